"""The emu backend's EPT-violation exits, with the guest-linear address and the event whose
delivery they interrupted, as hardware reports them.

Theory of operation
-------------------
An access to guest-physical memory that is not mapped, or that its mapping does not allow,
is an EPT violation (exit 48): the qualification has the access (bits 0-2) and what the
mapping allows (3-5); for an access to the translation of a linear address, bits 7 (the
linear address is valid) and 8 (the access was to the translation, not to a paging-structure
entry) are set and VMCS_RO_GUEST_LIN_ADDR holds the linear address; the guest-physical
address is in VMCS_GUEST_PHYSICAL_ADDRESS.

unicorn's memory hooks report the guest-physical address only; the instruction has not run
(RIP is at it). :meth:`EptExits._ept_linear` finds the linear address: with paging off it is
the physical address; for a fetch it is RIP (or, for an instruction that crosses into the next
page, that page's first byte); for data, the instruction at RIP is decoded (capstone) and each
address it accesses - its memory operands (string instructions' [RSI]/[RDI] included) with
their segment bases, and the stack slots of a push or pop - is translated with the guest's
page tables, and the one whose translation is the faulting address wins (the first byte of
the next page for an access that crosses into it). An access none of them explains keeps bits
7/8 clear and reports no linear address.

An exit taken while an event is delivered (an event the VMM injected through
VMCS_CTRL_VMENTRY_IRQ_INFO, or a guest exception or interrupt the backend delivers through the
guest's IDT: ``emu_events``) - an EPT violation of an access of the delivery (IDT, GDT/LDT,
TSS, the frame it pushes), or an exception that delivery raises and the exception bitmap
intercepts - reports that event in VMCS_RO_IDT_VECTOR_INFO (valid, type, vector, error-code
valid) and VMCS_RO_IDT_VECTOR_ERROR (SDM 27.2.4); the guest's state is the one before the
delivery, and a software interrupt or exception has RIP at its instruction and its length in
VMCS_RO_VMEXIT_INSTR_LEN, so the VMM re-injects it as QEMU's hvf does. Every other exit has
the field's valid bit clear.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import capstone
from capstone import x86_const as CX

from . import common
from . import constants as C
from .emu_events import ERROR_CODE_VECTORS
from .emu_state import M64, EptFault, Guard, TaskGate, Vcpu, X, unicorn
from .emu_sys import SystemExits

_CR0_PG = 1 << 31
_SOURCE_IDT_GATE = 3  # task-switch qualification bits 31:30: a task gate in the IDT
_SOFTWARE = frozenset({C.IRQ_INFO_SOFT_IRQ, C.IRQ_INFO_SOFT_EXC, C.IRQ_INFO_PRIV_SOFT_EXC})
_STACK_BASES = frozenset({CX.X86_REG_RSP, CX.X86_REG_RBP, CX.X86_REG_ESP, CX.X86_REG_EBP})
_SEGMENT_INDEX = {
    CX.X86_REG_ES: 0,
    CX.X86_REG_CS: 1,
    CX.X86_REG_SS: 2,
    CX.X86_REG_DS: 3,
    CX.X86_REG_FS: 4,
    CX.X86_REG_GS: 5,
}
# instructions that push onto the stack (the slot below RSP) or pop from it (the slot at RSP)
_PUSHES = frozenset(
    {CX.X86_INS_PUSH, CX.X86_INS_CALL, CX.X86_INS_PUSHFQ, CX.X86_INS_PUSHFD, CX.X86_INS_PUSHF}
)
_POPS = frozenset(
    {
        CX.X86_INS_POP,
        CX.X86_INS_RET,
        CX.X86_INS_POPFQ,
        CX.X86_INS_POPFD,
        CX.X86_INS_POPF,
        CX.X86_INS_IRETQ,
        CX.X86_INS_IRETD,
        CX.X86_INS_IRET,
        CX.X86_INS_LEAVE,
    }
)


@lru_cache(maxsize=4)
def disassembler_with_details(bits: int) -> Any:
    """capstone for ``bits``-bit code, with operand details."""
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = True
    return md


def _register(uc: Any, insn: Any, reg: int) -> int:
    """The value of capstone register ``reg`` (0 for none) in unicorn's CPU."""
    if reg == CX.X86_REG_INVALID:
        return 0
    name = insn.reg_name(reg).upper()
    value = getattr(X, f"UC_X86_REG_{name}", None)
    return 0 if value is None else int(uc.reg_read(value))


