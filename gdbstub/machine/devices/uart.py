"""COM1-style 16550A UART (one device of the ``gdbstub run`` machine; no VM calls).

Transmission is instantaneous: THR bytes go straight to the ``sink`` callable, so LSR always
shows THRE|TEMT.  Received bytes come from :meth:`Uart16550.feed_input` (any thread) into an
unbounded FIFO; LSR.DR is set while it is non-empty and RBR pops it.  Loopback (MCR bit 4) sends
THR bytes to the receive FIFO and reflects MCR into MSR, which is what Linux's 8250 probe checks.
:meth:`Uart16550.irq_pending` tells what the interrupt line carries, and IIR reports it.
Wider accesses are split into byte accesses on consecutive ports, as on ISA.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

Sink = Callable[[bytes], None]

COM1_BASE = 0x3F8

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

    def __init__(
        self, sink: Sink, base: int = COM1_BASE, irq: Callable[[bool], None] | None = None
    ) -> None:
        self.base = base
        self.sink = sink
        self.irq = irq
        self._line = False
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
        self._update_irq()

    @property
    def rx_pending(self) -> int:
        """Bytes waiting in the receive FIFO."""
        with self._lock:
            return len(self._rx)

    def irq_pending(self) -> bool:
        """Whether the UART raises its interrupt line (an IIR condition and MCR.OUT2)."""
        with self._lock:
            return self._iir_locked() != IIR_NONE and bool(self.mcr & MCR_OUT2)

    def _update_irq(self) -> None:
        """Drive the interrupt line from the IIR state (outside the lock)."""
        if self.irq is None:
            return
        level = self.irq_pending()
        if level != self._line:
            self._line = level
            self.irq(level)

    def describe(self) -> str:
        """IER/IIR/LCR/MCR and the receive FIFO, for ``monitor info irq``."""
        with self._lock:
            return (
                f"uart {self.base:#x}: ier={self.ier:#04x} iir={self._iir_locked():#04x} "
                f"lcr={self.lcr:#04x} mcr={self.mcr:#04x} rx={len(self._rx)} "
                f"irq={'high' if self._line else 'low'}"
            )

    def read(self, port: int, size: int) -> int:
        """``in`` from one of the UART's ports (wider accesses read consecutive ports)."""
        value = 0
        for i in range(size):
            value |= self._read8(port - self.base + i) << (8 * i)
        self._update_irq()
        return value

    def write(self, port: int, size: int, value: int) -> None:
        """``out`` to one of the UART's ports (wider accesses write consecutive ports)."""
        for i in range(size):
            self._write8(port - self.base + i, (value >> (8 * i)) & 0xFF)
        self._update_irq()

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
