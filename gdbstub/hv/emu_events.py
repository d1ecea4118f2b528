"""The emu backend's events: exceptions raised in unicorn, injected events, their delivery.

Theory of operation
-------------------
Faults and traps raised inside unicorn reach a UC_HOOK_INTR hook, which records them (vector,
type, and the error code QEMU computed: a #PF's P/W/U/RSVD/I bits) and stops; the run loop
then exits to the VMM (vectors in the exception bitmap) or delivers the event through the
guest's IDT here, as it does an event injected through VMCS_CTRL_VMENTRY_IRQ_INFO.

Delivery follows the SDM: the real-mode IVT; in protected mode 16- and 32-bit interrupt and
trap gates; in long mode 64-bit gates. Software interrupts (INT n, INT3, INTO) check the gate's
DPL against CPL. A gate into a more privileged code segment switches stacks: in long mode to
RSPn of the 64-bit TSS (SS becomes the null selector with RPL n) and always to the IST stack
the gate names; in protected mode to SSn:ESPn of a 32-bit TSS. The frame holds SS:RSP of the
interrupted context whenever the stack switched (and always in long mode), then RFLAGS, CS,
RIP and the error code. Virtual-8086 mode is not supported (it faults).

A fault met while delivering (a gate not present, the stack not mapped, ...) becomes the
exception hardware raises (#NP/#GP/#TS with the selector error code, #PF with CR2), combined
with the first as the SDM's double-fault table says: #DF, then a triple fault (exit 2). When
the exception bitmap intercepts that exception, or an access of the delivery (IDT, GDT/LDT,
TSS, the frame) meets guest-physical memory that is not mapped or does not allow it (an EPT
violation), the delivery stops with an exit that reports the event being delivered in the
IDT-vectoring information (``emu_ept``), the guest's state as it was before the delivery. So
does an event whose IDT entry is a task gate (protected mode): a task switch, exit 9
(``emu_task``).

SYSCALL and SYSENTER do nothing architectural in unicorn 2.1 (its helpers only call the
UC_HOOK_INSN hooks and step over the instruction); a hook records them and the run loop gives
them their effect here: RCX/R11, RFLAGS masked by IA32_FMASK, CS/SS from IA32_STAR with the
flat 64-bit (or 32-bit) attributes, RIP from IA32_LSTAR (IA32_CSTAR from compatibility mode,
STAR[31:0] from legacy mode, as AMD does; Intel raises #UD there), and SYSENTER's from the
IA32_SYSENTER MSRs. SYSRET and SYSEXIT are QEMU's own, but neither checks that the return
address is canonical, nor does IRETQ: their sites are scanned and an IRETQ or SYSRETQ to a
non-canonical address raises #GP(0) at the instruction, at CPL0, as on Intel hardware.
"""

from __future__ import annotations

import struct

from . import common
from . import constants as C
from .emu_debug import DebugRegs
from .emu_state import (
    DESC_B,
    DESC_L,
    DESC_P,
    HF_CS64,
    M64,
    EptFault,
    ExitRun,
    Guard,
    Snapshot,
    TaskGate,
    Vcpu,
    X,
)

ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17})
_CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
_SOFTWARE = frozenset({C.IRQ_INFO_SOFT_IRQ, C.IRQ_INFO_SOFT_EXC})

# RFLAGS bits
_TF, _IF, _NT, _RF, _VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
# QEMU descriptor flags of the flat segments SYSCALL/SYSENTER load (G, P, S, DPL 0, type)
_DESC_G, _DESC_S = 1 << 23, 1 << 12
_FLAT_CODE = _DESC_G | DESC_P | _DESC_S | 0xB << 8  # execute/read, accessed
_FLAT_DATA = _DESC_G | DESC_B | DESC_P | _DESC_S | 0x3 << 8  # read/write, accessed
_CONFORMING = 1 << 10
_TASK_GATE = 0x5
_CODE = 1 << 11


def canonical(address: int) -> bool:
    """Whether ``address`` is canonical for 48-bit linear addresses."""
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


