"""A vCPU set up and kept the way a VMM on Hypervisor.framework must: controls, CR0/CR4, EFER.

Theory of operation
-------------------
The framework hands the VMM a raw VMX vCPU, and VMX runs a guest only with the CR0/CR4 bits of
the capabilities' fixed-0 sets: CR0.NE and CR4.VMXE (CR0.PE and PG may be 0 with unrestricted
guest). So a framework VMM (QEMU's hvf support, hyperkit) keeps two values of each register:

* the real one in VMCS_GUEST_CR0/CR4: the guest's value with NE|ET and VMXE forced on and CD|NW
  forced off (the host's caches stay on);
* the guest's own in the read shadows, behind the guest/host masks (CR0: PG|CD|NW|NE|ET, CR4:
  VMXE). The guest reads the shadow in masked bits, and a guest write that would give a masked
  bit a value other than the shadow's exits (28, MOV-CR) for :func:`handle_cr_access`.

CR0.PG is masked although its real value is the guest's, so that its changes reach the VMM:
VMX does not switch the guest in and out of long mode, the VMM does, keeping EFER.LMA and the
IA-32e mode guest entry control equal to EFER.LME & CR0.PG (an entry checks that they agree).
EFER goes through VMCS_GUEST_IA32_EFER with the "load IA32_EFER" entry control. With PAE
paging outside long mode an entry takes the four PDPTEs from VMCS_GUEST_PDPTE0-3, so every
change the VMM makes to CR0/CR3/CR4 that leaves PAE paging on loads them from guest memory.

The controls are the VMM's wishes combined with the capabilities by the cap2ctrl rule:
external-interrupt and NMI exiting; HLT exiting, TPR shadow (else CR8-load/store exiting:
hvdos found that the framework ignores the primary word unless one of them is set) and the
secondary controls; EPT and unrestricted guest; "load IA32_EFER" at entry, "save/load
IA32_EFER" at exit.

An exit taken while the processor delivered an event (an EPT violation while it pushed an
exception frame, a kick) leaves that event in VMCS_RO_IDT_VECTOR_INFO; :func:`reinject_event`
puts it back into the entry slot (VMCS_CTRL_VMENTRY_IRQ_INFO) for the next entry, as QEMU's
hvf support does, unless the VMM already queued an event of its own there.

Everything here runs on the vCPU's owner thread and uses only ``gdbstub.hv``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from . import hv
from .hv import (
    CR0_CD,
    CR0_ET,
    CR0_NE,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR4_PAE,
    CR4_PCIDE,
    CR4_VMXE,
)

CR0_RESET = CR0_CD | CR0_NW | CR0_ET
"""CR0 after power-on or RESET (0x60000010)."""

CR0_MASK = CR0_PG | CR0_CD | CR0_NW | CR0_NE | CR0_ET
"""The CR0 bits the VMM owns (guest/host mask): NE and ET forced on, CD and NW forced off, PG
intercepted to keep long mode in step (QEMU's hvf support owns the same five)."""
CR4_MASK = CR4_VMXE
"""The CR4 bits the VMM owns: VMXE, on in the real register and 0 in the guest's view."""
CR0_FORCED_ON, CR0_FORCED_OFF = CR0_NE | CR0_ET, CR0_CD | CR0_NW

GPRS = (
    hv.HV_X86_RAX,
    hv.HV_X86_RCX,
    hv.HV_X86_RDX,
    hv.HV_X86_RBX,
    hv.HV_X86_RSP,
    hv.HV_X86_RBP,
    hv.HV_X86_RSI,
    hv.HV_X86_RDI,
    *range(hv.HV_X86_R8, hv.HV_X86_R15 + 1),
)
"""``hv_x86_reg_t`` of each general register in x86 encoding order (exit qualifications)."""


def code_mode(vcpu: int) -> int:
    """16, 32 or 64: the mode of the code ``vcpu`` runs."""
    efer = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER)
    cs_ar = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CS_AR)
    if efer & hv.EFER_LMA and cs_ar & (1 << 13):
        return 64
    if hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR0) & 1 and cs_ar & (1 << 14):
        return 32
    return 16


CR_MOV_TO, CR_MOV_FROM, CR_CLTS, CR_LMSW = range(4)
_PDPTES = (hv.VMCS_GUEST_PDPTE0, hv.VMCS_GUEST_PDPTE1, hv.VMCS_GUEST_PDPTE2, hv.VMCS_GUEST_PDPTE3)
_SOFTWARE_EVENTS = (hv.IRQ_INFO_SOFT_IRQ, hv.IRQ_INFO_PRIV_SOFT_EXC, hv.IRQ_INFO_SOFT_EXC)
_AR_L = 1 << 13
_TSS_BUSY16, _TSS_BUSY64 = 3, 11
M32, M64 = 0xFFFFFFFF, (1 << 64) - 1


