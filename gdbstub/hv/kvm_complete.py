"""What the KVM backend does with an instruction this host's KVM failed to emulate.

Theory of operation
-------------------
kvm_pvm runs guest kernel code (CPL0) in KVM's instruction emulator. When the emulator lacks
the instruction at RIP, KVM_RUN ends in KVM_EXIT_INTERNAL_ERROR / emulation failure with RIP
at the instruction and the vCPU intact. ``KvmBackend`` executes INT3, INT n and XGETBV itself
and turns VEX instructions into #UD where the probe showed CPL0 AVX cannot run; everything
else comes here (:func:`complete`), only on such an exit (never on the hot exit path):

* The instruction is decoded (capstone, cached by its bytes) for its name, length and needs.
* RDTSCP is done here: EDX:EAX from the guest's IA32_TSC, ECX from IA32_TSC_AUX (the software
  CPU's TSC is not the guest's). So are CLAC and STAC (RFLAGS.AC), which a kernel with SMAP
  runs around every user access: cheaper here than on the software CPU.
* XSAVE, XSAVEOPT, XSAVEC and XRSTOR are done by ``kvm_xsave`` on KVM's own XSAVE image, for
  every state component the host has (the guest sees the host's CPUID here, AVX-512
  included, which unicorn cannot hold); they need no unicorn.
* Instructions that are the VMM's (I/O, CPUID, MSRs, HLT, XSETBV...) are never executed in
  software: the run stops (``HvError`` HV_UNSUPPORTED) with one line naming the instruction.
* Anything else runs once on the vCPU's :class:`~gdbstub.hv.kvm_softcpu.SoftCpu` (unicorn),
  made at the vCPU's first failure, with the vCPU's registers, its x87/SSE state and XCR0
  when the instruction uses them, and guest RAM mapped from the same host buffers. Without
  unicorn the run stops with one line naming the instruction and ``pip install gdbstub[emu]``.

What the software CPU reports becomes what VMX would have done:

* done: the registers (and segment/control registers, x87/SSE state) it changed are written
  back to KVM; an interrupt shadow the instruction consumed is dropped; IRET ends NMI blocking;
  INVLPG/INVPCID flush KVM's TLB (the sregs are written back). With MTF on (single-stepping),
  the exit is MTF, as after any instruction.
* fault: the guest sees it (KVM_SET_VCPU_EVENTS; #PF sets CR2 first), or, when its vector is
  in the exception bitmap, an exception exit (0) as VMX reports it (CR2 in the qualification).
* trap (#DB from RFLAGS.TF after the instruction): state written back, #DB delivered.
* an access outside RAM or to a read-only page: exit 48 (EPT violation) with GPA, linear
  address and access bits, RIP at the instruction, nothing decoded: the VMM (MMIO emulation,
  or the debugger stepping through a write-protected watch page) takes it from there.
* unicorn does not know the instruction either (#UD): the run stops with one line naming it.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from . import common, kvm_softcpu, kvm_xsave
from . import constants as C
from . import kvm_abi as K
from .errors import HvError
from .posix import ioctl

if TYPE_CHECKING:
    from .kvm import KvmBackend, _Vcpu

MSR_TSC_AUX = 0xC0000103
_EFLAGS_AC = 1 << 18
_CALL = "hv_vcpu_run"


def complete(backend: KvmBackend, vcpu: _Vcpu, linear: int, code: bytes, bits: int) -> bool | None:
    """Complete the instruction at RIP that KVM failed to emulate (``code``: its bytes at
    guest-linear ``linear``, ``bits``: the code size). Returns the exit handler's answer (True:
    an exit for the VMM is recorded; False: run on), None if ``code`` does not decode. Raises
    HvError(HV_UNSUPPORTED) where the instruction cannot be completed (see the module doc)."""
    insn = kvm_softcpu.decode(bytes(code[:15]), bits)
    if insn is None:
        return None
    regs = backend._get(vcpu, "regs")
    where = f"`{insn.text}` at rip {regs.rip:#x}"
    if insn.mnemonic == "rdtscp":
        return _rdtscp(backend, vcpu, insn.length)
    if insn.mnemonic in ("clac", "stac"):  # every user access of a kernel with SMAP
        regs = backend._dirty(vcpu, "regs")
        ac = _EFLAGS_AC if insn.mnemonic == "stac" else 0
        regs.rflags = regs.rflags & ~_EFLAGS_AC | ac
        regs.rip = (regs.rip + insn.length) % (1 << 64)
        _end_of_instruction(backend, vcpu, iret=False)
        return _after_instruction(backend, vcpu)
    if insn.mnemonic in kvm_xsave.MNEMONICS:
        return _xsave_family(backend, vcpu, insn.mnemonic, code, bits)
    if (insn.vmm or not kvm_softcpu.available()) and _execute_only(backend, vcpu, linear):
        # a debugger's read watchpoint made the page execute-only (no KVM slot): the
        # fetch is the VMM's to step through with the page opened, as on VMX
        fetch = kvm_softcpu.Outcome("access", address=linear, fetch=True)
        return _access_exit(backend, vcpu, fetch)
    if insn.vmm:
        raise HvError(
            C.HV_UNSUPPORTED,
            _CALL,
            f"this host's KVM cannot execute {where} in guest kernel code, and it is not "
            "one the backend may complete in software",
        )
    if not kvm_softcpu.available():
        raise HvError(
            C.HV_UNSUPPORTED,
            _CALL,
            f"this host's KVM cannot execute {where} in guest kernel code; "
            "`pip install gdbstub[emu]` lets gdbstub complete it in software",
        )
    if vcpu.soft is None:
        vcpu.soft = kvm_softcpu.SoftCpu()
    regs = backend._dirty(vcpu, "regs")
    sregs = backend._get(vcpu, "sregs")
    xsave: K.KvmXsave | None = None
    image: bytearray | None = None
    if insn.fpu:
        xsave = K.KvmXsave()
        ioctl(vcpu.fd, K.KVM_GET_XSAVE, xsave)
        image = bytearray(bytes(xsave))
    xcr0 = _xcr0(vcpu) if insn.xcr0 else 1
    outcome = vcpu.soft.step(regs, sregs, vcpu.space.regions, insn, linear, image, xcr0)
    if outcome.kind == "invalid":
        raise HvError(
            C.HV_UNSUPPORTED,
            _CALL,
            f"this host's KVM cannot execute {where} in guest kernel code, and the software "
            "CPU (unicorn) does not know it either",
        )
    if outcome.kind == "access":
        return _access_exit(backend, vcpu, outcome)
    if outcome.kind == "fault":
        return _exception(backend, vcpu, outcome.vector, outcome.error, outcome.cr2)
    # done, or trap: the instruction completed
    if outcome.sregs_changed or insn.flush_tlb:
        backend._dirty(vcpu, "sregs")  # KVM_SET_SREGS also flushes KVM's TLB
        vcpu.xlate_cache.clear()
        vcpu.io_cache.clear()
    if outcome.fpu_changed and xsave is not None and image is not None:
        ctypes.memmove(xsave.region, bytes(image), ctypes.sizeof(xsave))
        ioctl(vcpu.fd, K.KVM_SET_XSAVE, xsave)
    _end_of_instruction(backend, vcpu, iret=insn.mnemonic.startswith("iret"))
    if outcome.kind == "trap":
        if outcome.vector == C.IDT_DB:
            backend._dirty(vcpu, "dregs").dr6 |= C.DR6_BS  # a single-step trap (RFLAGS.TF)
        return _exception(backend, vcpu, outcome.vector, None, 0)
    return _after_instruction(backend, vcpu)


def _xsave_family(backend: KvmBackend, vcpu: _Vcpu, mnemonic: str, code: bytes, bits: int) -> bool:
    """XSAVE, XSAVEOPT, XSAVEC, XRSTOR: done on KVM's XSAVE image (kvm_xsave), for every
    state component the host has (unicorn has no AVX or AVX-512 state)."""
    try:
        kvm_xsave.execute(backend, vcpu, mnemonic, bytes(code[:15]), bits, _xcr0(vcpu))
    except kvm_xsave.Fault as fault:
        return _exception(backend, vcpu, fault.vector, fault.error, fault.cr2)
    except kvm_xsave.NotRam as access:
        outcome = kvm_softcpu.Outcome("access", address=access.linear, write=access.write)
        return _access_exit(backend, vcpu, outcome)
    _end_of_instruction(backend, vcpu, iret=False)
    return _after_instruction(backend, vcpu)


def _xcr0(vcpu: _Vcpu) -> int:
    xcrs = K.KvmXcrs()
    ioctl(vcpu.fd, K.KVM_GET_XCRS, xcrs)
    for i in range(xcrs.nr_xcrs):
        if xcrs.xcrs[i].xcr == 0:
            return int(xcrs.xcrs[i].value)
    return 1


def _end_of_instruction(backend: KvmBackend, vcpu: _Vcpu, iret: bool) -> None:
    """What retiring an instruction ends: an STI/MOV-SS interrupt shadow, and after IRET the
    blocking of NMIs."""
    events = backend._get(vcpu, "events")
    if events.interrupt.shadow or (iret and events.nmi.masked):
        events = backend._dirty(vcpu, "events")
        events.interrupt.shadow = 0
        if iret:
            events.nmi.masked = 0


def _after_instruction(backend: KvmBackend, vcpu: _Vcpu) -> bool:
    """After a completed instruction: an MTF exit when single-stepping, else run on."""
    if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_MTF:
        backend._set_exit(vcpu, C.VMX_REASON_MTF)
        return True
    return False


def _exception(backend: KvmBackend, vcpu: _Vcpu, vector: int, error: int | None, cr2: int) -> bool:
    """Exception ``vector`` raised by the instruction: an exception exit when the exception
    bitmap asks for it (as VMX reports it: #PF's address in the qualification), else
    delivered to the guest through KVM."""
    if vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & 1 << vector:
        info = C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | vector
        if error is not None:
            info |= C.IRQ_INFO_ERROR_VALID
        backend._set_exit(
            vcpu,
            C.VMX_REASON_EXC_NMI,
            qual=cr2 if vector == C.IDT_PF else 0,
            irq_info=info,
            irq_error=error or 0,
        )
        return True
    if vector == C.IDT_PF:
        backend._dirty(vcpu, "sregs").cr2 = cr2
    events = backend._dirty(vcpu, "events")
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = 0 if error is None else 1
    events.exception.error_code = error or 0
    return False


def _access_exit(backend: KvmBackend, vcpu: _Vcpu, outcome: kvm_softcpu.Outcome) -> bool:
    """The instruction touches memory that is not RAM, or writes a read-only page: exit 48
    as VMX reports an EPT violation (RIP at the instruction, nothing executed or decoded)."""
    sregs = backend._get(vcpu, "sregs")
    linear = outcome.address
    gpa = linear & 0xFFFFFFFF if not sregs.cr0 & 1 << 31 else backend._translate(vcpu, linear)
    if gpa is None:
        gpa = linear
    region = common.region_at(vcpu.space.regions, gpa)
    if outcome.fetch:
        qual = C.EPT_VIOLATION_INST_FETCH
    elif outcome.write:
        qual = C.EPT_VIOLATION_DATA_WRITE
    else:
        qual = C.EPT_VIOLATION_DATA_READ
    qual |= C.EPT_VIOLATION_GLA_VALID
    qual |= common.ept_permission_bits(region.flags if region is not None else 0)
    # the size is a hint for the debugger's watched pages (GDBSTUB_VMCS_MMIO_DECODED stays 0)
    size = 0 if outcome.fetch else outcome.size
    backend._set_exit(
        vcpu, C.VMX_REASON_EPT_VIOLATION, qual=qual, gpa=gpa, gla=linear, mmio_size=size
    )
    return True


def _execute_only(backend: KvmBackend, vcpu: _Vcpu, linear: int) -> bool:
    """Whether the instruction at guest-linear ``linear`` is on an execute-only page."""
    sregs = backend._get(vcpu, "sregs")
    gpa = linear & 0xFFFFFFFF if not sregs.cr0 & 1 << 31 else backend._translate(vcpu, linear)
    region = None if gpa is None else common.region_at(vcpu.space.regions, gpa)
    rwx = C.HV_MEMORY_READ | C.HV_MEMORY_WRITE | C.HV_MEMORY_EXEC
    return region is not None and region.flags & rwx == C.HV_MEMORY_EXEC


def _rdtscp(backend: KvmBackend, vcpu: _Vcpu, length: int) -> bool:
    """RDTSCP: EDX:EAX = the guest's TSC, ECX = IA32_TSC_AUX (CPL0: CR4.TSD does not apply)."""
    backend._apply_pending_tsc(vcpu)
    tsc = backend._get_msr(vcpu, C.MSR_TSC)
    try:
        aux = backend._get_msr(vcpu, MSR_TSC_AUX)
    except HvError:
        aux = 0
    regs = backend._dirty(vcpu, "regs")
    regs.rax = tsc & 0xFFFFFFFF
    regs.rdx = tsc >> 32 & 0xFFFFFFFF
    regs.rcx = aux & 0xFFFFFFFF
    regs.rip = (regs.rip + length) % (1 << 64)
    _end_of_instruction(backend, vcpu, iret=False)
    return _after_instruction(backend, vcpu)
