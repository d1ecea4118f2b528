"""The emu backend's task switches: exit 9, as VMX raises it, where unicorn would switch tasks.

Theory of operation
-------------------
In VMX non-root operation a task switch always exits (reason 9), before anything of it is done:
the qualification holds the selector of the TSS the guest tried to switch to (bits 15:0) and
the source (bits 31:30: 0 CALL, 1 IRET, 2 JMP, 3 a task gate in the IDT); RIP is at the
instruction and VMCS_RO_VMEXIT_INSTR_LEN its length. The VMM (QEMU's x86_task.c) does the
switch. unicorn does it in QEMU's helpers instead, so:

* a far JMP or CALL (``EA``/``9A`` with a pointer, ``FF /5``/``FF /3`` with a memory operand)
  and IRET are instruction sites (``emu_code``; in code scanned by chunk with paging off, the
  far JMP/CALL byte patterns; IRET only in code scanned block by block). Their hook, in
  protected mode outside IA-32e mode, reads the selector (the pointer's, or the one in memory
  after the offset) and its descriptor in the GDT or LDT: a TSS (16- or 32-bit, available or
  busy) exits with that selector, a task gate with the TSS selector the gate holds; a code
  segment, or a selector whose descriptor cannot be read, is left to unicorn (a far transfer,
  or the fault). An IRET with RFLAGS.NT set exits with the back link of the current TSS.
* before the exit, VMX checks the new TSS (SDM "Task Switches" in VMX non-root operation): in
  the GDT and within its limit, a TSS, present, long enough, available (busy for IRET)
  (``emu_events._check_tss``). A TSS that fails them is no exit: the fault, which unicorn
  raises for the instruction and the delivery raises for a task gate in the IDT.
* an event delivered through a task gate in the IDT (``emu_events``) exits with the gate's TSS
  selector and source 3, the event in the IDT-vectoring information (``emu_ept``).

The other checks of the switch (the TSS descriptor's DPL against CPL and RPL for CALL/JMP...)
are the VMM's, as they are after the exit on hardware.
"""

from __future__ import annotations

import struct

from capstone import x86_const as CX

from . import constants as C
from .emu_code import far_indirect
from .emu_ept import EptExits, disassembler_with_details
from .emu_state import EptFault, Guard, Vcpu, X

_RFLAGS_NT, _RFLAGS_VM = 1 << 14, 1 << 17
_SOURCE_CALL, _SOURCE_IRET, _SOURCE_JMP = 0, 1, 2
_TSS_TYPES = frozenset({0x1, 0x3, 0x9, 0xB})  # 16-bit / 32-bit TSS, available / busy
_TASK_GATE = 0x5
_FAR = {CX.X86_INS_LJMP: _SOURCE_JMP, CX.X86_INS_LCALL: _SOURCE_CALL}
_IRETS = frozenset({CX.X86_INS_IRET, CX.X86_INS_IRETD})


class TaskSwitches(EptExits):
    """Exit 9 for far JMP/CALL to a TSS or task gate and for IRET with NT (see above)."""

    def _task_site(self, vcpu: Vcpu, address: int) -> None:
        """The code hook of a far JMP/CALL or IRET site (RIP at it, nothing of it done)."""
        uc = vcpu.uc
        if not uc.reg_read(X.UC_X86_REG_CR0) & 1:
            return  # real mode: no tasks
        if int(uc.reg_read(X.UC_X86_REG_RFLAGS)) & _RFLAGS_VM:
            return
        state = self._snapshot(vcpu)
        if state.efer & C.EFER_LMA:
            return  # IA-32e mode has no task switches (a #GP, unicorn's)
        bits = self._cpu_bits(vcpu)
        code = self._read_linear(vcpu, address, 15)
        insn = next(iter(disassembler_with_details(bits).disasm(code, address, 1)), None)
        if insn is None:
            return
        if insn.id in _IRETS:
            if not int(uc.reg_read(X.UC_X86_REG_RFLAGS)) & _RFLAGS_NT:
                return
            back_link = self._read_linear(vcpu, state.seg(7)[1], 2)
            if len(back_link) == 2:
                tss = struct.unpack("<H", back_link)[0]
                if self._tss_ok(vcpu, tss, iret=True):
                    self._task_exit(vcpu, tss, _SOURCE_IRET, insn.size)
            return
        source = _FAR.get(insn.id)
        if source is None:
            reg = far_indirect(bytes(insn.bytes))
            if reg is None:
                return
            source = _SOURCE_JMP if reg == 5 else _SOURCE_CALL
        selector = self._far_selector(vcpu, insn, bits)
        if selector is None:
            return
        tss = self._task_target(vcpu, selector)
        if tss is not None and self._tss_ok(vcpu, tss):
            self._task_exit(vcpu, tss, source, insn.size)

    def _far_selector(self, vcpu: Vcpu, insn: object, bits: int) -> int | None:
        """The selector of a far JMP/CALL: its pointer's, or the one after the offset in its
        memory operand (None: not readable)."""
        operands = list(getattr(insn, "operands", ()))
        if len(operands) == 2 and all(op.type == CX.X86_OP_IMM for op in operands):
            return int(operands[0].imm) & 0xFFFF
        accessed = self._accessed(vcpu, insn, bits)
        if not accessed or not operands or operands[0].type != CX.X86_OP_MEM:
            return None
        # m16:16 or m16:32 by the operand size (capstone's operand size is not reliable here)
        wide = (bits == 32) != (0x66 in bytes(getattr(insn, "prefix", b"")))
        offset_size = 4 if wide else 2
        raw = self._read_linear(vcpu, accessed[0] + offset_size, 2)
        return struct.unpack("<H", raw)[0] if len(raw) == 2 else None

    def _task_target(self, vcpu: Vcpu, selector: int) -> int | None:
        """The TSS selector a far JMP/CALL to ``selector`` switches to: the selector itself
        for a TSS descriptor, the gate's for a task gate; None for anything else."""
        state = self._snapshot(vcpu)
        table_base, table_limit = state.table(0)
        if selector & 4:
            _, table_base, table_limit, _ = state.seg(6)
        index = selector & ~7
        if selector & 0xFFFC == 0 or index + 7 > table_limit:
            return None
        raw = self._read_linear(vcpu, table_base + index, 8)
        if len(raw) != 8:
            return None
        low, high = (int(v) for v in struct.unpack("<II", raw))
        if high & 1 << 12 or not high & 1 << 15:
            return None  # a code or data segment, or not present (unicorn's #NP)
        kind = high >> 8 & 0xF
        if kind in _TSS_TYPES:
            return selector & 0xFFFF
        if kind == _TASK_GATE:
            return low >> 16
        return None

    def _tss_ok(self, vcpu: Vcpu, tss: int, iret: bool = False) -> bool:
        """Whether the new TSS passes the checks made before the exit; if not, unicorn (QEMU)
        raises the same fault when it runs the instruction."""
        try:
            self._check_tss(vcpu, self._snapshot(vcpu), tss, 0, iret)
        except (Guard, EptFault):
            return False
        return True

    def _task_exit(self, vcpu: Vcpu, tss: int, source: int, length: int) -> None:
        qual = tss & 0xFFFF | source << 30
        self._stop(vcpu, C.VMX_REASON_TASK, qual=qual, length=length)
