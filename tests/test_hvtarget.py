"""The debug target in-process, on paths the gdb tests do not reach on this machine."""

from __future__ import annotations

import pytest
from guestbuild import build

from gdbstub import hv
from gdbstub.hvtarget import HostDebugFeatures, HvTarget
from gdbstub.machine.loader import symbols
from gdbstub.machine.machine import Machine
from gdbstub.target import ResumeAction


@pytest.mark.skipif("emu" not in hv.available_backends(), reason="needs unicorn")
def test_page_watchpoint_steps_through_an_undecoded_access() -> None:
    """On the framework (and emu) exit 48 is not decoded: the target opens the page, lets the
    vCPU execute the write under the monitor trap flag, closes the page, and reports the
    watchpoint after the access - the mechanism a Mac uses where DR watchpoints cannot."""
    hv._reset_for_tests()
    hv.select_backend("emu")
    kernel = build("pvh_kernel")
    syms = symbols(kernel)
    machine = Machine(kernel, memory_size=64 << 20)
    target = HvTarget(machine, 1, probe=False)
    target.features = HostDebugFeatures(dr_data=False, avx=False)  # force protected pages
    machine.cpu_avx = False
    try:
        target.insert_breakpoint(1, syms["main64"], 1)
        target.resume({}, ResumeAction("c"))
        assert target.wait_stop(60) is not None
        target.remove_breakpoint(1, syms["main64"], 1)
        target.insert_breakpoint(2, syms["counter"], 8)
        assert "write-protected guest page" in target.breakpoint_report()
        for expected in (1, 2):
            target.resume({}, ResumeAction("c"))
            stop = target.wait_stop(60)
            assert stop is not None and stop.reason == "watch" and stop.address == syms["counter"]
            assert target.registers(1)["rip"] == syms["demo_loop"] + 7  # after the inc
            value = int.from_bytes(target.read_memory(1, syms["counter"], 8), "little")
            assert value == expected
        target.remove_breakpoint(2, syms["counter"], 8)
        target.resume({}, ResumeAction("c"))
        stop = target.wait_stop(60)
        assert stop is not None and stop.exit_status == 0x21  # the page is open again
    finally:
        target.close()
        machine.close()
        hv._reset_for_tests()
