"""A VMM written the way QEMU's target/i386/hvf writes it runs on every backend, and the set-ups
VMX refuses fail their entry as on a Mac (issue 12).

The vCPU is set up as a framework VMM must: controls through cap2ctrl with HLT exiting, the TPR
shadow and the secondary controls; CR0.NE and CR4.VMXE ORed into the guest's CR0/CR4 and hidden
behind the guest/host masks (CR0: CD|NE, CR4: VMXE) with read shadows 0. Such a guest runs to an
I/O exit, a HLT exit and a ``hv_vcpu_run_until`` deadline. Each forbidden set-up (CR4 without
VMXE, CR0 without NE, a segment limit that disagrees with its granularity, TR with a 4 GiB limit
and G=0, the IA-32e entry control disagreeing with EFER.LMA) makes the run return HV_SUCCESS with
exit reason 0x80000021; control words outside the capabilities are refused when written, and a
control check that fails at entry (a TPR threshold with bits 31:4 set) fails the run itself.
Long mode is entered as QEMU does it (EFER.LME, the IA-32e entry control, CR0.PG). The MSRs:
``hv_vcpu_read/write_msr`` take the framework's ``HV_MSR_*`` list and refuse the rest, and a
guest RDMSR/WRMSR of another MSR exits to the VMM. EPT violations carry the guest-linear
address (qualification bits 7/8, VMCS_RO_GUEST_LIN_ADDR), as hardware reports them.

The checks are on for these tests (GDBSTUB_VMX_CHECKS=1). The file runs on the backends the
suite's ``hv_backend`` fixture offers: kvm, emu and hvf-shim here, and hvf on a Mac (where the
checks are the processor's and the file says what the Mac does).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hvguest import (
    CODE,
    GDT,
    IDT,
    PML4,
    STACK,
    Vm,
    asm,
    build_long_mode_tables,
    exit_reason,
    hv_vm,
    pte_address,
    reg,
    set_reg,
    set_segment,
    set_vmcs,
    skip_instruction,
    vmcs,
)

from gdbstub import hv

__all__ = ["hv_vm"]  # the fixture, imported for pytest

FAILED_ENTRY = hv.VMX_EXIT_REASON_FAILED_ENTRY | hv.VMX_REASON_VMENTRY_GUEST
CR0_MASK = hv.CR0_CD | hv.CR0_NE
CR4_MASK = hv.CR4_VMXE

GUEST = asm(
    """
    mov eax, cr4
    out 0x10, eax
    mov eax, cr0
    out 0x11, eax
    hlt
