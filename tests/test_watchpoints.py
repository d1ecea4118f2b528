"""watch / rwatch / awatch through real gdb, on every backend: right address, old and new
values, every access, trap-after.

The guest is tests/guests/watch_kernel.asm: a qword alone in its page (``lone``), a qword in
the page of the code that accesses it (``nearv``), and bytes read and written by string
instructions (``sbyte``, ``dbyte``, next to that code). Each case breaks at a block, sets one
watchpoint, then every ``continue`` must stop just after the next access to the watched data
(``after_*`` labels; inside a ``rep movsb`` at the repeated instruction or just after it), with
the value gdb shows, until the guest exits.

tests/guests/watch_rep_kernel.asm has REP string instructions reading watched data
(``rep movsb``, ``repe cmpsb`` and ``repne scasb`` ending on ZF, ``rep movsb`` with address
size 32): a stop after each iteration that read it, with the count register as hardware
leaves it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from gdbdrive import Gdb, backends, session
from guestbuild import GUESTS_DIR

pytestmark = pytest.mark.gdb

SHIM_MMIO = (
    "hvf-shim forwards to KVM, which decodes and retires MMIO accesses itself; the framework "
    "reports them undecoded at the instruction, which the shim cannot model"
)

# One expected stop: (labels where RIP may be, "Value" for a read, or (old, new) for a write).
Hit = tuple[tuple[str, ...], int | tuple[int, int]]


def _lone(var: str, base: int) -> dict[str, list[Hit]]:
    """The accesses of the lone/near blocks (write, two reads in a loop, inc)."""
    write = (("after_" + var + "_write",), (0, base))
    read = (("after_" + var + "_read",), base)
    inc_read = (("after_" + var + "_inc",), base + 1)
    inc = (("after_" + var + "_inc",), (base, base + 1))
    return {
        "watch": [write, inc],
        "rwatch": [read, read, inc_read],
        "awatch": [write, read, read, inc],
    }


LONE, NEAR = _lone("lone", 0x11), _lone("near", 0x21)
SBYTE_READS: list[Hit] = [(("after_lodsb",), 0x5A), (("after_movsb",), 0x5A)]
REP_READ: list[Hit] = [(("rep_read", "after_rep_read"), 0x5A)]
DBYTE_WRITES: list[Hit] = [
    (("after_stosb",), (0, 0x61)),
    (("after_movsb",), (0x61, 0x5A)),
    (("rep_write", "after_rep_movsb"), (0x5A, 0x33)),
]

CASES: dict[str, tuple[str, str, list[Hit]]] = {
    # name: (gdb command, where to set it, every stop expected until the guest exits)
    "watch-lone": ("watch *(long*)&lone", "lone_block", LONE["watch"]),
    "rwatch-lone": ("rwatch *(long*)&lone", "after_lone_write", LONE["rwatch"]),
    "awatch-lone": ("awatch *(long*)&lone", "lone_block", LONE["awatch"]),
    "watch-near-code": ("watch *(long*)&nearv", "near_block", NEAR["watch"]),
    "rwatch-near-code": ("rwatch *(long*)&nearv", "after_near_write", NEAR["rwatch"]),
    "awatch-near-code": ("awatch *(long*)&nearv", "near_block", NEAR["awatch"]),
    "rwatch-lodsb-movsb": ("rwatch *(char*)&sbyte", "string_block", SBYTE_READS + REP_READ),
    "awatch-lodsb-movsb": ("awatch *(char*)&sbyte", "string_block", SBYTE_READS + REP_READ),
    "watch-stosb-movsb": ("watch *(char*)&dbyte", "string_block", DBYTE_WRITES),
    "awatch-stosb-movsb": ("awatch *(char*)&dbyte", "string_block", DBYTE_WRITES),
    # the same reads, set where only the rep movsb is left (so the cases above show the rest)
    "rwatch-rep-movsb": ("rwatch *(char*)&sbyte", "after_rep_movsb", REP_READ),
}


def _params() -> list[object]:
    params: list[object] = []
    for backend in backends():
        for name in CASES:
            marks: list[pytest.MarkDecorator] = []
            if backend == "hvf-shim":
                marks.append(pytest.mark.skip(reason=SHIM_MMIO))
            params.append(pytest.param(backend, name, marks=marks, id=f"{backend}-{name}"))
    return params


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"


def _build(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """tests/guests/NAME.asm, built as the plain ELF64 kernels are (elf64.ld)."""
    out = tmp_path_factory.mktemp(name)
    obj, elf = out / f"{name}.o", out / f"{name}.elf"
    src = GUESTS_DIR / f"{name}.asm"
    _run(["nasm", "-f", "elf64", "-I", f"{GUESTS_DIR}/", "-o", str(obj), str(src)])
    _run(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-z", "max-page-size=0x1000",
          "-z", "noexecstack", "--no-warn-rwx-segments", "-T", str(GUESTS_DIR / "elf64.ld"),
          "-o", str(elf), str(obj)])  # fmt: skip
    return elf


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """watch_kernel.asm."""
    return _build(tmp_path_factory, "watch_kernel")


@pytest.fixture(scope="module")
def rep_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """watch_rep_kernel.asm."""
    return _build(tmp_path_factory, "watch_rep_kernel")


def _check_stop(gdb: Gdb, out: str, number: int, hit: Hit, step: int) -> None:
    labels, expected = hit
    where = f"stop {step}: {out}"
    assert re.search(rf"atchpoint {number}: ", out), where
    if isinstance(expected, tuple):
        old, new = expected
        assert re.search(rf"Old value = {old}\b", out), where
        assert re.search(rf"New value = {new}\b", out), where
    else:
        assert re.search(rf"\bValue = {expected}\b", out), where
        assert "Old value" not in out, where
    rip = gdb.value("$rip")
    places = {gdb.value(f"&{label}"): label for label in labels}
    assert rip in places, f"{where}\nrip {rip:#x} not at {labels}"


@pytest.mark.parametrize("backend, case", _params())
def test_watchpoint_reports_every_access(
    kernel: Path, backend: str, case: str, tmp_path: Path
) -> None:
    command, start, hits = CASES[case]
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        assert "Breakpoint 1" in gdb.cmd(f"break *{start}")
        out = gdb.cmd("continue")
        assert "Breakpoint 1," in out, out
        gdb.cmd("delete")
        out = gdb.cmd(command)
        match = re.search(r"atchpoint (\d+): ", out)
        assert match, out
        for step, hit in enumerate(hits):
            _check_stop(gdb, gdb.cmd("continue", timeout=30), int(match.group(1)), hit, step)
        out = gdb.cmd("continue", timeout=30)
        assert "exited with code 041" in out, f"after the last access: {out}"


def _qword(text: bytes) -> int:
    return int.from_bytes(text, "little", signed=True)


# One expected stop inside a REP string instruction: (labels where RIP may be, the value gdb
# shows, the count register left); hardware's data breakpoint after an iteration: RIP at the
# instruction and the count decremented, after it once ZF ended it; after the last iteration
# RIP is after it, or at it with a count of 0 (the same state: the CPU goes on with a REP of
# no iterations).
RepStop = tuple[tuple[str, ...], int, int]
LOW = "0x7fffffff"  # mask of the identity-mapped alias of a kernel address

REP_CASES: dict[str, tuple[str, str, str, list[RepStop]]] = {
    # name: (gdb command, where to set it, count register, every stop until the guest exits)
    "rwatch-rep-movsb-each-byte": (
        "rwatch *(int*)&rbuf",
        "movs_block",
        "$rcx",
        [(("rep_movs",), 0x24232221, n) for n in (4, 3, 2, 1)],
    ),
    "rwatch-repe-cmpsb-ends-on-zf": (
        "rwatch *(long*)&left",
        "cmps_block",
        "$rcx",
        [*[(("rep_cmps",), _qword(b"abcXwxyz"), n) for n in (7, 6, 5)],
         (("after_rep_cmps",), _qword(b"abcXwxyz"), 4)],
    ),
    "awatch-repne-scasb-ends-on-zf": (
        "awatch *(long*)&sbuf",
        "scas_block",
        "$rcx",
        [*[(("rep_scas",), _qword(b"xy\0zzzzz"), n) for n in (7, 6)],
         (("after_rep_scas",), _qword(b"xy\0zzzzz"), 5)],
    ),
    "rwatch-a32-rep-movsb-counts-ecx": (
        f"rwatch *(short*)((long)&abuf & {LOW})",
        "a32_block",
        "$ecx",
        [(("rep_a32",), 0x4241, 1), (("rep_a32", "after_rep_a32"), 0x4241, 0)],
    ),
}  # fmt: skip


def _rep_params() -> list[object]:
    return [
        pytest.param(backend, name, id=f"{backend}-{name}")
        for backend in backends()
        if backend != "hvf-shim"  # (SHIM_MMIO)
        for name in REP_CASES
    ]


@pytest.mark.parametrize("backend, case", _rep_params())
def test_rep_string_watchpoint_stops_after_each_iteration(
    rep_kernel: Path, backend: str, case: str, tmp_path: Path
) -> None:
    """A read or access watchpoint on data a REP string instruction reads stops after each
    iteration that touched it, as hardware does: RIP at the instruction with the count
    decremented, after it at the last iteration; a REPE/REPNE CMPS/SCAS ends on ZF and reads
    nothing more; with address size 32 the count is ECX alone."""
    command, start, count, stops = REP_CASES[case]
    with session(rep_kernel, backend, tmp_path) as (_stub, gdb):
        assert "Breakpoint 1" in gdb.cmd(f"break *{start}")
        out = gdb.cmd("continue")
        assert "Breakpoint 1," in out, out
        gdb.cmd("delete")
        out = gdb.cmd(command)
        match = re.search(r"atchpoint (\d+): ", out)
        assert match, out
        for step, (labels, value, left) in enumerate(stops):
            out = gdb.cmd("continue", timeout=30)
            where = f"stop {step}: {out}"
            assert re.search(rf"atchpoint {match.group(1)}: ", out), where
            assert re.search(rf"\bValue = {value}\b", out), where
            rip = gdb.value("$rip")
            assert rip in {gdb.value(f"&{label}") for label in labels}, f"{where}\nrip {rip:#x}"
            assert gdb.value(count) == left, f"{where}\n{count} = {gdb.value(count)}, not {left}"
        out = gdb.cmd("continue", timeout=30)
        assert "exited with code 041" in out, f"after the last access: {out}"
