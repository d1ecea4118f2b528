"""Which device sits where on the ``gdbstub run`` PC: the port and MMIO map, and the IRQ wiring.

The map is QEMU's ``pc`` machine (i440FX/PIIX), the one Linux and hobby kernels expect
(``firmware/layout.py`` has the numbers): 8259 pair, 8254 PIT with port 0x61, CMOS RTC,
i8042, port 0x92, PCI configuration ports with the 0xCF9 reset register, the ACPI PM block at
0x600 (plus QEMU's older soft-off port 0xB004), COM1 on IRQ 4, QEMU's isa-debug-exit at 0xF4
and the 0xE9 debug console; the I/O APIC at 0xFEC00000 (local APICs are per vCPU, see
``machine.py``). Devices with timers are listed in ``timers`` for the machine to poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .bus import MmioBus, PortBus
from .devices.acpi_pm import AcpiPm, LegacyPowerOff
from .devices.debugport import DEBUG_EXIT_PORT, DEBUGCON_PORT, DebugCon, DebugExit
from .devices.i8042 import I8042
from .devices.pci import PciHost
from .devices.pit import Pit
from .devices.rtc import Rtc
from .devices.sysctl import Port92
from .devices.uart import COM1_BASE, Uart16550
from .firmware import layout
from .interrupts import InterruptRouter

Sink = Callable[[bytes], None]


class TimerDevice(Protocol):
    """A device that counts virtual time."""

    def next_deadline_ns(self) -> int | None:
        """Virtual time of the next event, or None."""
        ...

    def poll(self, now_ns: int) -> None:
        """Fire what is due at ``now_ns``."""
        ...


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


@dataclass
class Platform:
    """The devices of one PC and the buses that reach them."""

    ports: PortBus
    mmio: MmioBus
    router: InterruptRouter
    uart: Uart16550
    pit: Pit
    rtc: Rtc
    acpi_pm: AcpiPm
    i8042: I8042
    pci: PciHost
    timers: list[TimerDevice] = field(default_factory=list)

    def describe_timers(self) -> str:
        """State of every timer device, for ``monitor info timers``."""
        return "\n".join(device.describe() for device in (self.pit, self.rtc, self.acpi_pm))


def build_platform(
    clock: Callable[[], int],
    *,
    mem_size: int,
    serial_sink: Sink,
    cpus: int = 1,
    start_time: float | None = None,
) -> Platform:
    """Every device of the PC, wired (see the module docstring)."""
    router = InterruptRouter()
    ports = PortBus()
    mmio = MmioBus()
    uart = Uart16550(serial_sink, irq=router.line(layout.IRQ_COM1))
    pit = Pit(clock, router.line(layout.IRQ_PIT))
    rtc = Rtc(
        clock,
        router.line(layout.IRQ_RTC),
        start_time=time.time() if start_time is None else start_time,
        mem_size=mem_size,
        cpus=cpus,
    )
    acpi_pm = AcpiPm(clock, router.line(layout.IRQ_SCI))
    i8042 = I8042(router.line(layout.IRQ_KBD), router.line(layout.IRQ_MOUSE))
    pci = PciHost()
    pic = router.pic
    ports.register(layout.PIC_MASTER, 2, pic)
    ports.register(layout.PIC_SLAVE, 2, pic)
    ports.register(layout.ELCR, 2, pic)
    ports.register(layout.PIT_PORT, 4, pit)
    ports.register(layout.PORT61, 1, pit)
    ports.register(layout.I8042_DATA, 1, i8042)
    ports.register(layout.I8042_CMD, 1, i8042)
    ports.register(layout.RTC_PORT, 2, rtc)
    ports.register(layout.PORT92, 1, Port92())
    ports.register(layout.PCI_CONFIG, 8, pci)
    ports.register(layout.ACPI_PM_BASE, 12, acpi_pm)
    ports.register(layout.ACPI_LEGACY_OFF, 2, LegacyPowerOff())
    ports.register(COM1_BASE, 8, uart)
    ports.register(DEBUG_EXIT_PORT, 4, DebugExit())
    ports.register(DEBUGCON_PORT, 1, DebugCon(serial_sink))
    mmio.register(layout.IOAPIC_ADDR, layout.MMIO_SIZE, router.ioapic)
    return Platform(
        ports=ports,
        mmio=mmio,
        router=router,
        uart=uart,
        pit=pit,
        rtc=rtc,
        acpi_pm=acpi_pm,
        i8042=i8042,
        pci=pci,
        timers=[pit, rtc, acpi_pm],
    )
