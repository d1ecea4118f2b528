"""What the KVM backend hands KVM before an entry: owed completions, events, guest debug.

Theory of operation
-------------------
The VMM's controls and writes become KVM state when the vCPU next enters
(:meth:`Entry._prepare_entry`):

* **Owed completions.** An exit KVM expects user space to complete is finished from what the
  VMM left: the RDMSR result (EDX:EAX) or the #GP it asked for, with RIP rewound where KVM
  skips the instruction itself on re-entry; the IN result from RAX; the value of an MMIO read
  from GDBSTUB_VMCS_MMIO_DATA.
* **Events.** The VM-entry interruption info becomes ``KVM_INTERRUPT`` (external interrupt),
  ``KVM_NMI`` or an event in KVM_SET_VCPU_EVENTS. A re-injected #BP (soft exception 3) where
  KVM intercepts INT3 itself (VMX/SVM hosts, see kvm_emufail) is KVM_GUESTDBG_INJECT_BP with
  RIP at the INT3. Any other software event (types 4-6) advances RIP by
  VMCS_CTRL_VMENTRY_INSTR_LEN here and goes to KVM as an event that pushes RIP as it is, so
  the guest sees the return address VMX would push.
* **Guest debug.** #BP and #DB in the exception bitmap and MTF become KVM_SET_GUEST_DEBUG
  (software breakpoints, hardware breakpoints from DR0-DR3/DR7, single-step);
  interrupt-window exiting becomes ``request_interrupt_window``.
* **The VMX entry checks** (when on) run before all of this (:meth:`Entry._entry_fails`,
  kvm_gate); an entry that passes them loads IA32_EFER as VMX does.

:meth:`Entry._plain_entry` tells whether the next entry needs none of it; the run loop
(kvm_run) then only flags the dirty registers.
"""

from __future__ import annotations

import ctypes
import struct
from functools import partial

from . import constants as C
from . import kvm_abi as K
from . import kvm_gate
from .kvm_regs import Registers
from .kvm_state import Vcpu
from .posix import ioctl

_ACTIVITY = C.VMCS_GUEST_ACTIVITY_STATE
_ENTRY_INFO = C.VMCS_CTRL_VMENTRY_IRQ_INFO


