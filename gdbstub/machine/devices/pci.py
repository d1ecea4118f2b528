"""PCI configuration mechanism #1 (ports 0xCF8-0xCFF) and the PIIX reset control register 0xCF9.

Theory of operation
-------------------
A dword write to 0xCF8 sets the configuration address (bit 31 enable, bus 23-16, device 15-11,
function 10-8, register 7-2); a dword read gives it back.  Accesses of any size at 0xCFC-0xCFF
then reach the selected function's configuration space at ``register + (port - 0xCFC)``.  With
the enable bit clear, or for a function that does not exist, reads give all ones and writes
vanish, as on a bus where nobody answers.

The bus holds what QEMU's ``pc`` machine has at its root: 00:00.0, an i440FX host bridge
(8086:1237), and 00:01.0, the PIIX3 PCI-to-ISA bridge (8086:7000, multi-function header) whose
PIRQ route registers 0x60-0x63 read 0x80 (routing disabled), which lets Linux route legacy IRQs
by the tables instead.  Their configuration space is read-only except a few registers (latency
timer, interrupt line, the i440FX PAM and SMRAM bytes, the PIIX3 PIRQ routes and DLC), so BAR
sizing finds no BARs.

A one-byte access to 0xCF9 is not part of the address dword: it is the reset control register.
Writing it with bit 2 set resets the machine (bit 1 asks for a hard reset; Linux and the FADT
write 0x06): ``on_reset("0xcf9")`` is called, or :class:`GuestReset` raised.  Other non-dword
accesses to 0xCF8-0xCFB reach nothing (all ones).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..bus import GuestReset, size_mask
from ..firmware.layout import PCI_CONFIG, RESET_CONTROL

CONFIG_ADDRESS = PCI_CONFIG
CONFIG_DATA = PCI_CONFIG + 4
ENABLE = 0x80000000

RCR_SYS_RST = 0x02  # hard (system) reset rather than CPU-only
RCR_RST_CPU = 0x04  # writing 1 resets
RCR_FULL_RST = 0x08


class PciFunction:
    """One function's 256-byte configuration space with a per-byte mask of writable bits."""

    def __init__(
        self,
        name: str,
        vendor: int,
        device: int,
        class_code: int,
        *,
        revision: int = 0,
        header_type: int = 0,
        command: int = 0,
        status: int = 0,
        subsystem: tuple[int, int] = (0x1AF4, 0x1100),
    ) -> None:
        self.name = name
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        self.set16(0x00, vendor)
        self.set16(0x02, device)
        self.set16(0x04, command)
        self.set16(0x06, status)
        self.config[0x08] = revision
        self.config[0x09] = class_code & 0xFF
        self.config[0x0A] = (class_code >> 8) & 0xFF
        self.config[0x0B] = (class_code >> 16) & 0xFF
        self.config[0x0E] = header_type
        self.set16(0x2C, subsystem[0])
        self.set16(0x2E, subsystem[1])
        self.writable(0x0D, 1, 0xFF)  # latency timer
        self.writable(0x3C, 1, 0xFF)  # interrupt line (scratch for software)

    def set16(self, offset: int, value: int) -> None:
        """Set a 16-bit field at ``offset``."""
        self.config[offset : offset + 2] = value.to_bytes(2, "little")

    def writable(self, offset: int, count: int, mask: int) -> None:
        """Let software change ``mask`` bits of ``count`` bytes from ``offset``."""
        for i in range(count):
            self.wmask[offset + i] = mask

    def read(self, offset: int, size: int) -> int:
        """``size`` bytes at ``offset`` (inside the 256 bytes)."""
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Store ``size`` bytes at ``offset``; only the writable bits change."""
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            mask = self.wmask[offset + i]
            self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)


def i440fx_host_bridge() -> PciFunction:
    """00:00.0, the i440FX PMC (host bridge), as QEMU presents it."""
    fn = PciFunction(
        "i440FX host bridge", 0x8086, 0x1237, 0x060000, revision=0x02, command=0x0006,
        status=0x0280,
    )  # fmt: skip
    fn.writable(0x59, 7, 0xFF)  # PAM0-PAM6 (shadow RAM attributes; accepted, not acted on)
    fn.config[0x72] = 0x02  # SMRAM: C_BASE_SEG = A0000
    fn.writable(0x72, 1, 0x78)
    return fn


def piix3_isa_bridge() -> PciFunction:
    """00:01.0, the PIIX3 PCI-to-ISA bridge (multi-function device), as QEMU presents it."""
    fn = PciFunction(
        "PIIX3 ISA bridge", 0x8086, 0x7000, 0x060100, header_type=0x80, command=0x0007,
        status=0x0200,
    )  # fmt: skip
    for reg in (0x60, 0x61, 0x62, 0x63):  # PIRQA-D route control: disabled
        fn.config[reg] = 0x80
    fn.writable(0x60, 4, 0x8F)
    fn.config[0x70] = fn.config[0x71] = 0x80  # motherboard IRQ routes: disabled
    fn.writable(0x70, 2, 0xCF)
    fn.config[0x4C] = 0x4D  # ISA I/O recovery timer
    fn.config[0x4E] = 0x03  # X-bus chip select
    fn.config[0x69] = 0x02  # top of memory
    fn.config[0x76] = fn.config[0x77] = 0x0C  # motherboard DMA: disabled
    fn.writable(0x82, 1, 0x0F)  # deterministic latency control (Linux sets passive release)
    return fn


class PciHost:
    """Configuration mechanism #1 plus the 0xCF9 reset control register (ports 0xCF8-0xCFF)."""

    def __init__(self, *, on_reset: Callable[[str], None] | None = None) -> None:
        self.on_reset = on_reset
        self._lock = threading.Lock()
        self.address = 0
        self.rcr = 0
        self.functions: dict[tuple[int, int, int], PciFunction] = {
            (0, 0, 0): i440fx_host_bridge(),
            (0, 1, 0): piix3_isa_bridge(),
        }
        self.resets = 0

    def _target(self) -> tuple[PciFunction, int] | None:
        """The addressed function and register, None if disabled or absent."""
        a = self.address
        if not a & ENABLE:
            return None
        fn = self.functions.get(((a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7))
        return None if fn is None else (fn, a & 0xFC)

    def read(self, port: int, size: int) -> int:
        """``in`` from 0xCF8-0xCFF."""
        mask = size_mask(size)
        with self._lock:
            if port == CONFIG_ADDRESS and size == 4:
                return self.address
            if port == RESET_CONTROL and size == 1:
                return self.rcr
            offset = port - CONFIG_DATA
            if offset >= 0 and offset + size <= 4:
                target = self._target()
                if target is not None:
                    fn, reg = target
                    return fn.read(reg + offset, size)
        return mask

    def write(self, port: int, size: int, value: int) -> None:
        """``out`` to 0xCF8-0xCFF (a reset through 0xCF9 calls ``on_reset`` or raises)."""
        with self._lock:
            if port == CONFIG_ADDRESS and size == 4:
                self.address = value & 0xFFFFFFFF
                return
            if port == RESET_CONTROL and size == 1:
                self.rcr = value & (RCR_SYS_RST | RCR_FULL_RST)
                reset = bool(value & RCR_RST_CPU)
            else:
                reset = False
                offset = port - CONFIG_DATA
                target = self._target()
                if offset >= 0 and offset + size <= 4 and target is not None:
                    fn, reg = target
                    fn.write(reg + offset, size, value)
            if reset:
                self.resets += 1
        if reset:
            if self.on_reset is not None:
                self.on_reset("0xcf9")
            else:
                raise GuestReset("0xcf9")

    def describe(self) -> str:
        """A few lines of state for ``monitor info``."""
        with self._lock:
            a = self.address
            lines = [
                f"pci: config address {a:#010x} ({'enabled' if a & ENABLE else 'disabled'}: "
                f"{(a >> 16) & 0xFF:02x}:{(a >> 11) & 0x1F:02x}.{(a >> 8) & 7} reg {a & 0xFC:#04x})"
                f", reset control {self.rcr:#04x}, resets {self.resets}"
            ]
            for (bus, dev, func), fn in sorted(self.functions.items()):
                lines.append(
                    f"pci: {bus:02x}:{dev:02x}.{func} {fn.read(0, 2):04x}:{fn.read(2, 2):04x} "
                    f"class {fn.read(9, 3):06x} {fn.name}"
                )
        return "\n".join(lines)
