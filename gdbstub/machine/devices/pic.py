"""The PC's two cascaded 8259A interrupt controllers and the PIIX edge/level control register.

Theory of operation
-------------------
Each :class:`I8259` chip has eight request inputs.  An input sets its bit in the IRR either on a
rising edge (edge mode, the latch survives the line dropping) or while the line is high (level
mode, chosen per IRQ by the ELCR at ports 0x4D0/0x4D1; bits 0, 1, 2 of the master and 0, 5 of the
slave are wired to edge, as on PIIX, and read back as 0).  The IMR masks requests; the ISR holds
the interrupts being serviced.  A chip raises its INT output when the highest-priority unmasked
request outranks the highest-priority in-service interrupt.  Priorities rotate: ``priority_add``
is the IRQ with the highest priority (0 until a rotate or set-priority command).

The slave's INT drives the master's IR2 input (an edge input), and the master's INT is the
CPU's INTR line, read with :meth:`DualPic.int_output`.  :meth:`DualPic.acknowledge` is the INTA
cycle: the master picks its best request, moves it from IRR to ISR (unless auto-EOI) and gives
its vector; when that request is IR2 the slave does the same and gives the vector instead.  A
request that vanished between INTR and INTA (a level line dropped, a mask written) gives the
spurious IRQ 7 of that chip with no ISR bit set; for a spurious slave IRQ 15 the master still
sets ISR bit 2, as real hardware does, which is why Linux sends the master an EOI for it.

The command port (even) takes ICW1 (bit 4), OCW3 (bit 3) or OCW2; the data port (odd) takes
ICW2-ICW4 while an initialisation sequence is running and OCW1 (the IMR) otherwise.  Reads of
the command port give the IRR or the ISR as selected by OCW3, the data port gives the IMR, and
after an OCW3 poll command the next read of either port is an acknowledge in disguise
(``0x80 | irq``, or 0 when nothing is pending).  The state after power-on is QEMU's: not
initialised, vector base 0, nothing masked, IRR shown on the command port.

Everything is behind one lock: devices may raise lines from any thread.  ``notify`` is called
(outside the lock) whenever INTR goes from low to high, so a halted vCPU can be woken.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from gdbstub.machine.firmware.layout import ELCR, PIC_MASTER, PIC_SLAVE

CASCADE_IRQ = 2  # master input the slave's INT is wired to
SPURIOUS_IRQ = 7
MASTER_ELCR_MASK = 0xF8  # IRQ 0, 1, 2 are always edge-triggered (PIIX)
SLAVE_ELCR_MASK = 0xDE  # IRQ 8 and 13 are always edge-triggered (PIIX)

# command port: ICW1 / OCW3 / OCW2
ICW1 = 0x10
ICW1_IC4 = 0x01  # ICW4 follows
ICW1_SNGL = 0x02  # single chip: no ICW3
OCW3 = 0x08
OCW3_RIS = 0x01  # read ISR (with RR) instead of IRR
OCW3_RR = 0x02  # RIS is valid
OCW3_POLL = 0x04
OCW3_SMM = 0x20  # special mask mode on (with ESMM)
OCW3_ESMM = 0x40  # SMM is valid
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10  # special fully nested mode

# OCW2 commands (bits 7..5)
OCW2_ROTATE_AEOI_CLEAR = 0
OCW2_EOI = 1
OCW2_NOP = 2
OCW2_SPECIFIC_EOI = 3
OCW2_ROTATE_AEOI_SET = 4
OCW2_ROTATE_EOI = 5
OCW2_SET_PRIORITY = 6
OCW2_ROTATE_SPECIFIC_EOI = 7

# what the data port expects next
READY, EXPECT_ICW2, EXPECT_ICW3, EXPECT_ICW4 = range(4)
_EXPECT_NAMES = {EXPECT_ICW2: "ICW2", EXPECT_ICW3: "ICW3", EXPECT_ICW4: "ICW4"}

Notify = Callable[[], None]


class I8259:
    """One 8259A chip; :class:`DualPic` owns two of them, the lock and the cascade wiring."""

    def __init__(self, master: bool) -> None:
        self.master = master
        self.elcr_mask = MASTER_ELCR_MASK if master else SLAVE_ELCR_MASK
        self.elcr = 0  # 1 = level-triggered
        self.lines = 0  # current level of the eight request inputs
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.base = 0  # vector of IR0 (ICW2 & 0xF8)
        self.priority_add = 0  # the IRQ with the highest priority
        self.expect = READY
        self.icw3 = 0
        self.need_icw4 = False
        self.single = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.fully_nested = False  # special fully nested mode
        self.special_mask = False
        self.read_isr = False
        self.poll = False

    def power_on(self) -> None:
        """Hardware reset: the ICW1 state, and the ELCR back to all edge."""
        self.elcr = 0
        self.initialise(0)
        self.expect = READY

    def initialise(self, icw1: int) -> None:
        """ICW1: forget edges and service state; the data port now expects ICW2."""
        self.irr = self.lines & self.elcr  # only lines held high in level mode stay requested
        self.isr = 0
        self.imr = 0
        self.base = 0
        self.priority_add = 0
        self.icw3 = 0
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.fully_nested = False
        self.special_mask = False
        self.read_isr = False
        self.poll = False
        self.need_icw4 = bool(icw1 & ICW1_IC4)
        self.single = bool(icw1 & ICW1_SNGL)
        self.expect = EXPECT_ICW2  # ICW1's LTIM bit is ignored: the ELCR decides (PIIX)

    # -- priority logic
    def _best(self, mask: int) -> int:
        """Priority rank (0 = highest) of the best IRQ in ``mask``, 8 when ``mask`` is empty."""
        for rank in range(8):
            if mask & (1 << ((rank + self.priority_add) & 7)):
                return rank
        return 8

    def pending_irq(self) -> int | None:
        """The IRQ this chip would present on INTA, or None (its INT output is low)."""
        rank = self._best(self.irr & ~self.imr)
        if rank == 8:
            return None
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.fully_nested and self.master:
            in_service &= ~(1 << CASCADE_IRQ)  # more slave IRQs may nest under IR2
        if rank < self._best(in_service):
            return (rank + self.priority_add) & 7
        return None

    def set_input(self, irq: int, level: bool) -> None:
        """Drive request input ``irq`` (0-7) to ``level``."""
        bit = 1 << irq
        if self.elcr & bit:
            self.irr = self.irr | bit if level else self.irr & ~bit
        elif level and not self.lines & bit:
            self.irr |= bit
        self.lines = self.lines | bit if level else self.lines & ~bit

    def intack(self, irq: int) -> None:
        """The INTA of ``irq``: into service (unless auto-EOI), out of the IRR if edge."""
        bit = 1 << irq
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit
        if not self.elcr & bit:
            self.irr &= ~bit

    def set_elcr(self, value: int) -> None:
        """A write of the ELCR byte (bits that must stay edge are dropped)."""
        self.elcr = value & self.elcr_mask
        self.irr = (self.irr & ~self.elcr) | (self.lines & self.elcr)

    # -- ports (offset 0 = command, 1 = data)
    def read(self, offset: int) -> int:
        """``in`` from the command (0) or data (1) port."""
        if self.poll:
            self.poll = False
            irq = self.pending_irq()
            if irq is None:
                return 0
            self.intack(irq)
            return 0x80 | irq
        if offset == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr

    def write(self, offset: int, value: int) -> None:
        """``out`` to the command (0) or data (1) port."""
        if offset == 0:
            if value & ICW1:
                self.initialise(value)
            elif value & OCW3:
                self._ocw3(value)
            else:
                self._ocw2(value)
            return
        if self.expect == READY:
            self.imr = value
        elif self.expect == EXPECT_ICW2:
            self.base = value & 0xF8
            if not self.single:
                self.expect = EXPECT_ICW3
            else:
                self.expect = EXPECT_ICW4 if self.need_icw4 else READY
        elif self.expect == EXPECT_ICW3:
            self.icw3 = value
            self.expect = EXPECT_ICW4 if self.need_icw4 else READY
        else:
            self.auto_eoi = bool(value & ICW4_AEOI)
            self.fully_nested = bool(value & ICW4_SFNM)
            self.expect = READY

    def _ocw3(self, value: int) -> None:
        if value & OCW3_POLL:
            self.poll = True
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)

    def _ocw2(self, value: int) -> None:
        command, level = value >> 5, value & 7
        if command in (OCW2_ROTATE_AEOI_CLEAR, OCW2_ROTATE_AEOI_SET):
            self.rotate_on_auto_eoi = command == OCW2_ROTATE_AEOI_SET
        elif command in (OCW2_EOI, OCW2_ROTATE_EOI):
            rank = self._best(self.isr)
            if rank != 8:
                irq = (rank + self.priority_add) & 7
                self.isr &= ~(1 << irq)
                if command == OCW2_ROTATE_EOI:
                    self.priority_add = (irq + 1) & 7
        elif command in (OCW2_SPECIFIC_EOI, OCW2_ROTATE_SPECIFIC_EOI):
            self.isr &= ~(1 << level)
            if command == OCW2_ROTATE_SPECIFIC_EOI:
                self.priority_add = (level + 1) & 7
        elif command == OCW2_SET_PRIORITY:
            self.priority_add = (level + 1) & 7  # ``level`` becomes the lowest priority

    def describe(self) -> str:
        """One line of this chip's state."""
        flags = [
            name
            for name, on in (
                ("auto-EOI", self.auto_eoi),
                ("rotate-on-AEOI", self.rotate_on_auto_eoi),
                ("special-fully-nested", self.fully_nested),
                ("special-mask", self.special_mask),
                ("single", self.single),
                ("poll", self.poll),
            )
            if on
        ]
        if self.expect != READY:
            flags.append(f"initialising (expects {_EXPECT_NAMES[self.expect]})")
        if self.priority_add:
            flags.append(f"IRQ{(self.priority_add + 7) & 7} lowest")
        return (
            f"{'master:' if self.master else 'slave: '} base {self.base:#04x} irr {self.irr:#04x}"
            f" isr {self.isr:#04x} imr {self.imr:#04x} elcr {self.elcr:#04x}"
            f" lines {self.lines:#04x}" + "".join(f" {f}" for f in flags)
        )


