"""Registers, FP state and VMCS fields on the KVM backend: views of KVM's vCPU state.

Theory of operation
-------------------
* GPRs, RIP and RFLAGS are 64-bit words of ``struct kvm_regs`` (a memoryview: indexing is
  cheaper than ctypes attributes). The hot calls (``hv_vcpu_read_register``,
  ``hv_vcpu_write_register``, ``hv_vmx_vcpu_read_vmcs``, ``hv_vmx_vcpu_write_vmcs``) check the
  owner with one dictionary lookup and serve those registers and the exit fields at once.
* VMCS guest-state fields are views of KVM's state (:meth:`Registers._guest_field`): kvm_sregs
  (segments, their access rights packed as VMX packs them, descriptor tables, CR0/CR3/CR4,
  EFER), kvm_regs (RIP, RSP, RFLAGS), DR7, a few MSRs and the interruptibility state (KVM's vCPU
  events). The segment, descriptor-table and control registers of ``hv_vcpu_read_register``
  are those fields. A write to KVM's register state drops the vCPU's cached translations.
* CR4.VMXE, which VMX requires and KVM without nested VMX refuses, is kept beside KVM's CR4
  (:meth:`Registers._guest_cr4`); the PAE PDPTEs are kept for read-back only.
* Controls are kept in ``vcpu.controls``; kvm_entry turns them into KVM settings at the next
  entry. The VM-entry controls read back as the processor leaves them at an exit (IA-32e mode
  guest = EFER.LMA) unless the VMM wrote them since the last entry.
* Exit fields are ``vcpu.exit``, set at the exit (an I/O site's dictionary is shared between its
  exits: never mutated); an I/O exit's RCX/RSI/RDI/RIP fields are read from the registers.
* With the VMX entry checks on, every write a check reads touches the vCPU's gate (kvm_gate).
"""

from __future__ import annotations

import ctypes
import threading

from ..buffers import Buffer
from . import common, kvm_gate, vmx_rules
from . import constants as C
from . import kvm_abi as K
from .kvm_msrs import Msrs
from .kvm_state import MASK64, Vcpu, forget_translations
from .posix import ioctl

_EXIT_FIELDS = C.VMCS_EXIT_INFORMATION_FIELDS | C.GDBSTUB_VMCS_MMIO_FIELDS

# Order of segments in VMCS encodings (ES, CS, SS, DS, FS, GS, LDTR, TR) and in kvm_sregs.
_VMCS_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")

_GPR_FIELDS = {
    C.HV_X86_RIP: "rip",
    C.HV_X86_RFLAGS: "rflags",
    C.HV_X86_RAX: "rax",
    C.HV_X86_RCX: "rcx",
    C.HV_X86_RDX: "rdx",
    C.HV_X86_RBX: "rbx",
    C.HV_X86_RSI: "rsi",
    C.HV_X86_RDI: "rdi",
    C.HV_X86_RSP: "rsp",
    C.HV_X86_RBP: "rbp",
    C.HV_X86_R8: "r8",
    C.HV_X86_R9: "r9",
    C.HV_X86_R10: "r10",
    C.HV_X86_R11: "r11",
    C.HV_X86_R12: "r12",
    C.HV_X86_R13: "r13",
    C.HV_X86_R14: "r14",
    C.HV_X86_R15: "r15",
}
# hv_x86_reg_t -> index of the register in struct kvm_regs seen as 64-bit words
_KVM_REGS_ORDER = [name for name, *_ in K.KvmRegs._fields_]
_GPR_INDEX = {reg: _KVM_REGS_ORDER.index(name) for reg, name in _GPR_FIELDS.items()}
RIP_INDEX = _GPR_INDEX[C.HV_X86_RIP]

