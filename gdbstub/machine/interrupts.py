"""Interrupt routing of the PC: ISA lines to the 8259 pair and the I/O APIC, on to local APICs.

Theory of operation
-------------------
Wiring as in QEMU's ``pc`` machine, which Linux's ``check_timer()`` expects:

* every ISA IRQ line (0-15) goes to the 8259 pair *and* to the I/O APIC; IRQ 0 (the PIT) reaches
  I/O APIC pin 2, announced by the MADT's interrupt-source override, every other IRQ its own
  pin (IRQ 9, the SCI, is level-triggered active high, also announced by an override);
* the I/O APIC's messages go to the local APIC(s) they name (physical ID, logical flat mask,
  or broadcast), fixed, lowest-priority (to the first match), NMI or ExtINT;
* the 8259's INTR output reaches the CPU through LINT0 of the boot CPU's local APIC when that
  is in ExtINT mode (virtual wire) or when the APIC is disabled;
* a level-triggered EOI at a local APIC clears the I/O APIC's remote IRR.

``pending(index)`` and ``acknowledge(index)`` are what the VMM's injection step asks before an
entry: the highest vector the CPU would take now, and the INTA cycle once it is injected. When a
line changes from any thread, the vCPUs that may now have an interrupt are poked (``wake``), so
a halted vCPU wakes and a running one comes round to inject.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .devices.ioapic import IoApic, IoApicMessage
from .devices.lapic import LocalApic
from .devices.pic import DualPic
from .firmware.layout import GSI_PIT, IRQ_PIT

ExtInt = -1
"""``pending`` result: the 8259 has an interrupt whose vector the INTA cycle will tell."""

DELIVERY_FIXED, DELIVERY_LOWEST, DELIVERY_SMI, DELIVERY_NMI = 0, 1, 2, 4
DELIVERY_INIT, DELIVERY_EXTINT = 5, 7


def isa_to_gsi(irq: int) -> int:
    """The I/O APIC pin of ISA IRQ ``irq`` (the PIT's override: 0 -> 2)."""
    return GSI_PIT if irq == IRQ_PIT else irq


class InterruptRouter:
    """The PC's interrupt wiring (see the module docstring)."""

    def __init__(self, *, cpus: int = 1) -> None:
        self._wakers: dict[int, Callable[[], None]] = {}
        self.pic = DualPic(notify=self._wake_bsp)
        self.ioapic = IoApic(self._deliver, apic_id=cpus)  # the MADT's and MP table's id
        self.lapics: list[LocalApic] = []
        self._levels: dict[int, bool] = {}
        self._lock = threading.Lock()

    # --- wiring ---------------------------------------------------------------------------------

    def add_lapic(self, lapic: LocalApic) -> int:
        """Attach the local APIC of the next vCPU; returns its index."""
        self.lapics.append(lapic)
        return len(self.lapics) - 1

    def set_waker(self, index: int, wake: Callable[[], None]) -> None:
        """How to poke vCPU ``index`` when an interrupt becomes pending for it."""
        self._wakers[index] = wake

    def wake(self, index: int) -> None:
        """Poke vCPU ``index`` (any thread)."""
        waker = self._wakers.get(index)
        if waker is not None:
            waker()

    def _wake_bsp(self) -> None:
        self.wake(0)

    def line(self, irq: int) -> Callable[[bool], None]:
        """A device's interrupt output wired to ISA IRQ ``irq``."""

        def set_level(level: bool) -> None:
            self.set_isa_irq(irq, level)

        return set_level

    def set_isa_irq(self, irq: int, level: bool) -> None:
        """ISA IRQ ``irq`` goes to ``level`` (both controllers see it, as on a PC)."""
        with self._lock:
            self._levels[irq] = level
            self.pic.set_irq(irq, level)
            self.ioapic.set_irq(isa_to_gsi(irq), level)

    def lapic_eoi(self, vector: int) -> None:
        """A local APIC's EOI of a level-triggered ``vector``: the I/O APIC's remote IRR."""
        with self._lock:
            self.ioapic.eoi(vector)

    # --- delivery -------------------------------------------------------------------------------

    def _targets(self, message: IoApicMessage) -> list[int]:
        return [
            i
            for i, lapic in enumerate(self.lapics)
            if lapic.matches_destination(message.dest, message.dest_logical)
        ]

    def _deliver(self, message: IoApicMessage) -> None:
        targets = self._targets(message)
        if message.delivery_mode == DELIVERY_LOWEST:
            targets = targets[:1]
        for index in targets:
            lapic = self.lapics[index]
            if message.delivery_mode in (DELIVERY_FIXED, DELIVERY_LOWEST):
                lapic.accept(message.vector, message.level_triggered)
            elif message.delivery_mode == DELIVERY_NMI:
                lapic.deliver_nmi()
            elif message.delivery_mode == DELIVERY_EXTINT:
                pass  # the 8259's INTR is seen through LINT0 (pending() below)
            else:
                continue
            self.wake(index)

    # --- the CPU side ---------------------------------------------------------------------------

    def pending(self, index: int) -> int | None:
        """The vector vCPU ``index`` would take now (``ExtInt`` for the 8259), or None."""
        lapic = self.lapics[index]
        vector = lapic.pending_vector()
        if vector is not None:
            return vector
        if index == 0 and lapic.extint_enabled() and self.pic.int_output():
            return ExtInt
        return None

    def acknowledge(self, index: int, vector: int) -> int:
        """The CPU takes ``vector`` (from ``pending``); returns the vector to inject."""
        if vector == ExtInt:
            with self._lock:
                return self.pic.acknowledge()
        self.lapics[index].acknowledge(vector)
        return vector

    def describe(self) -> str:
        """State of every interrupt controller, for ``monitor info irq``."""
        parts = [self.pic.describe(), self.ioapic.describe()]
        parts += [f"local APIC {i}:\n{lapic.describe()}" for i, lapic in enumerate(self.lapics)]
        levels = " ".join(f"{irq}" for irq, up in sorted(self._levels.items()) if up)
        parts.append(f"ISA lines high: {levels or 'none'}")
        return "\n".join(parts)