spin:
    jmp spin
    """,
    bits=32,
)


@pytest.fixture(autouse=True)
def _checks_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDBSTUB_VMX_CHECKS", "1")


def framework_vcpu(vm: Vm, code: bytes = GUEST) -> int:
    """A vCPU in flat 32-bit protected mode, set up as QEMU's hvf support does it."""
    vm.mem.write(CODE, code)
    for offset, descriptor in (
        (0x00, 0),
        (0x08, 0x00CF9B000000FFFF),
        (0x10, 0x00CF93000000FFFF),
        (0x20, 0x00008B000000FFFF),
    ):
        vm.mem.put64(GDT + offset, descriptor)
    vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
    vm.vcpus.append(vcpu)
    for field, cap, wanted in (
        (hv.VMCS_CTRL_PIN_BASED, hv.HV_VMX_CAP_PINBASED, hv.PIN_BASED_INTR | hv.PIN_BASED_NMI),
        (
            hv.VMCS_CTRL_CPU_BASED,
            hv.HV_VMX_CAP_PROCBASED,
            hv.CPU_BASED_HLT | hv.CPU_BASED_TPR_SHADOW | hv.CPU_BASED_SECONDARY_CTLS,
        ),
        (hv.VMCS_CTRL_CPU_BASED2, hv.HV_VMX_CAP_PROCBASED2, hv.CPU_BASED2_VIRTUAL_APIC),
        (hv.VMCS_CTRL_VMENTRY_CONTROLS, hv.HV_VMX_CAP_ENTRY, 0),
        (hv.VMCS_CTRL_VMEXIT_CONTROLS, hv.HV_VMX_CAP_EXIT, 0),
    ):
        set_vmcs(vcpu, field, hv.cap2ctrl(hv.hv_vmx_read_capability(cap), wanted))
    set_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 0)
    set_vmcs(vcpu, hv.VMCS_CTRL_TPR_THRESHOLD, 0)
    for i in range(6):
        selector, ar = (0x08, 0xC09B) if i == 1 else (0x10, 0xC093)
        set_segment(vcpu, i, selector, 0, 0xFFFFFFFF, ar)
    set_segment(vcpu, 6, 0, 0, 0, 0x10000)  # LDTR unusable
    set_segment(vcpu, 7, 0x20, 0, 0xFFFF, 0x8B)  # a busy 32-bit TSS
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_BASE, GDT)
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_LIMIT, 0x27)
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_BASE, IDT)
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_LIMIT, 0x3FF)
    cr0 = hv.CR0_PE | hv.CR0_ET  # what the guest's code wants
    cr4 = hv.CR4_OSFXSR | hv.CR4_OSXMMEXCPT
    set_vmcs(vcpu, hv.VMCS_CTRL_CR0_MASK, CR0_MASK)
    set_vmcs(vcpu, hv.VMCS_CTRL_CR0_SHADOW, 0)
    set_vmcs(vcpu, hv.VMCS_GUEST_CR0, cr0 | hv.CR0_NE)
    set_vmcs(vcpu, hv.VMCS_CTRL_CR4_MASK, CR4_MASK)
    set_vmcs(vcpu, hv.VMCS_CTRL_CR4_SHADOW, 0)
    set_vmcs(vcpu, hv.VMCS_GUEST_CR4, cr4 | hv.CR4_VMXE)
    set_vmcs(vcpu, hv.VMCS_GUEST_CR3, 0)
    set_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER, 0)
    set_reg(vcpu, hv.HV_X86_TPR, 0)
    set_reg(vcpu, hv.HV_X86_RIP, CODE)
    set_reg(vcpu, hv.HV_X86_RFLAGS, 2)
    set_reg(vcpu, hv.HV_X86_RSP, STACK)
    return vcpu


def test_capabilities_offer_what_framework_vmms_ask_for(hv_vm: Vm) -> None:
    """As on an Intel Mac: TPR shadow and CR8-load/store exiting may be one (every framework VMM
    sets one, hvdos found the rest of the word ignored otherwise), CR3-load/store exiting may
    be zero (hyperkit needs that), HLT exiting and the secondary controls may be one."""
    cap = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_PROCBASED)
    must, may = cap & 0xFFFFFFFF, cap >> 32
    for bit in (
        hv.CPU_BASED_TPR_SHADOW,
        hv.CPU_BASED_CR8_LOAD,
        hv.CPU_BASED_CR8_STORE,
        hv.CPU_BASED_HLT,
        hv.CPU_BASED_SECONDARY_CTLS,
    ):
        assert may & bit, hex(bit)
    assert not must & (hv.CPU_BASED_CR3_LOAD | hv.CPU_BASED_CR3_STORE)
    assert hv.hv_vmx_read_capability(hv.HV_VMX_CAP_CR4_FIXED0) & hv.CR4_VMXE
    assert hv.hv_vmx_read_capability(hv.HV_VMX_CAP_CR0_FIXED0) & hv.CR0_NE
    vcpu = framework_vcpu(hv_vm)
    proc = vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    assert proc & hv.CPU_BASED_TPR_SHADOW and proc & hv.CPU_BASED_HLT


INSTRUCTION_EXITS = (
    hv.CPU_BASED_INVLPG,
    hv.CPU_BASED_MWAIT,
    hv.CPU_BASED_RDPMC,
    hv.CPU_BASED_RDTSC,
    hv.CPU_BASED_MOV_DR,
    hv.CPU_BASED_MONITOR,
    hv.CPU_BASED_PAUSE,
)


