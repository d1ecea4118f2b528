"""The guest TSC on the emu backend: RDTSC and RDTSCP see hv_vm_sync_tsc and IA32_TSC writes
(the host's, the guest's own WRMSR) as an offset on the host tick counter, as on hardware."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hvguest import Vm, asm, emu_vm, reg, run_to_exit, skip_instruction, vmcs

from gdbstub import hv

pytestmark = pytest.mark.skipif("emu" not in hv.available_backends(), reason="no unicorn")

GUEST = """
again:
        rdtsc
        out     0x10, al
        rdtscp
        out     0x11, al
        mov     ecx, 0x10
        mov     eax, 0
        mov     edx, 0x40000            ; IA32_TSC = 1 << 50
        wrmsr
        rdtsc
        out     0x12, al
        jmp     again
"""
SECOND = 10**10  # a second of TSC ticks on any host (< 10 GHz)


@pytest.fixture
def vm() -> Iterator[Vm]:
    yield from emu_vm()


def tsc_at(vcpu: int, port: int) -> int:
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16 == port
    skip_instruction(vcpu)
    return (reg(vcpu, hv.HV_X86_RDX) & 0xFFFFFFFF) << 32 | reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF


def test_guest_tsc_follows_sync_and_msr_writes(vm: Vm) -> None:
    code = asm(GUEST, bits=64)
    a = vm.vcpu("long", code)
    b = vm.vcpu("long", code)
    hv.hv_vcpu_enable_native_msr(a, hv.MSR_TSC, True)
    hv.hv_vcpu_write_msr(a, hv.MSR_TSC_AUX, 7)
    base = 1 << 52
    hv.hv_vm_sync_tsc(base)
    tsc_a, tsc_b = tsc_at(a, 0x10), tsc_at(b, 0x10)
    assert base <= tsc_a < base + SECOND and base <= tsc_b < base + SECOND
    assert abs(tsc_a - tsc_b) < SECOND // 10
    later = tsc_at(a, 0x11)  # RDTSCP, with IA32_TSC_AUX in ECX
    assert tsc_a < later < base + SECOND
    assert reg(a, hv.HV_X86_RCX) & 0xFFFFFFFF == 7
    assert tsc_at(a, 0x12) < base  # the guest's own WRMSR of IA32_TSC (1 << 50)
    assert 1 << 50 <= hv.hv_vcpu_read_msr(a, hv.MSR_TSC) < (1 << 50) + SECOND
    hv.hv_vcpu_write_msr(b, hv.MSR_TSC, 5 << 50)  # the host's write
    assert 5 << 50 <= tsc_at(b, 0x11) < (5 << 50) + SECOND
