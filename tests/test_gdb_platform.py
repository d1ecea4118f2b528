"""gdb on a guest with a running timer: steps skip interrupt handlers, breakpoints in them hit,
Ctrl-C stops a vCPU idling in ``hlt`` (tests/guests/pc_kernel.asm, command line ``idle``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gdbdrive import backends, session
from guestbuild import build

BACKENDS = [b for b in backends() if b != "hvf-shim"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def kernel() -> Path:
    return build("pc_kernel")


def _to_idle(gdb: object, kernel: Path) -> None:
    out = gdb.cmd("break idle")  # type: ignore[attr-defined]
    assert "Breakpoint 1" in out
    out = gdb.cmd("continue", timeout=60)  # type: ignore[attr-defined]
    assert "idle" in out
    gdb.cmd("delete")  # type: ignore[attr-defined]


def test_stepping_over_sti_hlt_does_not_enter_the_timer_handler(
    kernel: Path, backend: str, tmp_path: Path
) -> None:
    with session(kernel, backend, tmp_path, "--append", "idle") as (_stub, gdb):
        _to_idle(gdb, kernel)
        handler = gdb.value("&irq0_handler")
        idle = gdb.value("&idle")
        for _ in range(3):
            ticks = gdb.value("*(int *)&ticks")
            assert gdb.value("$pc") == idle
            gdb.cmd("stepi")  # sti
            gdb.cmd("stepi", timeout=30)  # hlt: ends once the timer interrupt is pending
            pc = gdb.value("$pc")
            assert pc == idle + 2, f"the step over hlt ended at {pc:#x} (handler {handler:#x})"
            assert gdb.value("*(int *)&ticks") == ticks, "the interrupt was not delivered yet"
            gdb.cmd("stepi")  # jmp idle
        assert "ENABLE=1,NOIRQ=2,NOTIMER=4" in gdb.cmd("maintenance packet qqemu.sstepbits")


def test_breakpoint_in_the_timer_handler_and_ctrl_c_while_idle(
    kernel: Path, backend: str, tmp_path: Path
) -> None:
    with session(kernel, backend, tmp_path, "--append", "idle") as (_stub, gdb):
        _to_idle(gdb, kernel)
        gdb.cmd("break irq0_handler")
        ticks = gdb.value("*(int *)&ticks")
        for expected in (ticks, ticks + 1, ticks + 2):
            out = gdb.cmd("continue", timeout=30)
            assert "irq0_handler" in out, out
            assert gdb.value("*(int *)&ticks") == expected  # each stop: one interrupt later
        gdb.cmd("delete")
        ticks = gdb.value("*(int *)&ticks")
        gdb.child.sendline("continue")
        gdb.child.expect("Continuing")
        time.sleep(1.0)
        out = gdb.interrupt()
        assert "SIGINT" in out, out
        pc = gdb.value("$pc")
        assert pc in (gdb.value("&idle"), gdb.value("&idle") + 2, gdb.value("&idle") + 1) or (
            gdb.value("&irq0_handler") <= pc < gdb.value("&lapic_handler")
        ), f"stopped at {pc:#x}"
        later = gdb.value("*(int *)&ticks")
        assert later > ticks + 20, "the PIT kept interrupting at ~100 Hz while the guest idled"
        info = gdb.cmd("monitor info irq")
        assert "IRR" in info or "irr" in info, info
        timers = gdb.cmd("monitor info timers")
        assert "virtual time" in timers


def test_a_long_stop_does_not_show_in_the_guest_tsc(
    kernel: Path, backend: str, tmp_path: Path
) -> None:
    """The debugger holds the guest for 2 s at tsc_mark; the guest's TSC moves on by far less
    than the half second of ticks it measured before (where the backend can set the TSC)."""
    with session(kernel, backend, tmp_path, "--append", "tsc ") as (stub, gdb):
        gdb.cmd("break tsc_mark")
        assert "tsc_mark" in gdb.cmd("continue", timeout=60)
        time.sleep(2.0)
        gdb.cmd("delete")
        gdb.cmd("continue", timeout=60)
        out = stub.serial_text()
    half = int(out.split("tsc half second: ")[1][:16], 16)
    across = int(out.split("tsc across the stop: ")[1][:16], 16)
    if backend == "kvm" and across > half:
        pytest.skip("this host's KVM (kvm_pvm) ignores guest TSC writes (docs/linux.md)")
    assert across < half // 4, (half, across)


def test_monitor_system_reset_and_quit(kernel: Path, backend: str, tmp_path: Path) -> None:
    """QEMU's ``system_reset``: the PC starts again (RAM reloaded, gdb's breakpoints planted
    again); ``quit`` ends the stub."""
    with session(kernel, backend, tmp_path, "--append", "idle") as (stub, gdb):
        _to_idle(gdb, kernel)
        gdb.cmd("break irq0_handler")
        assert "irq0_handler" in gdb.cmd("continue", timeout=60)
        assert "irq0_handler" in gdb.cmd("continue", timeout=60)
        assert gdb.value("*(int *)&ticks") == 1
        assert "was reset" in gdb.cmd("monitor system_reset")
        gdb.cmd("maintenance flush register-cache")  # gdb's cache, as after QEMU's system_reset
        assert gdb.value("$pc") == gdb.value("&pvh_entry")
        assert gdb.value("*(int *)&ticks") == 0  # RAM holds the image again
        out = gdb.cmd("continue", timeout=60)
        assert "irq0_handler" in out, out  # planted again after the reset
        assert gdb.value("*(int *)&ticks") == 0
        assert stub.serial_text().count("pc_kernel\n") == 2
        gdb.child.sendline("monitor quit")
        assert stub.wait_exit(30) == 0
