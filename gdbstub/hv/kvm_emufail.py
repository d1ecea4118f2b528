"""Instructions KVM failed to emulate: the ones the KVM backend executes itself.

Theory of operation
-------------------
On kvm_pvm guest kernel code (CPL0) runs in KVM's instruction emulator. Where the emulator lacks
the instruction at RIP, KVM_RUN ends in KVM_EXIT_INTERNAL_ERROR / emulation failure with RIP at
the instruction and the vCPU intact. :meth:`EmulationFailures._complete_failed_emulation` does
what the CPU would have done, for:

* **INT3 and INT n.** ``kvm_probes.probe_int3`` (a scratch 32-bit guest, once per process)
  learns whether a CPL0 INT3 ends this way and whether the vCPU runs on afterwards. If so, INT3
  with #BP in the exception bitmap is exit 0 (soft exception 3, length 1, RIP at the INT3), as
  on VMX; otherwise (and for INT n, which the bitmap does not intercept) RIP moves past the
  instruction and the event is injected through KVM_SET_VCPU_EVENTS, so the guest's IDT handler
  returns after it. (Where KVM intercepts INT3 itself, VMX/SVM hosts, it is KVM_EXIT_DEBUG.)
* **XGETBV**, which kvm_pvm's emulator lacks: EDX:EAX from KVM_GET_XCRS; #UD without
  CR4.OSXSAVE, #GP(0) for an unknown XCR.
* **VEX instructions** where ``kvm_probes.probe_cpl0_avx`` showed that CPL0 code cannot execute
  them (the AVX family is then out of the vCPUs' CPUID table): #UD in the guest, as on a CPU
  without usable AVX, instead of a dead vCPU.
* **Fetches from non-RAM.** An instruction KVM could not fetch (the guest jumped to a
  guest-physical address that is not RAM) is exit 48 with the fetch bit, as VMX reports it.

Anything else goes to :func:`~gdbstub.hv.kvm_complete.complete` (one instruction completed in
software). None of this is on the common exit path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from . import common, kvm_complete
from . import constants as C
from . import kvm_abi as K
from .kvm_entry import Entry
from .kvm_state import Vcpu
from .posix import ioctl

if TYPE_CHECKING:
    from .kvm import KvmBackend

_REX = frozenset(range(0x40, 0x50))


class EmulationFailures(Entry):
    """Instructions KVM failed to emulate (see the module docstring)."""

    cpl0_avx: bool  # kvm_probes.probe_cpl0_avx: guest kernels can execute VEX instructions

    def _complete_failed_emulation(self, vcpu: Vcpu) -> bool | None:
        """KVM failed to emulate the instruction at RIP (kvm_pvm emulates all CPL0 code and
        its emulator lacks a few instructions): execute the ones the backend knows as the CPU
        would. INT3 (CC) and INT n (CD nn), where the int3 probe shows KVM cannot, and XGETBV.
        Returns the exit handler's answer, or None for an instruction it does not know."""
        regs = self._get(vcpu, "regs")
        sregs = self._get(vcpu, "sregs")
        long64 = sregs.efer & C.EFER_LMA and sregs.cs.l
        linear = (regs.rip if long64 else sregs.cs.base + regs.rip) % (1 << 64)
        code = self._read_linear(vcpu, linear, 15)
        if not code:
            return self._fetch_violation(vcpu, linear)
        prefixes = common.PREFIXES | _REX if long64 else common.PREFIXES
        i = 0
        while i < len(code) - 1 and code[i] in prefixes:
            i += 1
        op = code[i : i + 1]
        if op == b"\xcc" and self._emulates_int3():
            return self._software_interrupt(vcpu, C.IDT_BP, i + 1, exception=True)
        if op == b"\xcd" and i + 1 < len(code) and self._emulates_int3():
            return self._software_interrupt(vcpu, code[i + 1], i + 2, exception=False)
        if code[i : i + 3] == b"\x0f\x01\xd0":
            return self._xgetbv(vcpu, i + 3)
        if op in (b"\xc4", b"\xc5") and not self.cpl0_avx:
            return self._undefined_opcode(vcpu)
        bits = 64 if long64 else 32 if sregs.cs.db else 16
        return kvm_complete.complete(cast("KvmBackend", self), vcpu, linear, code, bits)

    def _fetch_violation(self, vcpu: Vcpu, linear: int) -> bool | None:
        """KVM could not fetch the instruction: the guest executes from guest-physical memory
        that is not RAM. On VMX that is an EPT violation on an instruction fetch (exit 48,
        RIP at the instruction, nothing decoded)."""
        sregs = self._get(vcpu, "sregs")
        gpa: int | None = linear & 0xFFFFFFFF if not sregs.cr0 & (1 << 31) else None
        if gpa is None:
            host_page = self._linear_to_host(vcpu, linear)
            if host_page is not None:
                return None  # the page is RAM after all: not a fetch violation
            gpa = self._translate(vcpu, linear)
            if gpa is None:
                return None  # not mapped by the guest: KVM would have raised #PF itself
        self._set_exit(
            vcpu,
            C.VMX_REASON_EPT_VIOLATION,
            gpa=gpa,
            gla=linear,
            qual=C.EPT_VIOLATION_INST_FETCH
            | C.EPT_VIOLATION_GLA_VALID
            | C.EPT_VIOLATION_XLAT_VALID,
        )
        return True

    def _undefined_opcode(self, vcpu: Vcpu) -> bool:
        """A VEX (AVX) instruction where the probe showed CPL0 AVX cannot run: #UD, as a CPU
        without usable AVX raises. Intercepted #UD exits like any exception; otherwise the
        guest's handler runs (RIP stays at the instruction: #UD is a fault)."""
        if vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & 1 << C.IDT_UD:
            self._set_exit(
                vcpu,
                C.VMX_REASON_EXC_NMI,
                irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | C.IDT_UD,
            )
            return True
        events = self._dirty(vcpu, "events")
        events.exception.injected = 1
        events.exception.nr = C.IDT_UD
        events.exception.has_error_code = 0
        events.exception.error_code = 0
        return False

    def _software_interrupt(self, vcpu: Vcpu, vector: int, length: int, exception: bool) -> bool:
        """INT3 with #BP in the exception bitmap is an exception exit (RIP at the INT3, its
        length, soft exception 3), as on VMX. Otherwise the event is delivered through the
        guest's IDT with the return address after the instruction. INT n is a software
        interrupt: the exception bitmap does not apply to it on VMX."""
        if exception and vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & 1 << C.IDT_BP:
            self._set_exit(
                vcpu,
                C.VMX_REASON_EXC_NMI,
                length=length,
                irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_SOFT_EXC | C.IDT_BP,
            )
            return True
        regs = self._dirty(vcpu, "regs")
        regs.rip = (regs.rip + length) % (1 << 64)
        events = self._dirty(vcpu, "events")
        if exception:
            events.exception.injected = 1
            events.exception.nr = vector
            events.exception.has_error_code = 0
            events.exception.error_code = 0
        else:
            events.interrupt.injected = 1
            events.interrupt.nr = vector
            events.interrupt.soft = 0
        return False

    def _xgetbv(self, vcpu: Vcpu, length: int) -> bool:
        """XGETBV: EDX:EAX = XCR[ECX]; #UD without CR4.OSXSAVE, #GP(0) for an unknown XCR."""
        regs = self._dirty(vcpu, "regs")
        if not self._get(vcpu, "sregs").cr4 & 1 << 18:
            fault: tuple[int, int] | None = (6, -1)
        else:
            xcrs = K.KvmXcrs()
            ioctl(vcpu.fd, K.KVM_GET_XCRS, xcrs)
            index = regs.rcx & 0xFFFFFFFF
            values = {int(xcrs.xcrs[n].xcr): int(xcrs.xcrs[n].value) for n in range(xcrs.nr_xcrs)}
            fault = None if index in values else (13, 0)
            if fault is None:
                regs.rax = values[index] & 0xFFFFFFFF
                regs.rdx = values[index] >> 32
                regs.rip = (regs.rip + length) % (1 << 64)
                if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_MTF:
                    self._set_exit(vcpu, C.VMX_REASON_MTF)  # single-stepping: it is done
                    return True
        if fault is not None:
            events = self._dirty(vcpu, "events")
            events.exception.injected = 1
            events.exception.nr = fault[0]
            events.exception.has_error_code = 1 if fault[1] >= 0 else 0
            events.exception.error_code = max(fault[1], 0)
        return False
