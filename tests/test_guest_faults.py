"""Issue 13, guest faults: a guest that breaks itself never takes the stub with it.

Each case of ``tests/guests/guest_faults.asm`` (an exception storm that never ends, a guest
unmapping its own code, wiping its page tables, filling its IDT with garbage, an IDT whose
handler cannot be reached, ``hlt`` and an endless loop with interrupts off) runs under
``gdbstub run`` on kvm and on emu, through a real gdb: the stub stays responsive, Ctrl-C stops
a guest that loops, gdb sees a meaningful stop (SIGINT, or SIGSEGV for a triple fault) and reads
registers and memory, ``monitor status`` says why, and SIGINT/SIGTERM to the stub with the guest
in that state end the process with 130/143, never with a crash in a native library.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from gdbdrive import PROMPT, Gdb, Stub, session
from guestbuild import GUESTS_DIR, assemble_flat

from gdbstub import hv

pytestmark = pytest.mark.gdb

BACKENDS = [b for b in hv.available_backends() if b in ("kvm", "emu")]
COUNTER = 0x80000
READY = 0x80004
LOAD = 0x100000
CRASH_WORDS = ("Traceback", "Fatal Python error", "Segmentation fault", "core dumped")


@dataclass(frozen=True)
class Case:
    """One way for the guest to break itself (``CASE`` in the guest's source)."""

    number: int
    kind: str  # "storm" (counter grows), "triple" (SIGSEGV stop), "halt", "spin"
    status: str  # what ``monitor status`` says after the stop


CASES = {
    "gp-storm": Case(1, "storm", "stopped by Ctrl-C"),
    "unmapped-own-code": Case(2, "storm", "stopped by Ctrl-C"),
    "wiped-page-tables": Case(3, "triple", "triple fault"),
    "garbage-idt": Case(4, "triple", "triple fault"),
    "unreachable-handler": Case(5, "triple", "triple fault"),
    "hlt-interrupts-off": Case(6, "halt", "halted with interrupts disabled"),
    "loop-interrupts-off": Case(7, "spin", "stopped by Ctrl-C"),
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def guest(case: Case, tmp: Path) -> Path:
    """The guest of ``case``, assembled (a Multiboot a.out-kludge image at 1 MiB)."""
    source = (GUESTS_DIR / "guest_faults.asm").read_text()
    path = tmp / f"guest_faults_{case.number}.bin"
    path.write_bytes(assemble_flat(f"%define CASE {case.number}\n{source}", bits=32, org=LOAD))
    return path


def word(gdb: Gdb, address: int) -> int:
    """The 32-bit word gdb reads at ``address``."""
    return gdb.value(f"*(unsigned int*){address:#x}")


def run_into(gdb: Gdb, case: Case, seconds: float = 0.8) -> str:
    """``continue`` into the case; Ctrl-C after ``seconds`` unless the guest stops by itself."""
    gdb.child.sendline("continue")
    gdb.child.expect("Continuing")
    if case.kind == "triple":
        gdb.child.expect(PROMPT, timeout=60)
        return str(gdb.child.before)
    time.sleep(seconds)
    assert gdb.child.isalive()
    return gdb.interrupt()


def threads(pid: int) -> dict[int, tuple[str, int]]:
    """The threads of ``pid``: tid -> (name, CPU ticks used)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        out[int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return out


def signal_thread(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to one thread of another process (tgkill): where the kernel delivers a
    process-directed signal is its choice, any thread that does not block it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, signum) != 0:  # SYS_tgkill on x86-64
        raise OSError(ctypes.get_errno(), "tgkill")


def assert_clean_exit(stub: Stub, signum: int) -> None:
    status = stub.wait_exit(30)
    log = stub.log.read_text(errors="replace")
    assert status == 128 + signum, (status, log)
    assert not any(w in log for w in CRASH_WORDS), log


@pytest.mark.parametrize("name", list(CASES))
def test_a_guest_that_breaks_itself(name: str, backend: str, tmp_path: Path) -> None:
    case = CASES[name]
    signum = signal.SIGTERM if case.number % 2 else signal.SIGINT
    with session(guest(case, tmp_path), backend, tmp_path, "--memory", "16M") as (stub, gdb):
        out = run_into(gdb, case)
        assert ("SIGSEGV" if case.kind == "triple" else "SIGINT") in out, out
        status = gdb.cmd("monitor status")
        assert case.status in status, status
        rip = gdb.value("$rip")
        assert gdb.cmd("x/4bx $pc")  # the stub answers memory reads at the stop
        assert "eflags" in gdb.cmd("info registers eflags")
        if case.kind == "triple":
            assert LOAD <= rip < LOAD + 0x3000 or rip < 0x100, hex(rip)
        else:
            assert word(gdb, READY) == 1  # the guest got through its set-up
            assert LOAD <= rip < LOAD + 0x3000, hex(rip)
        if case.kind in ("storm", "spin"):
            first = word(gdb, COUNTER)
            assert first > 10, first  # the storm (or the loop) really ran
            assert "SIGINT" in run_into(gdb, case, 0.4)  # and stops again
            assert word(gdb, COUNTER) > first
        if case.kind == "halt":
            assert gdb.cmd("x/2bx $pc - 1").split(":")[1].split()[0] == "0xf4"  # after hlt
        pid = stub.proc.pid
        if case.kind == "triple":  # the stub stays there: signal with the guest stopped
            signal_thread(pid, pid, signum)
            assert_clean_exit(stub, signum)
            gdb.child.sendline("monitor status")  # gdb at its prompt finds the port closed
            gdb.child.expect(["Remote connection closed", "Remote communication error"])
        else:  # signal while the guest is in its state and gdb waits for it
            gdb.child.sendline("continue")
            gdb.child.expect("Continuing")
            time.sleep(0.5)
            signal_thread(pid, pid, signum)  # a vCPU thread: test_a_signal_on_a_vcpu_thread
            gdb.child.expect(f"terminated with signal {signal.Signals(signum).name}")
        assert_clean_exit(stub, signum)


@pytest.mark.parametrize("name", list(CASES))
def test_signals_without_a_debugger(name: str, backend: str, tmp_path: Path) -> None:
    """No gdb: the guest runs into its state at once (a triple fault resets the machine over
    and over); the other signal than the gdb test's, taken by the main thread, ends the
    process cleanly."""
    case = CASES[name]
    signum = signal.SIGINT if case.number % 2 else signal.SIGTERM
    stub = Stub(guest(case, tmp_path), backend, "--memory", "16M", wait=False, tmp=tmp_path)
    try:
        time.sleep(1.0)
        assert stub.proc.poll() is None, stub.log.read_text()
        signal_thread(stub.proc.pid, stub.proc.pid, signum)
        assert_clean_exit(stub, signum)
        if case.kind == "triple":
            assert "triple fault" in stub.log.read_text()
    finally:
        stub.stop()


def test_a_signal_on_a_vcpu_thread(backend: str, tmp_path: Path) -> None:
    case = CASES["loop-interrupts-off"]
    stub = Stub(guest(case, tmp_path), backend, "--memory", "16M", wait=False, tmp=tmp_path)
    try:
        time.sleep(1.0)
        pid = stub.proc.pid
        busiest = max(
            (tid for tid, (name, _) in threads(pid).items() if tid != pid and name == "python"),
            key=lambda tid: threads(pid)[tid][1],
        )  # the vCPU thread, spinning
        signal_thread(pid, busiest, signal.SIGTERM)
        try:
            status = stub.wait_exit(10)
        except subprocess.TimeoutExpired:
            status = None
        assert status == 128 + signal.SIGTERM, "the stub did not end"
    finally:
        stub.stop()


def test_a_reset_loop_does_not_flood_the_log(backend: str, tmp_path: Path) -> None:
    case = CASES["garbage-idt"]
    stub = Stub(guest(case, tmp_path), backend, "--memory", "16M", wait=False, tmp=tmp_path)
    try:
        time.sleep(3.0)
        resets = stub.log.read_text().count("the guest reset")
        assert resets >= 1
        assert resets <= 5, f"{resets} lines in 3 s"
    finally:
        stub.stop()