class PhysicalMemory(Protocol):
    """Guest-physical memory the VMM owns (for the PDPTEs): ``read(gpa, length)``."""

    def read(self, gpa: int, length: int, /) -> bytes:
        """``length`` bytes at guest-physical ``gpa``."""
        ...


# --- controls ---------------------------------------------------------------------------------


def control_words(
    *, hlt_exiting: bool = True, unrestricted: bool = True, rdtscp: bool = False
) -> dict[int, int]:
    """The five control words (VMCS field -> value) a framework VMM writes to a new vCPU,
    from ``hv_vmx_read_capability`` by the cap2ctrl rule (module docstring). ``rdtscp``: let
    the guest run RDTSCP (only where its CPUID offers it; else RDTSCP is #UD, as it should)."""

    def cap(which: int) -> int:
        return hv.hv_vmx_read_capability(which)

    proc_cap = cap(hv.HV_VMX_CAP_PROCBASED)
    proc = hv.CPU_BASED_SECONDARY_CTLS | (hv.CPU_BASED_HLT if hlt_exiting else 0)
    if proc_cap >> 32 & hv.CPU_BASED_TPR_SHADOW:
        proc |= hv.CPU_BASED_TPR_SHADOW
    else:
        proc |= hv.CPU_BASED_CR8_LOAD | hv.CPU_BASED_CR8_STORE
    proc2 = hv.CPU_BASED2_EPT | (hv.CPU_BASED2_UNRESTRICTED if unrestricted else 0)
    proc2 |= hv.CPU_BASED2_RDTSCP if rdtscp else 0
    return {
        hv.VMCS_CTRL_PIN_BASED: hv.cap2ctrl(
            cap(hv.HV_VMX_CAP_PINBASED), hv.PIN_BASED_INTR | hv.PIN_BASED_NMI
        ),
        hv.VMCS_CTRL_CPU_BASED: hv.cap2ctrl(proc_cap, proc),
        hv.VMCS_CTRL_CPU_BASED2: hv.cap2ctrl(cap(hv.HV_VMX_CAP_PROCBASED2), proc2),
        hv.VMCS_CTRL_VMENTRY_CONTROLS: hv.cap2ctrl(cap(hv.HV_VMX_CAP_ENTRY), hv.VMENTRY_LOAD_EFER),
        hv.VMCS_CTRL_VMEXIT_CONTROLS: hv.cap2ctrl(
            cap(hv.HV_VMX_CAP_EXIT), hv.VMEXIT_SAVE_EFER | hv.VMEXIT_LOAD_EFER
        ),
    }


def setup_vcpu(
    vcpu: int,
    *,
    cr0: int = CR0_RESET,
    cr4: int = 0,
    efer: int = 0,
    cr3: int | None = None,
    memory: PhysicalMemory | None = None,
    hlt_exiting: bool = True,
    unrestricted: bool = True,
    rdtscp: bool = False,
) -> None:
    """Set up a new vCPU the framework way: the :func:`control_words`, TPR threshold 0, no
    event queued, and CR0/CR4/EFER (and CR3) as the guest has them (architectural values,
    e.g. a boot protocol's; power-on values by default), through
    :func:`set_control_registers`. Segments, RIP, RFLAGS and the exception bitmap are the
    caller's."""
    for field_, value in control_words(
        hlt_exiting=hlt_exiting, unrestricted=unrestricted, rdtscp=rdtscp
    ).items():
        hv.hv_vmx_vcpu_write_vmcs(vcpu, field_, value)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_TPR_THRESHOLD, 0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, 0)
    set_control_registers(vcpu, cr0=cr0, cr4=cr4, efer=efer, cr3=cr3, memory=memory)


# --- CR0, CR4, EFER as the guest has them -------------------------------------------------------


def guest_view(real: int, mask: int, shadow: int) -> int:
    """What the guest reads of a CR: the real bits outside ``mask``, the shadow's inside."""
    return (real & ~mask) | (shadow & mask)


def real_cr0(value: int) -> int:
    """The real CR0 for guest value ``value``: NE and ET on, CD and NW off."""
    return (value & ~CR0_FORCED_OFF) | CR0_FORCED_ON


def real_cr4(value: int) -> int:
    """The real CR4 for guest value ``value``: VMXE on."""
    return value | CR4_VMXE


