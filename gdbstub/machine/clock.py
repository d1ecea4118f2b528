"""Virtual time for the machine's devices: one clock that stops while the VM is stopped.

Theory of operation
-------------------
Every device that counts time (PIT, RTC, local APIC timer, ACPI PM timer) reads ``now_ns()``,
the nanoseconds of *virtual* time since power-on. The source is pluggable: ``MonotonicSource``
is the host's monotonic clock minus the time the VM spent stopped in the debugger (so an hour
at a breakpoint is no time at all for the guest: no storm of timer ticks, no RCU stall); a later
source may count instructions for deterministic runs. ``pause()``/``resume()`` are called by
the debug target when every vCPU stops and before they run again.

Deadlines: a device that wants to be polled at a virtual time ``t`` says so through
``next_deadline_ns()``; the machine turns the earliest of them into a host-monotonic deadline
with ``host_ns(t)`` for ``hv_vcpu_run_until`` or for a halted vCPU's wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


class TimeSource(Protocol):
    """Where virtual time comes from."""

    def now_ns(self) -> int:
        """Virtual nanoseconds since the source started (frozen while paused)."""
        ...

    def pause(self) -> None:
        """Stop the flow of time (idempotent)."""
        ...

    def resume(self) -> None:
        """Let time flow again (idempotent)."""
        ...

    def host_ns(self, virtual_ns: int) -> int:
        """The host monotonic time at which virtual time reaches ``virtual_ns`` if it runs."""
        ...


class MonotonicSource:
    """Host monotonic time minus the time spent paused."""

    def __init__(self, host_clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._host = host_clock
        self._lock = threading.Lock()
        self._origin = host_clock()  # host time that corresponds to virtual 0
        self._paused_at: int | None = None

    def now_ns(self) -> int:
        """Virtual time: host time since the origin, minus paused stretches."""
        with self._lock:
            host = self._paused_at if self._paused_at is not None else self._host()
            return host - self._origin

    def pause(self) -> None:
        """Freeze virtual time at its current value."""
        with self._lock:
            if self._paused_at is None:
                self._paused_at = self._host()

    def resume(self) -> None:
        """Move the origin forward by the paused stretch and let time flow."""
        with self._lock:
            if self._paused_at is not None:
                self._origin += self._host() - self._paused_at
                self._paused_at = None

    def host_ns(self, virtual_ns: int) -> int:
        """Host monotonic ns at which virtual time will read ``virtual_ns``."""
        with self._lock:
            return virtual_ns + self._origin

    @property
    def paused(self) -> bool:
        """Whether time is frozen."""
        return self._paused_at is not None


class Clock:
    """The machine's one clock (a thin face over a :class:`TimeSource`)."""

    def __init__(self, source: TimeSource | None = None) -> None:
        self.source: TimeSource = source or MonotonicSource()

    def now_ns(self) -> int:
        """Virtual nanoseconds since power-on."""
        return self.source.now_ns()

    def pause(self) -> None:
        """The VM stopped (debugger): virtual time stops."""
        self.source.pause()

    def resume(self) -> None:
        """The VM runs again."""
        self.source.resume()

    def host_ns(self, virtual_ns: int) -> int:
        """Host monotonic time of the virtual instant ``virtual_ns``."""
        return self.source.host_ns(virtual_ns)
