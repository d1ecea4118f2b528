"""How a reset is told on stderr: every one while they are rare, a count while they repeat.

A guest that triple-faults in a loop with no debugger attached resets the machine dozens of
times a second; one line each would bury everything else the terminal shows. The first
``BURST`` resets in a row are logged one line each, then one line says further ones are
counted, then a count every ``SUMMARY_SECONDS``. A machine that has not reset for
``QUIET_SECONDS`` starts a new row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

BURST = 3
SUMMARY_SECONDS = 10.0
QUIET_SECONDS = 10.0


class ResetLog:
    """Logs ``the guest reset (how)`` lines to ``log`` under the rule above."""

    def __init__(self, log: logging.Logger, now: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._now = now
        self._last = -QUIET_SECONDS - 1.0
        self._in_row = 0
        self._unlogged = 0
        self._summary_at = 0.0

    def reset(self, how: str) -> None:
        """The guest reset the machine (``how``: what did it) and it restarts."""
        now = self._now()
        if now - self._last > QUIET_SECONDS:
            self._in_row = 0
        self._last = now
        self._in_row += 1
        if self._in_row <= BURST:
            self._log.warning("gdbstub: the guest reset (%s); restarting the machine", how)
            if self._in_row == BURST:
                self._log.warning(
                    "gdbstub: it keeps resetting: further resets are counted, one line "
                    "every %.0f s",
                    SUMMARY_SECONDS,
                )
            self._summary_at, self._unlogged = now, 0
            return
        self._unlogged += 1
        if now - self._summary_at >= SUMMARY_SECONDS:
            self._log.warning(
                "gdbstub: %d more resets in %.0f s (the last: %s)",
                self._unlogged,
                now - self._summary_at,
                how,
            )
            self._summary_at, self._unlogged = now, 0
