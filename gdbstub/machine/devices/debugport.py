"""QEMU's isa-debug-exit (port 0xf4) and the Bochs/QEMU 0xE9 debug console (no VM calls).

* :class:`DebugExit` -- a write of ``v`` ends the VM with exit status ``(v << 1) | 1`` (the
  process exit code is that value & 0xff).  It calls ``on_exit`` if one is given, else raises
  :class:`GuestExit` out of ``write`` for the VMM to catch.
* :class:`DebugCon` -- writes go to a sink, reads return 0xE9 (the value kernels probe for).
"""

from __future__ import annotations

from collections.abc import Callable

from ..bus import GuestExit, size_mask

Sink = Callable[[bytes], None]

DEBUG_EXIT_PORT = 0xF4
DEBUGCON_PORT = 0xE9

class DebugExit:
    """QEMU ``isa-debug-exit``: writing ``v`` ends the VM with status ``(v << 1) | 1``."""

    def __init__(self, on_exit: Callable[[int], None] | None = None) -> None:
        self.on_exit = on_exit

    def read(self, port: int, size: int) -> int:
        """Reads are meaningless; all ones."""
        return size_mask(size)

    def write(self, port: int, size: int, value: int) -> None:
        """End the VM: call ``on_exit(status)`` or raise :class:`GuestExit`."""
        status = ((value & size_mask(size)) << 1) | 1
        if self.on_exit is not None:
            self.on_exit(status)
        else:
            raise GuestExit(status)


class DebugCon:
    """The 0xE9 debug console: bytes written go to ``sink``; reads return 0xE9."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def read(self, port: int, size: int) -> int:
        """The Bochs/QEMU detection value 0xE9 (low byte; higher bytes all ones)."""
        return (size_mask(size) & ~0xFF) | 0xE9

    def write(self, port: int, size: int, value: int) -> None:
        """Send the low byte to the sink."""
        self.sink(bytes((value & 0xFF,)))
