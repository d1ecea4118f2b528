"""System control port A (port 0x92): fast A20 gate and fast reset (no VM calls).

Theory of operation
-------------------
Bit 1 is the fast A20 gate; it reads back as written and starts at 1 (A20 on, as a firmware that
enabled it leaves the machine).  Bit 0 is the fast reset: a 0 -> 1 transition resets the machine
(``on_reset()`` is called, else :class:`GuestReset` raised) and the reset clears the bit again.
The other bits are kept and read back.  Only the low byte of a wider access is the register.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..bus import GuestReset, size_mask

FAST_RESET = 0x01
FAST_A20 = 0x02


class Port92:
    """PS/2 system control port A at 0x92."""

    def __init__(self, *, a20: bool = True, on_reset: Callable[[], None] | None = None) -> None:
        self.on_reset = on_reset
        self._lock = threading.Lock()
        self.value = FAST_A20 if a20 else 0
        self.resets = 0

    @property
    def a20(self) -> bool:
        """Whether the fast A20 gate is on."""
        return bool(self.value & FAST_A20)

    def read(self, port: int, size: int) -> int:
        """``in``: the register in the low byte, all ones above."""
        with self._lock:
            return (size_mask(size) & ~0xFF) | self.value

    def write(self, port: int, size: int, value: int) -> None:
        """``out``: set A20 and the other bits; a rising bit 0 resets the machine."""
        value &= 0xFF
        with self._lock:
            reset = bool(value & FAST_RESET and not self.value & FAST_RESET)
            self.value = value & ~FAST_RESET if reset else value
            if reset:
                self.resets += 1
        if reset:
            if self.on_reset is not None:
                self.on_reset()
            else:
                raise GuestReset("port 0x92")

    def describe(self) -> str:
        """One line of state."""
        with self._lock:
            return (
                f"port 0x92: {self.value:#04x} (fast A20 {'on' if self.a20 else 'off'}), "
                f"resets {self.resets}"
            )
