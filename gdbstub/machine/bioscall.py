"""A BIOS stub's port exit: run the real-mode service in Python (``firmware/bios.py``).

The stub for vector ``v`` executes ``out dx, ax`` with DX = BIOS_PORT; the exit's CS base + IP
names the stub and so the vector. The service sees the caller's registers (``StubFrame`` takes
DX and FLAGS from the stub's stack frame) and guest-physical memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import hv
from .firmware.bios import BiosServices, StubFrame, vector_of

if TYPE_CHECKING:
    from .machine import Machine

_REGS = {
    "eax": hv.HV_X86_RAX,
    "ebx": hv.HV_X86_RBX,
    "ecx": hv.HV_X86_RCX,
    "edx": hv.HV_X86_RDX,
    "esi": hv.HV_X86_RSI,
    "edi": hv.HV_X86_RDI,
    "ebp": hv.HV_X86_RBP,
    "esp": hv.HV_X86_RSP,
}
_SEGMENTS = {"es": hv.VMCS_GUEST_ES, "ds": hv.VMCS_GUEST_DS, "ss": hv.VMCS_GUEST_SS}


class _RawCpu:
    """``bios.RawCpu`` over a vCPU in real mode (owner thread)."""

    def __init__(self, machine: Machine, vcpu: int) -> None:
        self.machine = machine
        self.vcpu = vcpu

    def get(self, reg: str) -> int:
        if reg in _SEGMENTS:
            return hv.hv_vmx_vcpu_read_vmcs(self.vcpu, _SEGMENTS[reg])
        return hv.hv_vcpu_read_register(self.vcpu, _REGS[reg]) & 0xFFFFFFFF

    def set(self, reg: str, value: int) -> None:
        if reg in _SEGMENTS:
            raise ValueError("BIOS services do not load segment registers")
        old = hv.hv_vcpu_read_register(self.vcpu, _REGS[reg])
        hv.hv_vcpu_write_register(self.vcpu, _REGS[reg], old & ~0xFFFFFFFF | value & 0xFFFFFFFF)

    def read(self, addr: int, n: int) -> bytes:
        return self.machine.memory.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        self.machine.memory.write(addr, data)


def bios_call(machine: Machine, services: BiosServices, vcpu: int) -> None:
    """Run the service of the stub at CS:IP (nothing if the exit is not at a stub)."""
    ip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    cs_base = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CS_BASE)
    vector = vector_of((cs_base + ip) & 0xFFFFFFFF)
    if vector is not None:
        services.call(vector, StubFrame(_RawCpu(machine, vcpu)))
