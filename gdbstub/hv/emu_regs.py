"""The emu backend's registers, FPU state, MSRs, TSC and VMCS fields.

Theory of operation
-------------------
General registers go straight to unicorn; segment caches, descriptor tables, control registers
and EFER through the context patches of :mod:`emu_state`. MSRs are unicorn's (QEMU's), but for
EFER (patched, with LMA kept consistent) and the TSC: the guest's TSC is the host's tick
counter plus QEMU's ``tsc_offset``, which RDTSC, RDTSCP and RDMSR add in unicorn, so IA32_TSC
writes and ``hv_vm_sync_tsc`` set that offset (at the vCPU's next entry when another thread
asks). The VMCS is a dictionary of controls plus the guest-state fields mapped onto the above.
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Callable
from typing import Any

from ..buffers import Buffer
from . import common, vmx_rules
from . import constants as C
from .emu_events import Events
from .emu_state import M64, SELECTOR_REGS, Vcpu, X, flush_tlb, unicorn
from .errors import HvError

EXIT_FIELDS = C.VMCS_EXIT_INFORMATION_FIELDS | C.GDBSTUB_VMCS_MMIO_FIELDS

_GPR = {
    C.HV_X86_RIP: X.UC_X86_REG_RIP,
    C.HV_X86_RFLAGS: X.UC_X86_REG_RFLAGS,
    C.HV_X86_RAX: X.UC_X86_REG_RAX,
    C.HV_X86_RCX: X.UC_X86_REG_RCX,
    C.HV_X86_RDX: X.UC_X86_REG_RDX,
    C.HV_X86_RBX: X.UC_X86_REG_RBX,
    C.HV_X86_RSI: X.UC_X86_REG_RSI,
    C.HV_X86_RDI: X.UC_X86_REG_RDI,
    C.HV_X86_RSP: X.UC_X86_REG_RSP,
    C.HV_X86_RBP: X.UC_X86_REG_RBP,
    C.HV_X86_R8: X.UC_X86_REG_R8,
    C.HV_X86_R9: X.UC_X86_REG_R9,
    C.HV_X86_R10: X.UC_X86_REG_R10,
    C.HV_X86_R11: X.UC_X86_REG_R11,
    C.HV_X86_R12: X.UC_X86_REG_R12,
    C.HV_X86_R13: X.UC_X86_REG_R13,
    C.HV_X86_R14: X.UC_X86_REG_R14,
    C.HV_X86_R15: X.UC_X86_REG_R15,
}


_XSAVE_SIZE = 832  # legacy area, XSAVE header, AVX (YMM upper halves) at 576
_XSTATE_X87_SSE_AVX = 7
# MSRs the software vCPU has (QEMU's rdmsr/wrmsr in unicorn keep these; it reads any other as 0
# and drops writes). hv_vcpu_read_msr/write_msr take the framework's list (common.FRAMEWORK_MSRS)
# and refuse others; a framework MSR unicorn does not keep (PMCs, LBRs, SPEC_CTRL...) is kept in
# the vCPU's books (a guest RDMSR/WRMSR of it exits unless the VMM granted it: then unicorn's 0).
_KNOWN_MSRS = frozenset(
    {C.MSR_TSC, 0xFE, 0x179, 0x17A, 0x17B, C.MSR_IA32_MISC_ENABLE, C.MSR_IA32_PAT, 0x2FF}
    | set(range(C.MSR_IA32_SYSENTER_CS, C.MSR_IA32_SYSENTER_EIP + 1))
    | set(range(0x200, 0x210))  # variable-range MTRRs
    | {0x250, 0x258, 0x259, *range(0x268, 0x270)}  # fixed-range MTRRs
    | set(range(0x400, 0x400 + 4 * 10))  # machine-check banks (MCG_CAP: 10)
    | {0xD90}  # IA32_BNDCFGS
    | set(range(C.MSR_EFER, C.MSR_SF_MASK + 1))
    | set(range(C.MSR_FSBASE, C.MSR_TSC_AUX + 1))
    | {0xC0010117}  # VM_HSAVE_PA
)

_MSR_FIELDS = {
    C.VMCS_GUEST_IA32_PAT: C.MSR_IA32_PAT,
    C.VMCS_GUEST_IA32_DEBUGCTL: C.MSR_IA32_DEBUGCTL,
    C.VMCS_GUEST_IA32_SYSENTER_CS: C.MSR_IA32_SYSENTER_CS,
    C.VMCS_GUEST_SYSENTER_ESP: C.MSR_IA32_SYSENTER_ESP,
    C.VMCS_GUEST_SYSENTER_EIP: C.MSR_IA32_SYSENTER_EIP,
    C.VMCS_GUEST_IA32_EFER: C.MSR_EFER,
}


_ticks_lock = threading.Lock()
_ticks_uc: list[Any] = []


def _host_ticks() -> int:
    """The host tick counter unicorn's RDTSC reads (QEMU's cpu_get_host_ticks): an RDTSC run
    in a spare unicorn CPU whose TSC offset is 0 (unicorn's RDMSR does not know IA32_TSC).

    One instruction by count, with exits enabled and none listed: an ``emu_start`` with an end
    address leaks about 350 bytes of unicorn's memory per call (unicorn 2.1), and the debugger
    reads and writes IA32_TSC at every stop (issue 13: +0.7 KiB per single step)."""
    with _ticks_lock:
        if not _ticks_uc:
            spare = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
            spare.mem_map(0x1000, 0x1000)
            spare.mem_write(0x1000, b"\x0f\x31")  # rdtsc
            spare.ctl_exits_enabled(True)
            _ticks_uc.append(spare)
        spare = _ticks_uc[0]
        spare.emu_start(0x1000, 0, 0, 1)
        low = int(spare.reg_read(X.UC_X86_REG_RAX)) & 0xFFFFFFFF
        return (int(spare.reg_read(X.UC_X86_REG_RDX)) & 0xFFFFFFFF) << 32 | low


class Registers(Events):
    """Registers, fpstate, MSRs, TSC and VMCS fields (see the module docstring)."""

    def hv_vcpu_flush(self, vid: int) -> None:
        self._vcpu(vid, "hv_vcpu_flush")

    def hv_vcpu_invalidate_tlb(self, vid: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_invalidate_tlb")
        flush_tlb(vcpu.uc)
        vcpu.dr_dirty = True

    def hv_vcpu_read_register(self, vid: int, reg: int) -> int:
        vcpu = self._vcpu(vid, "hv_vcpu_read_register")
        return self._read_register(vcpu, reg)

    def _read_register(self, vcpu: Vcpu, reg: int) -> int:
        if reg in _GPR:
            return int(vcpu.uc.reg_read(_GPR[reg])) & M64
        return self._read_other_register(vcpu, reg)

    def _read_other_register(self, vcpu: Vcpu, reg: int) -> int:
        """Anything but a GPR, RIP or RFLAGS. Kept apart from the GPR path: the closures below
        make every call of the function that holds them allocate cells."""
        uc = vcpu.uc
        if reg in SELECTOR_REGS:
            return self._seg(vcpu, SELECTOR_REGS[reg])[0]
        simple: dict[int, Callable[[], int]] = {
            C.HV_X86_IDT_BASE: lambda: self._table(vcpu, 1)[0],
            C.HV_X86_IDT_LIMIT: lambda: self._table(vcpu, 1)[1],
            C.HV_X86_GDT_BASE: lambda: self._table(vcpu, 0)[0],
            C.HV_X86_GDT_LIMIT: lambda: self._table(vcpu, 0)[1],
            C.HV_X86_LDT_BASE: lambda: self._seg(vcpu, 6)[1],
            C.HV_X86_LDT_LIMIT: lambda: self._seg(vcpu, 6)[2],
            C.HV_X86_LDT_AR: lambda: self._seg(vcpu, 6)[3],
            C.HV_X86_TSS_BASE: lambda: self._seg(vcpu, 7)[1],
            C.HV_X86_TSS_LIMIT: lambda: self._seg(vcpu, 7)[2],
            C.HV_X86_TSS_AR: lambda: self._seg(vcpu, 7)[3],
            C.HV_X86_CR0: lambda: uc.reg_read(X.UC_X86_REG_CR0),
            C.HV_X86_CR1: lambda: 0,
            C.HV_X86_CR2: lambda: uc.reg_read(X.UC_X86_REG_CR2),
            C.HV_X86_CR3: lambda: uc.reg_read(X.UC_X86_REG_CR3),
            C.HV_X86_CR4: lambda: uc.reg_read(X.UC_X86_REG_CR4),
            C.HV_X86_TPR: lambda: (uc.reg_read(X.UC_X86_REG_CR8) & 0xF) << 4,
            C.HV_X86_XCR0: lambda: vcpu.xcr0,
        }
        if reg in simple:
            return int(simple[reg]()) & M64
        if C.HV_X86_DR0 <= reg <= C.HV_X86_DR7:
            index = reg - C.HV_X86_DR0
            index = {4: 6, 5: 7}.get(index, index)
            return int(uc.reg_read(X.UC_X86_REG_DR0 + index)) & M64
        raise common.bad("hv_vcpu_read_register", f"unknown register {reg}")

    def hv_vcpu_write_register(self, vid: int, reg: int, value: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_write_register")
        if not 0 <= value < 1 << 64:
            raise common.bad("hv_vcpu_write_register", f"value {value:#x} does not fit 64 bits")
        vcpu.gate.touch_register(reg)
        self._write_register(vcpu, reg, value)

    def _write_register(self, vcpu: Vcpu, reg: int, value: int) -> None:
        if reg in _GPR:
            vcpu.uc.reg_write(_GPR[reg], value)
            if reg == C.HV_X86_RFLAGS:
                self._patch(vcpu)
            return
        self._write_other_register(vcpu, reg, value)

    def _write_other_register(self, vcpu: Vcpu, reg: int, value: int) -> None:
        """Anything but a GPR, RIP or RFLAGS (see _read_other_register)."""
        uc = vcpu.uc
        if reg in SELECTOR_REGS:
            self._patch(vcpu, segs={SELECTOR_REGS[reg]: (value, None, None, None)})
            return
        if reg in (C.HV_X86_CR0, C.HV_X86_CR2, C.HV_X86_CR3, C.HV_X86_CR4):
            self._write_cr(vcpu, {36: 0, 38: 2, 39: 3, 40: 4}[reg], value)
            vcpu.dr_dirty = True
            return
        patches: dict[int, Callable[[], None]] = {
            C.HV_X86_IDT_BASE: lambda: self._patch(vcpu, idt=(value, None)),
            C.HV_X86_IDT_LIMIT: lambda: self._patch(vcpu, idt=(None, value)),
            C.HV_X86_GDT_BASE: lambda: self._patch(vcpu, gdt=(value, None)),
            C.HV_X86_GDT_LIMIT: lambda: self._patch(vcpu, gdt=(None, value)),
            C.HV_X86_LDT_BASE: lambda: self._patch(vcpu, segs={6: (None, value, None, None)}),
            C.HV_X86_LDT_LIMIT: lambda: self._patch(vcpu, segs={6: (None, None, value, None)}),
            C.HV_X86_LDT_AR: lambda: self._patch(vcpu, segs={6: (None, None, None, value)}),
            C.HV_X86_TSS_BASE: lambda: self._patch(vcpu, segs={7: (None, value, None, None)}),
            C.HV_X86_TSS_LIMIT: lambda: self._patch(vcpu, segs={7: (None, None, value, None)}),
            C.HV_X86_TSS_AR: lambda: self._patch(vcpu, segs={7: (None, None, None, value)}),
            C.HV_X86_CR1: lambda: None,
            C.HV_X86_TPR: lambda: uc.reg_write(X.UC_X86_REG_CR8, (value >> 4) & 0xF),
        }
        if reg in patches:
            patches[reg]()
            return
        if C.HV_X86_DR0 <= reg <= C.HV_X86_DR7:
            index = reg - C.HV_X86_DR0
            index = {4: 6, 5: 7}.get(index, index)
            uc.reg_write(X.UC_X86_REG_DR0 + index, value)
            vcpu.dr_dirty = True
            return
        if reg == C.HV_X86_XCR0:
            if not value & 1 or value & ~0x7 or (value & 4 and not value & 2):
                raise common.bad("hv_vcpu_write_register", f"XCR0 {value:#x}: invalid")
            vcpu.xcr0 = value
            return
        raise common.bad("hv_vcpu_write_register", f"unknown register {reg}")

    # --- fpstate ---------------------------------------------------------------------------------

    def hv_vcpu_read_fpstate(self, vid: int, buffer: Buffer, size: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_read_fpstate")
        view = common.check_fp_buffer("hv_vcpu_read_fpstate", buffer, size, _XSAVE_SIZE)
        if view.readonly:
            raise common.bad("hv_vcpu_read_fpstate", "buffer is read-only")
        uc = vcpu.uc
        image = bytearray(_XSAVE_SIZE)
        fsw = uc.reg_read(X.UC_X86_REG_FPSW)
        top = (fsw >> 11) & 7
        tags = uc.reg_read(X.UC_X86_REG_FPTAG)
        abridged = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != 3)
        struct.pack_into("<HHBxH", image, 0, uc.reg_read(X.UC_X86_REG_FPCW), fsw, abridged, 0)
        struct.pack_into("<QQII", image, 8, uc.reg_read(X.UC_X86_REG_FIP), 0, 0, 0)
        struct.pack_into("<II", image, 24, uc.reg_read(X.UC_X86_REG_MXCSR), 0xFFFF)
        for i in range(8):
            mantissa, exponent = uc.reg_read(X.UC_X86_REG_FP0 + ((top + i) & 7))
            struct.pack_into("<QH", image, 32 + 16 * i, mantissa, exponent)
        for i in range(16):
            ymm = int(uc.reg_read(X.UC_X86_REG_YMM0 + i))
            image[160 + 16 * i : 176 + 16 * i] = (ymm & ((1 << 128) - 1)).to_bytes(16, "little")
            image[576 + 16 * i : 592 + 16 * i] = (ymm >> 128).to_bytes(16, "little")
        struct.pack_into("<Q", image, 512, _XSTATE_X87_SSE_AVX)
        view[:_XSAVE_SIZE] = image
        if size > _XSAVE_SIZE:
            view[_XSAVE_SIZE:size] = bytes(size - _XSAVE_SIZE)

    def hv_vcpu_write_fpstate(self, vid: int, buffer: Buffer, size: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_write_fpstate")
        view = common.check_fp_buffer("hv_vcpu_write_fpstate", buffer, size, _XSAVE_SIZE)
        image = bytes(view[:_XSAVE_SIZE])
        fcw, fsw, abridged = struct.unpack_from("<HHB", image, 0)
        mxcsr = struct.unpack_from("<I", image, 24)[0]
        xstate_bv = struct.unpack_from("<Q", image, 512)[0]
        if mxcsr & ~0xFFFF or xstate_bv & ~_XSTATE_X87_SSE_AVX:
            raise common.bad("hv_vcpu_write_fpstate", "invalid XSAVE image")
        uc = vcpu.uc
        uc.reg_write(X.UC_X86_REG_FPCW, fcw)
        uc.reg_write(X.UC_X86_REG_FPSW, fsw)
        top = (fsw >> 11) & 7
        uc.reg_write(X.UC_X86_REG_MXCSR, mxcsr)
        for i in range(8):
            mantissa, exponent = struct.unpack_from("<QH", image, 32 + 16 * i)
            uc.reg_write(X.UC_X86_REG_FP0 + ((top + i) & 7), (mantissa, exponent))
        tags = sum((0 if abridged >> i & 1 else 3) << (2 * i) for i in range(8))
        uc.reg_write(X.UC_X86_REG_FPTAG, tags)
        for i in range(16):
            low = int.from_bytes(image[160 + 16 * i : 176 + 16 * i], "little")
            high = int.from_bytes(image[576 + 16 * i : 592 + 16 * i], "little")
            if not xstate_bv & 4:
                high = 0
            uc.reg_write(X.UC_X86_REG_YMM0 + i, high << 128 | low)

    # --- MSRs ------------------------------------------------------------------------------------

    def _get_msr(self, vcpu: Vcpu, msr: int) -> int:
        if msr == C.MSR_EFER:
            return self._efer(vcpu)
        if msr == C.MSR_TSC:
            return (_host_ticks() + vcpu.tsc_offset) & M64
        return int(vcpu.uc.reg_read(X.UC_X86_REG_MSR, msr)) & M64

    def _set_msr(self, vcpu: Vcpu, msr: int, value: int) -> None:
        if msr == C.MSR_EFER:
            self._set_efer(vcpu, value)
            vcpu.dr_dirty = True
        elif msr == C.MSR_TSC:
            vcpu.tsc_offset = (value - _host_ticks()) & M64
            self._patch(vcpu)  # RDTSC sees it at once
        else:
            vcpu.uc.reg_write(X.UC_X86_REG_MSR, (msr, value))

    def hv_vcpu_read_msr(self, vid: int, msr: int) -> int:
        vcpu = self._vcpu(vid, "hv_vcpu_read_msr")
        common.check_framework_msr("hv_vcpu_read_msr", msr)
        if msr not in _KNOWN_MSRS:
            return vcpu.kept_msrs.get(msr, 0)
        return self._get_msr(vcpu, msr)

    def hv_vcpu_write_msr(self, vid: int, msr: int, value: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_write_msr")
        if not 0 <= value < 1 << 64:
            raise common.bad("hv_vcpu_write_msr", f"value {value:#x} out of range")
        common.check_framework_msr("hv_vcpu_write_msr", msr)
        vcpu.gate.touch_msr(msr)
        if msr not in _KNOWN_MSRS:
            vcpu.kept_msrs[msr] = value
            return
        self._set_msr(vcpu, msr, value)

    # --- TSC and time ----------------------------------------------------------------------------

    def hv_vm_sync_tsc(self, tsc: int) -> None:
        if not 0 <= tsc < 1 << 64:
            raise common.bad("hv_vm_sync_tsc", "TSC value out of range")
        self._space0("hv_vm_sync_tsc")
        now = _host_ticks()
        with self._lock:
            for vcpu in self._vcpus.values():
                if not vcpu.destroyed:
                    vcpu.tsc_offset = (tsc - now) & M64
                    vcpu.tsc_dirty = True  # in unicorn's CPU state at the next entry

    # --- VMCS ------------------------------------------------------------------------------------

    def hv_vmx_vcpu_read_vmcs(self, vid: int, field_: int) -> int:
        return self._read_vmcs(self._vcpu(vid, "hv_vmx_vcpu_read_vmcs"), field_)

    def _read_vmcs(self, vcpu: Vcpu, field_: int) -> int:
        if field_ in EXIT_FIELDS:
            return vcpu.exit.get(field_, 0)
        guest = self._guest_field(vcpu, field_, None)
        if guest is not None:
            return guest
        if field_ in vcpu.controls:
            # the entry controls as written; every exit stores EFER.LMA into IA-32e mode guest
            return vcpu.controls[field_]
        raise common.field_error("hv_vmx_vcpu_read_vmcs", field_, "emu")

    def _entry_fails(self, vcpu: Vcpu) -> bool:
        """The VM-entry checks of what the VMM wrote since the last entry (``EntryGate``).
        A guest-state failure is an exit (0x80000021, True); a control failure raises
        HV_ERROR with VMCS_RO_INSTR_ERROR 7. Passing, the guest's IA32_EFER is the one VM entry
        loads (LMA, and LME under CR0.PG, from the IA-32e mode guest control without "load
        IA32_EFER")."""
        tpr = self._read_register(vcpu, C.HV_X86_TPR)
        view = vmx_rules.VmcsView(
            functools.partial(self._read_vmcs, vcpu), {vmx_rules.FIELD_VTPR: tpr}
        )
        failure = vcpu.gate.check(view)
        if failure is None:
            efer = vmx_rules.entry_efer(view)
            if efer != view.get(C.VMCS_GUEST_IA32_EFER, 0):
                self._set_efer(vcpu, efer)
            return False
        if failure.kind == "controls":
            vcpu.exit[C.VMCS_RO_INSTR_ERROR] = failure.instr_error
            raise HvError(failure.status, "hv_vcpu_run", str(failure))
        vcpu.exit = failure.exit_fields()
        vcpu.exit_recorded = True
        return True

    def hv_vmx_vcpu_write_vmcs(self, vid: int, field_: int, value: int) -> None:
        vcpu = self._vcpu(vid, "hv_vmx_vcpu_write_vmcs")
        if not 0 <= value < 1 << 64:
            raise common.bad("hv_vmx_vcpu_write_vmcs", "value out of range")
        if field_ in vmx_rules.CONTROL_CAPS and common.entry_checks_enabled():
            refused = vmx_rules.control_write_error(field_, value, vcpu.gate.caps)
            if refused is not None:
                raise common.bad("hv_vmx_vcpu_write_vmcs", refused)
        vcpu.gate.touch(field_)
        if field_ == C.GDBSTUB_VMCS_MMIO_DATA:
            vcpu.exit[field_] = value
            return
        if self._guest_field(vcpu, field_, value) is not None:
            return
        if field_ == C.VMCS_GUEST_ACTIVITY_STATE:
            if value not in (0, 1, 2, 3):
                raise common.bad("hv_vmx_vcpu_write_vmcs", f"activity state {value}")
            vcpu.controls[field_] = value
            return
        if field_ in vcpu.controls:
            vcpu.controls[field_] = value
            if field_ in (C.VMCS_CTRL_EXC_BITMAP, C.VMCS_CTRL_CPU_BASED):
                vcpu.dr_dirty = True
            return
        raise common.field_error("hv_vmx_vcpu_write_vmcs", field_, "emu")

    def _guest_field(self, vcpu: Vcpu, field_: int, value: int | None) -> int | None:
        """Read (value None) or write a guest-state field; None if ``field_`` is not one."""
        if field_ in _MSR_FIELDS:
            if value is None:
                return self._get_msr(vcpu, _MSR_FIELDS[field_])
            self._set_msr(vcpu, _MSR_FIELDS[field_], value)
            return value
        simple = {
            C.VMCS_GUEST_RIP: C.HV_X86_RIP,
            C.VMCS_GUEST_RSP: C.HV_X86_RSP,
            C.VMCS_GUEST_RFLAGS: C.HV_X86_RFLAGS,
            C.VMCS_GUEST_CR0: C.HV_X86_CR0,
            C.VMCS_GUEST_CR3: C.HV_X86_CR3,
            C.VMCS_GUEST_CR4: C.HV_X86_CR4,
            C.VMCS_GUEST_DR7: C.HV_X86_DR7,
            C.VMCS_GUEST_GDTR_BASE: C.HV_X86_GDT_BASE,
            C.VMCS_GUEST_GDTR_LIMIT: C.HV_X86_GDT_LIMIT,
            C.VMCS_GUEST_IDTR_BASE: C.HV_X86_IDT_BASE,
            C.VMCS_GUEST_IDTR_LIMIT: C.HV_X86_IDT_LIMIT,
        }
        if field_ in simple:
            if value is None:
                return self._read_register(vcpu, simple[field_])
            if field_ in (C.VMCS_GUEST_GDTR_LIMIT, C.VMCS_GUEST_IDTR_LIMIT):
                value &= 0xFFFF
            self._write_register(vcpu, simple[field_], value)
            return value
        for kind, first in (
            ("selector", C.VMCS_GUEST_ES),
            ("limit", C.VMCS_GUEST_ES_LIMIT),
            ("ar", C.VMCS_GUEST_ES_AR),
            ("base", C.VMCS_GUEST_ES_BASE),
        ):
            if first <= field_ < first + 16 and not (field_ - first) % 2:
                index = (field_ - first) // 2
                selector, base, limit, ar = self._seg(vcpu, index)
                if value is None:
                    return {"selector": selector, "limit": limit, "ar": ar, "base": base}[kind]
                width = {"selector": 0xFFFF, "limit": 0xFFFFFFFF, "ar": 0x1F0FF}.get(kind, M64)
                value &= width
                parts: list[int | None] = [None, None, None, None]
                parts[("selector", "base", "limit", "ar").index(kind)] = value
                self._patch(vcpu, segs={index: (parts[0], parts[1], parts[2], parts[3])})
                return value
        return None
