"""The guest's RDMSR/WRMSR exits: local APIC MSRs, the machine's own MSRs, then the backend's.

A framework VMM sees an exit for every MSR it did not make native. The local APIC answers
IA32_APIC_BASE, the x2APIC range and IA32_TSC_DEADLINE; the machine keeps the few MSRs a PC's
firmware and CPU provide that no backend need know (PAT, MTRRs, MISC_ENABLE, microcode and
machine-check status, feature control); everything else goes to ``hv_vcpu_read_msr`` /
``hv_vcpu_write_msr``, and what that refuses is a #GP in the guest, as on hardware.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import hv
from .devices.lapic import ApicMsrFault

if TYPE_CHECKING:
    from .machine import Machine, VcpuState

LAPIC_MSRS = (0x1B, 0x6E0)

# IA32_ARCH_CAPABILITIES of the virtual CPU: not affected by Meltdown (RDCL_NO), speculative
# store bypass, MDS, the page-size-change machine check, TAA, the MMIO stale-data bugs
# (SBDR_SSDP_NO, FBSDP_NO, PSDP_NO), BHI, PBRSB, GDS, RFDS and ITS: a kernel then neither
# clears CPU buffers nor patches its returns for them
ARCH_CAPABILITIES = sum(1 << bit for bit in (0, 4, 5, 6, 8, 13, 14, 15, 20, 24, 26, 27, 62))
X2APIC_FIRST, X2APIC_LAST = 0x800, 0x8FF

# MSR: (reset value, writable)
MACHINE_MSRS: dict[int, tuple[int, bool]] = {
    0x17: (0, False),  # IA32_PLATFORM_ID
    0x3A: (1, False),  # IA32_FEATURE_CONTROL: locked, VMX off
    0x8B: (0, True),  # IA32_BIOS_SIGN_ID (microcode revision)
    0xFE: (0, False),  # IA32_MTRRCAP: no variable or fixed MTRRs
    0x10A: (ARCH_CAPABILITIES, False),  # IA32_ARCH_CAPABILITIES (CPUID 7 EDX bit 29)
    0x179: (0, False),  # IA32_MCG_CAP: no machine-check banks
    0x17A: (0, True),  # IA32_MCG_STATUS
    0x1A0: (1, True),  # IA32_MISC_ENABLE: fast strings
    0x277: (0x0007040600070406, True),  # IA32_PAT
    0x2FF: (0, True),  # IA32_MTRR_DEF_TYPE
}


def _state(cpu: VcpuState) -> dict[int, int]:
    if not cpu.msrs:
        cpu.msrs.update((msr, value) for msr, (value, _) in MACHINE_MSRS.items())
    return cpu.msrs


def read(machine: Machine, cpu: VcpuState, vcpu: int, msr: int) -> int | None:
    """The value of ``msr`` for a guest RDMSR, or None for #GP."""
    if msr in LAPIC_MSRS or X2APIC_FIRST <= msr <= X2APIC_LAST:
        try:
            return cpu.lapic.msr_read(msr)
        except ApicMsrFault:
            return None
    if msr in MACHINE_MSRS:
        return _state(cpu)[msr]
    try:
        return hv.hv_vcpu_read_msr(vcpu, msr)
    except hv.HvError:
        return None


def write(machine: Machine, cpu: VcpuState, vcpu: int, msr: int, value: int) -> bool:
    """Perform a guest WRMSR; False for #GP."""
    if msr in LAPIC_MSRS or X2APIC_FIRST <= msr <= X2APIC_LAST:
        try:
            cpu.lapic.msr_write(msr, value)
        except ApicMsrFault:
            return False
        return True
    if msr in MACHINE_MSRS:
        if not MACHINE_MSRS[msr][1]:
            return False
        _state(cpu)[msr] = value
        return True
    try:
        hv.hv_vcpu_write_msr(vcpu, msr, value)
    except hv.HvError:
        return False
    return True
