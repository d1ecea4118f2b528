"""gdbstub.machine.resetlog: every reset is told while they are rare, a count while they loop."""

from __future__ import annotations

import logging

import pytest

from gdbstub.machine.resetlog import BURST, QUIET_SECONDS, SUMMARY_SECONDS, ResetLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return out


def test_a_reset_loop_logs_a_few_lines_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    resets = ResetLog(logging.getLogger("t"), clock)
    for _ in range(BURST):
        resets.reset("triple fault")
        clock.t += 0.01
    first = lines(caplog)
    assert first[:BURST] == ["gdbstub: the guest reset (triple fault); restarting the machine"] * 3
    assert len(first) == BURST + 1 and "further resets are counted" in first[-1]
    for _ in range(999):  # 80 a second for about 12 s: the count covers 10 s of them, ends included
        resets.reset("triple fault")
        clock.t += 0.0125
    assert lines(caplog) == ["gdbstub: 801 more resets in 10 s (the last: triple fault)"]


def test_a_quiet_machine_tells_every_reset_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    resets = ResetLog(logging.getLogger("t"), clock)
    for how in ("0xcf9", "i8042", "acpi", "0xcf9", "i8042"):
        resets.reset(how)
        clock.t += QUIET_SECONDS + SUMMARY_SECONDS
    assert lines(caplog) == [
        f"gdbstub: the guest reset ({how}); restarting the machine"
        for how in ("0xcf9", "i8042", "acpi", "0xcf9", "i8042")
    ]