def test_instruction_exit_controls_may_be_one(hv_vm: Vm, hv_backend: str) -> None:
    """As on an Intel Mac: INVLPG, MWAIT, RDPMC, RDTSC, MOV-DR, MONITOR and PAUSE exiting
    (primary) and WBINVD exiting (secondary) may be one, and neither must. A VMM that sets them
    all is not refused, its entry passes, and a guest RDTSC exits 16 at the instruction (on kvm
    KVM absorbs it: the guest runs on to its HLT, docs/library.md)."""
    proc_cap = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_PROCBASED)
    proc2_cap = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_PROCBASED2)
    for cap, bit in [(proc_cap, b) for b in INSTRUCTION_EXITS] + [
        (proc2_cap, hv.CPU_BASED2_WBINVD)
    ]:
        assert cap >> 32 & bit and not cap & bit, hex(bit)
    vcpu = framework_vcpu(hv_vm, asm("rdtsc\nhlt\n", bits=32))
    proc = vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    for bit in INSTRUCTION_EXITS:
        proc |= bit
    set_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, proc)
    set_vmcs(
        vcpu, hv.VMCS_CTRL_CPU_BASED2, vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED2) | hv.CPU_BASED2_WBINVD
    )
    assert vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED) == proc
    reason = run_for(vcpu)
    if hv_backend in ("kvm", "hvf-shim"):
        assert reason == hv.VMX_REASON_HLT
        return
    assert reason == hv.VMX_REASON_RDTSC
    assert reg(vcpu, hv.HV_X86_RIP) == CODE
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2


def run_for(vcpu: int, nanoseconds: int = 5_000_000_000) -> int:
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(nanoseconds))
    return exit_reason(vcpu)


def test_framework_setup_runs_io_hlt_and_deadline(hv_vm: Vm) -> None:
    vcpu = framework_vcpu(hv_vm)
    assert run_for(vcpu) == hv.VMX_REASON_IO
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16 == 0x10
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 3  # at the OUT (after MOV EAX, CR4)
    skip_instruction(vcpu)
    assert run_for(vcpu) == hv.VMX_REASON_IO
    skip_instruction(vcpu)
    assert run_for(vcpu) == hv.VMX_REASON_HLT
    skip_instruction(vcpu)
    assert run_for(vcpu, 20_000_000) in (hv.VMX_REASON_VMX_TIMER_EXPIRED, hv.VMX_REASON_IRQ)
    # the VMM's values read back, fixed bits included
    assert vmcs(vcpu, hv.VMCS_GUEST_CR4) & hv.CR4_VMXE
    assert reg(vcpu, hv.HV_X86_CR4) & hv.CR4_VMXE
    assert vmcs(vcpu, hv.VMCS_GUEST_CR0) & hv.CR0_NE
    assert vmcs(vcpu, hv.VMCS_CTRL_CR4_MASK) == CR4_MASK
    assert vmcs(vcpu, hv.VMCS_CTRL_CR0_MASK) == CR0_MASK


def test_guest_reads_cr4_through_the_mask_and_shadow(hv_vm: Vm) -> None:
    vcpu = framework_vcpu(hv_vm)
    assert run_for(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_RAX) == hv.CR4_OSFXSR | hv.CR4_OSXMMEXCPT  # VMXE from the shadow


LONG_GUEST = asm(
    """
    mov rax, 0x123456789
    out 0x10, eax
    hlt
    """,
    bits=64,
)


