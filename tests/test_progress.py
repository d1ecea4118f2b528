"""Progress lines for slow steps (gdbstub/progress.py): silent when quick, two lines when slow."""

from __future__ import annotations

import io
import time

from gdbstub.progress import Progress


def test_a_quick_step_prints_nothing() -> None:
    out = io.StringIO()
    with Progress("loading k (1 MB)", after=0.5, stream=out):
        pass
    time.sleep(0.6)
    assert out.getvalue() == ""


def test_a_slow_step_says_what_it_does_and_how_long_it_took() -> None:
    out = io.StringIO()
    with Progress("loading vmlinux (650 MB)", after=0.05, stream=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "gdbstub: loading vmlinux (650 MB)..."
    assert lines[1].startswith("gdbstub: loading vmlinux (650 MB): done in ")
    assert len(lines) == 2
