"""gdbstub.kallsyms: a stripped kernel's symbols from its own kallsyms table.

Two independent checks: tables written here the way Linux's ``scripts/kallsyms.c`` lays them
out (both name-length encodings, with and without ``kallsyms_seqs_of_names``, in random
bytes), and Debian's real kernel, whose exported symbols (``__ksymtab``, a second table the
kernel keeps for modules) must have the same addresses as the kallsyms table gives them.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from debian_kernel import cached_debian_kernel
from elftools.elf.elffile import ELFFile
from gdbdrive import ROOT

from gdbstub import kallsyms
from gdbstub.machine.boot.payload import vmlinux_of_bzimage
from gdbstub.machine.loader import symbols

BASE = 0xFFFFFFFF81000000


def _align(out: bytearray) -> None:
    out.extend(b"\0" * (-len(out) % 8))


def _tokens(texts: list[bytes]) -> list[bytes]:
    """Every byte the names use stands for itself; the free numbers get pairs and words."""
    used = sorted({b for text in texts for b in text})
    table: list[bytes | None] = [bytes([b]) if b in used else None for b in range(256)]
    extras = [b"__", b"sys_", b"x64_", b"func_", b"_t", b"er"]
    extras += [bytes([a, b]) for a in used for b in used]
    free = iter(i for i in range(256) if table[i] is None)
    for word in extras:
        slot = next(free, None)
        if slot is None:
            break
        if word not in table:
            table[slot] = word
    return [token or b"?" for token in table]


def _encode(text: bytes, tokens: list[bytes]) -> bytes:
    out, pos = bytearray(), 0
    by_length = sorted(range(256), key=lambda i: -len(tokens[i]))
    while pos < len(text):
        index = next(i for i in by_length if text.startswith(tokens[i], pos))
        out.append(index)
        pos += len(tokens[index])
    return bytes(out)


def build_image(
    syms: list[kallsyms.KernelSymbol], *, wide: bool, seqs: bool, seed: int = 1
) -> bytes:
    """A blob of random bytes with a kallsyms table for ``syms`` inside it."""
    rng = random.Random(seed)
    texts = [(s.kind + s.name).encode() for s in syms]
    tokens = _tokens(texts)
    out = bytearray(rng.randbytes(4099))
    _align(out)
    for s in syms:
        offset = s.address if s.kind == "A" else BASE - 1 - s.address
        out += struct.pack("<i", offset)
    _align(out)
    out += struct.pack("<Q", BASE)
    out += struct.pack("<I", len(syms))
    _align(out)
    names_at, markers = len(out), []
    for i, text in enumerate(texts):
        if i % 256 == 0:
            markers.append(len(out) - names_at)
        code = _encode(text, tokens)
        if wide and len(code) > 0x7F:
            out += bytes([0x80 | len(code) & 0x7F, len(code) >> 7])
        else:
            assert len(code) <= (0x3FFF if wide else 0xFF)
            out.append(len(code))
        out += code
    _align(out)
    out += struct.pack(f"<{len(markers)}I", *markers)
    _align(out)
    if seqs:
        out += rng.randbytes(3 * len(syms))
        _align(out)
    offsets, pos = [], 0
    for token in tokens:
        offsets.append(pos)
        out += token + b"\0"
        pos += len(token) + 1
    _align(out)
    out += struct.pack("<256H", *offsets)
    out += rng.randbytes(777)
    return bytes(out)


def _symbols(count: int, long_name: bool) -> list[kallsyms.KernelSymbol]:
    rng = random.Random(count)
    syms = [kallsyms.KernelSymbol(0, "A", "fixed_percpu_data")]
    address = BASE
    for i in range(count):
        address += rng.randrange(1, 4096)
        kind = rng.choice("TtDdBbRr")
        syms.append(kallsyms.KernelSymbol(address, kind, f"func_{i}_{rng.randrange(10**6)}"))
    syms.append(kallsyms.KernelSymbol(address + 16, "T", "__x64_sys_uname"))
    if long_name:
        syms.append(kallsyms.KernelSymbol(address + 32, "t", "rust_" + "q" * 300))
    return syms


@pytest.mark.parametrize("wide", [False, True], ids=["one-byte-lengths", "uleb128-lengths"])
@pytest.mark.parametrize("seqs", [False, True], ids=["5.x-layout", "with-seqs-of-names"])
def test_a_written_table_reads_back_whole(wide: bool, seqs: bool) -> None:
    syms = _symbols(3000, long_name=wide)
    image = build_image(syms, wide=wide, seqs=seqs)
    assert kallsyms.kernel_symbols(image) == syms


def test_symbol_map_leaves_out_absolute_symbols_and_prefers_globals() -> None:
    syms = _symbols(1500, long_name=False)
    syms += [
        kallsyms.KernelSymbol(BASE + 0x10, "t", "dup"),
        kallsyms.KernelSymbol(BASE + 0x20, "T", "dup"),
        kallsyms.KernelSymbol(BASE + 0x30, "t", "dup"),
    ]
    mapping = kallsyms.symbol_map(build_image(syms, wide=True, seqs=True))
    assert "fixed_percpu_data" not in mapping
    assert mapping["dup"] == BASE + 0x20
    assert mapping["__x64_sys_uname"] == syms[-4].address


def test_no_table_means_no_symbols() -> None:
    noise = random.Random(5).randbytes(1 << 20)
    digits_only = noise + kallsyms.DIGITS_RUN * 3 + noise  # the digit run alone is not enough
    assert kallsyms.kernel_symbols(noise) == []
    assert kallsyms.kernel_symbols(digits_only) == []


def test_a_damaged_table_is_not_misread() -> None:
    """8 bytes cut out of the names (alignment kept): the markers no longer fit, no symbols."""
    syms = _symbols(2000, long_name=False)
    image = build_image(syms, wide=True, seqs=True)
    names_at = image.index(struct.pack("<QI", BASE, len(syms))) + 16
    cut = names_at + 5000
    assert kallsyms.kernel_symbols(image[:cut] + image[cut + 8 :]) == []


# --- Debian's kernel ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_vmlinux() -> bytes:
    bzimage = cached_debian_kernel()
    if bzimage is None:
        pytest.skip("Debian's linux-image-amd64 could not be fetched (apt-get download)")
    return vmlinux_of_bzimage(bzimage.read_bytes())


def _exported(vmlinux: bytes) -> dict[str, int]:
    """``__ksymtab`` + ``__ksymtab_gpl``: {int value_offset, name_offset, namespace_offset}
    entries, each offset relative to its own field (CONFIG_HAVE_ARCH_PREL32_RELOCATIONS)."""
    import io

    elf = ELFFile(io.BytesIO(vmlinux))
    strings = elf.get_section_by_name("__ksymtab_strings")
    out = {}
    for name in ("__ksymtab", "__ksymtab_gpl"):
        section = elf.get_section_by_name(name)
        data, base = section.data(), section["sh_addr"]
        for at in range(0, len(data), 12):
            value, name_off = struct.unpack_from("<ii", data, at)
            name_addr = base + at + 4 + name_off
            start = name_addr - strings["sh_addr"]
            text = strings.data()[start : strings.data().index(b"\0", start)].decode()
            out[text] = (base + at + value) & (1 << 64) - 1
    return out


def test_debian_kernels_table_agrees_with_its_exported_symbols(debian_vmlinux: bytes) -> None:
    found = kallsyms.kernel_symbols(debian_vmlinux)
    assert len(found) > 50_000
    by_name = {s.name: s.address for s in found if s.kind.isupper()}
    exported = _exported(debian_vmlinux)
    assert len(exported) > 10_000
    wrong = {n: hex(a) for n, a in exported.items() if by_name.get(n) != a}
    assert not wrong, list(wrong.items())[:5]
    assert by_name["_text"] == BASE


def test_gdbstub_reads_symbols_of_a_bzimage_and_of_its_vmlinux(
    debian_vmlinux: bytes, tmp_path: Path
) -> None:
    bzimage = cached_debian_kernel()
    assert bzimage is not None
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(debian_vmlinux)
    from_bzimage, from_vmlinux = symbols(bzimage), symbols(vmlinux)
    assert from_bzimage == from_vmlinux
    assert from_bzimage["start_kernel"] > from_bzimage["_text"] == BASE


def test_the_command_prints_a_system_map(tmp_path: Path) -> None:
    bzimage = cached_debian_kernel()
    if bzimage is None:
        pytest.skip("Debian's linux-image-amd64 could not be fetched (apt-get download)")
    run = [sys.executable, "-m", "gdbstub.kallsyms"]
    out = subprocess.run([*run, str(bzimage)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    assert "ffffffff81000000 T _text\n" in out.stdout
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + bytes(5000))
    out = subprocess.run([*run, str(junk)], capture_output=True, text=True, cwd=ROOT)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.strip() == f"gdbstub.kallsyms: {junk}: no kallsyms table found"
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("usage:")