def long_mode(vcpu: int, vm: Vm) -> None:
    """Enter long mode as QEMU's hvf does: EFER.LME in VMCS_GUEST_IA32_EFER, the IA-32e mode
    guest entry control, CR0.PG and CR4.PAE (identity paging of the first 2 MiB)."""
    build_long_mode_tables(vm.mem)
    vm.mem.put64(GDT + 0x18, 0x00AF9B000000FFFF)
    set_segment(vcpu, 1, 0x18, 0, 0xFFFFFFFF, 0xA09B)
    entry = vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & ~hv.VMENTRY_LOAD_EFER
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS, entry | hv.VMENTRY_GUEST_IA32E)
    set_vmcs(vcpu, hv.VMCS_GUEST_CR3, PML4)
    set_vmcs(vcpu, hv.VMCS_GUEST_CR4, vmcs(vcpu, hv.VMCS_GUEST_CR4) | hv.CR4_PAE)
    set_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER, hv.EFER_LME)
    set_vmcs(vcpu, hv.VMCS_GUEST_CR0, vmcs(vcpu, hv.VMCS_GUEST_CR0) | hv.CR0_PG)


def test_ia32e_entry_control_makes_efer_lma(hv_vm: Vm) -> None:
    """Without "load IA32_EFER" the entry sets EFER.LMA from the IA-32e mode guest control
    (SDM 26.3.2.1), and the exit leaves it in the field."""
    vcpu = framework_vcpu(hv_vm, LONG_GUEST)
    long_mode(vcpu, hv_vm)
    assert vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & hv.VMENTRY_GUEST_IA32E  # as written
    assert run_for(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_RAX) == 0x123456789  # 64-bit code ran
    assert vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER) & (hv.EFER_LME | hv.EFER_LMA) == (
        hv.EFER_LME | hv.EFER_LMA
    )
    assert vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & hv.VMENTRY_GUEST_IA32E


def _clear(field: int, bits: int) -> Callable[[int], None]:
    return lambda vcpu: set_vmcs(vcpu, field, vmcs(vcpu, field) & ~bits)


def _segment(index: int, limit: int, ar: int) -> Callable[[int], None]:
    def apply(vcpu: int) -> None:
        set_vmcs(vcpu, hv.VMCS_GUEST_ES_LIMIT + 2 * index, limit)
        set_vmcs(vcpu, hv.VMCS_GUEST_ES_AR + 2 * index, ar)

    return apply


def _efer_lma_without_ia32e(vcpu: int) -> None:
    entry = vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) | hv.VMENTRY_LOAD_EFER
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS, entry & ~hv.VMENTRY_GUEST_IA32E)
    set_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER, hv.EFER_LME | hv.EFER_LMA)


FORBIDDEN: dict[str, Callable[[int], None]] = {
    "cr4-without-vmxe": _clear(hv.VMCS_GUEST_CR4, hv.CR4_VMXE),
    "cr0-without-ne": _clear(hv.VMCS_GUEST_CR0, hv.CR0_NE),
    "ds-limit-4g-with-g0": _segment(3, 0xFFFFFFFF, 0x4093),
    "ss-limit-fff-with-g1": _segment(2, 0xFFFFE, 0xC093),
    "tr-limit-4g-with-g0": _segment(7, 0xFFFFFFFF, 0x8B),
    "efer-lma-without-ia32e": _efer_lma_without_ia32e,
}


@pytest.mark.parametrize("name", list(FORBIDDEN))
def test_forbidden_setup_fails_the_entry(hv_vm: Vm, name: str) -> None:
    vcpu = framework_vcpu(hv_vm)
    FORBIDDEN[name](vcpu)
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(2_000_000_000))  # HV_SUCCESS
    assert exit_reason(vcpu) == FAILED_ENTRY
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) == 0
    assert reg(vcpu, hv.HV_X86_RIP) == CODE  # nothing ran
    # the same entry fails again until the VMM changes the state
    assert run_for(vcpu, 1_000_000_000) == FAILED_ENTRY