class EptExits(SystemExits):
    """Exit 48 with the guest-linear address (see the module docstring)."""

    def _ept_exit(self, vcpu: Vcpu, access: int, gpa: int) -> None:
        """Record the EPT violation of unicorn memory fault ``access`` at ``gpa``."""
        write = access in (unicorn.UC_MEM_WRITE_UNMAPPED, unicorn.UC_MEM_WRITE_PROT)
        fetch = access in (unicorn.UC_MEM_FETCH_UNMAPPED, unicorn.UC_MEM_FETCH_PROT)
        region = common.region_at(vcpu.space.regions, gpa)
        if write:
            qual = C.EPT_VIOLATION_DATA_WRITE
        elif fetch:
            qual = C.EPT_VIOLATION_INST_FETCH
        else:
            qual = C.EPT_VIOLATION_DATA_READ
        qual |= common.ept_permission_bits(region.flags if region is not None else 0)
        linear = self._ept_linear(vcpu, gpa, fetch)
        fields = {"qual": qual, "gpa": gpa}
        if linear is not None:
            fields["qual"] |= C.EPT_VIOLATION_GLA_VALID | C.EPT_VIOLATION_XLAT_VALID
            fields["gla"] = linear
        self._set_exit(vcpu, C.VMX_REASON_EPT_VIOLATION, **fields)
        self._no_mmio_data(vcpu)

    def _delivery_exit(
        self,
        vcpu: Vcpu,
        event: tuple[int, int, int | None, int],
        cause: Guard | EptFault | TaskGate,
        vector: int = 0,
    ) -> None:
        """The exit that interrupts the delivery of ``event`` (SDM 27.2.4): an EPT violation
        (``cause`` an EptFault), a task switch through a task gate (exit 9, source 3), or
        exception ``vector`` the bitmap intercepts (``cause`` the Guard that raised it), with
        the event in the IDT-vectoring information. The guest's
        state is the one before the delivery: a software interrupt or exception has RIP at its
        instruction and the VM-exit instruction length its length, for the re-injection."""
        event_vector, kind, error, rip = event
        uc = vcpu.uc
        info = C.IRQ_INFO_VALID | kind | event_vector
        fields: dict[str, int] = {}
        protected = bool(uc.reg_read(X.UC_X86_REG_CR0) & 1)
        if (
            error is not None
            and kind == C.IRQ_INFO_HARD_EXC
            and event_vector in ERROR_CODE_VECTORS
            and protected
        ):
            info |= C.IRQ_INFO_ERROR_VALID
            fields["idt_error"] = error & 0xFFFFFFFF
        if kind in _SOFTWARE:
            current = int(uc.reg_read(X.UC_X86_REG_RIP))
            if rip != current:  # injected: RIP is still at the instruction
                length = (rip - current) & M64
            else:  # raised by unicorn after the instruction: INT n is CD ib, the others 1 byte
                length = 2 if kind == C.IRQ_INFO_SOFT_IRQ else 1
                uc.reg_write(X.UC_X86_REG_RIP, (current - length) & M64)
            fields["length"] = length
        if isinstance(cause, TaskGate):
            qual = cause.selector & 0xFFFF | _SOURCE_IDT_GATE << 30
            self._set_exit(vcpu, C.VMX_REASON_TASK, qual=qual, idt_info=info, **fields)
            return
        if isinstance(cause, EptFault):
            qual = C.EPT_VIOLATION_DATA_WRITE if cause.write else C.EPT_VIOLATION_DATA_READ
            qual |= common.ept_permission_bits(cause.flags)
            qual |= C.EPT_VIOLATION_GLA_VALID | C.EPT_VIOLATION_XLAT_VALID
            self._set_exit(
                vcpu,
                C.VMX_REASON_EPT_VIOLATION,
                qual=qual,
                gpa=cause.gpa,
                gla=cause.linear,
                idt_info=info,
                **fields,
            )
            self._no_mmio_data(vcpu)
            return
        irq_info = C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | vector
        if vector in ERROR_CODE_VECTORS:
            irq_info |= C.IRQ_INFO_ERROR_VALID
            fields["irq_error"] = cause.error & 0xFFFFFFFF
        qual = cause.cr2 if vector == C.IDT_PF and cause.cr2 is not None else 0
        self._set_exit(
            vcpu, C.VMX_REASON_EXC_NMI, qual=qual, irq_info=irq_info, idt_info=info, **fields
        )

    @staticmethod
    def _no_mmio_data(vcpu: Vcpu) -> None:
        """The MMIO extension fields of an exit 48 on emu: not decoded (the VMM decodes)."""
        vcpu.exit[C.GDBSTUB_VMCS_MMIO_DECODED] = 0
        vcpu.exit[C.GDBSTUB_VMCS_MMIO_SIZE] = 0
        vcpu.exit[C.GDBSTUB_VMCS_MMIO_DATA] = 0

    def _ept_linear(self, vcpu: Vcpu, gpa: int, fetch: bool) -> int | None:
        """The linear address whose translation the access at ``gpa`` was to, or None."""
        if not vcpu.uc.reg_read(X.UC_X86_REG_CR0) & _CR0_PG:
            return gpa  # without paging, linear addresses are physical
        rip = self._linear_rip(vcpu)
        if fetch:
            return self._matching(vcpu, gpa, [rip])
        code = self._read_linear(vcpu, rip, 15)
        bits = self._cpu_bits(vcpu)
        insn = next(iter(disassembler_with_details(bits).disasm(code, rip, 1)), None)
        if insn is None:
            return None
        return self._matching(vcpu, gpa, self._accessed(vcpu, insn, bits))

    def _accessed(self, vcpu: Vcpu, insn: Any, bits: int) -> list[int]:
        """The linear addresses ``insn`` accesses (where each access starts)."""
        uc = vcpu.uc
        mask = M64 if bits == 64 else 0xFFFFFFFF
        addresses = []
        address_mask = (1 << (insn.addr_size * 8 if insn.addr_size else bits)) - 1
        for op in insn.operands:
            if op.type != CX.X86_OP_MEM:
                continue
            mem = op.mem
            base = insn.address + insn.size if mem.base == CX.X86_REG_RIP else 0
            if mem.base != CX.X86_REG_RIP:
                base = _register(uc, insn, mem.base)
            offset = base + _register(uc, insn, mem.index) * mem.scale + mem.disp
            segment = mem.segment
            if segment == CX.X86_REG_INVALID:
                segment = CX.X86_REG_SS if mem.base in _STACK_BASES else CX.X86_REG_DS
            addresses.append(self._segmented(vcpu, segment, offset & address_mask, bits) & mask)
        if insn.id in _PUSHES or insn.id in _POPS:
            rsp = int(uc.reg_read(X.UC_X86_REG_RSP))
            stack = self._segmented(vcpu, CX.X86_REG_SS, rsp, bits)
            width = 8 if bits == 64 else 4 if bits == 32 else 2
            for slot in (stack, stack - width, stack - 2 * width):
                addresses.append(slot & mask)
        return addresses

    def _segmented(self, vcpu: Vcpu, segment: int, offset: int, bits: int) -> int:
        """``offset`` in ``segment`` as a linear address (bases other than FS/GS are 0 in
        64-bit mode)."""
        if bits == 64 and segment not in (CX.X86_REG_FS, CX.X86_REG_GS):
            return offset
        return int(self._seg(vcpu, _SEGMENT_INDEX.get(segment, 3))[1]) + offset

    def _matching(self, vcpu: Vcpu, gpa: int, addresses: list[int]) -> int | None:
        """The first of ``addresses`` (or the next page's first byte, for an access that
        crosses into it) whose translation is ``gpa``."""
        for address in addresses:
            for linear in (address, ((address | 0xFFF) + 1) & M64):
                if linear & 0xFFF != gpa & 0xFFF:
                    continue
                physical = self._translate(vcpu, linear)
                if physical is not None and physical & ~0xFFF == gpa & ~0xFFF:
                    return linear
        return None