# Registers that are VMCS guest-state fields: read and written through _guest_field.
_REG_FIELDS = {
    C.HV_X86_ES: C.VMCS_GUEST_ES,
    C.HV_X86_CS: C.VMCS_GUEST_CS,
    C.HV_X86_SS: C.VMCS_GUEST_SS,
    C.HV_X86_DS: C.VMCS_GUEST_DS,
    C.HV_X86_FS: C.VMCS_GUEST_FS,
    C.HV_X86_GS: C.VMCS_GUEST_GS,
    C.HV_X86_LDTR: C.VMCS_GUEST_LDTR,
    C.HV_X86_TR: C.VMCS_GUEST_TR,
    C.HV_X86_IDT_BASE: C.VMCS_GUEST_IDTR_BASE,
    C.HV_X86_IDT_LIMIT: C.VMCS_GUEST_IDTR_LIMIT,
    C.HV_X86_GDT_BASE: C.VMCS_GUEST_GDTR_BASE,
    C.HV_X86_GDT_LIMIT: C.VMCS_GUEST_GDTR_LIMIT,
    C.HV_X86_LDT_BASE: C.VMCS_GUEST_LDTR_BASE,
    C.HV_X86_LDT_LIMIT: C.VMCS_GUEST_LDTR_LIMIT,
    C.HV_X86_LDT_AR: C.VMCS_GUEST_LDTR_AR,
    C.HV_X86_TSS_BASE: C.VMCS_GUEST_TR_BASE,
    C.HV_X86_TSS_LIMIT: C.VMCS_GUEST_TR_LIMIT,
    C.HV_X86_TSS_AR: C.VMCS_GUEST_TR_AR,
    C.HV_X86_CR0: C.VMCS_GUEST_CR0,
    C.HV_X86_CR3: C.VMCS_GUEST_CR3,
    C.HV_X86_CR4: C.VMCS_GUEST_CR4,
}

# I/O exit fields answered from the registers (VMCS_RO_IO_RIP is kept at the exit)
_IO_EXIT_REGS = {
    C.VMCS_RO_IO_RCX: "rcx",
    C.VMCS_RO_IO_RSI: "rsi",
    C.VMCS_RO_IO_RDI: "rdi",
}

_get_ident = threading.get_ident


def _seg_ar(seg: K.KvmSegment) -> int:
    return int(
        seg.type
        | seg.s << 4
        | seg.dpl << 5
        | seg.present << 7
        | seg.avl << 12
        | seg.l << 13
        | seg.db << 14
        | seg.g << 15
        | seg.unusable << 16
    )


def _set_seg_ar(seg: K.KvmSegment, ar: int) -> None:
    seg.type = ar & 0xF
    seg.s = ar >> 4 & 1
    seg.dpl = ar >> 5 & 3
    seg.present = ar >> 7 & 1
    seg.avl = ar >> 12 & 1
    seg.l = ar >> 13 & 1
    seg.db = ar >> 14 & 1
    seg.g = ar >> 15 & 1
    seg.unusable = ar >> 16 & 1


def _guest_field_table() -> dict[int, tuple[str, str | int, str]]:
    """VMCS guest-state field -> (cached struct or "msr"/"intr", member, attribute)."""
    table: dict[int, tuple[str, str | int, str]] = {}
    for i, seg in enumerate(_VMCS_SEGMENTS):
        table[C.VMCS_GUEST_ES + 2 * i] = ("sregs", seg, "selector")
        table[C.VMCS_GUEST_ES_LIMIT + 2 * i] = ("sregs", seg, "limit")
        table[C.VMCS_GUEST_ES_AR + 2 * i] = ("sregs", seg, "ar")
        table[C.VMCS_GUEST_ES_BASE + 2 * i] = ("sregs", seg, "base")
    table.update(
        {
            C.VMCS_GUEST_GDTR_BASE: ("sregs", "gdt", "base"),
            C.VMCS_GUEST_GDTR_LIMIT: ("sregs", "gdt", "limit"),
            C.VMCS_GUEST_IDTR_BASE: ("sregs", "idt", "base"),
            C.VMCS_GUEST_IDTR_LIMIT: ("sregs", "idt", "limit"),
            C.VMCS_GUEST_CR0: ("sregs", "", "cr0"),
            C.VMCS_GUEST_CR3: ("sregs", "", "cr3"),
            C.VMCS_GUEST_CR4: ("sregs", "", "cr4"),
            C.VMCS_GUEST_IA32_EFER: ("sregs", "", "efer"),
            C.VMCS_GUEST_RIP: ("regs", "", "rip"),
            C.VMCS_GUEST_RSP: ("regs", "", "rsp"),
            C.VMCS_GUEST_RFLAGS: ("regs", "", "rflags"),
            C.VMCS_GUEST_DR7: ("dregs", "", "dr7"),
            C.VMCS_GUEST_IA32_PAT: ("msr", C.MSR_IA32_PAT, ""),
            C.VMCS_GUEST_IA32_DEBUGCTL: ("msr", C.MSR_IA32_DEBUGCTL, ""),
            C.VMCS_GUEST_IA32_SYSENTER_CS: ("msr", C.MSR_IA32_SYSENTER_CS, ""),
            C.VMCS_GUEST_SYSENTER_ESP: ("msr", C.MSR_IA32_SYSENTER_ESP, ""),
            C.VMCS_GUEST_SYSENTER_EIP: ("msr", C.MSR_IA32_SYSENTER_EIP, ""),
            C.VMCS_GUEST_INTERRUPTIBILITY: ("intr", "", ""),
        }
    )
    return table


