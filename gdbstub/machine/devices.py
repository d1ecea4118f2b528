"""Port-I/O devices of the ``gdbstub run`` machine, as pure classes (no VM calls).

Theory of operation
===================

Every device has ``read(port, size) -> int`` and ``write(port, size, value) -> None`` where
``port`` is the absolute I/O port and ``size`` is 1, 2 or 4 bytes.  A :class:`PortBus` maps each
port of a registered range to its device (a dict lookup per access) and answers ports nobody
owns the way an empty ISA bus does: reads give all ones of the access size, writes vanish, and
each unknown port is logged once.

* :class:`Uart16550` -- COM1-style 16550A.  Transmission is instantaneous: THR bytes go straight
  to the ``sink`` callable, so LSR always shows THRE|TEMT.  Received bytes come from
  :meth:`Uart16550.feed_input` (any thread) into an unbounded FIFO; LSR.DR is set while it is
  non-empty and RBR pops it.  Loopback (MCR bit 4) sends THR bytes to the receive FIFO and
  reflects MCR into MSR, which is what Linux's 8250 probe checks.  There is no interrupt line
  yet; :meth:`Uart16550.irq_pending` tells what a PIC would see, and IIR reports it.
  Wider accesses are split into byte accesses on consecutive ports, as on ISA.
* :class:`DebugExit` -- QEMU's ``isa-debug-exit``: a write of ``v`` ends the VM with exit
  status ``(v << 1) | 1`` (the process exit code is that value & 0xff).  It calls ``on_exit``
  if one is given, else raises :class:`GuestExit` out of ``write`` for the VMM to catch.
* :class:`DebugCon` -- the Bochs/QEMU 0xE9 port: writes go to a sink, reads return 0xE9 (the
  value kernels probe for).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

Sink = Callable[[bytes], None]

COM1_BASE = 0x3F8
DEBUG_EXIT_PORT = 0xF4
DEBUGCON_PORT = 0xE9


def size_mask(size: int) -> int:
    """All ones for an access of ``size`` bytes (1, 2 or 4)."""
    if size not in (1, 2, 4):
        raise ValueError(f"bad I/O access size {size}")
    return (1 << (8 * size)) - 1


class PortDevice(Protocol):
    """What a :class:`PortBus` dispatches to."""

    def read(self, port: int, size: int) -> int:
        """Value of an ``in`` of ``size`` bytes from ``port``."""
        ...

    def write(self, port: int, size: int, value: int) -> None:
        """An ``out`` of ``size`` bytes of ``value`` to ``port``."""
        ...


class GuestExit(Exception):
    """The guest asked to end the VM; ``status`` is the exit status (QEMU's convention)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"guest exit with status {status:#x}")
        self.status = status


class PortBus:
    """Dispatch port I/O to devices by port range."""

    def __init__(self) -> None:
        self._ports: dict[int, PortDevice] = {}
        self._unknown_logged: set[int] = set()

    def register(self, first: int, count: int, device: PortDevice) -> None:
        """Give ports ``first`` .. ``first + count - 1`` to ``device`` (ValueError on overlap)."""
        if count <= 0 or first < 0 or first + count > 0x10000:
            raise ValueError(f"bad port range {first:#x}+{count}")
        taken = [p for p in range(first, first + count) if p in self._ports]
        if taken:
            raise ValueError(f"port {taken[0]:#x} is already registered")
        for p in range(first, first + count):
            self._ports[p] = device

    def device_at(self, port: int) -> PortDevice | None:
        """The device owning ``port``, or None."""
        return self._ports.get(port)

    def read(self, port: int, size: int) -> int:
        """``in``: the owning device's value, or all ones for an unknown port."""
        mask = size_mask(size)
        dev = self._ports.get(port)
        if dev is None:
            self._log_unknown(port, size, "read")
            return mask
        return dev.read(port, size) & mask

    def write(self, port: int, size: int, value: int) -> None:
        """``out``: hand to the owning device; ignored (and logged once) for an unknown port."""
        mask = size_mask(size)
        dev = self._ports.get(port)
        if dev is None:
            self._log_unknown(port, size, "write", value & mask)
            return
        dev.write(port, size, value & mask)

    def _log_unknown(self, port: int, size: int, what: str, value: int | None = None) -> None:
        if port in self._unknown_logged:
            return
        self._unknown_logged.add(port)
        extra = "" if value is None else f" value {value:#x}"
        log.info("unhandled I/O port %#x: %d-byte %s%s (logged once)", port, size, what, extra)


# ------------------------------------------------------------------------------------- 16550 UART

# register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
IER_RDA, IER_THRE = 0x01, 0x02
IIR_NONE, IIR_THRE, IIR_RDA = 0x01, 0x02, 0x04
IIR_FIFO = 0xC0
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02


class Uart16550:
    """A 16550A UART at ``base`` (8 ports) that transmits to ``sink``."""

    def __init__(self, sink: Sink, base: int = COM1_BASE) -> None:
        self.base = base
        self.sink = sink
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.divisor = 12  # 9600 baud until the guest programs it
        self._thre_pending = False  # THR-empty interrupt condition (cleared by reading IIR)

    def feed_input(self, data: bytes) -> None:
        """Queue bytes for the guest to receive (safe from any thread)."""
        with self._lock:
            self._rx.extend(data)

    @property
    def rx_pending(self) -> int:
        """Bytes waiting in the receive FIFO."""
        with self._lock:
            return len(self._rx)

    def irq_pending(self) -> bool:
        """Whether the UART would be raising its interrupt line (for a future PIC)."""
        with self._lock:
            return self._iir_locked() != IIR_NONE and bool(self.mcr & MCR_OUT2)

    def read(self, port: int, size: int) -> int:
        """``in`` from one of the UART's ports (wider accesses read consecutive ports)."""
        value = 0
        for i in range(size):
            value |= self._read8(port - self.base + i) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        """``out`` to one of the UART's ports (wider accesses write consecutive ports)."""
        for i in range(size):
            self._write8(port - self.base + i, (value >> (8 * i)) & 0xFF)

    # -- byte registers
    def _iir_locked(self) -> int:
        if self.ier & IER_RDA and self._rx:
            return IIR_RDA
        if self.ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _read8(self, reg: int) -> int:
        with self._lock:
            dlab = bool(self.lcr & LCR_DLAB)
            if reg == RBR_THR_DLL:
                if dlab:
                    return self.divisor & 0xFF
                return self._rx.popleft() if self._rx else 0
            if reg == IER_DLM:
                return (self.divisor >> 8) & 0xFF if dlab else self.ier
            if reg == IIR_FCR:
                iir = self._iir_locked()
                if iir == IIR_THRE:
                    self._thre_pending = False
                return iir | (IIR_FIFO if self.fcr & FCR_ENABLE else 0)
            if reg == LCR:
                return self.lcr
            if reg == MCR:
                return self.mcr
            if reg == LSR:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
            if reg == MSR:
                if self.mcr & MCR_LOOP:
                    m = self.mcr
                    return (
                        (MSR_CTS if m & MCR_RTS else 0)
                        | (MSR_DSR if m & MCR_DTR else 0)
                        | (MSR_RI if m & MCR_OUT1 else 0)
                        | (MSR_DCD if m & MCR_OUT2 else 0)
                    )
                return MSR_DCD | MSR_DSR | MSR_CTS
            if reg == SCR:
                return self.scr
        return 0xFF  # not one of our 8 ports

    def _write8(self, reg: int, value: int) -> None:
        out: int | None = None
        with self._lock:
            dlab = bool(self.lcr & LCR_DLAB)
            if reg == RBR_THR_DLL:
                if dlab:
                    self.divisor = (self.divisor & 0xFF00) | value
                elif self.mcr & MCR_LOOP:
                    self._rx.append(value)
                    self._thre_pending = True
                else:
                    out = value
                    self._thre_pending = True
            elif reg == IER_DLM:
                if dlab:
                    self.divisor = (self.divisor & 0x00FF) | (value << 8)
                else:
                    if value & IER_THRE and not self.ier & IER_THRE:
                        self._thre_pending = True  # THR is empty the moment it is enabled
                    self.ier = value & 0x0F
            elif reg == IIR_FCR:
                self.fcr = value & 0xC9
                if value & FCR_CLEAR_RX:
                    self._rx.clear()
            elif reg == LCR:
                self.lcr = value
            elif reg == MCR:
                self.mcr = value & 0x1F
            elif reg == SCR:
                self.scr = value
        if out is not None:  # call the sink outside the lock
            self.sink(bytes((out,)))


# ------------------------------------------------------------------------ debug exit / debugcon


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
