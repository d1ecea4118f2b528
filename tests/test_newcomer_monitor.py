"""Monitor commands as a newcomer types them: status that tells the truth, the breakpoints gdb
inserted, useful errors, and addresses written as gdb users write them."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gdbdrive import ROOT, backends, session
from guestbuild import build

from gdbstub import hv
from gdbstub.hvtarget import HvTarget
from gdbstub.machine.loader import symbols
from gdbstub.machine.machine import Machine
from gdbstub.monitor import run_monitor_command
from gdbstub.target import ResumeAction

BACKENDS = backends()


@pytest.fixture(scope="module")
def hello() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)
    return ROOT / "examples" / "build" / "hello.elf"


@pytest.fixture(params=[b for b in BACKENDS if b in ("kvm", "emu")])
def in_process(request: pytest.FixtureRequest) -> Iterator[str]:
    hv._reset_for_tests()
    hv.select_backend(str(request.param))
    try:
        yield str(request.param)
    finally:
        hv._reset_for_tests()


def _status_line(target: HvTarget) -> str:
    lines = run_monitor_command(target, "status").splitlines()
    assert lines[0] == f"backend {hv.backend_name()}"
    return lines[1]


def test_status_says_stopped_running_and_halted(in_process: str, hello: Path) -> None:
    syms = symbols(hello)
    machine = Machine(hello, memory_size=64 << 20)
    target = HvTarget(machine, 1, symbols=syms)
    machine.symbols = syms
    try:
        line = _status_line(target)
        assert line.startswith("vCPU 0: stopped by a step or at start-up")
        assert f"rip {syms['start32']:#x} <start32>" in line
        target.insert_breakpoint(0, syms["fib"], 1)
        target.resume({}, ResumeAction("c"))
        assert target.wait_stop(60) is not None
        assert _status_line(target).startswith("vCPU 0: stopped at a breakpoint, at rip")
        assert "<fib>" in _status_line(target)
        target.remove_breakpoint(0, syms["fib"], 1)
        target.resume({}, ResumeAction("c"))
        assert _status_line(target) == "vCPU 0: running"  # the idle loop counts ticks
        target.interrupt()
        assert target.wait_stop(60) is not None
        assert _status_line(target).startswith("vCPU 0: stopped by Ctrl-C, at rip")
    finally:
        target.close()
        machine.close()


def test_status_says_halted_in_hlt(in_process: str) -> None:
    kernel = build("pvh_kernel")
    syms = symbols(kernel)
    machine = Machine(kernel, memory_size=64 << 20)
    target = HvTarget(machine, 1, symbols=syms)
    try:
        target.insert_breakpoint(1, syms["main64"], 1)
        target.resume({}, ResumeAction("c"))
        assert target.wait_stop(60) is not None
        target.remove_breakpoint(1, syms["main64"], 1)
        target.write_memory(1, syms["mode"], (4).to_bytes(8, "little"))  # cli; hlt
        line = ""
        for _ in range(20):  # the Ctrl-C may land before the hlt: run on until it waits there
            target.resume({}, ResumeAction("c"))
            time.sleep(0.2)
            target.interrupt()
            assert target.wait_stop(60) is not None
            line = _status_line(target)
            if "halted" in line:
                break
        assert line.startswith("vCPU 0: halted with interrupts disabled (waiting for an")
    finally:
        target.close()
        machine.close()


@pytest.mark.gdb
@pytest.mark.parametrize("backend", BACKENDS)
def test_monitor_commands_through_gdb(hello: Path, backend: str, tmp_path: Path) -> None:
    with session(hello, backend, tmp_path) as (_stub, gdb):
        assert "Breakpoint 1 at" in gdb.cmd("break fib")
        assert "Hardware assisted breakpoint 2" in gdb.cmd("hbreak puts")
        assert "atchpoint 3" in gdb.cmd("watch *(long*)&ticks")
        assert "Breakpoint 2, puts" in gdb.cmd("continue")
        pc = gdb.value("$pc")
        status = gdb.cmd("monitor status")
        assert f"vCPU 0: stopped at a hardware breakpoint, at rip {pc:#x} <puts>" in status
        assert "running" not in status

        report = gdb.cmd("monitor info breakpoints")  # gdb took them out at the stop
        fib, ticks = gdb.value("&fib"), gdb.value("&ticks")
        assert re.search(rf"^breakpoint +{fib:#x} .*; hits 0$", report, re.M), report
        assert re.search(rf"^hw breakpoint +{pc:#x} .*debug register DR\d.*; hits 1$", report, re.M)
        assert re.search(rf"^watchpoint +{ticks:#x} len 8 ", report, re.M), report

        nope = gdb.cmd("monitor vmcs NOPE")
        assert "unknown VMCS field 'NOPE'" in nope and "GUEST_RIP" in nope
        assert "GUEST_RIP" in gdb.cmd("monitor vmcs guest_rpi").split("?")[0]
        assert re.search(rf"VMCS_GUEST_RIP +{pc:#x}$", gdb.cmd("monitor vmcs guest_rip"), re.M)

        first = gdb.cmd("monitor disas $pc 1").splitlines()
        assert len(first) == 1 and first[0].startswith(f"{pc:#018x}: 66baf803 ")
        four = gdb.cmd("monitor disas rip+16 4").splitlines()
        assert len(four) == 4 and four[0].startswith(f"{pc + 16:#018x}:"), four
        spaced = gdb.cmd("monitor disas $pc + 16 4").splitlines()
        assert spaced == four
        assert gdb.cmd(f"monitor disas {pc + 16:#x} 0x4").splitlines() == four
        assert (
            gdb.cmd(f"monitor disas {pc + 8} 4").splitlines()
            == gdb.cmd(f"monitor disas ({pc} + 020) / 2 * 2 - 8 4").splitlines()
        )  # decimal, octal, * / ( )
        walk = gdb.cmd("monitor translate &ticks")
        assert walk.startswith(f"{ticks:#x} (4-level paging") and f"-> physical {ticks:#x}" in walk
        assert "nosuch: not a register or a symbol" in gdb.cmd("monitor disas nosuch")
