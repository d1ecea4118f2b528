"""The I/O APIC (82093AA-style, version 0x20 with the EOI register) at 0xFEC00000.

Theory of operation
-------------------
The guest reaches the registers indirectly: it writes a register index to IOREGSEL (offset 0x00)
and reads or writes the 32-bit register through IOWIN (offset 0x10). Index 0 is the ID (bits
27:24), 1 the version (0x20, the highest redirection entry in bits 23:16), 2 the arbitration ID
(the ID, as KVM shows it), and 0x10 + 2n / 0x11 + 2n the low and high halves of pin n's 64-bit
redirection entry: vector, delivery mode, destination mode, delivery status (always idle here),
polarity, remote IRR (read-only), trigger mode, mask, and the destination in bits 63:56.

Each pin has an electrical level set with :meth:`IoApic.set_irq`; an active-low entry inverts it.
An edge-triggered entry sends one message on each rising edge of the (inverted) input; an edge
while the entry is masked is lost, as the datasheet says. A level-triggered entry with fixed or
lowest-priority delivery sends a message while its input is asserted and its remote IRR is
clear, and sets remote IRR; the local APIC's EOI of that vector (:meth:`IoApic.eoi`, or a guest
write of the vector to the EOI register at offset 0x40) clears it and, if the input is still
asserted, sends again. Unmasking an asserted level entry sends at once. Rewriting an entry as
edge-triggered clears its remote IRR (Linux relies on this to unstick an entry).

Messages are :class:`IoApicMessage` values handed to ``deliver`` outside the lock; the machine
routes them to local APICs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

IOREGSEL = 0x00
IOWIN = 0x10
IOAPIC_EOI = 0x40

REG_ID = 0x00
REG_VERSION = 0x01
REG_ARBITRATION = 0x02
REG_REDIRECTION = 0x10
IOAPIC_VERSION = 0x20

# redirection entry bits
RTE_VECTOR = 0xFF
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_ACTIVE_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_WRITABLE = 0xFF | 0x700 | RTE_DEST_LOGICAL | RTE_ACTIVE_LOW | RTE_LEVEL | RTE_MASKED
RTE_WRITABLE_HIGH = 0xFF000000  # destination, bits 63:56

DELIVERY_FIXED, DELIVERY_LOWEST = 0, 1
_MODE_NAMES = {0: "fixed", 1: "lowest", 2: "SMI", 4: "NMI", 5: "INIT", 7: "ExtINT"}


@dataclass(frozen=True)
class IoApicMessage:
    """One interrupt message from the I/O APIC to the local APIC(s) it names."""

    dest: int
    dest_logical: bool
    delivery_mode: int
    vector: int
    level_triggered: bool


class IoApic:
    """An I/O APIC with ``pins`` inputs that sends its messages to ``deliver``."""

    def __init__(
        self, deliver: Callable[[IoApicMessage], None], *, apic_id: int = 0, pins: int = 24
    ) -> None:
        if not 1 <= pins <= 240:
            raise ValueError(f"bad I/O APIC pin count {pins}")
        self._deliver = deliver
        self.pins = pins
        self._initial_id = apic_id & 0xF
        self._lock = threading.Lock()
        self._levels = [False] * pins
        self.reset()

    def reset(self) -> None:
        """Power-on state: every entry masked and zero, IOREGSEL 0; pin levels are kept."""
        with self._lock:
            self._id = self._initial_id
            self._select = 0
            self._entries = [RTE_MASKED] * self.pins

    def redirection(self, pin: int) -> int:
        """Pin ``pin``'s 64-bit redirection entry as the guest would read it."""
        with self._lock:
            return self._entries[pin]

    # --- MMIO -----------------------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        """A guest load: IOREGSEL, IOWIN (narrower reads give the bytes of the window)."""
        with self._lock:
            if offset < 4:
                return (self._select >> (8 * offset)) & ((1 << (8 * size)) - 1)
            if IOWIN <= offset < IOWIN + 4:
                value = self._read_register(self._select)
                return (value >> (8 * (offset - IOWIN))) & ((1 << (8 * size)) - 1)
            return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """A guest store: IOREGSEL, IOWIN (32-bit only) or the EOI register."""
        out: list[IoApicMessage] = []
        with self._lock:
            if offset == IOREGSEL:
                self._select = value & 0xFF
            elif offset == IOWIN and size == 4:
                self._write_register(self._select, value & 0xFFFFFFFF, out)
            elif offset == IOAPIC_EOI:
                self._eoi(value & 0xFF, out)
        self._send(out)

    def _read_register(self, index: int) -> int:
        if index == REG_ID:
            return self._id << 24
        if index == REG_VERSION:
            return IOAPIC_VERSION | ((self.pins - 1) << 16)
        if index == REG_ARBITRATION:
            return self._id << 24
        pin, high = divmod(index - REG_REDIRECTION, 2)
        if index >= REG_REDIRECTION and pin < self.pins:
            return (self._entries[pin] >> (32 * high)) & 0xFFFFFFFF
        return 0

    def _write_register(self, index: int, value: int, out: list[IoApicMessage]) -> None:
        if index == REG_ID:
            self._id = (value >> 24) & 0xF
            return
        pin, high = divmod(index - REG_REDIRECTION, 2)
        if index < REG_REDIRECTION or pin >= self.pins:
            return  # version, arbitration and unknown indexes are read-only
        entry = self._entries[pin]
        if high:
            entry = (entry & 0xFFFFFFFF) | ((value & RTE_WRITABLE_HIGH) << 32)
        else:
            entry = (entry & ~0xFFFFFFFF) | (value & RTE_WRITABLE) | (entry & RTE_REMOTE_IRR)
            if not entry & RTE_LEVEL:
                entry &= ~RTE_REMOTE_IRR
        self._entries[pin] = entry
        self._service(pin, False, out)

    # --- inputs ---------------------------------------------------------------------------------

    def set_irq(self, pin: int, level: bool) -> None:
        """Pin ``pin`` goes to electrical ``level`` (any thread)."""
        out: list[IoApicMessage] = []
        with self._lock:
            if not 0 <= pin < self.pins:
                return
            was = self._asserted(pin)
            self._levels[pin] = level
            now = self._asserted(pin)
            if now != was:
                self._service(pin, now, out)
        self._send(out)

    def eoi(self, vector: int) -> None:
        """A local APIC's EOI of level-triggered ``vector``: clear remote IRR, resend if due."""
        out: list[IoApicMessage] = []
        with self._lock:
            self._eoi(vector & 0xFF, out)
        self._send(out)

    def _eoi(self, vector: int, out: list[IoApicMessage]) -> None:
        for pin, entry in enumerate(self._entries):
            if entry & RTE_REMOTE_IRR and entry & RTE_VECTOR == vector:
                self._entries[pin] = entry & ~RTE_REMOTE_IRR
                self._service(pin, False, out)

    def _asserted(self, pin: int) -> bool:
        return self._levels[pin] != bool(self._entries[pin] & RTE_ACTIVE_LOW)

    def _service(self, pin: int, rising: bool, out: list[IoApicMessage]) -> None:
        """Send pin ``pin``'s message if it is due (``rising``: its input just asserted)."""
        entry = self._entries[pin]
        if entry & RTE_MASKED:
            return
        mode = (entry >> 8) & 7
        level = bool(entry & RTE_LEVEL) and mode in (DELIVERY_FIXED, DELIVERY_LOWEST)
        if level:
            if not self._asserted(pin) or entry & RTE_REMOTE_IRR:
                return
            self._entries[pin] = entry | RTE_REMOTE_IRR
        elif not rising:
            return
        out.append(
            IoApicMessage(
                dest=entry >> 56,
                dest_logical=bool(entry & RTE_DEST_LOGICAL),
                delivery_mode=mode,
                vector=entry & RTE_VECTOR,
                level_triggered=level,
            )
        )

    def _send(self, out: list[IoApicMessage]) -> None:
        for message in out:
            self._deliver(message)

    def describe(self) -> str:
        """The ID and every pin that is unmasked, asserted or waiting for an EOI."""
        with self._lock:
            lines = [f"I/O APIC id {self._id}, {self.pins} pins, IOREGSEL {self._select:#04x}"]
            for pin, entry in enumerate(self._entries):
                if entry & RTE_MASKED and not self._levels[pin] and not entry & RTE_REMOTE_IRR:
                    continue
                mode = (entry >> 8) & 7
                flags = [
                    "level" if entry & RTE_LEVEL else "edge",
                    "active-low" if entry & RTE_ACTIVE_LOW else "active-high",
                    _MODE_NAMES.get(mode, f"mode {mode}"),
                    f"{'logical' if entry & RTE_DEST_LOGICAL else 'physical'} {entry >> 56:#x}",
                ]
                flags += ["masked"] * bool(entry & RTE_MASKED)
                flags += ["remote-IRR"] * bool(entry & RTE_REMOTE_IRR)
                flags += ["asserted"] * self._asserted(pin)
                lines.append(f"  pin {pin:2}: vector {entry & RTE_VECTOR:#04x} " + " ".join(flags))
            return "\n".join(lines)
