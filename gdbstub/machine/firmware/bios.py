"""A minimal real-mode BIOS: an IVT, tiny stubs that trap to the machine, services in Python.

Theory of operation
===================

Kernels entered in real mode (Linux's setup code, boot sectors) call the BIOS with ``int n``.
:func:`build_ivt_and_stubs` fills the IVT so that vector ``v`` points at ``F000:off`` with
``0xF0000 + off = BIOS_STUBS + v * STUB_SIZE``.  Each stub is ``STUB_SIZE`` (8) bytes::

    +0  52         push dx
    +1  BA 11 05   mov  dx, BIOS_PORT      ; 0x511 is above 0xFF: no "out imm8, ax" form
    +4  EF         out  dx, ax             ; the port exit: the machine runs the service here
    +5  5A         pop  dx
    +6  CF         iret
    +7  90         (padding)

The stubs of the hardware IRQ vectors (8-0xF and 0x70-0x77) are a lone ``iret``: a stray IRQ in
real mode is ignored (no EOI is sent).  The machine learns the vector from the exit's address
with :func:`vector_of` and calls :meth:`BiosServices.call` with a :class:`RealModeCpu`: the
caller's registers as they were at the ``int`` and its FLAGS image.  At the ``out`` the stack
holds, from SS:SP up, the caller's DX, then the IP, CS and FLAGS pushed by ``int``.  Because
``pop dx`` and ``iret`` reload DX and FLAGS from there, the caller's DX and the flags that a
service returns (CF, ZF) live in that frame, not in the vCPU's registers.  :class:`StubFrame`
implements :class:`RealModeCpu` on top of raw register and memory access (:class:`RawCpu`) and
takes care of that, so a machine only does::

    vector = vector_of(cs_base + rip)
    if vector is not None:
        services.call(vector, StubFrame(raw_cpu))   # then finish the ``out`` as usual

Everything but the registers a service returns is left intact.

Services (CF set means failure; unknown services set CF, and int 15h ones also AH = 0x86):

* int 10h: AH=0Eh teletype (AL to ``tty``), AH=0Fh video mode (AL=3, AH=80 columns, BH=0),
  AH=03h cursor (0, 0); everything else does nothing.
* int 11h: AX = equipment word; int 12h: AX = 639 (KiB of base memory).
* int 13h: no disks (CF set, AH=1), EDD check (AH=41h) included.
* int 15h: AX=E820h (memory map, 20 or 24-byte entries at ES:DI, continuation in EBX), AX=E801h,
  AH=88h, AX=2401h/2402h (A20 is always on); AH=C0h and the rest fail with AH=86h.
* int 16h: no keyboard input ever: AH=00h/01h/10h/11h set ZF and CF (no key, AX=0);
  AH=02h/12h shift state 0; AH=03h accepted.
* int 1Ah: AH=00h ticks since midnight (CX:DX, AL=0), AH=02h time and AH=04h date in BCD (UTC).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Protocol

from gdbstub.machine.firmware.bda import BASE_MEMORY_KIB, EQUIPMENT_WORD, TICKS_PER_DAY
from gdbstub.machine.firmware.layout import BIOS_PORT, BIOS_STUBS, HIGH_RAM_START, IVT_ADDR

BIOS_SEGMENT = 0xF000
BIOS_SEGMENT_BASE = BIOS_SEGMENT << 4
VECTORS = 256
STUB_SIZE = 8
STUB_OUT_OFFSET = 4  # where the ``out dx, ax`` sits in a stub
STUBS_SIZE = VECTORS * STUB_SIZE
HW_IRQ_VECTORS = frozenset([*range(0x08, 0x10), *range(0x70, 0x78)])

# the stack frame at the ``out``: offsets from SS:SP
FRAME_DX = 0
FRAME_IP = 2
FRAME_CS = 4
FRAME_FLAGS = 6

FLAG_CF = 1 << 0
FLAG_ZF = 1 << 6

SMAP = 0x534D4150  # "SMAP"
E820_RAM = 1
E820_ENTRY_SIZE = 20
E820_EXT_ENTRY_SIZE = 24
E820_EXT_ENABLED = 1
ERR_UNSUPPORTED = 0x86  # int 15h: function not supported
ERR_DISK_INVALID = 0x01  # int 13h: invalid function
PIT_HZ = 1193182
KIB = 1024
MIB = 1024 * KIB

GPR32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")
SEGMENTS = ("es", "ds")
REGISTERS = GPR32 + SEGMENTS


def _stub(vector: int) -> bytes:
    if vector in HW_IRQ_VECTORS:
        code = b"\xcf"  # iret
    else:
        code = b"\x52\xba" + BIOS_PORT.to_bytes(2, "little") + b"\xef\x5a\xcf"
    return code.ljust(STUB_SIZE, b"\x90")


def stub_offset(vector: int) -> int:
    """The IP (in segment ``BIOS_SEGMENT``) of the stub for ``vector``."""
    return BIOS_STUBS - BIOS_SEGMENT_BASE + vector * STUB_SIZE


def build_ivt_and_stubs() -> list[tuple[int, bytes]]:
    """The IVT (256 far pointers at ``IVT_ADDR``) and the stubs (at ``BIOS_STUBS``)."""
    ivt = b"".join(struct.pack("<HH", stub_offset(v), BIOS_SEGMENT) for v in range(VECTORS))
    stubs = b"".join(_stub(v) for v in range(VECTORS))
    return [(IVT_ADDR, ivt), (BIOS_STUBS, stubs)]


def vector_of(ip: int) -> int | None:
    """The vector whose stub contains ``ip``, else None.

    ``ip`` is a linear address (CS base + IP) of any byte of a stub, e.g. of its ``out``; values
    below 0x10000 are taken as an IP in segment ``BIOS_SEGMENT`` instead.
    """
    offset = ip - (BIOS_STUBS - BIOS_SEGMENT_BASE) if ip < 0x10000 else ip - BIOS_STUBS
    if 0 <= offset < STUBS_SIZE:
        return offset // STUB_SIZE
    return None


class RealModeCpu(Protocol):
    """What a BIOS service sees of its caller: registers as at the ``int``, FLAGS, memory.

    Register names are ``eax ebx ecx edx esi edi ebp`` (32-bit values) and ``es ds`` (16-bit
    segment values).
    """

    def get(self, reg: str) -> int:
        """The caller's value of register ``reg``."""
        ...

    def set(self, reg: str, value: int) -> None:
        """Set the value the caller will see in ``reg`` after the ``iret``."""
        ...

    def set_carry(self, carry: bool) -> None:
        """Set or clear CF in the FLAGS the ``iret`` restores."""
        ...

    def set_zero(self, zero: bool) -> None:
        """Set or clear ZF in the FLAGS the ``iret`` restores."""
        ...

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes of guest-physical memory at ``addr``."""
        ...

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` to guest-physical memory at ``addr``."""
        ...


