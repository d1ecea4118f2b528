"""MMIO the backend did not decode: fetch the instruction at RIP and perform it (hvf and emu).

The framework's EPT-violation exit gives the guest-physical address and read/write bits; RIP
is at the instruction. The machine reads up to 15 code bytes through the guest's page tables,
decodes them with ``mmio.decode`` (capstone), performs the access on the device that owns the
address (the vCPU's own local APIC at 0xFEE00000, else the MMIO bus; nothing there reads all
ones and drops writes, as on a PC), and advances RIP. KVM decodes MMIO itself; its accesses
arrive through the GDBSTUB_VMCS_MMIO_* extension instead (``exits._ept``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import hv, paging, vmxsetup
from ..vcpu import Stop
from .bus import MmioDevice
from .firmware import layout
from .mmio import decode, describe

if TYPE_CHECKING:
    from .machine import Machine

SIGSEGV, SIGILL = 11, 4


class _VcpuRegisters:
    """``mmio.MmioCpu`` over a vCPU's registers (owner thread)."""

    def __init__(self, vcpu: int) -> None:
        self.vcpu = vcpu

    def read_gpr(self, index: int) -> int:
        return hv.hv_vcpu_read_register(self.vcpu, vmxsetup.GPRS[index])

    def write_gpr(self, index: int, value: int) -> None:
        hv.hv_vcpu_write_register(self.vcpu, vmxsetup.GPRS[index], value & (1 << 64) - 1)

    def read_rflags(self) -> int:
        return hv.hv_vcpu_read_register(self.vcpu, hv.HV_X86_RFLAGS)

    def write_rflags(self, value: int) -> None:
        hv.hv_vcpu_write_register(self.vcpu, hv.HV_X86_RFLAGS, value)


def fetch_code(machine: Machine, vcpu: int, mode: int) -> tuple[int, bytes]:
    """(RIP, up to 15 bytes at CS:RIP) read through the guest's page tables."""
    rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    base = 0 if mode == 64 else hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CS_BASE)
    linear = (base + rip) & ((1 << 64) - 1 if mode == 64 else 0xFFFFFFFF)
    state = paging.PagingState(
        cr0=hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR0),
        cr3=hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR3),
        cr4=hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR4),
        efer=hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER),
    )
    code = bytearray()
    for gpa, size in paging.virtual_to_physical_chunks(machine.memory.read, state, linear, 15):
        code += machine.memory.read(gpa, size)
    return rip, bytes(code)


def device_at(machine: Machine, vcpu: int, gpa: int) -> tuple[MmioDevice | None, int]:
    """The device a vCPU reaches at ``gpa`` and the offset into it (None: nothing there)."""
    if layout.LAPIC_ADDR <= gpa < layout.LAPIC_ADDR + layout.MMIO_SIZE:
        return machine.lapic_device(vcpu), gpa - layout.LAPIC_ADDR
    found = machine.mmio.find(gpa)
    if found is None:
        return None, 0
    return found


def emulate_mmio(machine: Machine, vcpu: int, gpa: int, qual: int) -> Stop | None:
    """Perform the MMIO access at RIP against the device at ``gpa`` and advance RIP."""
    if qual & hv.EPT_VIOLATION_INST_FETCH:
        return machine.fault(f"the guest executes outside RAM at {gpa:#x}", SIGSEGV, vcpu)
    mode = vmxsetup.code_mode(vcpu)
    rip, code = fetch_code(machine, vcpu, mode)
    instruction = decode(code, mode, rip)
    if instruction is None:
        text = describe(code, mode, rip)
        return machine.fault(
            f"cannot emulate the MMIO access at {gpa:#x} by `{text}` at rip {rip:#x}",
            SIGILL,
            vcpu,
        )
    device, offset = device_at(machine, vcpu, gpa)

    def read(size: int) -> int:
        if device is None:
            return machine.mmio.read(gpa, size)
        return device.mmio_read(offset, size) & ((1 << (8 * size)) - 1)

    def write(size: int, value: int) -> None:
        if device is None:
            machine.mmio.write(gpa, size, value)
        else:
            device.mmio_write(offset, size, value & ((1 << (8 * size)) - 1))

    instruction.execute(_VcpuRegisters(vcpu), read, write)
    mask = (1 << 64) - 1 if mode == 64 else 0xFFFFFFFF if mode == 32 else 0xFFFF
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, (rip + instruction.length) & mask)
    blocking = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY)
    if blocking & 3:
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY, blocking & ~3)
    return None