def test_entry_runs_again_once_the_state_is_fixed(hv_vm: Vm) -> None:
    vcpu = framework_vcpu(hv_vm)
    cr4 = vmcs(vcpu, hv.VMCS_GUEST_CR4)
    set_vmcs(vcpu, hv.VMCS_GUEST_CR4, cr4 & ~hv.CR4_VMXE)
    assert run_for(vcpu) == FAILED_ENTRY
    set_vmcs(vcpu, hv.VMCS_GUEST_CR4, cr4)
    assert run_for(vcpu) == hv.VMX_REASON_IO


@pytest.mark.parametrize(
    "field",
    [hv.VMCS_CTRL_PIN_BASED, hv.VMCS_CTRL_VMENTRY_CONTROLS, hv.VMCS_CTRL_CPU_BASED],
    ids=["pin", "entry", "proc"],
)
def test_control_word_outside_the_capabilities(hv_vm: Vm, hv_backend: str, field: int) -> None:
    """Cleared must-be-one bits: the framework (macOS 11+) refuses the write; if a framework
    takes it, the entry must fail instead."""
    vcpu = framework_vcpu(hv_vm)
    before = vmcs(vcpu, field)
    try:
        set_vmcs(vcpu, field, 0)
    except hv.HvError as exc:
        assert exc.code == hv.HV_BAD_ARGUMENT
        assert vmcs(vcpu, field) == before  # refused: unchanged
        assert run_for(vcpu) == hv.VMX_REASON_IO  # and the vCPU still runs
        return
    assert hv_backend == "hvf", "kvm and emu refuse the write as macOS 11+ does"
    try:
        reason = run_for(vcpu)
    except hv.HvError:
        return  # the entry failed on the controls
    assert reason == FAILED_ENTRY


def test_failed_control_check_at_entry(hv_vm: Vm, hv_backend: str) -> None:
    """A TPR threshold with bits 31:4 set (TPR shadow on, no virtual-interrupt delivery) fails
    the checks on the controls: no exit, the run fails, VM-instruction error 7."""
    vcpu = framework_vcpu(hv_vm)
    set_vmcs(vcpu, hv.VMCS_CTRL_TPR_THRESHOLD, 0x10)
    with pytest.raises(hv.HvError) as caught:
        hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(1_000_000_000))
    if hv_backend != "hvf":
        assert caught.value.code == hv.HV_ERROR
        assert vmcs(vcpu, hv.VMCS_RO_INSTR_ERROR) == 7
    assert reg(vcpu, hv.HV_X86_RIP) == CODE
    set_vmcs(vcpu, hv.VMCS_CTRL_TPR_THRESHOLD, 0)
    assert run_for(vcpu) == hv.VMX_REASON_IO


# --- MSRs ----------------------------------------------------------------------------------------

FRAMEWORK_MSRS = {
    hv.HV_MSR_IA32_SYSENTER_EIP: 0x8000_1000,
    hv.HV_MSR_IA32_STAR: 0x0023_0010_0000_0000,
    hv.HV_MSR_IA32_LSTAR: 0xFFFF_8000_0000_2000,
    hv.HV_MSR_IA32_KERNEL_GS_BASE: 0x7FFF_0000_3000,
    hv.HV_MSR_IA32_TSC_AUX: 3,
}
VMM_MSRS = {  # no HV_MSR_*: the VMM's to emulate
    "apic-base": hv.MSR_IA32_APIC_BASE,
    "pat": hv.MSR_IA32_PAT,
    "mtrr-def-type": 0x2FF,
    "misc-enable": hv.MSR_IA32_MISC_ENABLE,
    "x2apic-id": 0x802,
}


def test_framework_msrs_read_and_write(hv_vm: Vm) -> None:
    vcpu = framework_vcpu(hv_vm)
    for msr, value in FRAMEWORK_MSRS.items():
        hv.hv_vcpu_write_msr(vcpu, msr, value)
    for msr, value in FRAMEWORK_MSRS.items():
        assert hv.hv_vcpu_read_msr(vcpu, msr) == value, hex(msr)


