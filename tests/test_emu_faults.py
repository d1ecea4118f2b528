"""Exceptions a long-mode guest takes through its own IDT (tests/guests/emu_faults.asm), on the
emu backend and on kvm as a cross-check: #PF after #PF with CR2 and error code each time, #GP,
#DF when the #PF gate is not present, #GP at an IRETQ/SYSRETQ to a non-canonical address,
an interrupt injected into HLT; and CR2 exactly as the guest left it across runs and hv calls
(the emu backend's own lookups once left CR2 = 0xffff_ffff_ffff_fffe and a stale exception in
flight that made the next real #PF a #DF)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from guestbuild import GUESTS_DIR, assemble_flat
from hvguest import (
    CODE,
    Vm,
    asm,
    new_vm,
    reg,
    run,
    run_to_port,
    set_reg,
    set_vmcs,
    tear_down,
    vmcs,
)

from gdbstub import hv

BACKENDS = [name for name in ("emu", "kvm") if name in hv.available_backends()]
DATA_PAGE = 0x30000
GP, PF_P, PF_W = 13, 1, 2


def program() -> bytes:
    return assemble_flat((GUESTS_DIR / "emu_faults.asm").read_text(), bits=64, org=CODE)


def address_of(code: bytes, pattern: bytes, after: int = 0) -> int:
    return CODE + code.index(pattern, after)


@pytest.fixture(params=BACKENDS)
def vm(request: pytest.FixtureRequest) -> Iterator[Vm]:
    hv._reset_for_tests()
    hv.select_backend(request.param)
    machine = new_vm()
    try:
        yield machine
    finally:
        tear_down(machine, hv._reset_for_tests)
        hv._reset_for_tests()


def scenario(vm: Vm, number: int) -> tuple[int, bytes]:
    code = program()
    vcpu = vm.vcpu("long", code)
    set_reg(vcpu, hv.HV_X86_RDI, number)
    return vcpu, code


def test_page_faults_in_a_row_then_gp_then_df(vm: Vm) -> None:
    for page, value in enumerate((0x11111111, 0x22222222, 0x33333333, 0x44444444)):
        vm.mem.put32(DATA_PAGE + page * 0x1000, value)
    vcpu, code = scenario(vm, 0)
    faults = []
    while (port := run_to_port(vcpu)) == 0x63:
        cr2 = reg(vcpu, hv.HV_X86_RAX)
        assert reg(vcpu, hv.HV_X86_CR2) == cr2
        faults.append((cr2, reg(vcpu, hv.HV_X86_RBX)))
    assert faults == [
        (0x200000, 0),  # read, not present
        (0x201000, PF_W),  # write, not present
        (0x202000, 0),
        (0x203000, PF_P | PF_W),  # write to a read-only page (CR0.WP)
    ]
    assert port == 0x60
    assert reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF == 0x11111111
    assert reg(vcpu, hv.HV_X86_RBX) & 0xFFFFFFFF == 0x11111111  # written through 0x201000
    assert reg(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF == 0x33333333
    assert vm.mem.u32(DATA_PAGE + 0x1000) == 0x11111111
    assert vm.mem.u32(DATA_PAGE + 0x3000) == 0x44444444
    assert run_to_port(vcpu) == 0x61  # #GP: a non-canonical load
    assert reg(vcpu, hv.HV_X86_RBX) == 0
    assert reg(vcpu, hv.HV_X86_RCX) == address_of(code, b"\x48\x8b\x03")
    assert run_to_port(vcpu) == 0x62  # #PF with no #PF gate: #DF, error code 0
    assert reg(vcpu, hv.HV_X86_RBX) == 0
    assert reg(vcpu, hv.HV_X86_RCX) == address_of(code, b"\x8b\x04\x25\x00\x00\x60\x00")
    assert reg(vcpu, hv.HV_X86_CR2) == 0x600000


def test_iretq_to_non_canonical_address_faults_at_the_iretq(vm: Vm) -> None:
    if hv.backend_name() != "emu":
        pytest.skip("the SDM's IRETQ; kvm_pvm's instruction emulator returns, then faults")
    vcpu, code = scenario(vm, 1)
    assert run_to_port(vcpu) == 0x61
    assert reg(vcpu, hv.HV_X86_RBX) == 0
    assert reg(vcpu, hv.HV_X86_RCX) == address_of(code, b"\x48\xcf")
    assert reg(vcpu, hv.HV_X86_R8) == 0x18  # from CPL0


def test_sysretq_to_non_canonical_address_faults_at_the_sysretq(vm: Vm) -> None:
    if hv.backend_name() != "emu":
        pytest.skip("Intel's behaviour; this host's CPU (AMD) returns to ring 3 first")
    vcpu, code = scenario(vm, 2)
    assert run_to_port(vcpu) == 0x61
    assert reg(vcpu, hv.HV_X86_RBX) == 0
    assert reg(vcpu, hv.HV_X86_RCX) == address_of(code, b"\x48\x0f\x07")
    assert reg(vcpu, hv.HV_X86_R8) == 0x18


def test_interrupt_injected_into_hlt_wakes_the_vcpu(vm: Vm) -> None:
    vcpu, code = scenario(vm, 3)
    set_vmcs(
        vcpu,
        hv.VMCS_CTRL_CPU_BASED,
        hv.cap2ctrl(hv.hv_vmx_read_capability(hv.HV_VMX_CAP_PROCBASED), 0),
    )
    assert run(vcpu, 100_000_000) == hv.VMX_REASON_VMX_TIMER_EXPIRED
    assert vmcs(vcpu, hv.VMCS_GUEST_ACTIVITY_STATE) == hv.GUEST_ACTIVITY_HLT
    after_hlt = address_of(code, b"\xfb\xf4") + 2
    assert reg(vcpu, hv.HV_X86_RIP) == after_hlt
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_EXT_IRQ | 0x20)
    assert run_to_port(vcpu) == 0x64  # the handler
    assert vmcs(vcpu, hv.VMCS_GUEST_ACTIVITY_STATE) == hv.GUEST_ACTIVITY_ACTIVE
    assert vm.mem.u64(reg(vcpu, hv.HV_X86_RSP)) == after_hlt
    assert run_to_port(vcpu) == 0x65  # returned past the hlt


CR2_GUEST = """
        mov     rax, 0xabc000
        mov     cr2, rax
        out     0x70, al
        mov     rax, cr2
        out     0x71, al
        jmp     $