class RawCpu(Protocol):
    """A vCPU stopped at a stub's ``out``: raw registers and guest-physical memory.

    Names: ``eax ebx ecx edx esi edi ebp esp`` and the segment values ``es ds ss``.
    """

    def get(self, reg: str) -> int:
        """The current value of ``reg``."""
        ...

    def set(self, reg: str, value: int) -> None:
        """Change ``reg``."""
        ...

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes of guest-physical memory at ``addr``."""
        ...

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` to guest-physical memory at ``addr``."""
        ...


class StubFrame:
    """A :class:`RealModeCpu` for a vCPU stopped at a stub's ``out`` (see the module docstring).

    DX and FLAGS are read from and written to the stub's stack frame at SS:SP; the other
    registers and memory go straight to ``raw``.
    """

    def __init__(self, raw: RawCpu) -> None:
        self.raw = raw
        self._ss_base = (raw.get("ss") & 0xFFFF) << 4
        self._sp = raw.get("esp") & 0xFFFF

    def _slot(self, offset: int) -> int:
        return self._ss_base + ((self._sp + offset) & 0xFFFF)

    def _read16(self, offset: int) -> int:
        value: int = struct.unpack("<H", self.raw.read(self._slot(offset), 2))[0]
        return value

    def _write16(self, offset: int, value: int) -> None:
        self.raw.write(self._slot(offset), struct.pack("<H", value & 0xFFFF))

    def get(self, reg: str) -> int:
        """The caller's ``reg``; EDX's low half comes from the frame."""
        if reg == "edx":
            return (self.raw.get("edx") & 0xFFFF0000) | self._read16(FRAME_DX)
        return self.raw.get(reg)

    def set(self, reg: str, value: int) -> None:
        """Set ``reg`` for the caller; DX goes to the frame, where ``pop dx`` takes it."""
        if reg == "edx":
            self._write16(FRAME_DX, value)
            self.raw.set("edx", (value & 0xFFFF0000) | (self.raw.get("edx") & 0xFFFF))
        else:
            self.raw.set(reg, value)

    def _set_flag(self, bit: int, on: bool) -> None:
        flags = self._read16(FRAME_FLAGS)
        self._write16(FRAME_FLAGS, (flags | bit) if on else (flags & ~bit))

    def set_carry(self, carry: bool) -> None:
        """CF in the FLAGS image that ``iret`` restores."""
        self._set_flag(FLAG_CF, carry)

    def set_zero(self, zero: bool) -> None:
        """ZF in the FLAGS image that ``iret`` restores."""
        self._set_flag(FLAG_ZF, zero)

    def read(self, addr: int, n: int) -> bytes:
        """Guest-physical memory."""
        return self.raw.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        """Guest-physical memory."""
        self.raw.write(addr, data)