def read_cr0(vcpu: int) -> int:
    """CR0 as the guest sees it (shadow in masked bits), but PG from the real register: the
    VMM masks PG only to see it change and never alters it, so the real bit is the guest's
    even where the backend switched paging without an exit (KVM does it in the kernel)."""
    real = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CR0)
    mask = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CR0_MASK) & ~CR0_PG
    return guest_view(real, mask, hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CR0_SHADOW))


def read_cr4(vcpu: int) -> int:
    """CR4 as the guest sees it (shadow in masked bits)."""
    return guest_view(
        hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CR4),
        hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CR4_MASK),
        hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CR4_SHADOW),
    )


def set_control_registers(
    vcpu: int,
    *,
    cr0: int | None = None,
    cr4: int | None = None,
    efer: int | None = None,
    cr3: int | None = None,
    memory: PhysicalMemory | None = None,
) -> None:
    """Give the guest these CR0/CR4/EFER/CR3 values (None: keep the current one), as it would
    have them on bare metal: real registers with the fixed bits, masks and shadows, EFER.LMA
    and the IA-32e mode guest control from LME & PG, the PDPTEs for PAE paging (read through
    ``memory``; ValueError without it), then the TLB flushed."""
    if efer is not None:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER, efer)
    if cr3 is not None:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_CR3, cr3)
    if cr4 is not None:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CR4_MASK, CR4_MASK)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CR4_SHADOW, cr4)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_CR4, real_cr4(cr4))
    if cr0 is not None:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CR0_MASK, CR0_MASK)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CR0_SHADOW, cr0)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_CR0, real_cr0(cr0))
    guest_cr0 = read_cr0(vcpu) if cr0 is None else cr0
    lma = sync_long_mode(vcpu, guest_cr0)
    guest_cr4 = read_cr4(vcpu) if cr4 is None else cr4
    if guest_cr0 & CR0_PG and guest_cr4 & CR4_PAE and not lma:
        if memory is None:
            raise ValueError("PAE paging without long mode: the PDPTEs need guest memory")
        load_pdptes(vcpu, memory)
    hv.hv_vcpu_invalidate_tlb(vcpu)


def write_cr0(vcpu: int, value: int, memory: PhysicalMemory | None = None) -> None:
    """The guest's CR0 becomes ``value`` (see :func:`set_control_registers`)."""
    set_control_registers(vcpu, cr0=value, memory=memory)


def write_cr4(vcpu: int, value: int, memory: PhysicalMemory | None = None) -> None:
    """The guest's CR4 becomes ``value`` (see :func:`set_control_registers`)."""
    set_control_registers(vcpu, cr4=value, memory=memory)


def write_efer(vcpu: int, value: int, memory: PhysicalMemory | None = None) -> None:
    """The guest's IA32_EFER becomes ``value`` (a WRMSR; LMA follows LME & CR0.PG)."""
    set_control_registers(vcpu, efer=value, memory=memory)


def write_cr3(vcpu: int, value: int, memory: PhysicalMemory | None = None) -> None:
    """The guest's CR3 becomes ``value`` (PDPTEs reloaded under PAE paging)."""
    set_control_registers(vcpu, cr3=value, memory=memory)


def sync_long_mode(vcpu: int, cr0: int) -> bool:
    """Make EFER.LMA and the IA-32e mode guest control equal EFER.LME & ``cr0``.PG (in IA-32e
    mode a 16-bit busy TSS in TR becomes a 64-bit one, as TR must be); whether LMA is on."""
    efer = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER)
    lma = bool(efer & hv.EFER_LME and cr0 & CR0_PG)
    new_efer = efer | hv.EFER_LMA if lma else efer & ~hv.EFER_LMA
    if new_efer != efer:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER, new_efer)
    entry = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS)
    new_entry = entry | hv.VMENTRY_GUEST_IA32E if lma else entry & ~hv.VMENTRY_GUEST_IA32E
    if new_entry != entry:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS, new_entry)
    if lma:
        tr_ar = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_TR_AR)
        if tr_ar & 0xF == _TSS_BUSY16:
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_TR_AR, tr_ar & ~0xF | _TSS_BUSY64)
    return lma


def load_pdptes(vcpu: int, memory: PhysicalMemory) -> None:
    """Load VMCS_GUEST_PDPTE0-3 from the 32-byte table CR3 points to (PAE paging)."""
    table = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CR3) & 0xFFFFFFE0
    data = memory.read(table, 32)
    for i, field_ in enumerate(_PDPTES):
        hv.hv_vmx_vcpu_write_vmcs(vcpu, field_, int.from_bytes(data[8 * i : 8 * i + 8], "little"))


