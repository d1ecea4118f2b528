"""The guest-linear address of an EPT violation, which VMX reports and KVM_EXIT_MMIO does not.

Theory of operation
-------------------
A data access that ends in an EPT violation reports, besides the guest-physical address, the
linear address the guest used (VMCS_RO_GUEST_LIN_ADDR) with qualification bit 7 ("guest
linear address valid") and bit 8 (the access was to the translation of that address, not to a
paging-structure entry). KVM_EXIT_MMIO gives only the guest-physical address.
:func:`access_linear` recovers the linear one: with paging off it is the physical address;
otherwise the instruction is decoded (capstone, cached by code bytes and mode) - the one at
RIP for a read (KVM exits before completing it), else the one that ends at RIP (a write KVM
completed) - the effective address of each memory operand is computed from the registers and
segment bases, and the one whose translation (KVM_TRANSLATE, through the backend's
translation cache) is the faulting guest-physical address wins (the next page's first byte
for an access that crosses into it). An access it cannot attribute (an implicit stack access,
a paging-structure walk) keeps bits 7/8 clear and reports no linear address
(docs/library.md).

IDT-vectoring information is not reported by the kvm backend: KVM re-delivers an event whose
delivery it interrupted by itself, and on VMX hosts an MMIO access during delivery stops KVM
with KVM_INTERNAL_ERROR_DELIVERY_EV, on kvm_pvm it is a triple fault (docs/library.md).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import capstone
from capstone import x86_const as X

from . import constants as C

if TYPE_CHECKING:
    from .kvm import KvmBackend, _Vcpu

_CR0_PG = 1 << 31

# capstone register id -> (kvm_regs / kvm_sregs name, bit width)
_REGISTERS: dict[int, tuple[str, int]] = {}
for _name in ("ax", "bx", "cx", "dx", "si", "di", "sp", "bp"):
    _REGISTERS[getattr(X, f"X86_REG_R{_name.upper()}")] = ("r" + _name, 64)
    _REGISTERS[getattr(X, f"X86_REG_E{_name.upper()}")] = ("r" + _name, 32)
    _REGISTERS[getattr(X, f"X86_REG_{_name.upper()}")] = ("r" + _name, 16)
for _n in range(8, 16):
    _REGISTERS[getattr(X, f"X86_REG_R{_n}")] = (f"r{_n}", 64)
    _REGISTERS[getattr(X, f"X86_REG_R{_n}D")] = (f"r{_n}", 32)
    _REGISTERS[getattr(X, f"X86_REG_R{_n}W")] = (f"r{_n}", 16)
_SEGMENTS = {
    X.X86_REG_ES: "es",
    X.X86_REG_CS: "cs",
    X.X86_REG_SS: "ss",
    X.X86_REG_DS: "ds",
    X.X86_REG_FS: "fs",
    X.X86_REG_GS: "gs",
}
_STACK_BASES = frozenset({X.X86_REG_RSP, X.X86_REG_RBP, X.X86_REG_ESP, X.X86_REG_EBP})
_RIP = frozenset({X.X86_REG_RIP, X.X86_REG_EIP})

# One memory operand: (segment, base, index, scale, displacement, address bits, insn length)
_Operand = tuple[int, int, int, int, int, int, int]


@lru_cache(maxsize=4)
def _disassembler(bits: int) -> Any:
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    cs = capstone.Cs(capstone.CS_ARCH_X86, mode)
    cs.detail = True
    return cs


@lru_cache(maxsize=512)
def memory_operands(code: bytes, bits: int) -> tuple[_Operand, ...]:
    """The memory operands of the instruction at the start of ``code`` (``bits``-bit code)."""
    for insn in _disassembler(bits).disasm(code, 0, 1):
        address_bits = insn.addr_size * 8 if insn.addr_size else bits
        return tuple(
            (
                op.mem.segment,
                op.mem.base,
                op.mem.index,
                op.mem.scale,
                op.mem.disp,
                address_bits,
                insn.size,
            )
            for op in insn.operands
            if op.type == X.X86_OP_MEM
        )
    return ()


def _value(regs: Any, reg: int, rip_next: int) -> int:
    if reg == X.X86_REG_INVALID:
        return 0
    if reg in _RIP:
        return rip_next
    name, width = _REGISTERS.get(reg, ("", 0))
    if not name:
        return 0
    return int(getattr(regs, name)) & ((1 << width) - 1)


def _effective(op: _Operand, regs: Any, sregs: Any, long64: bool, rip: int) -> int:
    segment, base, index, scale, disp, address_bits, length = op
    offset = _value(regs, base, rip + length) + _value(regs, index, 0) * scale + disp
    offset &= (1 << address_bits) - 1
    if segment == X.X86_REG_INVALID:
        segment = X.X86_REG_SS if base in _STACK_BASES else X.X86_REG_DS
    if long64 and segment not in (X.X86_REG_FS, X.X86_REG_GS):
        return offset
    seg_base = int(getattr(sregs, _SEGMENTS.get(segment, "ds")).base)
    linear = seg_base + offset
    return linear % (1 << 64) if long64 else linear & 0xFFFFFFFF


def access_linear(backend: KvmBackend, vcpu: _Vcpu, gpa: int) -> int | None:
    """The guest-linear address of the data access at ``gpa`` KVM stopped on, or None.

    The instruction is the one at RIP (a read: KVM exits before it completes) or the one that
    ends at RIP (a write KVM completed before the exit)."""
    sregs = backend._get(vcpu, "sregs")
    if not sregs.cr0 & _CR0_PG:
        return gpa  # without paging, linear addresses are physical
    regs = backend._get(vcpu, "regs")
    long64 = bool(sregs.efer & C.EFER_LMA and sregs.cs.l)
    bits = 64 if long64 else 32 if sregs.cs.db else 16
    rip = int(regs.rip)
    code_base = 0 if long64 else int(sregs.cs.base)
    code = backend._read_linear(vcpu, (code_base + rip - 15) % (1 << 64), 30)
    if len(code) != 30:  # the page before RIP is not mapped: RIP's own instruction only
        code = b"\x90" * 15 + backend._read_linear(vcpu, (code_base + rip) % (1 << 64), 15)
    hit = _HITS.get((code, bits))
    if hit is not None:  # the instruction that matched at this place last time
        back, index = hit
        ops = memory_operands(code[15 - back : 30 - back], bits)
        if index < len(ops):
            linear = _match(backend, vcpu, gpa, ops[index], regs, sregs, long64, rip - back)
            if linear is not None:
                return linear
    for back in range(16):
        ops = memory_operands(code[15 - back : 30 - back], bits)
        if back and ops and ops[0][-1] != back:
            continue  # not an instruction that ends at RIP
        for index, op in enumerate(ops):
            linear = _match(backend, vcpu, gpa, op, regs, sregs, long64, rip - back)
            if linear is not None:
                if len(_HITS) > 1024:
                    _HITS.clear()
                _HITS[code, bits] = (back, index)
                return linear
    return None


_HITS: dict[tuple[bytes, int], tuple[int, int]] = {}
"""(code window, mode) -> (bytes back from RIP, operand index) that matched last time."""


def _match(
    backend: KvmBackend,
    vcpu: _Vcpu,
    gpa: int,
    op: _Operand,
    regs: Any,
    sregs: Any,
    long64: bool,
    start: int,
) -> int | None:
    """The linear address of memory operand ``op`` of the instruction at ``start`` if it
    translates to ``gpa`` (or crosses into its page at ``gpa``), else None."""
    address = _effective(op, regs, sregs, long64, start % (1 << 64))
    for linear in (address, (address | 0xFFF) + 1):
        if linear & 0xFFF == gpa & 0xFFF and _gpa_page(backend, vcpu, linear) == gpa & ~0xFFF:
            return linear
    return None


def _gpa_page(backend: KvmBackend, vcpu: _Vcpu, linear: int) -> int | None:
    sregs = vcpu.sregs
    key = (sregs.cr0, sregs.cr3, sregs.cr4, linear & ~0xFFF)
    page = vcpu.xlate_cache.get(key)
    if page is None:
        gpa = backend._translate(vcpu, linear & ~0xFFF)
        if gpa is None:
            return None
        page = vcpu.xlate_cache[key] = gpa & ~0xFFF
    return page