# ================================================================================================
# register helpers


def _get16(cpu: RealModeCpu, reg: str) -> int:
    return cpu.get(reg) & 0xFFFF


def _set16(cpu: RealModeCpu, reg: str, value: int) -> None:
    cpu.set(reg, (cpu.get(reg) & 0xFFFF0000) | (value & 0xFFFF))


def _set_high8(cpu: RealModeCpu, reg: str, value: int) -> None:
    cpu.set(reg, (cpu.get(reg) & 0xFFFF00FF) | ((value & 0xFF) << 8))


def _set_low8(cpu: RealModeCpu, reg: str, value: int) -> None:
    cpu.set(reg, (cpu.get(reg) & 0xFFFFFF00) | (value & 0xFF))


def _ah(cpu: RealModeCpu) -> int:
    return (cpu.get("eax") >> 8) & 0xFF


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _fail15(cpu: RealModeCpu) -> None:
    _set_high8(cpu, "eax", ERR_UNSUPPORTED)
    cpu.set_carry(True)


class BiosServices:
    """The BIOS services behind the stubs, for a machine with memory map ``mem_map``.

    ``mem_map`` holds (address, size, E820 type) entries as the boot code hands them out;
    ``tty`` receives int 10h teletype output; ``clock_ticks`` returns the 18.2 Hz ticks since
    midnight (by default derived from ``now``); ``now`` returns seconds since the epoch (UTC).
    """

    def __init__(
        self,
        *,
        mem_map: list[tuple[int, int, int]],
        mem_size: int,
        tty: Callable[[bytes], None] | None = None,
        clock_ticks: Callable[[], int] | None = None,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.mem_map = list(mem_map)
        self.mem_size = mem_size
        self.tty = tty if tty is not None else (lambda data: None)
        self.now = now if now is not None else time.time
        self.clock_ticks = clock_ticks if clock_ticks is not None else self._ticks_from_now
        self._handlers: dict[int, Callable[[RealModeCpu], None]] = {
            0x10: self._int10,
            0x11: self._int11,
            0x12: self._int12,
            0x13: self._int13,
            0x15: self._int15,
            0x16: self._int16,
            0x1A: self._int1a,
        }

    def _ticks_from_now(self) -> int:
        return int((self.now() % 86400) * PIT_HZ / 65536)

    def call(self, vector: int, cpu: RealModeCpu) -> None:
        """Run the service for ``int vector`` with the caller's registers in ``cpu``."""
        handler = self._handlers.get(vector)
        if handler is None:
            cpu.set_carry(True)
        else:
            handler(cpu)

    # -- memory ------------------------------------------------------------------------------

    def ram_top_above_1m(self) -> int:
        """The end of the RAM that runs contiguously from 1 MiB (capped at 4 GiB)."""
        top = HIGH_RAM_START
        for addr, size, kind in sorted(self.mem_map):
            if kind == E820_RAM and addr <= top < addr + size:
                top = addr + size
        return min(top, self.mem_size, 1 << 32)

    def _e820(self, cpu: RealModeCpu) -> None:
        index = cpu.get("ebx")
        size = cpu.get("ecx")
        if cpu.get("edx") != SMAP or size < E820_ENTRY_SIZE or index >= len(self.mem_map):
            _fail15(cpu)
            return
        addr, length, kind = self.mem_map[index]
        entry = struct.pack("<QQI", addr, length, kind)
        if size >= E820_EXT_ENTRY_SIZE:
            entry += struct.pack("<I", E820_EXT_ENABLED)
        buf = (_get16(cpu, "es") << 4) + _get16(cpu, "edi")
        cpu.write(buf, entry)
        cpu.set("eax", SMAP)
        cpu.set("ecx", len(entry))
        cpu.set("ebx", index + 1 if index + 1 < len(self.mem_map) else 0)
        cpu.set_carry(False)

    def _e801(self, cpu: RealModeCpu) -> None:
        top = self.ram_top_above_1m()
        below16 = (min(top, 16 * MIB) - HIGH_RAM_START) // KIB
        above16 = min(max(top - 16 * MIB, 0) // (64 * KIB), 0xFFFF)
        for reg, value in (("eax", below16), ("ecx", below16), ("ebx", above16), ("edx", above16)):
            _set16(cpu, reg, value)
        cpu.set_carry(False)

    def _int15(self, cpu: RealModeCpu) -> None:
        ax = _get16(cpu, "eax")
        if ax == 0xE820:
            self._e820(cpu)
        elif ax == 0xE801:
            self._e801(cpu)
        elif ax >> 8 == 0x88:
            kib = (self.ram_top_above_1m() - HIGH_RAM_START) // KIB
            _set16(cpu, "eax", min(kib, 0xFFFF))
            cpu.set_carry(False)
        elif ax in (0x2401, 0x2402):  # enable A20 / A20 status: always enabled
            _set16(cpu, "eax", 0x0001 if ax == 0x2402 else 0)
            cpu.set_carry(False)
        else:
            _fail15(cpu)

    def _int11(self, cpu: RealModeCpu) -> None:
        _set16(cpu, "eax", EQUIPMENT_WORD)

    def _int12(self, cpu: RealModeCpu) -> None:
        _set16(cpu, "eax", min(BASE_MEMORY_KIB, self.mem_size // KIB))

    # -- devices -----------------------------------------------------------------------------

    def _int10(self, cpu: RealModeCpu) -> None:
        ah = _ah(cpu)
        if ah == 0x0E:
            self.tty(bytes([cpu.get("eax") & 0xFF]))
        elif ah == 0x0F:
            _set16(cpu, "eax", (80 << 8) | 3)
            _set_high8(cpu, "ebx", 0)
        elif ah == 0x03:
            _set16(cpu, "ecx", 0x0607)  # cursor scan lines 6-7
            _set16(cpu, "edx", 0)  # row 0, column 0

    def _int13(self, cpu: RealModeCpu) -> None:
        _set_high8(cpu, "eax", ERR_DISK_INVALID)
        cpu.set_carry(True)

    def _int16(self, cpu: RealModeCpu) -> None:
        ah = _ah(cpu)
        if ah in (0x00, 0x01, 0x10, 0x11):  # read / check keystroke: there is never one
            _set16(cpu, "eax", 0)
            cpu.set_zero(True)
            cpu.set_carry(True)
        elif ah in (0x02, 0x12):  # shift flags
            if ah == 0x12:
                _set16(cpu, "eax", 0)  # AH = extended shift flags
            else:
                _set_low8(cpu, "eax", 0)
        elif ah == 0x03:  # typematic rate
            cpu.set_carry(False)
        else:
            cpu.set_carry(True)

    def _int1a(self, cpu: RealModeCpu) -> None:
        ah = _ah(cpu)
        if ah == 0x00:
            ticks = self.clock_ticks() % TICKS_PER_DAY
            _set16(cpu, "ecx", ticks >> 16)
            _set16(cpu, "edx", ticks)
            _set_low8(cpu, "eax", 0)  # no midnight rollover
            cpu.set_carry(False)
        elif ah in (0x02, 0x04):
            t = time.gmtime(self.now())
            if ah == 0x02:
                _set16(cpu, "ecx", (_bcd(t.tm_hour) << 8) | _bcd(t.tm_min))
                _set16(cpu, "edx", _bcd(t.tm_sec) << 8)  # DL = 0: no daylight saving
            else:
                _set16(cpu, "ecx", (_bcd(t.tm_year // 100) << 8) | _bcd(t.tm_year % 100))
                _set16(cpu, "edx", (_bcd(t.tm_mon) << 8) | _bcd(t.tm_mday))
            cpu.set_carry(False)
        else:
            cpu.set_carry(True)