# --- exits -------------------------------------------------------------------------------------


class CrAccess(NamedTuple):
    """What :func:`handle_cr_access` did: ``cr`` (0, 3, 4, 8), ``access`` (CR_MOV_TO,
    CR_MOV_FROM, CR_CLTS, CR_LMSW), ``value`` (written or read; the new CR0 for CLTS/LMSW),
    ``fault`` (a #GP(0) was queued instead; RIP unchanged)."""

    cr: int
    access: int
    value: int
    fault: bool = False


def skip_instruction(vcpu: int) -> None:
    """Move RIP past the exiting instruction (VMCS_RO_VMEXIT_INSTR_LEN) and end STI/MOV-SS
    blocking, as completing the instruction does on hardware."""
    rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    length = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, (rip + length) & M64)
    blocking = hv.GUEST_INTRBILITY_STI_BLOCKING | hv.GUEST_INTRBILITY_MOVSS_BLOCKING
    value = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY)
    if value & blocking:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY, value & ~blocking)


def inject_exception(vcpu: int, vector: int, error_code: int | None = None) -> None:
    """Queue hardware exception ``vector`` (with ``error_code`` if given) for the next entry."""
    info = hv.IRQ_INFO_VALID | hv.IRQ_INFO_HARD_EXC | vector
    if error_code is not None:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_EXC_ERROR, error_code)
        info |= hv.IRQ_INFO_ERROR_VALID
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, info)


def _mode_64(vcpu: int) -> bool:
    """Whether the guest runs 64-bit code (IA-32e mode and CS.L)."""
    efer = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER)
    return bool(efer & hv.EFER_LMA and hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CS_AR) & _AR_L)


def cr0_write_faults(value: int, old: int, cr4: int, efer: int, mode_64: bool) -> bool:
    """Whether MOV to CR0 of ``value`` is a #GP(0) (SDM "MOV - Move to/from Control
    Registers"): bits 63:32 set, PG without PE, NW without CD, PG with LME but no PAE,
    PG cleared in 64-bit mode or with CR4.PCIDE."""
    if value >> 32 or (value & CR0_PG and not value & CR0_PE):
        return True
    if value & CR0_NW and not value & CR0_CD:
        return True
    if value & CR0_PG and not old & CR0_PG and efer & hv.EFER_LME and not cr4 & CR4_PAE:
        return True
    return bool(old & CR0_PG and not value & CR0_PG and (mode_64 or cr4 & CR4_PCIDE))


def cr4_write_faults(value: int, efer: int) -> bool:
    """Whether MOV to CR4 of ``value`` is a #GP(0): a bit the processor lacks (outside
    CR4_FIXED1), VMXE (the guest has no VMX), or PAE cleared in IA-32e mode."""
    fixed1 = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_CR4_FIXED1)
    if value & ~fixed1 or value & CR4_VMXE:
        return True
    return bool(efer & hv.EFER_LMA and not value & CR4_PAE)


def handle_cr_access(vcpu: int, memory: PhysicalMemory | None = None) -> CrAccess:
    """Complete a control-register access exit (28) as the instruction would have on bare
    metal: decode the qualification (CR number 3:0, access type 5:4, GPR 11:8, LMSW source
    31:16), apply a MOV to CR0/CR4 with the masks and shadows (long mode and PDPTEs kept in
    step), CR3 and CR8 (the TPR) both ways, CLTS and LMSW; then advance RIP. A value the
    instruction refuses queues #GP(0) instead."""
    qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    cr, access, gpr = qual & 0xF, qual >> 4 & 3, GPRS[qual >> 8 & 0xF]
    efer = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER)
    mode_64 = _mode_64(vcpu)
    result: CrAccess
    if access == CR_MOV_FROM:
        if cr == 3:
            value = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CR3)
        elif cr == 8:
            value = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_TPR) >> 4 & 0xF
        else:
            value = read_cr0(vcpu) if cr == 0 else read_cr4(vcpu)
        hv.hv_vcpu_write_register(vcpu, gpr, value if mode_64 else value & M32)
        result = CrAccess(cr, access, value)
    elif access == CR_MOV_TO:
        value = hv.hv_vcpu_read_register(vcpu, gpr)
        value = value if mode_64 else value & M32
        result = _mov_to_cr(vcpu, cr, value, efer, mode_64, memory)
    elif access == CR_CLTS:
        value = read_cr0(vcpu) & ~CR0_TS
        write_cr0(vcpu, value, memory)
        result = CrAccess(0, access, value)
    else:  # LMSW: loads PE, MP, EM, TS; never clears PE
        old = read_cr0(vcpu)
        value = old & ~0xE | (qual >> 16 & 0xF) | (old & CR0_PE)
        write_cr0(vcpu, value, memory)
        result = CrAccess(0, access, value)
    if result.fault:
        inject_exception(vcpu, hv.IDT_GP, 0)
    else:
        skip_instruction(vcpu)
    return result