class Events(DebugRegs):
    """Exceptions, interrupts, system calls and their delivery (see the module docstring)."""

    # --- raised inside unicorn -------------------------------------------------------------------

    def _on_interrupt(self, vcpu: Vcpu, intno: int) -> None:
        """A fault, trap or INT n raised by unicorn: remember it; the run loop decides."""
        vcpu.stale_fault = True  # QEMU counted it as an exception in flight
        if vcpu.recovery is not None:  # the rest of a block being undone (emu_nets)
            vcpu.uc.emu_stop()
            return
        linear = self._linear_rip(vcpu)
        before = self._read_linear(vcpu, (linear - 2) & M64, 2)
        kind = C.IRQ_INFO_HARD_EXC
        if (intno, before[-1:]) in ((C.IDT_BP, b"\xcc"), (C.IDT_OF, b"\xce")):
            kind = C.IRQ_INFO_SOFT_EXC
        elif intno == C.IDT_DB and before[-1:] == b"\xf1":
            kind = C.IRQ_INFO_PRIV_SOFT_EXC
        elif len(before) == 2 and before[0] == 0xCD and before[1] == intno:
            kind = C.IRQ_INFO_SOFT_IRQ
        error: int | None = None
        if kind == C.IRQ_INFO_HARD_EXC and intno in ERROR_CODE_VECTORS:
            blob = self._blob(vcpu)  # the error code QEMU computed (a #PF's P/W/U/RSVD/I)
            error = struct.unpack_from("<I", blob, self._layout.error_code)[0] & 0xFFFF_FFFF
        vcpu.pending_event = (intno, kind, error)
        vcpu.uc.emu_stop()

    def _exception(self, vcpu: Vcpu) -> bool:
        assert vcpu.pending_event is not None
        vector, kind, error = vcpu.pending_event
        vcpu.pending_event = None
        uc = vcpu.uc
        bitmap = vcpu.controls[C.VMCS_CTRL_EXC_BITMAP]
        if kind != C.IRQ_INFO_SOFT_IRQ and bitmap & (1 << vector):
            fields: dict[int, int] = {}
            length = 0
            rip = int(uc.reg_read(X.UC_X86_REG_RIP))
            if kind in (C.IRQ_INFO_SOFT_EXC, C.IRQ_INFO_PRIV_SOFT_EXC):
                length = 1
                uc.reg_write(X.UC_X86_REG_RIP, (rip - 1) & M64)  # the framework: RIP at INT3
            info = C.IRQ_INFO_VALID | kind | vector
            if error is not None:
                info |= C.IRQ_INFO_ERROR_VALID
                fields[C.VMCS_RO_VMEXIT_IRQ_ERROR] = error
            qual = 0
            if vector == C.IDT_PF:
                qual = int(uc.reg_read(X.UC_X86_REG_CR2))
            elif vector == C.IDT_DB:
                qual = int(uc.reg_read(X.UC_X86_REG_DR6)) & (0xF | C.DR6_BD | C.DR6_BS)
            self._set_exit(vcpu, C.VMX_REASON_EXC_NMI, irq_info=info, length=length, qual=qual)
            vcpu.exit.update(fields)
            if vcpu.stale_fault:
                self._patch(vcpu)  # no exception is in flight once the VMM has it
            return True
        rip = int(uc.reg_read(X.UC_X86_REG_RIP))
        self._deliver_or_fault(vcpu, vector, kind, error, rip)
        return False

    def _inject_entry_event(self, vcpu: Vcpu) -> None:
        info = vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO]
        if not info & C.IRQ_INFO_VALID:
            return
        vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO] = info & ~C.IRQ_INFO_VALID
        vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] = C.GUEST_ACTIVITY_ACTIVE
        vector, kind = info & 0xFF, info & C.IRQ_INFO_TYPE_MASK
        error = (
            vcpu.controls[C.VMCS_CTRL_VMENTRY_EXC_ERROR] & 0xFFFFFFFF
            if info & C.IRQ_INFO_ERROR_VALID
            else None
        )
        rip = vcpu.uc.reg_read(X.UC_X86_REG_RIP)
        if kind in (C.IRQ_INFO_SOFT_EXC, C.IRQ_INFO_SOFT_IRQ, C.IRQ_INFO_PRIV_SOFT_EXC):
            rip += vcpu.controls[C.VMCS_CTRL_VMENTRY_INSTR_LEN]
        self._deliver_or_fault(vcpu, vector, kind, error, rip & M64)

    # --- delivery --------------------------------------------------------------------------------

    def _deliver_or_fault(
        self, vcpu: Vcpu, vector: int, kind: int, error: int | None, rip: int
    ) -> None:
        """Deliver an event through the guest IDT. A fault on the way is delivered instead,
        or becomes #DF as the SDM's table says (contributory after contributory, #PF or
        contributory after #PF); a fault delivering #DF is a triple fault (exit 2). A fault
        the exception bitmap intercepts, or an EPT violation, exits with the event being
        delivered in the IDT-vectoring information (``_delivery_exit``)."""
        for _ in range(4):
            try:
                self._deliver(vcpu, vector, kind, error, rip)
                return
            except (EptFault, TaskGate) as stop:
                self._delivery_exit(vcpu, (vector, kind, error, rip), stop)
                raise ExitRun from None
            except Guard as fault:
                if vector == C.IDT_DF and kind == C.IRQ_INFO_HARD_EXC:
                    break
                hard = kind == C.IRQ_INFO_HARD_EXC
                second, second_error = fault.vector, fault.error
                if hard and (
                    (vector in _CONTRIBUTORY and second in _CONTRIBUTORY)
                    or (vector == C.IDT_PF and (second == C.IDT_PF or second in _CONTRIBUTORY))
                ):
                    second, second_error = C.IDT_DF, 0
                if vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & (1 << second):
                    self._delivery_exit(vcpu, (vector, kind, error, rip), fault, second)
                    raise ExitRun from None
                if fault.cr2 is not None:
                    vcpu.uc.reg_write(X.UC_X86_REG_CR2, fault.cr2)
                vector, error, kind = second, second_error, C.IRQ_INFO_HARD_EXC
        vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] = C.GUEST_ACTIVITY_SHUTDOWN
        self._set_exit(vcpu, C.VMX_REASON_TRIPLE_FAULT)
        raise ExitRun

    def _delivery_exit(
        self,
        vcpu: Vcpu,
        event: tuple[int, int, int | None, int],
        cause: Guard | EptFault | TaskGate,
        vector: int = 0,
    ) -> None:
        """Record the exit that interrupted the delivery of ``event`` (vector, type, error
        code, return RIP): an EPT violation, a task switch through a task gate, or the
        exception ``vector`` of ``cause`` (``emu_ept``)."""
        raise NotImplementedError

    def _delivery_read(self, vcpu: Vcpu, linear: int, size: int) -> bytes:
        """What event delivery reads (IDT, GDT/LDT, TSS): ``_read_exact``, after the EPT
        check."""
        self._check_ept(vcpu, linear, size, write=False)
        return self._read_exact(vcpu, linear, size)

    def _delivery_write(self, vcpu: Vcpu, linear: int, data: bytes) -> None:
        """What event delivery writes (the frame): ``_write_linear``, after the EPT check."""
        self._check_ept(vcpu, linear, len(data), write=True)
        self._write_linear(vcpu, linear, data)

    def _check_ept(self, vcpu: Vcpu, linear: int, size: int, write: bool) -> None:
        """EptFault for the first page of the access whose guest-physical memory is not mapped
        or does not allow it; a page not present stops the check (the access raises #PF)."""
        needed = C.HV_MEMORY_WRITE if write else C.HV_MEMORY_READ
        address, end = linear, linear + size
        while address < end:
            gpa = self._translate(vcpu, address & M64)
            if gpa is None:
                return
            region = common.region_at(vcpu.space.regions, gpa)
            if region is None or not region.flags & needed:
                flags = 0 if region is None else region.flags
                raise EptFault(gpa, address & M64, write, flags)
            address = (address | 0xFFF) + 1

    def _deliver(self, vcpu: Vcpu, vector: int, kind: int, error: int | None, rip: int) -> None:
        uc = vcpu.uc
        state = self._snapshot(vcpu)
        idt_base, idt_limit = state.table(1)
        rflags = int(uc.reg_read(X.UC_X86_REG_RFLAGS)) & 0xFFFFFFFF
        if kind == C.IRQ_INFO_HARD_EXC and vector not in ERROR_CODE_VECTORS:
            error = None
        if not uc.reg_read(X.UC_X86_REG_CR0) & 1:
            self._deliver_real(vcpu, state, vector, rip, rflags)
            return
        ext = 0 if kind in _SOFTWARE else 1  # EXT: not caused by the program (INT n, INT3)
        long_mode = bool(state.efer & C.EFER_LMA)
        size = 16 if long_mode else 8
        if vector * size + size - 1 > idt_limit:
            raise Guard("IDT entry beyond the limit", C.IDT_GP, vector * 8 + 2 + ext)
        gate = self._delivery_read(vcpu, idt_base + vector * size, size)
        low, selector, ist, type_attr, mid = struct.unpack_from("<HHBBH", gate)
        gate_type = type_attr & 0x1F
        if gate_type not in ((0xE, 0xF) if long_mode else (0x5, 0x6, 0x7, 0xE, 0xF)):
            raise Guard(
                f"IDT entry {vector}: not an interrupt or trap gate", C.IDT_GP, vector * 8 + 2 + ext
            )
        cpl = state.cpl
        if kind in _SOFTWARE and (type_attr >> 5) & 3 < cpl:
            raise Guard("software interrupt through a gate of DPL < CPL", C.IDT_GP, vector * 8 + 2)
        if not type_attr & 0x80:
            raise Guard(f"IDT entry {vector} not present", C.IDT_NP, vector * 8 + 2 + ext)
        if gate_type == _TASK_GATE:
            self._check_tss(vcpu, state, selector, ext)
            raise TaskGate(selector)
        offset = low | mid << 16
        if long_mode:
            offset |= struct.unpack_from("<I", gate, 8)[0] << 32
        base, limit, flags = self._descriptor(vcpu, state, selector, ext)
        dpl = (flags >> 13) & 3
        code_segment = flags & (_CODE | _DESC_S) == _CODE | _DESC_S
        if not code_segment or dpl > cpl or (long_mode and not flags & DESC_L):
            raise Guard(
                f"bad handler code segment 0x{selector:x}", C.IDT_GP, selector & 0xFFFC | ext
            )
        new_cpl = cpl if flags & _CONFORMING else dpl
        cs = state.seg(1)[0]
        ss, ss_base, _, ss_flags = state.seg(2)
        rsp = int(uc.reg_read(X.UC_X86_REG_RSP))
        segs: dict[int, tuple[int | None, int | None, int | None, int | None]] = {
            1: ((selector & ~3) | new_cpl, base, limit, None)
        }
        raw = {1: flags}
        if long_mode:
            new_rsp = rsp
            if ist & 7:
                new_rsp = self._tss_stack(vcpu, state, 0x24 + 8 * ((ist & 7) - 1))
            elif new_cpl < cpl:
                new_rsp = self._tss_stack(vcpu, state, 4 + 8 * new_cpl)
            if new_cpl < cpl:  # SS becomes the null selector with RPL = the new CPL
                segs[2], raw[2] = (new_cpl, 0, 0, None), new_cpl << 13
            new_rsp &= ~0xF
            values = [ss, rsp, rflags, cs, rip] + ([error] if error is not None else [])
            frame = b"".join(struct.pack("<Q", v & M64) for v in reversed(values))
            new_rsp = (new_rsp - len(frame)) & M64
            self._delivery_write(vcpu, new_rsp, frame)
        else:
            if rflags & _VM:
                raise Guard("interrupt in virtual-8086 mode (not supported)")
            width = 4 if gate_type & 8 else 2
            values = [rflags, cs, rip] + ([error] if error is not None else [])
            stack_base, mask, sp = ss_base, 0xFFFFFFFF if ss_flags & DESC_B else 0xFFFF, rsp
            if new_cpl < cpl:
                new_ss, new_sp = self._tss_stack32(vcpu, state, new_cpl)
                stack_base, stack_limit, ss_flags = self._descriptor(
                    vcpu, state, new_ss, ext, stack=True
                )
                segs[2], raw[2] = (new_ss, stack_base, stack_limit, None), ss_flags
                values = [ss, rsp, *values]
                mask = 0xFFFFFFFF if ss_flags & DESC_B else 0xFFFF
                sp = new_sp
            fmt = "<I" if width == 4 else "<H"
            frame = b"".join(struct.pack(fmt, v & (1 << 8 * width) - 1) for v in reversed(values))
            sp = (sp - len(frame)) & mask
            self._delivery_write(vcpu, (stack_base + sp) & 0xFFFFFFFF, frame)
            new_rsp = (rsp & ~mask) | sp if new_cpl == cpl else sp
            if width == 2:
                offset &= 0xFFFF
        uc.reg_write(X.UC_X86_REG_RSP, new_rsp)
        mask = _TF | _NT | _RF | _VM | (_IF if not gate_type & 1 else 0)  # interrupt gate: IF
        uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~mask)
        self._patch(vcpu, segs=segs, raw_flags=raw)
        uc.reg_write(X.UC_X86_REG_RIP, offset)

    def _deliver_real(
        self, vcpu: Vcpu, state: Snapshot, vector: int, rip: int, rflags: int
    ) -> None:
        """Real mode: through the IVT, a 16-bit frame on SS:SP."""
        uc = vcpu.uc
        idt_base, idt_limit = state.table(1)
        if vector * 4 + 3 > idt_limit:
            raise Guard("IVT entry beyond the limit")
        offset, segment = struct.unpack("<HH", self._delivery_read(vcpu, idt_base + vector * 4, 4))
        ss_base = state.seg(2)[1]
        sp = uc.reg_read(X.UC_X86_REG_RSP) & 0xFFFF
        frame = struct.pack("<HHH", rip & 0xFFFF, state.seg(1)[0], rflags & 0xFFFF)
        sp = (sp - 6) & 0xFFFF
        self._delivery_write(vcpu, ss_base + sp, frame)
        uc.reg_write(X.UC_X86_REG_RSP, sp)
        uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~(_TF | _IF | 1 << 18))  # and AC
        self._patch(vcpu, segs={1: (segment, segment << 4, 0xFFFF, None)})
        uc.reg_write(X.UC_X86_REG_RIP, offset)

    def _tss_stack(self, vcpu: Vcpu, state: Snapshot, offset: int) -> int:
        """A stack pointer of the 64-bit TSS (RSPn at 4 + 8n, ISTn at 0x24 + 8(n - 1))."""
        selector, base, limit, _ = state.seg(7)
        if offset + 7 > limit:
            raise Guard("TSS too short", C.IDT_TS, selector & 0xFFFC)
        return int(struct.unpack("<Q", self._delivery_read(vcpu, base + offset, 8))[0])

    def _tss_stack32(self, vcpu: Vcpu, state: Snapshot, cpl: int) -> tuple[int, int]:
        """(SSn, ESPn) of the 32-bit TSS."""
        selector, base, limit, flags = state.seg(7)
        if (flags >> 8) & 0xF not in (0x9, 0xB) or 8 + 8 * cpl + 1 > limit:
            raise Guard("no 32-bit TSS", C.IDT_TS, selector & 0xFFFC)
        esp, ss = struct.unpack("<IH", self._delivery_read(vcpu, base + 4 + 8 * cpl, 6))
        return ss, esp

    def _check_tss(
        self, vcpu: Vcpu, state: Snapshot, selector: int, ext: int, iret: bool = False
    ) -> None:
        """The checks VMX makes on the new TSS before a task switch exits (SDM "Task
        Switches" in VMX non-root operation), as QEMU's switch_tss makes them: a Guard with
        the fault otherwise. In the GDT (else #TS), within its limit (#GP), a TSS (#GP),
        present (#NP), long enough (#TS); available for CALL/JMP/an event (#GP), busy for
        IRET (#TS)."""
        error = selector & 0xFFFC | ext
        table_base, table_limit = state.table(0)
        if selector & 4:
            raise Guard(f"TSS selector 0x{selector:x} in the LDT", C.IDT_TS, error)
        if selector & 0xFFFC == 0 or (selector & ~7) + 7 > table_limit:
            raise Guard(f"TSS selector 0x{selector:x} beyond the GDT", C.IDT_GP, error)
        low, high = struct.unpack("<II", self._delivery_read(vcpu, table_base + (selector & ~7), 8))
        kind = high >> 8 & 0xF
        if high & _DESC_S or kind & 7 not in (1, 3):
            raise Guard(f"selector 0x{selector:x} is no TSS", C.IDT_GP, error)
        if not high & DESC_P:
            raise Guard(f"TSS 0x{selector:x} not present", C.IDT_NP, error)
        limit = (low & 0xFFFF) | (high & 0xF0000)
        if high & _DESC_G:
            limit = limit << 12 | 0xFFF
        if limit < (0x67 if kind & 8 else 0x2B):
            raise Guard(f"TSS 0x{selector:x} too short", C.IDT_TS, error)
        busy = bool(kind & 2)
        if busy != iret:
            raise Guard(f"TSS 0x{selector:x} busy state", C.IDT_TS if iret else C.IDT_GP, error)

    def _descriptor(
        self, vcpu: Vcpu, state: Snapshot, selector: int, ext: int, stack: bool = False
    ) -> tuple[int, int, int]:
        """(base, limit, QEMU flags) of the code (or, with ``stack``, stack) segment
        ``selector`` names, from the GDT or the LDT."""
        index = selector & ~7
        table_base, table_limit = state.table(0)
        if selector & 4:
            _, table_base, table_limit, _ = state.seg(6)
        error = selector & 0xFFFC | ext
        fault = C.IDT_TS if stack else C.IDT_GP
        if selector & 0xFFFC == 0 or index + 7 > table_limit:
            raise Guard(f"bad selector 0x{selector:x}", fault, error)
        e1, e2 = struct.unpack("<II", self._delivery_read(vcpu, table_base + index, 8))
        if stack and (
            e2 & (_CODE | 0x200 | _DESC_S) != 0x200 | _DESC_S or (e2 >> 13) & 3 != selector & 3
        ):
            raise Guard(f"bad stack segment 0x{selector:x}", C.IDT_TS, error)
        if not e2 & DESC_P:
            raise Guard(
                f"segment 0x{selector:x} not present", C.IDT_SS if stack else C.IDT_NP, error
            )
        base = (e1 >> 16) | (e2 & 0xFF) << 16 | (e2 & 0xFF000000)
        limit = (e1 & 0xFFFF) | (e2 & 0xF0000)
        if e2 & _DESC_G:
            limit = limit << 12 | 0xFFF
        return base, limit, e2

    # --- SYSCALL / SYSENTER, and returns to non-canonical addresses ------------------------------

    def _system_instruction(self, vcpu: Vcpu) -> None:
        """Give the SYSCALL or SYSENTER that unicorn stepped over its architectural effect
        (RIP is after it); a fault (#UD, #GP) is left pending at the instruction."""
        assert vcpu.system_insn is not None
        kind, address = vcpu.system_insn
        vcpu.system_insn = None
        uc = vcpu.uc
        state = self._snapshot(vcpu)
        lma = bool(state.efer & C.EFER_LMA)
        rflags = int(uc.reg_read(X.UC_X86_REG_RFLAGS))
        next_rip = int(uc.reg_read(X.UC_X86_REG_RIP))

        def msr(index: int) -> int:
            return int(uc.reg_read(X.UC_X86_REG_MSR, index))

        def fault(vector: int, error: int | None) -> None:
            uc.reg_write(X.UC_X86_REG_RIP, address)
            vcpu.pending_event = (vector, C.IRQ_INFO_HARD_EXC, error)

        if kind == "syscall":
            if not state.efer & C.EFER_SCE:
                fault(C.IDT_UD, None)
                return
            selector = (msr(C.MSR_STAR) >> 32) & 0xFFFF
            if lma:
                uc.reg_write(X.UC_X86_REG_RCX, next_rip)
                uc.reg_write(X.UC_X86_REG_R11, rflags & ~_RF)
                target = msr(C.MSR_LSTAR if state.hflags & HF_CS64 else C.MSR_CSTAR)
                rflags &= ~msr(C.MSR_SF_MASK)
                code = _FLAT_CODE | DESC_L
            else:
                uc.reg_write(X.UC_X86_REG_RCX, next_rip & 0xFFFFFFFF)
                target = msr(C.MSR_STAR) & 0xFFFFFFFF
                rflags &= ~(_IF | _VM)
                code = _FLAT_CODE | DESC_B
            stack_pointer = None
        else:
            selector = msr(C.MSR_IA32_SYSENTER_CS) & 0xFFFF
            if selector & 0xFFFC == 0:
                fault(C.IDT_GP, 0)
                return
            target = msr(C.MSR_IA32_SYSENTER_EIP)
            stack_pointer = msr(C.MSR_IA32_SYSENTER_ESP)
            if not lma:
                target, stack_pointer = target & 0xFFFFFFFF, stack_pointer & 0xFFFFFFFF
            rflags &= ~(_IF | _VM)
            code = _FLAT_CODE | (DESC_L if lma else DESC_B)
        uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~_RF)
        if stack_pointer is not None:
            uc.reg_write(X.UC_X86_REG_RSP, stack_pointer)
        self._patch(
            vcpu,
            segs={
                1: (selector & 0xFFFC, 0, 0xFFFFFFFF, None),
                2: ((selector + 8) & 0xFFFF, 0, 0xFFFFFFFF, None),
            },
            raw_flags={1: code, 2: _FLAT_DATA},
        )
        uc.reg_write(X.UC_X86_REG_RIP, target)

    def _check_return(self, vcpu: Vcpu, address: int, kind: str) -> None:
        """Before an IRETQ or SYSRETQ (REX.W) at CPL0: #GP(0) here when it would return to a
        non-canonical 64-bit address (unicorn would fault at the fetch, in ring 3). The
        common case, a canonical target, costs a register read (and a stack read)."""
        uc = vcpu.uc
        cs = 0
        if kind == "sysret":
            target = int(uc.reg_read(X.UC_X86_REG_RCX))
        else:
            frame = self._read_linear(vcpu, int(uc.reg_read(X.UC_X86_REG_RSP)), 16)
            if len(frame) != 16:
                return  # QEMU raises the #PF
            target, cs = struct.unpack("<QQ", frame)
        if canonical(target):
            return
        code = self._read_linear(vcpu, address, 4)
        if not code or not 0x48 <= code[0] <= 0x4F or not code[0] & 8:
            return  # not the 64-bit form: returns to 32-bit code
        state = self._snapshot(vcpu)
        if state.cpl != 0 or not state.hflags & HF_CS64:
            return  # QEMU raises #GP itself outside ring 0; 64-bit mode only
        if kind == "sysret" and not state.efer & C.EFER_SCE:
            return  # #UD, QEMU's
        if kind == "iretq":
            try:
                flags = self._descriptor(vcpu, state, cs & 0xFFFF, 0)[2]
            except (Guard, EptFault):
                return  # QEMU raises the #GP/#NP (or exits)
            if not flags & DESC_L:
                return  # to compatibility mode: EIP
        vcpu.pending_event = (C.IDT_GP, C.IRQ_INFO_HARD_EXC, 0)
        uc.emu_stop()
