"""The emu backend's run deadlines: one watchdog thread instead of unicorn's timeout thread.

Theory of operation
-------------------
``uc_emu_start`` with a timeout creates a thread and joins it on every call (about 180 us on
the machine this was measured on), and an entry with a deadline is the common case: the
machine runs its vCPU until the next device deadline. The backend therefore starts emulation
without a timeout and arms this watchdog instead: one daemon thread per backend, sleeping on a
condition variable until the earliest armed deadline, then calling ``emu_stop`` for the vCPU
whose entry is still running. An entry is identified by a generation number, so a deadline
left armed by an entry that already returned is ignored. ``emu_stop`` is lost when it lands
before ``emu_start`` has begun (unicorn clears its stop request there), so the watchdog
repeats it every ``RETRY_NS`` until the entry has ended, as ``hv_vcpu_interrupt`` does for
kicks. Arming costs a lock and, when the new deadline is the earliest, a notify.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable

RETRY_NS = 200_000


class Watchdog:
    """Calls ``stop(token)`` at armed deadlines until the token is disarmed."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int]] = []  # (deadline ns, entry generation)
        self._armed: dict[int, Callable[[int], None]] = {}  # generation -> stop
        self._next = 0
        self._thread: threading.Thread | None = None
        self._wake_at: int | None = None  # the deadline the thread sleeps for

    def arm(self, deadline_ns: int, stop: Callable[[int], None]) -> int:
        """Call ``stop(token)`` at ``deadline_ns`` (monotonic), and again every ``RETRY_NS``,
        until :meth:`disarm`; returns the token."""
        with self._cond:
            self._next += 1
            token = self._next
            self._armed[token] = stop
            heapq.heappush(self._heap, (deadline_ns, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="emu-watchdog", daemon=True)
                self._thread.start()
            elif self._wake_at is None or deadline_ns < self._wake_at:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        """The entry ended: its deadline no longer stops anything."""
        with self._cond:
            self._armed.pop(token, None)

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake_at = None
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                now = time.monotonic_ns()
                if now < deadline:
                    self._wake_at = deadline
                    self._cond.wait((deadline - now) / 1e9)
                    self._wake_at = None
                    continue
                heapq.heappop(self._heap)
                stop = self._armed[token]
                heapq.heappush(self._heap, (now + RETRY_NS, token))  # until disarmed
                self._cond.release()
                try:
                    stop(token)
                finally:
                    self._cond.acquire()