class Entry(Registers):
    """Entry preparation (see the module docstring)."""

    def _entry_fails(self, vcpu: Vcpu, call: str) -> bool:
        """The VMX entry checks the VMM's writes call for (kvm_gate): True when the entry
        failed on the guest state (the exit is recorded); raises for invalid controls. An
        entry that passes loads IA32_EFER as VMX does (kvm_gate.entry_efer)."""
        gate = vcpu.gate
        assert gate is not None
        dirty = gate.dirty
        # the virtual TPR only for the checks on the controls (the TPR threshold)
        vtpr = int(self._get(vcpu, "sregs").cr8) << 4 if dirty & 1 else None
        view = kvm_gate.entry_view(partial(self._state_field, vcpu), vtpr)
        failure = gate.check(view)
        if failure is None:
            efer = kvm_gate.entry_efer(view, dirty)
            if efer is not None:
                self._dirty(vcpu, "sregs").efer = efer
            return False
        vcpu.exit, error = kvm_gate.outcome(failure, vcpu.exit, call)
        if error is not None:
            raise error
        return True

    def _prepare_entry(self, vcpu: Vcpu) -> None:
        """Turn cached state, controls and owed completions into KVM state before KVM_RUN."""
        run = vcpu.run
        controls = vcpu.controls
        if (
            vcpu.pending is None
            and vcpu.pending_tsc is None
            and not vcpu.guest_debug_dirty
            and not controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO] & C.IRQ_INFO_VALID
        ):  # the common case: nothing owed, nothing to inject
            self._flush(vcpu, entering=True)
            run[K.RUN_REQUEST_INTERRUPT_WINDOW] = (
                1 if controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_IRQ_WND else 0
            )
            return
        if vcpu.pending is not None:
            kind, value = vcpu.pending
            vcpu.pending = None
            if kind == "msr":
                regs = self._get(vcpu, "regs")
                if vcpu.exit.get(C.VMCS_RO_EXIT_REASON) == C.VMX_REASON_RDMSR:
                    data = (regs.rdx & 0xFFFFFFFF) << 32 | (regs.rax & 0xFFFFFFFF)
                    struct.pack_into("<Q", run, K.RUN_MSR_DATA, data)
                info = vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO]
                if info & C.IRQ_INFO_VALID and info & 0xFF == C.IDT_GP:
                    run[K.RUN_MSR_ERROR] = 1  # KVM injects the #GP the VMM asked for
                    vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO] = 0
                else:
                    run[K.RUN_MSR_ERROR] = 0
                    if not value:
                        # KVM skips the instruction on re-entry: rewind what the VMM advanced.
                        self._dirty(vcpu, "regs").rip = (regs.rip - 2) % (1 << 64)
            elif kind == "in":
                if vcpu.state["regs"]:
                    size = run[K.RUN_IO_SIZE]
                    offset = struct.unpack_from("<Q", run, K.RUN_IO_DATA_OFFSET)[0]
                    rax = self._get(vcpu, "regs").rax
                    run[offset : offset + size] = (rax & ((1 << (8 * size)) - 1)).to_bytes(
                        size, "little"
                    )
            elif kind == "mmio":
                size = struct.unpack_from("<I", run, K.RUN_MMIO_LEN)[0]
                if not run[K.RUN_MMIO_IS_WRITE] and 0 < size <= 8:
                    data = vcpu.exit.get(C.GDBSTUB_VMCS_MMIO_DATA, 0) & ((1 << (8 * size)) - 1)
                    run[K.RUN_MMIO_DATA : K.RUN_MMIO_DATA + size] = data.to_bytes(size, "little")
        self._apply_pending_tsc(vcpu)
        info = vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO]
        if info & C.IRQ_INFO_VALID:
            self._inject(vcpu, info)
            vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO] = info & ~C.IRQ_INFO_VALID
        if vcpu.guest_debug_dirty:
            self._apply_guest_debug(vcpu)
        self._flush(vcpu, entering=True)
        run[K.RUN_REQUEST_INTERRUPT_WINDOW] = (
            1 if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_IRQ_WND else 0
        )

    def _inject(self, vcpu: Vcpu, info: int) -> None:
        vector, kind = info & 0xFF, info & C.IRQ_INFO_TYPE_MASK
        if kind == C.IRQ_INFO_EXT_IRQ:
            self._flush(vcpu)
            ioctl(vcpu.fd, K.KVM_INTERRUPT, ctypes.c_uint32(vector))
        elif kind == C.IRQ_INFO_NMI:
            ioctl(vcpu.fd, K.KVM_NMI)
        elif kind == C.IRQ_INFO_SOFT_EXC and vector == C.IDT_BP and not self._emulates_int3():
            # KVM pushes RIP + the length of the #BP it intercepted: RIP stays at the INT3.
            self._apply_guest_debug(vcpu, extra=K.KVM_GUESTDBG_INJECT_BP)
            vcpu.guest_debug_dirty = True
            vcpu.plain_entry = False
        else:
            events = self._dirty(vcpu, "events")
            if kind in (C.IRQ_INFO_SOFT_IRQ, C.IRQ_INFO_SOFT_EXC, C.IRQ_INFO_PRIV_SOFT_EXC):
                # VMX pushes RIP + VM-entry instruction length for software events. KVM would
                # use the length of its own last exit (or none, when it emulates): move RIP
                # here and inject an event that pushes RIP as it is.
                length = vcpu.controls[C.VMCS_CTRL_VMENTRY_INSTR_LEN] & 0xF
                regs = self._dirty(vcpu, "regs")
                regs.rip = (regs.rip + length) % (1 << 64)
            if kind == C.IRQ_INFO_SOFT_IRQ:
                events.interrupt.injected = 1
                events.interrupt.nr = vector
                events.interrupt.soft = 0
            else:
                events.exception.injected = 1
                events.exception.nr = vector
                events.exception.has_error_code = 1 if info & C.IRQ_INFO_ERROR_VALID else 0
                events.exception.error_code = (
                    vcpu.controls[C.VMCS_CTRL_VMENTRY_EXC_ERROR] & 0xFFFFFFFF
                )

    def _apply_guest_debug(self, vcpu: Vcpu, extra: int = 0) -> None:
        dbg = K.KvmGuestDebug()
        bitmap = vcpu.controls[C.VMCS_CTRL_EXC_BITMAP]
        control = extra
        if bitmap & 1 << C.IDT_BP:
            control |= K.KVM_GUESTDBG_USE_SW_BP
        if bitmap & 1 << C.IDT_DB:
            dregs = self._get(vcpu, "dregs")
            control |= K.KVM_GUESTDBG_USE_HW_BP
            for i in range(4):
                dbg.debugreg[i] = dregs.db[i]
            dbg.debugreg[7] = dregs.dr7
        if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_MTF:
            control |= K.KVM_GUESTDBG_SINGLESTEP
        if control:
            control |= K.KVM_GUESTDBG_ENABLE
        dbg.control = control
        ioctl(vcpu.fd, K.KVM_SET_GUEST_DEBUG, dbg)
        vcpu.guest_debug_dirty = False

    @staticmethod
    def _plain_entry(vcpu: Vcpu) -> bool:
        """Whether the next entry needs nothing but the dirty regs/sregs flags: nothing owed
        to KVM, no TSC to set, no debug settings, event, debug registers or halt to apply.
        The answer is kept in ``vcpu.plain_entry`` until something may change it: every exit
        but an I/O exit, an IN exit, ``_dirty`` of dregs/events, and the calls that write
        VMCS fields, non-GPR registers, MSRs, the TSC or the space."""
        controls, state = vcpu.controls, vcpu.state
        plain = (
            vcpu.sync
            and vcpu.pending is None
            and vcpu.pending_tsc is None
            and not vcpu.guest_debug_dirty
            and controls[_ACTIVITY] == C.GUEST_ACTIVITY_ACTIVE
            and not controls[_ENTRY_INFO] & C.IRQ_INFO_VALID
            and state["dregs"] != 2
            and state["events"] != 2
        )
        if plain:  # kvm_run keeps it: a control write makes the next entry not plain
            vcpu.run[K.RUN_REQUEST_INTERRUPT_WINDOW] = (
                1 if controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_IRQ_WND else 0
            )
        vcpu.plain_entry = plain
        return plain