@pytest.mark.parametrize("name", list(VMM_MSRS))
def test_msr_outside_the_framework_list_is_refused(hv_vm: Vm, name: str) -> None:
    vcpu = framework_vcpu(hv_vm)
    msr = VMM_MSRS[name]
    with pytest.raises(hv.HvError) as caught:
        hv.hv_vcpu_read_msr(vcpu, msr)
    assert caught.value.code == hv.HV_BAD_ARGUMENT
    with pytest.raises(hv.HvError) as caught:
        hv.hv_vcpu_write_msr(vcpu, msr, 0)
    assert caught.value.code == hv.HV_BAD_ARGUMENT


@pytest.mark.parametrize("name", list(VMM_MSRS))
def test_guest_rdmsr_wrmsr_outside_the_list_exit_to_the_vmm(hv_vm: Vm, name: str) -> None:
    msr = VMM_MSRS[name]
    code = asm(f"mov ecx, {msr}\nrdmsr\nwrmsr\nhlt\n", bits=32)
    vcpu = framework_vcpu(hv_vm, code)
    assert run_for(vcpu) == hv.VMX_REASON_RDMSR
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5 and vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2
    assert reg(vcpu, hv.HV_X86_RCX) == msr
    set_reg(vcpu, hv.HV_X86_RAX, 0x1234)  # the VMM's answer
    set_reg(vcpu, hv.HV_X86_RDX, 0)
    skip_instruction(vcpu)
    assert run_for(vcpu) == hv.VMX_REASON_WRMSR
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 7 and reg(vcpu, hv.HV_X86_RAX) == 0x1234
    skip_instruction(vcpu)
    assert run_for(vcpu) == hv.VMX_REASON_HLT


# --- EPT violations --------------------------------------------------------------------------

MMIO_GPA = 0x8000_0000  # no RAM there
PAGED_LINEAR = 0x1FF000  # mapped to MMIO_GPA by the test's page tables


@pytest.mark.parametrize(
    ("paging", "source", "gla", "access"),
    [
        (True, "mov eax, [0x1ff010]", PAGED_LINEAR + 0x10, hv.EPT_VIOLATION_DATA_READ),
        (True, "mov ebx, 0x1ff000\nmov [rbx+8], ecx", PAGED_LINEAR + 8, 2),
        (True, "mov esi, 0x1fe000\nmov al, [rsi+0x1ffe]", PAGED_LINEAR + 0xFFE, 1),
        (True, "mov [rel $+0x1fe000], eax", None, 2),
        (False, "mov eax, [0x80000020]", MMIO_GPA + 0x20, hv.EPT_VIOLATION_DATA_READ),
    ],
    ids=["paged-read", "paged-write", "paged-base-disp", "paged-rip-relative", "unpaged-read"],
)
def test_ept_violation_reports_the_linear_address(
    hv_vm: Vm,
    hv_backend: str,
    paging: bool,
    source: str,
    gla: int | None,
    access: int,
) -> None:
    """Bits 0-2 the access, 3-5 what the mapping allows (nothing: no RAM), bit 7 the linear
    address is valid, bit 8 the access was to its translation; VMCS_RO_GUEST_LIN_ADDR."""
    code = asm(source + "\nhlt\n", bits=64 if paging else 32)
    vcpu = framework_vcpu(hv_vm, code)
    if paging:
        long_mode(vcpu, hv_vm)
        hv_vm.mem.put64(pte_address(PAGED_LINEAR), MMIO_GPA | 3)
    if gla is None:  # RIP-relative: the instruction's own address plus 0x1fe000
        gla = CODE + 0x1FE000
        hv_vm.mem.put64(pte_address(gla), MMIO_GPA | 3)
    assert run_for(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == MMIO_GPA + (gla & 0xFFF)
    assert qual & 0x1FF == (access | hv.EPT_VIOLATION_GLA_VALID | hv.EPT_VIOLATION_XLAT_VALID), hex(
        qual
    )
    assert vmcs(vcpu, hv.VMCS_RO_GUEST_LIN_ADDR) == gla
    assert vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO) & hv.IRQ_INFO_VALID == 0
