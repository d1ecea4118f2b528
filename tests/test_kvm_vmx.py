"""The KVM backend and the framework's VMX rules (issue 12): what a VMM written for a Mac sees.

* CR4.VMXE: VMX requires it in the guest's CR4; KVM without nested VMX refuses it. The
  backend keeps the bit for read-back (VMCS_GUEST_CR4, HV_X86_CR4) and strips it only from
  what KVM gets, so a guest set up as QEMU's hvf does it (VMXE ORed in, masked, shadow 0) runs,
  and reads CR4 without VMXE, as it would on the framework.

Run on kvm and on the hvf binding over the shim (KVM underneath); the framework-level checks
every backend shares are in tests/test_framework_rules.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hvguest import Vm, asm, new_vm, reg, run_to_exit, set_vmcs, tear_down, vmcs

from gdbstub import hv

KVM_BACKENDS = [name for name in ("kvm",) if name in hv.available_backends()]


@pytest.fixture(params=KVM_BACKENDS)
def vm(request: pytest.FixtureRequest) -> Iterator[Vm]:
    hv._reset_for_tests()
    hv.select_backend(request.param)
    machine = new_vm()
    try:
        yield machine
    finally:
        tear_down(machine, hv._reset_for_tests)
        hv._reset_for_tests()


READ_CR = asm(
    """
    mov eax, cr4
    out 0x10, eax
    mov eax, cr0
    out 0x11, eax
    hlt
    """,
    bits=32,
)


def test_cr4_vmxe_is_kept_for_read_back_and_hidden_from_the_guest(vm: Vm) -> None:
    vcpu = vm.vcpu("protected", READ_CR)
    cr4 = vmcs(vcpu, hv.VMCS_GUEST_CR4) & ~hv.CR4_VMXE  # hvguest may OR it in already
    set_vmcs(vcpu, hv.VMCS_GUEST_CR4, cr4 | hv.CR4_VMXE)
    set_vmcs(vcpu, hv.VMCS_CTRL_CR4_MASK, hv.CR4_VMXE)
    set_vmcs(vcpu, hv.VMCS_CTRL_CR4_SHADOW, 0)
    assert vmcs(vcpu, hv.VMCS_GUEST_CR4) == cr4 | hv.CR4_VMXE
    assert reg(vcpu, hv.HV_X86_CR4) == cr4 | hv.CR4_VMXE
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16 == 0x10
    assert reg(vcpu, hv.HV_X86_RAX) == cr4  # what the guest reads: the shadow's VMXE (0)
    # after an exit the VMCS still has the VMM's value, mask and shadow
    assert vmcs(vcpu, hv.VMCS_GUEST_CR4) == cr4 | hv.CR4_VMXE
    assert reg(vcpu, hv.HV_X86_CR4) == cr4 | hv.CR4_VMXE
    assert vmcs(vcpu, hv.VMCS_CTRL_CR4_MASK) == hv.CR4_VMXE
    assert vmcs(vcpu, hv.VMCS_CTRL_CR4_SHADOW) == 0
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, reg(vcpu, hv.HV_X86_RIP) + 2)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_RAX) & hv.CR0_NE  # KVM runs the guest with CR0.NE, as VMX
    # writing CR4 without VMXE takes it away again (the entry checks, when on, refuse that)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_CR4, cr4)
    assert vmcs(vcpu, hv.VMCS_GUEST_CR4) == cr4