def _mov_to_cr(
    vcpu: int, cr: int, value: int, efer: int, mode_64: bool, memory: PhysicalMemory | None
) -> CrAccess:
    if cr == 0:
        old = read_cr0(vcpu)
        if cr0_write_faults(value, old, read_cr4(vcpu), efer, mode_64):
            return CrAccess(0, CR_MOV_TO, value, fault=True)
        write_cr0(vcpu, value, memory)
    elif cr == 4:
        if cr4_write_faults(value, efer):
            return CrAccess(4, CR_MOV_TO, value, fault=True)
        write_cr4(vcpu, value, memory)
    elif cr == 3:
        write_cr3(vcpu, value, memory)
    elif cr == 8:
        if value & ~0xF:
            return CrAccess(8, CR_MOV_TO, value, fault=True)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_TPR, value << 4)
    else:
        raise ValueError(f"MOV to CR{cr} cannot exit")
    return CrAccess(cr, CR_MOV_TO, value)


def reinject_event(vcpu: int) -> bool:
    """After an exit: if it interrupted the delivery of an event (VMCS_RO_IDT_VECTOR_INFO
    valid), queue that event again for the next entry (with its error code, and the
    instruction length for software interrupts and exceptions; NMI blocking cleared for an
    NMI). Not when the entry slot already holds an event the VMM queued: that one wins.
    Whether an event was queued."""
    info = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO)
    if not info & hv.IRQ_INFO_VALID:
        return False
    if hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO) & hv.IRQ_INFO_VALID:
        return False
    kind = info & hv.IRQ_INFO_TYPE_MASK
    if info & hv.IRQ_INFO_ERROR_VALID:
        error = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_ERROR)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_EXC_ERROR, error)
    if kind in _SOFTWARE_EVENTS:
        length = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_INSTR_LEN, length)
    if kind == hv.IRQ_INFO_NMI:
        blocking = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY)
        nmi = hv.GUEST_INTRBILITY_NMI_BLOCKING
        if blocking & nmi:
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY, blocking & ~nmi)
    entry = info & (hv.IRQ_INFO_VALID | hv.IRQ_INFO_ERROR_VALID | hv.IRQ_INFO_TYPE_MASK | 0xFF)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, entry)
    return True


def debugger_write_cr(vcpu: int, cr: int, value: int, memory: PhysicalMemory | None = None) -> None:
    """A debugger sets CR0 or CR4 (``cr``) to ``value`` as the guest will read it, under
    whatever masks the VMM chose: the shadow takes ``value``; the real register takes it
    outside the mask (and PG, which a VMM only intercepts), keeps the VMM's real bits inside
    it, and keeps the bits VMX requires (CR0.NE, CR4.VMXE; CR0.PE/PG too without
    unrestricted guest). Long mode follows a PG change; PAE paging reloads the PDPTEs."""
    fields = {0: (hv.VMCS_GUEST_CR0, hv.VMCS_CTRL_CR0_MASK, hv.VMCS_CTRL_CR0_SHADOW)}
    fields[4] = (hv.VMCS_GUEST_CR4, hv.VMCS_CTRL_CR4_MASK, hv.VMCS_CTRL_CR4_SHADOW)
    real_field, mask_field, shadow_field = fields[cr]
    mask = hv.hv_vmx_vcpu_read_vmcs(vcpu, mask_field) & ~(CR0_PG if cr == 0 else 0)
    old = hv.hv_vmx_vcpu_read_vmcs(vcpu, real_field)
    if cr == 0:
        fixed0 = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_CR0_FIXED0)
        proc2 = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED2)
        if proc2 & hv.CPU_BASED2_UNRESTRICTED:
            fixed0 &= ~(CR0_PE | CR0_PG)
    else:
        fixed0 = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_CR4_FIXED0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, shadow_field, value)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, real_field, (value & ~mask) | (old & mask) | fixed0)
    lma = sync_long_mode(vcpu, hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CR0))
    real_cr0_now = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CR0)
    real_cr4_now = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CR4)
    if real_cr0_now & CR0_PG and real_cr4_now & CR4_PAE and not lma and memory is not None:
        load_pdptes(vcpu, memory)
    hv.hv_vcpu_invalidate_tlb(vcpu)