class DualPic:
    """The PC's master/slave 8259A pair (ports 0x20-0x21, 0xA0-0xA1) with the ELCR (0x4D0-0x4D1).

    ``notify`` is called, from whichever thread caused it and outside the lock, each time the
    INTR output goes from low to high.
    """

    def __init__(self, notify: Notify = lambda: None) -> None:
        self._notify = notify
        self._lock = threading.Lock()
        self.master = I8259(master=True)
        self.slave = I8259(master=False)
        self._intr = False

    # -- interrupt lines and the INTA cycle
    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ ``irq`` (0-15) to ``level``; IRQ 2 is the cascade and is ignored."""
        if not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ {irq} out of range 0-15")
        if irq == CASCADE_IRQ:
            return
        with self._lock:
            before = self._intr
            chip = self.master if irq < 8 else self.slave
            chip.set_input(irq & 7, level)
            rose = self._settle(before)
        if rose:
            self._notify()

    def int_output(self) -> bool:
        """Whether INTR is asserted (an interrupt awaits acknowledge)."""
        with self._lock:
            return self._intr

    def acknowledge(self) -> int:
        """The INTA cycle: the vector to deliver, with IRR -> ISR moved on the chips involved.

        With nothing pending (the request went away after INTR was sampled) the master gives
        its spurious IRQ 7; an IR2 without a slave request gives the slave's IRQ 15.
        """
        with self._lock:
            before = self._intr
            vector = self._acknowledge_locked()
            rose = self._settle(before)
        if rose:
            self._notify()
        return vector

    def _acknowledge_locked(self) -> int:
        master, slave = self.master, self.slave
        irq = master.pending_irq()
        if irq is None:
            return master.base + SPURIOUS_IRQ  # no ISR bit for a spurious interrupt
        if irq == CASCADE_IRQ and not master.single:
            irq2 = slave.pending_irq()
            if irq2 is None:
                vector = slave.base + SPURIOUS_IRQ
            else:
                slave.intack(irq2)
                vector = slave.base + irq2
        else:
            vector = master.base + irq
        master.intack(irq)
        return vector

    def _settle(self, before: bool) -> bool:
        """Carry the slave's INT to IR2 and recompute INTR; True if INTR just rose."""
        self.master.set_input(CASCADE_IRQ, self.slave.pending_irq() is not None)
        self._intr = self.master.pending_irq() is not None
        return self._intr and not before

    # -- ports
    def read(self, port: int, size: int) -> int:
        """``in`` of ``size`` bytes (wider accesses read consecutive ports, as on ISA)."""
        with self._lock:
            before = self._intr
            value = 0
            for i in range(size):
                value |= self._read8(port + i) << (8 * i)
            rose = self._settle(before)
        if rose:
            self._notify()
        return value

    def write(self, port: int, size: int, value: int) -> None:
        """``out`` of ``size`` bytes (wider accesses write consecutive ports, as on ISA)."""
        with self._lock:
            before = self._intr
            for i in range(size):
                self._write8(port + i, (value >> (8 * i)) & 0xFF)
            rose = self._settle(before)
        if rose:
            self._notify()

    def _read8(self, port: int) -> int:
        if port in (PIC_MASTER, PIC_MASTER + 1):
            return self.master.read(port - PIC_MASTER)
        if port in (PIC_SLAVE, PIC_SLAVE + 1):
            return self.slave.read(port - PIC_SLAVE)
        if port == ELCR:
            return self.master.elcr
        if port == ELCR + 1:
            return self.slave.elcr
        return 0xFF

    def _write8(self, port: int, value: int) -> None:
        if port in (PIC_MASTER, PIC_MASTER + 1):
            self.master.write(port - PIC_MASTER, value)
        elif port in (PIC_SLAVE, PIC_SLAVE + 1):
            self.slave.write(port - PIC_SLAVE, value)
        elif port == ELCR:
            self.master.set_elcr(value)
        elif port == ELCR + 1:
            self.slave.set_elcr(value)

    # -- machine helpers
    def reset(self) -> None:
        """Power-on state of both chips and the ELCR (the machine's reset); lines are kept."""
        with self._lock:
            before = self._intr
            self.master.power_on()
            self.slave.power_on()
            rose = self._settle(before)
        if rose:
            self._notify()

    def bios_setup(self, master_base: int = 0x08, slave_base: int = 0x70) -> None:
        """Program the chips as a PC BIOS leaves them (SeaBIOS: 0x08/0x70, all but IR2 masked).

        For guests booted without firmware that expect a BIOS-initialised PIC; the power-on
        state (vector base 0, nothing masked) is what a fresh machine has without it.
        """
        sequence = (
            (PIC_MASTER, 0x11),
            (PIC_SLAVE, 0x11),
            (PIC_MASTER + 1, master_base),
            (PIC_SLAVE + 1, slave_base),
            (PIC_MASTER + 1, 1 << CASCADE_IRQ),
            (PIC_SLAVE + 1, CASCADE_IRQ),
            (PIC_MASTER + 1, 0x01),
            (PIC_SLAVE + 1, 0x01),
            (PIC_MASTER + 1, 0xFF & ~(1 << CASCADE_IRQ)),
            (PIC_SLAVE + 1, 0xFF),
        )
        for port, value in sequence:
            self.write(port, 1, value)

    def describe(self) -> str:
        """A few lines of state for ``monitor info irq``."""
        with self._lock:
            lines = [f"8259 {self.master.describe()}", f"8259 {self.slave.describe()}"]
            elcr = self.master.elcr | (self.slave.elcr << 8)
            irq = self.master.pending_irq()
            if irq is None:
                intr = "INTR low"
            elif irq == CASCADE_IRQ and not self.master.single:
                irq2 = self.slave.pending_irq()
                if irq2 is None:
                    intr = f"INTR high: spurious IRQ15, vector {self.slave.base + 7:#04x}"
                else:
                    intr = f"INTR high: IRQ{8 + irq2}, vector {self.slave.base + irq2:#04x}"
            else:
                intr = f"INTR high: IRQ{irq}, vector {self.master.base + irq:#04x}"
        lines.append(f"ELCR {elcr:#06x} (level-triggered IRQs), {intr}")
        return "\n".join(lines)
