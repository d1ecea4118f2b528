"""Which device sits where on the ``gdbstub run`` PC: the port and MMIO map, and the IRQ wiring."""

from __future__ import annotations

from collections.abc import Callable

from .bus import PortBus
from .devices.debugport import DEBUG_EXIT_PORT, DEBUGCON_PORT, DebugCon, DebugExit
from .devices.uart import COM1_BASE, Uart16550

Sink = Callable[[bytes], None]


def standard_bus(
    serial_sink: Sink,
    *,
    debugcon_sink: Sink | None = None,
    on_exit: Callable[[int], None] | None = None,
) -> tuple[PortBus, Uart16550]:
    """A bus with COM1 at 0x3f8, isa-debug-exit at 0xf4 (4 ports) and debugcon at 0xe9.

    ``debugcon_sink`` defaults to ``serial_sink``.  Returns the bus and the UART (for
    ``feed_input``).
    """
    bus = PortBus()
    uart = Uart16550(serial_sink)
    bus.register(COM1_BASE, 8, uart)
    bus.register(DEBUG_EXIT_PORT, 4, DebugExit(on_exit))
    bus.register(DEBUGCON_PORT, 1, DebugCon(debugcon_sink or serial_sink))
    return bus, uart