_GUEST_FIELDS = _guest_field_table()
_GUEST_CR4 = C.VMCS_GUEST_CR4
_CR4_KEPT = C.CR4_VMXE
"""CR4 bits KVM refuses without nested VMX that VMX requires: kept out of KVM's CR4."""


class Registers(Msrs):
    """Registers, FP state and VMCS fields (see the module docstring)."""

    _xsave_size: int  # bytes of the XSAVE image hv_vcpu_read_fpstate returns

    # --- registers --------------------------------------------------------------------------------

    def hv_vcpu_read_register(self, vid: int, reg: int) -> int:
        vcpu = self._live.get(vid)
        if vcpu is None or vcpu.owner != _get_ident():
            vcpu = self._vcpu(vid, "hv_vcpu_read_register")  # raises
        index = _GPR_INDEX.get(reg)
        if index is None:
            return self._read_other_register(vcpu, reg)
        if not vcpu.state["regs"]:
            self._get(vcpu, "regs")
        value: int = vcpu.regs_q[index]
        return value

    def _read_other_register(self, vcpu: Vcpu, reg: int) -> int:
        """hv_vcpu_read_register of anything but a GPR, RIP or RFLAGS (the hot call serves
        those with one lookup)."""
        field_ = _REG_FIELDS.get(reg)
        value = None if field_ is None else self._guest_field(vcpu, field_, None)
        if value is not None:
            return value
        if reg == C.HV_X86_CR2:
            return int(self._get(vcpu, "sregs").cr2)
        if reg == C.HV_X86_TPR:
            return int(self._get(vcpu, "sregs").cr8) << 4
        if reg == C.HV_X86_CR1:
            return 0
        if C.HV_X86_DR0 <= reg <= C.HV_X86_DR7:
            dregs = self._get(vcpu, "dregs")
            index = reg - C.HV_X86_DR0
            if index < 4:
                return int(dregs.db[index])
            return int(dregs.dr6 if index in (4, 6) else dregs.dr7)
        if reg == C.HV_X86_XCR0:
            xcrs = K.KvmXcrs()
            ioctl(vcpu.fd, K.KVM_GET_XCRS, xcrs)
            for i in range(xcrs.nr_xcrs):
                if xcrs.xcrs[i].xcr == 0:
                    return int(xcrs.xcrs[i].value)
            return 1
        raise common.bad("hv_vcpu_read_register", f"unknown register {reg}")

    def hv_vcpu_write_register(self, vid: int, reg: int, value: int) -> None:
        vcpu = self._live.get(vid)
        if vcpu is None or vcpu.owner != _get_ident():
            vcpu = self._vcpu(vid, "hv_vcpu_write_register")  # raises
        if not 0 <= value <= MASK64:
            raise common.bad("hv_vcpu_write_register", f"value {value:#x} does not fit 64 bits")
        gate = vcpu.gate
        if gate is not None:
            gate.touch_register(reg)
        index = _GPR_INDEX.get(reg)
        if index is None:
            self._write_other_register(vcpu, reg, value)
            return
        state = vcpu.state
        if not state["regs"]:
            self._get(vcpu, "regs")
        vcpu.regs_q[index] = value
        state["regs"] = 2
        if index != RIP_INDEX:
            vcpu.kvm_rip = None

    def _write_other_register(self, vcpu: Vcpu, reg: int, value: int) -> None:
        """hv_vcpu_write_register of anything but a GPR, RIP or RFLAGS."""
        if not 0 <= reg < C.HV_X86_REGISTERS_MAX:
            raise common.bad("hv_vcpu_write_register", f"unknown register {reg}")
        field_ = _REG_FIELDS.get(reg)
        if field_ is not None:
            self._guest_field(vcpu, field_, value)
            return
        if reg == C.HV_X86_CR1:
            return
        if reg in (C.HV_X86_CR2, C.HV_X86_TPR):
            sregs = self._dirty(vcpu, "sregs")
            if reg == C.HV_X86_CR2:
                sregs.cr2 = value
            else:
                sregs.cr8 = (value >> 4) & 0xF
            forget_translations(vcpu)
            return
        if C.HV_X86_DR0 <= reg <= C.HV_X86_DR7:
            dregs = self._dirty(vcpu, "dregs")
            index = reg - C.HV_X86_DR0
            if index < 4:
                dregs.db[index] = value
            elif index in (4, 6):
                dregs.dr6 = value
            else:
                dregs.dr7 = value
            vcpu.guest_debug_dirty = True
            vcpu.plain_entry = False
            return
        if reg == C.HV_X86_XCR0:
            xcrs = K.KvmXcrs()
            xcrs.nr_xcrs = 1
            xcrs.xcrs[0].xcr = 0
            xcrs.xcrs[0].value = value
            try:
                ioctl(vcpu.fd, K.KVM_SET_XCRS, xcrs)
            except OSError as exc:
                raise common.bad(
                    "hv_vcpu_write_register", f"XCR0 {value:#x}: {exc.strerror}"
                ) from exc
            return
        raise common.bad("hv_vcpu_write_register", f"unknown register {reg}")

    # --- fpstate ----------------------------------------------------------------------------------

    def hv_vcpu_read_fpstate(self, vid: int, buffer: Buffer, size: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_read_fpstate")
        view = common.check_fp_buffer("hv_vcpu_read_fpstate", buffer, size, self._xsave_size)
        if view.readonly:
            raise common.bad("hv_vcpu_read_fpstate", "buffer is read-only")
        xsave = K.KvmXsave()
        ioctl(vcpu.fd, K.KVM_GET_XSAVE, xsave)
        count = min(size, ctypes.sizeof(xsave))
        view[:count] = bytes(xsave)[:count]

    def hv_vcpu_write_fpstate(self, vid: int, buffer: Buffer, size: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_write_fpstate")
        view = common.check_fp_buffer("hv_vcpu_write_fpstate", buffer, size, self._xsave_size)
        xsave = K.KvmXsave()
        count = min(size, ctypes.sizeof(xsave))
        ctypes.memmove(xsave.region, bytes(view[:count]), count)
        try:
            ioctl(vcpu.fd, K.KVM_SET_XSAVE, xsave)
        except OSError as exc:
            raise common.bad(
                "hv_vcpu_write_fpstate", f"invalid XSAVE image: {exc.strerror}"
            ) from exc

    # --- VMCS -------------------------------------------------------------------------------------

    def hv_vmx_vcpu_read_vmcs(self, vid: int, field_: int) -> int:
        vcpu = self._live.get(vid)
        if vcpu is None or vcpu.owner != _get_ident():
            vcpu = self._vcpu(vid, "hv_vmx_vcpu_read_vmcs")  # raises
        value = vcpu.exit.get(field_)  # only exit fields live there
        if value is not None:
            return value
        if field_ in _EXIT_FIELDS:
            if vcpu.exit[C.VMCS_RO_EXIT_REASON] == C.VMX_REASON_IO:
                # I/O RCX/RSI/RDI/RIP: the registers of the I/O instruction (read them before
                # changing those registers)
                if field_ == C.VMCS_RO_IO_RIP:
                    return vcpu.io_exit_rip
                name = _IO_EXIT_REGS.get(field_)
                if name is not None:
                    register: int = getattr(self._get(vcpu, "regs"), name)
                    return register
            return 0
        return self._state_field(vcpu, field_)

    def _state_field(self, vcpu: Vcpu, field_: int) -> int:
        """A VMCS field that is no exit-information field (guest state or controls)."""
        guest = self._guest_field(vcpu, field_, None)
        if guest is not None:
            return guest
        value = vcpu.controls.get(field_)
        if value is None:
            raise common.field_error("hv_vmx_vcpu_read_vmcs", field_, "kvm")
        if field_ == C.VMCS_CTRL_VMENTRY_CONTROLS and not vcpu.entry_written:
            # the processor stores EFER.LMA into the IA-32e mode guest control at an exit
            value = vmx_rules.entry_controls_after_exit(value, self._get(vcpu, "sregs").efer)
        return value

    def hv_vmx_vcpu_write_vmcs(self, vid: int, field_: int, value: int) -> None:
        vcpu = self._live.get(vid)
        if vcpu is None or vcpu.owner != _get_ident():
            vcpu = self._vcpu(vid, "hv_vmx_vcpu_write_vmcs")  # raises
        vcpu.plain_entry = False
        if not 0 <= value < 1 << 64:
            raise common.bad("hv_vmx_vcpu_write_vmcs", "value out of range")
        if vcpu.gate is not None:
            kvm_gate.refuse_control_write(vcpu.gate, field_, value)  # touches the field
        if field_ == C.GDBSTUB_VMCS_MMIO_DATA:
            vcpu.exit = {**vcpu.exit, field_: value}  # exit dicts may be shared: copy
            return
        if self._guest_field(vcpu, field_, value) is not None:
            return
        if field_ in vcpu.controls and field_ not in (C.VMCS_GUEST_ACTIVITY_STATE,):
            old, vcpu.controls[field_] = vcpu.controls[field_], value
            if field_ == C.VMCS_CTRL_VMENTRY_CONTROLS:
                vcpu.entry_written = True
            if field_ in (C.VMCS_CTRL_EXC_BITMAP, C.VMCS_CTRL_CPU_BASED) and value != old:
                vcpu.guest_debug_dirty = True  # KVM_SET_GUEST_DEBUG before the next entry
            return
        if field_ == C.VMCS_GUEST_ACTIVITY_STATE:
            if value not in (0, 1, 2, 3):
                raise common.bad("hv_vmx_vcpu_write_vmcs", f"activity state {value}")
            vcpu.controls[field_] = value
            return
        raise common.field_error("hv_vmx_vcpu_write_vmcs", field_, "kvm")

    def _guest_field(self, vcpu: Vcpu, field_: int, value: int | None) -> int | None:
        """Read (value None) or write a guest-state field kept in KVM state; None if not one."""
        if field_ == _GUEST_CR4:
            return self._guest_cr4(vcpu, value)
        where = _GUEST_FIELDS.get(field_)
        if where is None:
            return None
        kind, name, attr = where
        if kind == "msr":
            if value is None:
                return self._get_msr(vcpu, int(name))
            self._set_msr(vcpu, int(name), value)
            return value
        if kind == "intr":
            return self._interruptibility(vcpu, value)
        obj = self._get(vcpu, kind) if value is None else self._dirty(vcpu, kind)
        if name:
            obj = getattr(obj, str(name))
        if value is None:
            return _seg_ar(obj) if attr == "ar" else int(getattr(obj, attr))
        if attr == "ar":
            _set_seg_ar(obj, value)
        else:
            width = {"selector": 0xFFFF, "limit": 0xFFFFFFFF}.get(attr, (1 << 64) - 1)
            if kind == "sregs" and name in ("gdt", "idt") and attr == "limit":
                width = 0xFFFF
            setattr(obj, attr, value & width)
        if kind == "dregs":
            vcpu.guest_debug_dirty = True
            vcpu.plain_entry = False
        forget_translations(vcpu)
        return value

    def _guest_cr4(self, vcpu: Vcpu, value: int | None) -> int:
        """VMCS_GUEST_CR4 (and HV_X86_CR4): KVM's CR4 plus the bits kept from it.

        VMX requires CR4.VMXE in the guest's CR4 (HV_VMX_CAP_CR4_FIXED0), and a framework VMM
        ORs it in and hides it behind the CR4 guest/host mask with read shadow 0. KVM without
        nested VMX refuses CR4.VMXE (KVM_SET_SREGS fails), so the bit is kept here for
        read-back and stripped from what KVM gets. Guest code that reads CR4 on kvm sees
        KVM's CR4, i.e. without VMXE: exactly what the guest reads on the framework when the
        VMM masks VMXE with shadow 0 (cr_guest_view); a VMM that leaves VMXE unmasked would
        let its guest read VMXE=1 on a Mac (docs/library.md). CR0.NE needs no such care: KVM
        accepts it and runs the guest with it, as VMX does."""
        if value is None:
            return int(self._get(vcpu, "sregs").cr4) | vcpu.cr4_kept
        sregs = self._dirty(vcpu, "sregs")
        vcpu.cr4_kept = value & _CR4_KEPT
        sregs.cr4 = value & ~_CR4_KEPT
        forget_translations(vcpu)
        return value

    def _interruptibility(self, vcpu: Vcpu, value: int | None) -> int:
        events = self._get(vcpu, "events") if value is None else self._dirty(vcpu, "events")
        if value is None:
            shadow = events.interrupt.shadow
            result = C.GUEST_INTRBILITY_STI_BLOCKING if shadow & K.KVM_X86_SHADOW_INT_STI else 0
            if shadow & K.KVM_X86_SHADOW_INT_MOV_SS:
                result |= C.GUEST_INTRBILITY_MOVSS_BLOCKING
            if events.nmi.masked:
                result |= C.GUEST_INTRBILITY_NMI_BLOCKING
            return result
        shadow = K.KVM_X86_SHADOW_INT_STI if value & C.GUEST_INTRBILITY_STI_BLOCKING else 0
        if value & C.GUEST_INTRBILITY_MOVSS_BLOCKING:
            shadow |= K.KVM_X86_SHADOW_INT_MOV_SS
        events.interrupt.shadow = shadow
        events.nmi.masked = 1 if value & C.GUEST_INTRBILITY_NMI_BLOCKING else 0
        return value
