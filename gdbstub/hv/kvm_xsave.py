"""XSAVE, XSAVEOPT, XSAVEC and XRSTOR done by the KVM backend, between guest memory and the
vCPU's XSAVE image.

Theory of operation
-------------------
On kvm_pvm the guest sees the host's CPUID whatever table the backend sets, so a guest kernel
enables every state component the host has (x87, SSE, AVX, AVX-512 ...) in XCR0 and saves
and restores them with the XSAVE family, which KVM's instruction emulator cannot execute.
unicorn (QEMU 5's CPU) knows neither AVX nor AVX-512 state, so these instructions are done
here, as the SDM describes them (vol. 1, ch. 13), on KVM's own XSAVE image
(``KVM_GET_XSAVE``/``KVM_SET_XSAVE``: the standard format, component offsets and sizes from
CPUID leaf 0xD):

* XSAVE and XSAVEOPT write, for each component i of RFBM = XCR0 & EDX:EAX, its state at its
  standard offset, and XSTATE_BV[i] = XINUSE[i] (XSAVEOPT's "modified" optimisation is not
  needed: writing everything is what XSAVE does). MXCSR goes with SSE or AVX.
* XSAVEC writes the compacted format: components of RFBM in index order from byte 576
  (64-byte aligned where CPUID says so), only those in use, XCOMP_BV = RFBM | bit 63.
* XRSTOR reads either format (XCOMP_BV bit 63), checks the header as the CPU does (#GP), loads
  each component of RFBM whose XSTATE_BV bit is set and puts the others in their initial
  state; XINUSE follows XSTATE_BV.

XINUSE is the image's XSTATE_BV. Outside 64-bit mode only XMM0-7 (and their upper halves)
take part. The operand is decoded with capstone; the accessed bytes are translated page by
page (KVM_TRANSLATE) before anything is written, so a fault (#PF with CR2, #GP for
misalignment, #UD without CR4.OSXSAVE, #NM with CR0.TS) leaves memory and state untouched.
An operand outside RAM is reported like any access outside RAM (exit 48).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import common
from . import constants as C
from . import kvm_abi as K
from .posix import ioctl

if TYPE_CHECKING:
    from .kvm import KvmBackend, _Vcpu

MNEMONICS = frozenset(
    {"xsave", "xsave64", "xsaveopt", "xsaveopt64", "xsavec", "xsavec64", "xrstor", "xrstor64"}
)
_LEGACY = 512
_HEADER = 64
_X87_INIT = struct.pack("<HHBxHQQ", 0x037F, 0, 0, 0, 0, 0)  # FCW FSW FTW FOP FIP FDP


class Fault(Exception):
    """The instruction raises exception ``vector`` (``error``: its error code or None;
    ``cr2`` for #PF)."""

    def __init__(self, vector: int, error: int | None = None, cr2: int = 0) -> None:
        super().__init__(vector)
        self.vector, self.error, self.cr2 = vector, error, cr2


class NotRam(Exception):
    """The operand reaches guest-physical memory that is not (writable) RAM."""

    def __init__(self, linear: int, write: bool) -> None:
        super().__init__(linear)
        self.linear, self.write = linear, write


@dataclass(frozen=True, slots=True)
class Component:
    """State component i >= 2 of the standard format: offset, size, 64-byte aligned when
    compacted."""

    offset: int
    size: int
    align: bool


@functools.cache
def components(kvm_fd: int) -> dict[int, Component]:
    """Components 2..62 the host's KVM supports (CPUID leaf 0xD, subleaves 2..62)."""
    cpuid = K.KvmCpuid2()
    cpuid.nent = K.CPUID_MAX_ENTRIES
    ioctl(kvm_fd, K.KVM_GET_SUPPORTED_CPUID, cpuid)
    found: dict[int, Component] = {}
    for n in range(cpuid.nent):
        entry = cpuid.entries[n]
        if entry.function == 0xD and 2 <= entry.index < 63 and entry.eax:
            found[entry.index] = Component(int(entry.ebx), int(entry.eax), bool(entry.ecx & 2))
    return found


@functools.cache
def _decoder(bits: int) -> Any:
    capstone = importlib.import_module("capstone")
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = True
    return md


def _register(regs: K.KvmRegs, name: str) -> int:
    """The value of a capstone register name (rax, eax, ax, r8d, r8w, rip...)."""
    if name in ("rip", "eip", "ip"):
        return int(regs.rip)
    widths = {"d": 0xFFFFFFFF, "w": 0xFFFF}
    if name.startswith("r") and name[1:].isdigit():
        return int(getattr(regs, name))
    if name.startswith("r") and name[1:-1].isdigit():
        return int(getattr(regs, name[:-1])) & widths.get(name[-1], 0xFF)
    if len(name) == 3 and name[0] in "re":
        value = int(getattr(regs, "r" + name[1:]))
        return value if name[0] == "r" else value & 0xFFFFFFFF
    return int(getattr(regs, "r" + name)) & 0xFFFF


def operand_address(code: bytes, bits: int, regs: K.KvmRegs, sregs: K.KvmSregs) -> int:
    """Guest-linear address of the memory operand of the instruction at the start of ``code``
    (segment base included; the address size from the mode and a 0x67 prefix)."""
    capstone = importlib.import_module("capstone")
    insn = next(_decoder(bits).disasm(code, regs.rip, 1))
    mem = next(op.mem for op in insn.operands if op.type == capstone.x86.X86_OP_MEM)
    size = {8: 64, 4: 32, 2: 16}.get(insn.addr_size, bits)
    address = mem.disp
    if mem.base:
        name = insn.reg_name(mem.base)
        address += regs.rip + insn.size if name in ("rip", "eip") else _register(regs, name)
    if mem.index:
        address += _register(regs, insn.reg_name(mem.index)) * mem.scale
    address &= (1 << size) - 1
    segment = insn.reg_name(mem.segment) if mem.segment else None
    if bits == 64:
        base = {"fs": sregs.fs.base, "gs": sregs.gs.base}.get(segment or "", 0)
        return int(address + base) & ((1 << 64) - 1)
    if segment is None:
        base_name = insn.reg_name(mem.base) if mem.base else ""
        segment = "ss" if base_name in ("esp", "ebp", "sp", "bp") else "ds"
    return int(address + getattr(sregs, segment).base) & 0xFFFFFFFF


class GuestBytes:
    """``size`` bytes of guest-linear memory at ``linear``, translated page by page up front:
    a #PF or an access outside RAM is raised before anything is read or written."""

    def __init__(
        self, backend: KvmBackend, vcpu: _Vcpu, linear: int, size: int, write: bool
    ) -> None:
        self.chunks: list[tuple[int, int]] = []  # (host address, length)
        sregs = backend._get(vcpu, "sregs")
        done = 0
        while done < size:
            address = (linear + done) & ((1 << 64) - 1)
            length = min(size - done, 0x1000 - (address & 0xFFF))
            translation = K.KvmTranslation(address)
            ioctl(vcpu.fd, K.KVM_TRANSLATE, translation)
            if not translation.valid:
                raise Fault(C.IDT_PF, 2 if write else 0, address)
            if write and not translation.writeable and sregs.cr0 & 1 << 16:  # CR0.WP
                raise Fault(C.IDT_PF, 3, address)
            gpa = int(translation.physical_address)
            region = common.region_at(vcpu.space.regions, gpa)
            if region is None or (write and not region.flags & C.HV_MEMORY_WRITE):
                raise NotRam(address, write)
            self.chunks.append((region.uva + gpa - region.gpa, length))
            done += length

    def read(self) -> bytes:
        """The bytes, in one piece."""
        return b"".join(ctypes.string_at(host, length) for host, length in self.chunks)

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` into the range."""
        at = 0
        for host, length in self.chunks:
            lo, hi = max(offset, at), min(offset + len(data), at + length)
            if lo < hi:
                ctypes.memmove(host + lo - at, data[lo - offset : hi - offset], hi - lo)
            at += length


def _layout(kvm_fd: int, xcomp: int) -> dict[int, tuple[int, int]]:
    """(memory offset, size) of each component >= 2 in the compacted format for XCOMP_BV."""
    at, places = _LEGACY + _HEADER, {}
    for i, comp in sorted(components(kvm_fd).items()):
        if xcomp >> i & 1:
            if comp.align:
                at = (at + 63) & ~63
            places[i] = (at, comp.size)
            at += comp.size
    return places


def _xmm_bytes(long64: bool, size: int) -> int:
    """How much of a per-register component a mode uses (XMM0-7 only outside 64-bit mode)."""
    return size if long64 else size // 2


def execute(
    backend: KvmBackend, vcpu: _Vcpu, mnemonic: str, code: bytes, bits: int, xcr0: int
) -> None:
    """Execute the XSAVE-family instruction at the start of ``code`` (RIP), advancing RIP,
    or raise Fault / NotRam with nothing changed."""
    regs, sregs = backend._get(vcpu, "regs"), backend._get(vcpu, "sregs")
    if not sregs.cr4 & 1 << 18:
        raise Fault(C.IDT_UD)
    if sregs.cr0 & 1 << 3:
        raise Fault(C.IDT_NM)
    linear = operand_address(code, bits, regs, sregs)
    if linear & 63:
        raise Fault(C.IDT_GP, 0)
    rfbm = xcr0 & ((regs.rdx & 0xFFFFFFFF) << 32 | (regs.rax & 0xFFFFFFFF))
    xsave = K.KvmXsave()
    ioctl(vcpu.fd, K.KVM_GET_XSAVE, xsave)
    image = bytearray(bytes(xsave))
    long64 = bits == 64
    comps = components(backend._kvm)
    end = max([_LEGACY + _HEADER] + [c.offset + c.size for i, c in comps.items() if rfbm >> i & 1])
    if mnemonic.startswith("xrstor"):
        header = GuestBytes(backend, vcpu, linear, _LEGACY + _HEADER, write=False).read()
        xcomp = struct.unpack_from("<Q", header, 520)[0]
        if xcomp >> 63:
            places = _layout(backend._kvm, xcomp & ~(1 << 63))
            end = max([_LEGACY + _HEADER] + [at + size for at, size in places.values()])
        memory = GuestBytes(backend, vcpu, linear, end, write=False)
        _xrstor(image, memory.read(), rfbm, xcr0, comps, long64, kvm_fd=backend._kvm)
        ctypes.memmove(xsave.region, bytes(image), ctypes.sizeof(xsave))
        ioctl(vcpu.fd, K.KVM_SET_XSAVE, xsave)
    else:
        compacted = mnemonic.startswith("xsavec")
        if compacted:
            places = _layout(backend._kvm, rfbm)
            end = max([_LEGACY + _HEADER] + [at + size for at, size in places.values()])
        memory = GuestBytes(backend, vcpu, linear, end, write=True)
        _xsave(image, memory, rfbm, comps, long64, compacted, kvm_fd=backend._kvm)
    regs = backend._dirty(vcpu, "regs")
    regs.rip = (regs.rip + next(_decoder(bits).disasm(code, 0, 1)).size) % (1 << 64)


def _xsave(
    image: bytearray,
    memory: GuestBytes,
    rfbm: int,
    comps: dict[int, Component],
    long64: bool,
    compacted: bool,
    kvm_fd: int,
) -> None:
    """Write the image's state of RFBM's components to ``memory`` (see the module doc)."""
    xinuse = struct.unpack_from("<Q", image, _LEGACY)[0]
    if compacted and struct.unpack_from("<I", image, 24)[0] != 0x1F80:
        xinuse |= 2  # XSAVEC saves SSE state with a MXCSR that is not the initial one
    saved = rfbm & xinuse if compacted else rfbm
    if saved & 1:
        memory.write(0, bytes(image[0:24]))
        memory.write(32, bytes(image[32:160]))
    if (saved & 2) if compacted else (rfbm & 6):
        memory.write(24, bytes(image[24:32]))  # MXCSR, MXCSR_MASK
    if saved & 2:
        memory.write(160, bytes(image[160 : 160 + _xmm_bytes(long64, 256)]))
    places = _layout(kvm_fd, rfbm) if compacted else {}
    for i, comp in comps.items():
        if saved >> i & 1 and (long64 or i != 7):  # Hi16_ZMM: 64-bit mode only
            at = places[i][0] if compacted else comp.offset
            size = _xmm_bytes(long64, comp.size) if i in (2, 6) else comp.size
            memory.write(at, bytes(image[comp.offset : comp.offset + size]))
    if compacted:
        memory.write(_LEGACY, struct.pack("<QQ", rfbm & xinuse, rfbm | 1 << 63))
    else:
        old = struct.unpack_from("<Q", memory.read(), _LEGACY)[0]
        memory.write(_LEGACY, struct.pack("<Q", (old & ~rfbm) | (xinuse & rfbm)))


def _xrstor(
    image: bytearray,
    memory: bytes,
    rfbm: int,
    xcr0: int,
    comps: dict[int, Component],
    long64: bool,
    kvm_fd: int,
) -> None:
    """Load RFBM's components from ``memory`` into the image, or initialise them."""
    xstate_bv, xcomp = struct.unpack_from("<QQ", memory, _LEGACY)
    compacted = bool(xcomp >> 63)
    if compacted:
        if xcomp & ~(1 << 63) & ~xcr0 or xstate_bv & ~xcomp or any(memory[528:576]):
            raise Fault(C.IDT_GP, 0)
        places = _layout(kvm_fd, xcomp & ~(1 << 63))
    else:
        if xstate_bv & ~xcr0 or any(memory[520:576]):
            raise Fault(C.IDT_GP, 0)
        places = {i: (c.offset, c.size) for i, c in comps.items()}
    if rfbm & 2 if compacted else rfbm & 6:
        # standard form: MXCSR from memory with SSE or AVX; compacted: with SSE, or initial
        from_memory = not compacted or xstate_bv & 2
        mxcsr = struct.unpack_from("<I", memory, 24)[0] if from_memory else 0x1F80
        if mxcsr & ~(struct.unpack_from("<I", image, 28)[0] or 0xFFBF):
            raise Fault(C.IDT_GP, 0)
        struct.pack_into("<I", image, 24, mxcsr)
    if rfbm & 1:
        image[0:24] = memory[0:24] if xstate_bv & 1 else _X87_INIT
        image[32:160] = memory[32:160] if xstate_bv & 1 else bytes(128)
    if rfbm & 2:
        size = _xmm_bytes(long64, 256)
        image[160 : 160 + size] = memory[160 : 160 + size] if xstate_bv & 2 else bytes(size)
    for i, comp in comps.items():
        if not rfbm >> i & 1 or (i == 7 and not long64):
            continue
        size = _xmm_bytes(long64, comp.size) if i in (2, 6) else comp.size
        at = places[i][0] if i in places else comp.offset
        data = memory[at : at + size] if xstate_bv >> i & 1 else bytes(size)
        image[comp.offset : comp.offset + size] = data
    xinuse = struct.unpack_from("<Q", image, _LEGACY)[0]
    struct.pack_into("<Q", image, _LEGACY, (xinuse & ~rfbm) | (xstate_bv & rfbm))