"""


def test_cr2_is_what_the_guest_left(vm: Vm) -> None:
    vcpu = vm.vcpu("long", asm(CR2_GUEST, bits=64))
    assert reg(vcpu, hv.HV_X86_CR2) == 0
    assert run_to_port(vcpu) == 0x70
    assert reg(vcpu, hv.HV_X86_CR2) == 0xABC000
    # calls that make the emu backend look at guest memory, maps and breakpoints
    hv.hv_vm_protect(0x30000, 0x1000, hv.HV_MEMORY_READ)
    hv.hv_vm_protect(0x30000, 0x1000, hv.HV_MEMORY_READ | hv.HV_MEMORY_WRITE)
    set_reg(vcpu, hv.HV_X86_DR0, 0x3FF000)  # an execution breakpoint where nothing is mapped
    set_reg(vcpu, hv.HV_X86_DR7, 0x401)
    hv.hv_vcpu_invalidate_tlb(vcpu)
    assert reg(vcpu, hv.HV_X86_CR2) == 0xABC000
    assert run_to_port(vcpu) == 0x71
    assert reg(vcpu, hv.HV_X86_RAX) == 0xABC000
    assert reg(vcpu, hv.HV_X86_CR2) == 0xABC000
    set_reg(vcpu, hv.HV_X86_CR2, 0x5000)
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(20_000_000))  # jmp $ until the deadline
    assert reg(vcpu, hv.HV_X86_CR2) == 0x5000
