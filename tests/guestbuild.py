"""Build the test guests in ``tests/guests`` (NASM + GNU ld) into ``tests/_build``.

``build(name)`` returns the path of a built guest, rebuilding only when a source (the ``.asm``,
``common.inc`` or the linker script) is newer than the output.  Names:

* kernels, ELF files: ``pvh_kernel``, ``mode_switch``, ``elf64_kernel`` (ELF64) and
  ``mb_kernel`` (ELF32 with a Multiboot a.out-kludge header); ``mb_kernel.bin`` is the same
  Multiboot kernel as a flat binary (objcopy -O binary), which only the kludge can describe.
  All carry DWARF line info (nasm -g -F dwarf) so gdb can step through the sources.
* flat programs for the hv API tests: every ``hv_*.asm`` (they set their own ``bits`` and
  ``org``; see each file's header), built with ``nasm -f bin`` to ``<name>.bin``.

``assemble_flat(source, bits=16, org=0x1000)`` assembles inline NASM source to bytes (cached by
content hash), and ``flat(name)`` returns a built ``hv_*`` program's bytes.  Outputs are written
to a temporary name and renamed, so parallel test runs never see half-written files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
GUESTS_DIR = TESTS_DIR / "guests"
BUILD_DIR = TESTS_DIR / "_build"

HV_ORG = 0x1000  # where the hv_* flat programs expect to be loaded

# A part is one nasm run over the kernel's source: (symbol to -D, with DWARF line info).
Part = tuple[str | None, bool]
WHOLE: tuple[Part, ...] = ((None, True),)
# kernel name -> (nasm object format, linker script, ld emulation, parts)
KERNELS: dict[str, tuple[str, str, str, tuple[Part, ...]]] = {
    # two objects: NASM's DWARF can only describe one contiguous address range per object
    "pvh_kernel": ("elf64", "higher_half.ld", "elf_x86_64",
                   (("BOOT_PART", False), ("MAIN_PART", True))),
    "mode_switch": ("elf64", "low.ld", "elf_x86_64", WHOLE),
    "elf64_kernel": ("elf64", "elf64.ld", "elf_x86_64", WHOLE),
    "mb_kernel": ("elf32", "multiboot.ld", "elf_i386", WHOLE),
    "pc_kernel": ("elf32", "pvh32.ld", "elf_i386", WHOLE),
    "mb_pc_kernel": ("elf32", "multiboot.ld", "elf_i386", WHOLE),
}  # fmt: skip


class GuestBuildError(RuntimeError):
    """nasm, ld or objcopy failed; the message carries their output."""


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")


def _fresh(out: Path, sources: list[Path]) -> bool:
    if not out.exists():
        return False
    built = out.stat().st_mtime
    return all(src.stat().st_mtime <= built for src in sources)


def _tmp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def build(name: str) -> Path:
    """Build guest ``name`` (see the module docstring) if needed; return the output path."""
    BUILD_DIR.mkdir(exist_ok=True)
    base, _, suffix = name.partition(".")
    common = GUESTS_DIR / "common.inc"
    if base.startswith("hv_"):
        src = GUESTS_DIR / f"{base}.asm"
        if not src.exists():
            raise GuestBuildError(f"no guest source {src}")
        out = BUILD_DIR / f"{base}.bin"
        if not _fresh(out, [src]):
            tmp = _tmp_name(out)
            _run(["nasm", "-f", "bin", "-I", f"{GUESTS_DIR}/", "-o", str(tmp), str(src)])
            tmp.replace(out)
        return out
    if base not in KERNELS:
        raise GuestBuildError(f"unknown guest {name!r}")
    fmt, script, emulation, parts = KERNELS[base]
    src = GUESTS_DIR / f"{base}.asm"
    ld_script = GUESTS_DIR / script
    sources = [src, common, ld_script]
    elf = BUILD_DIR / f"{base}.elf"
    if not _fresh(elf, sources):
        objs = [_tmp_name(BUILD_DIR / f"{base}.{i}.o") for i in range(len(parts))]
        tmp = _tmp_name(elf)
        try:
            for obj, (define, debug) in zip(objs, parts, strict=True):
                cmd = ["nasm", "-f", fmt, "-I", f"{GUESTS_DIR}/", "-o", str(obj), str(src)]
                if debug:
                    cmd[1:1] = ["-g", "-F", "dwarf"]
                if define:
                    cmd.insert(1, f"-D{define}")
                _run(cmd)
            _run(["ld", "-m", emulation, "-nostdlib", "-static", "-z", "max-page-size=0x1000",
                  "-z", "noexecstack", "--no-warn-rwx-segments", "-T", str(ld_script),
                  "-o", str(tmp), *map(str, objs)])  # fmt: skip
            tmp.replace(elf)
        finally:
            for obj in objs:
                obj.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    if suffix == "":
        return elf
    if suffix == "bin":
        out = BUILD_DIR / f"{base}.bin"
        if not _fresh(out, [elf]):
            tmp = _tmp_name(out)
            _run(["objcopy", "-O", "binary", str(elf), str(tmp)])
            tmp.replace(out)
        return out
    raise GuestBuildError(f"unknown guest output {name!r}")


def flat(name: str) -> bytes:
    """The bytes of flat program ``name`` (``hv_*``), built if needed."""
    return build(name).read_bytes()


def assemble_flat(source: str, bits: int = 16, org: int = HV_ORG) -> bytes:
    """Assemble NASM ``source`` as a flat binary in ``bits``-bit mode at ``org``."""
    if bits not in (16, 32, 64):
        raise ValueError("bits must be 16, 32 or 64")
    text = f'bits {bits}\norg {org:#x}\n%include "common.inc"\n{source}\n'
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    BUILD_DIR.mkdir(exist_ok=True)
    out = BUILD_DIR / "flat" / f"{digest}.bin"
    if out.exists():
        return out.read_bytes()
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmpdir:
        src = Path(tmpdir) / "snippet.asm"
        src.write_text(text)
        tmp = Path(tmpdir) / "snippet.bin"
        _run(["nasm", "-f", "bin", "-I", f"{GUESTS_DIR}/", "-o", str(tmp), str(src)])
        tmp.replace(out)
    return out.read_bytes()
