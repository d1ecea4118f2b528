"""emu as the framework: CR0/CR4 masks and shadows, CR3/CR8 and TPR shadow, instruction exits.

Guests set up as a framework VMM does (``tests/hvguest``, through ``gdbstub.vmxsetup``: CR0 mask
PG|CD|NW|NE|ET, CR4 mask VMXE, TPR shadow); each test runs a small 64-bit guest on the emu
backend and looks at what a VMM sees: the exit, its qualification and length, RIP, and what
the guest read.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hvguest import (
    CODE,
    GDT,
    Vm,
    asm,
    emu_vm,
    exit_reason,
    reg,
    run_to_exit,
    set_reg,
    set_vmcs,
    vmcs,
)

from gdbstub import hv

pytestmark = pytest.mark.skipif(
    "emu" not in hv.available_backends(), reason="unicorn is not installed"
)


@pytest.fixture
def vm() -> Iterator[Vm]:
    yield from emu_vm()


def long_vcpu(vm: Vm, source: str) -> int:
    return vm.vcpu("long", asm(source, bits=64))


def controls(vcpu: int, field: int, add: int = 0, remove: int = 0) -> None:
    set_vmcs(vcpu, field, (vmcs(vcpu, field) | add) & ~remove)


def test_guest_reads_cr0_and_cr4_through_the_shadows(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "mov rax, cr4\nmov rbx, cr0\nsmsw ecx\nout 0x10, al\n")
    assert vmcs(vcpu, hv.VMCS_GUEST_CR4) & hv.CR4_VMXE
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert not reg(vcpu, hv.HV_X86_RAX) & hv.CR4_VMXE
    assert reg(vcpu, hv.HV_X86_RAX) & 0x20  # PAE, the guest's own bit
    assert reg(vcpu, hv.HV_X86_RBX) == vmcs(vcpu, hv.VMCS_CTRL_CR0_SHADOW)
    assert reg(vcpu, hv.HV_X86_RCX) & 0xFFFF == vmcs(vcpu, hv.VMCS_CTRL_CR0_SHADOW) & 0xFFFF
    # the real registers keep the VMM's fixed bits
    assert reg(vcpu, hv.HV_X86_CR4) & hv.CR4_VMXE
    assert reg(vcpu, hv.HV_X86_CR0) & hv.CR0_NE


def test_mov_to_cr4_of_a_masked_bit_exits_28(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "mov rax, cr4\nor eax, 0x2000\nmov cr4, rax\nout 0x10, al\n")
    assert run_to_exit(vcpu) == hv.VMX_REASON_MOV_CR
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert (qual & 0xF, qual >> 4 & 3, qual >> 8 & 0xF) == (4, 0, 0)  # CR4, MOV to, RAX
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 8  # at the MOV, nothing done
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 3
    assert vmcs(vcpu, hv.VMCS_CTRL_CR4_SHADOW) & hv.CR4_VMXE == 0


def test_mov_to_cr4_of_guest_bits_loads_them_and_keeps_vmxe(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "mov rax, cr4\nor eax, 0x80\nmov cr4, rax\nmov rbx, cr4\nout 0x10, al\n")
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_CR4) & (hv.CR4_VMXE | 0x80) == hv.CR4_VMXE | 0x80
    assert reg(vcpu, hv.HV_X86_RBX) & (hv.CR4_VMXE | 0x80) == 0x80


def test_mov_to_cr0_keeps_masked_bits_and_exits_on_a_change(vm: Vm) -> None:
    # TS (unmasked) is loaded; NE stays set behind the mask though the guest writes its shadow
    vcpu = long_vcpu(vm, "mov rax, cr0\nor eax, 8\nmov cr0, rax\nclts\nout 0x10, al\n")
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_CR0) & (hv.CR0_NE | 8) == hv.CR0_NE  # TS set, then CLTS
    vcpu2 = long_vcpu(vm, "mov rax, cr0\nand eax, ~0x80000000\nmov cr0, rax\nhlt\n")
    assert run_to_exit(vcpu2) == hv.VMX_REASON_MOV_CR  # PG is masked: the VMM sees it


def test_clts_exits_when_ts_is_masked_and_shadowed(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "clts\nhlt\n")
    controls(vcpu, hv.VMCS_CTRL_CR0_MASK, add=8)
    controls(vcpu, hv.VMCS_CTRL_CR0_SHADOW, add=8)
    assert run_to_exit(vcpu) == hv.VMX_REASON_MOV_CR
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & 0x3F == 2 << 4  # CR0, CLTS


def test_lmsw_exit_carries_its_source(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "mov eax, 0x3\nlmsw ax\nhlt\n")
    controls(vcpu, hv.VMCS_CTRL_CR0_MASK, add=2)  # MP owned by the VMM, shadow 0
    assert run_to_exit(vcpu) == hv.VMX_REASON_MOV_CR
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert qual >> 4 & 3 == 3 and qual >> 16 == 3


def test_cr8_exiting_follows_the_controls(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "mov rax, cr3\nmov cr3, rax\nmov rcx, cr8\nmov cr8, rcx\nhlt\n")
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT  # nothing asks: no exit
    set_reg(vcpu, hv.HV_X86_RIP, CODE)
    controls(vcpu, hv.VMCS_CTRL_CPU_BASED, add=hv.CPU_BASED_CR8_STORE | hv.CPU_BASED_CR8_LOAD)
    assert run_to_exit(vcpu) == hv.VMX_REASON_MOV_CR
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) == 8 | 1 << 4 | 1 << 8  # CR8, MOV from, RCX
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 6


def test_cr8_write_below_the_tpr_threshold_exits_43_after_it(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "mov eax, 2\nmov cr8, rax\nhlt\n")
    assert vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED) & hv.CPU_BASED_TPR_SHADOW
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_TPR, 0x50)
    set_vmcs(vcpu, hv.VMCS_CTRL_TPR_THRESHOLD, 4)
    assert run_to_exit(vcpu) == hv.VMX_REASON_TPR_THRESHOLD
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_TPR) == 0x20
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 9  # trap-like: after the MOV


@pytest.mark.parametrize(
    ("source", "reason", "offset", "length"),
    [
        ("xor ecx, ecx\nxor edx, edx\nmov eax, 1\nxsetbv\nhlt\n", hv.VMX_REASON_XSETBV, 9, 3),
        ("vmcall\nhlt\n", hv.VMX_REASON_VMCALL, 0, 3),
        ("invd\nhlt\n", hv.VMX_REASON_INVD, 0, 2),
        ("vmxoff\nhlt\n", hv.VMX_REASON_VMOFF, 0, 3),
        ("vmread rax, rbx\nhlt\n", hv.VMX_REASON_VMREAD, 0, 3),
    ],
    ids=["xsetbv", "vmcall", "invd", "vmxoff", "vmread"],
)
def test_unconditional_exits(vm: Vm, source: str, reason: int, offset: int, length: int) -> None:
    vcpu = long_vcpu(vm, source)
    assert run_to_exit(vcpu) == reason
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == length
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + offset  # at the instruction


@pytest.mark.parametrize(
    ("source", "control", "reason"),
    [
        ("rdtsc\nhlt\n", hv.CPU_BASED_RDTSC, hv.VMX_REASON_RDTSC),
        ("xor ecx, ecx\nrdpmc\nhlt\n", hv.CPU_BASED_RDPMC, hv.VMX_REASON_RDPMC),
        ("pause\nhlt\n", hv.CPU_BASED_PAUSE, hv.VMX_REASON_PAUSE),
        ("mov rax, dr7\nhlt\n", hv.CPU_BASED_MOV_DR, hv.VMX_REASON_MOV_DR),
    ],
    ids=["rdtsc", "rdpmc", "pause", "mov-dr"],
)
def test_exits_the_controls_ask_for(vm: Vm, source: str, control: int, reason: int) -> None:
    vcpu = long_vcpu(vm, source)
    if reason != hv.VMX_REASON_RDPMC:  # (unicorn has no RDPMC: #UD)
        assert run_to_exit(vcpu) == hv.VMX_REASON_HLT  # not asked: runs in the guest
        set_reg(vcpu, hv.HV_X86_RIP, CODE)
    controls(vcpu, hv.VMCS_CTRL_CPU_BASED, add=control)
    assert run_to_exit(vcpu) == reason
    if reason == hv.VMX_REASON_MOV_DR:
        assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) == 7 | 1 << 4  # DR7, MOV from, RAX


def test_invlpg_exit_names_the_address(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "mov rbx, 0x3000\ninvlpg [rbx + 0x10]\nhlt\n")
    controls(vcpu, hv.VMCS_CTRL_CPU_BASED, add=hv.CPU_BASED_INVLPG)
    assert run_to_exit(vcpu) == hv.VMX_REASON_INVLPG
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) == 0x3010
    assert exit_reason(vcpu) == hv.VMX_REASON_INVLPG


def test_msrs_are_the_frameworks(vm: Vm) -> None:
    vcpu = long_vcpu(vm, "hlt\n")
    for msr in (hv.MSR_IA32_PAT, hv.MSR_IA32_APIC_BASE, hv.MSR_IA32_MISC_ENABLE, 0x2FF):
        with pytest.raises(hv.HvError) as caught:
            hv.hv_vcpu_read_msr(vcpu, msr)
        assert caught.value.code == hv.HV_BAD_ARGUMENT
        with pytest.raises(hv.HvError):
            hv.hv_vcpu_write_msr(vcpu, msr, 0)
    # on the list, unicorn's or kept beside it (the PMCs, SPEC_CTRL)
    for msr in (hv.MSR_LSTAR, hv.MSR_IA32_SPEC_CTRL, 0xC1):
        hv.hv_vcpu_write_msr(vcpu, msr, 5)
        assert hv.hv_vcpu_read_msr(vcpu, msr) == 5


def test_segments_the_guest_loads_read_back_accessed(
    vm: Vm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processor sets a descriptor's accessed bit when it loads it, so CS read after the
    guest's far JMP through a descriptor without it has type 11, and the VMM may write it back
    with the entry checks on (VMX refuses a CS that is not accessed)."""
    monkeypatch.setenv("GDBSTUB_VMX_CHECKS", "1")
    vcpu = vm.vcpu("protected", asm("jmp 0x38:next\nnext: hlt\nhlt\n", bits=32))
    vm.mem.put64(GDT + 0x38, 0x00CF9A000000FFFF)  # flat 32-bit code, not accessed
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_LIMIT, 0x3F)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert vmcs(vcpu, hv.VMCS_GUEST_CS_AR) & 0xF == 0xB
    set_vmcs(vcpu, hv.VMCS_GUEST_CS_AR, vmcs(vcpu, hv.VMCS_GUEST_CS_AR))
    set_reg(vcpu, hv.HV_X86_RIP, reg(vcpu, hv.HV_X86_RIP) + 1)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
