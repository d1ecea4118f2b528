"""The port bus of the ``gdbstub run`` machine: routes I/O-port exits to devices.

Every device has ``read(port, size) -> int`` and ``write(port, size, value) -> None`` where
``port`` is the absolute I/O port and ``size`` is 1, 2 or 4 bytes.  A :class:`PortBus` maps each
port of a registered range to its device (a dict lookup per access) and answers ports nobody
owns the way an empty ISA bus does: reads give all ones of the access size, writes vanish, and
each unknown port is logged once.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


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


class GuestPowerOff(Exception):
    """The guest turned the machine off (ACPI S5, QEMU's 0xB004): the process ends with 0."""


class GuestReset(Exception):
    """The guest reset the machine (i8042 0xFE, 0xCF9, port 0x92, ACPI reset register)."""

    def __init__(self, how: str) -> None:
        super().__init__(f"guest reset through {how}")
        self.how = how


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


class MmioDevice(Protocol):
    """What an :class:`MmioBus` dispatches to (``offset`` is from the device's base)."""

    def mmio_read(self, offset: int, size: int) -> int:
        """Value of a guest load of ``size`` bytes (1, 2, 4 or 8) at ``offset``."""
        ...

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """A guest store of ``size`` bytes of ``value`` at ``offset``."""
        ...


class MmioBus:
    """Dispatch guest-physical accesses outside RAM to devices by address range.

    An address no device owns behaves as on a PC: reads give all ones, writes vanish, and each
    page is logged once.
    """

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, MmioDevice]] = []
        self._unknown_logged: set[int] = set()

    def register(self, base: int, size: int, device: MmioDevice) -> None:
        """Give ``[base, base + size)`` to ``device`` (ValueError on overlap)."""
        if size <= 0 or base < 0:
            raise ValueError(f"bad MMIO range {base:#x}+{size:#x}")
        for start, length, _ in self._ranges:
            if base < start + length and start < base + size:
                raise ValueError(f"MMIO range {base:#x}+{size:#x} overlaps {start:#x}")
        self._ranges.append((base, size, device))

    def find(self, gpa: int) -> tuple[MmioDevice, int] | None:
        """The device owning ``gpa`` and the offset into it, or None."""
        for start, length, device in self._ranges:
            if start <= gpa < start + length:
                return device, gpa - start
        return None

    def read(self, gpa: int, size: int) -> int:
        """A guest load: the owning device's value, or all ones."""
        found = self.find(gpa)
        mask = (1 << (8 * size)) - 1
        if found is None:
            self._log_unknown(gpa, size, "read")
            return mask
        device, offset = found
        return device.mmio_read(offset, size) & mask

    def write(self, gpa: int, size: int, value: int) -> None:
        """A guest store: handed to the owning device, or dropped (logged once a page)."""
        found = self.find(gpa)
        if found is None:
            self._log_unknown(gpa, size, "write")
            return
        device, offset = found
        device.mmio_write(offset, size, value & ((1 << (8 * size)) - 1))

    def _log_unknown(self, gpa: int, size: int, what: str) -> None:
        page = gpa >> 12
        if page in self._unknown_logged:
            return
        self._unknown_logged.add(page)
        log.info(
            "guest %d-byte %s at %#x: no RAM or device there (logged once a page)", size, what, gpa
        )
