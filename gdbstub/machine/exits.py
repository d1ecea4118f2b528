"""The exits a framework VMM owns, handled for the ``gdbstub run`` PC (one function per reason).

Theory of operation
-------------------
``handle_exit(machine, vcpu)`` reads the exit reason and calls its handler, exactly as a VMM on
Hypervisor.framework must:

* I/O (30): the port bus answers; RAX is written for IN and RIP advanced by
  VMCS_RO_VMEXIT_INSTR_LEN. A device may end the machine (isa-debug-exit, ACPI soft-off) or
  reset it; those come back as exceptions from the bus and become stops or a reset here.
* EPT violation (48) outside RAM: MMIO. On KVM the access is already decoded (the
  GDBSTUB_VMCS_MMIO_* fields); elsewhere the instruction at RIP is decoded with capstone
  (``mmio.py``), performed against the MMIO bus, and RIP advanced. Nothing there: reads all
  ones, writes dropped, as on a PC.
* HLT (12): RIP advanced, the vCPU marked halted; ``Machine.before_entry`` keeps it out of the
  guest until an interrupt is pending (or for ever, with interrupts off, until Ctrl-C).
* CPUID (10), RDMSR/WRMSR (31/32), XSETBV (55): answered from the CPU model, the local APIC,
  the machine's own MSRs and the backend's; an MSR nobody has raises #GP in the guest. IA32_EFER
  is the VMCS's (VMCS_GUEST_IA32_EFER, through ``vmxsetup.write_efer``: LMA and the IA-32e mode
  guest control follow LME & PG).
* MOV-CR (28): a guest write to a CR0/CR4 bit the VMM owns (the masks of ``vmxsetup``; CR0.PG
  among them, so long mode is switched here), completed by ``vmxsetup.handle_cr_access``.
* RDPMC (15: no counters, reads 0, as QEMU's hvf support does), INVD/WBINVD (13/54: nothing to
  do), VMCALL (18: #UD, what the instruction does outside VMX operation; no hypercalls here).
* Interrupt window (7): the guest can take an interrupt now; the next entry injects it.
* Triple fault (2), task switch (9: hardware task switching is not emulated), failed entries,
  unexpected exceptions: the run stops with a fault the debugger reports; ``machine.what``
  remembers the reason for ``monitor`` commands.

Before its handler runs, an exit that interrupted the delivery of an event (IDT-vectoring
information valid: an MMIO page touched while an exception frame was pushed, say) queues that
event again for the next entry (``vmxsetup.reinject_event``); an event a handler queues
replaces it, and an interrupt waits until the slot is free (``Machine._inject``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import hv, vmxsetup
from ..hv import vmx_rules
from ..vcpu import Stop
from . import cpuid as cpuid_model
from .bus import GuestExit, GuestPowerOff, GuestReset
from .mmio_emulate import device_at

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

SIGTRAP, SIGSEGV, SIGILL, SIGABRT = 5, 11, 4, 6


def _why_entry_failed(vcpu: int) -> str:
    """The VMX rule the vCPU's state breaks, as ``vmx_rules`` reads the SDM (the framework
    only says that the entry failed; this names the check, on every backend)."""
    try:
        caps = vmx_rules.Capabilities.read(hv.hv_vmx_read_capability)
        view = vmx_rules.VmcsView(lambda field: hv.hv_vmx_vcpu_read_vmcs(vcpu, field))
        failure = vmx_rules.check_entry(view, caps)
    except hv.HvError:
        return ""
    if failure is None:
        return ""
    field = hv.VMCS_FIELD_NAMES.get(failure.field if failure.field is not None else -1)
    return f"; {failure.rule}{f' ({field})' if field else ''}: {failure.message}"


def handle_exit(machine: Machine, vcpu: int) -> Stop | None:
    """Handle the exit ``vcpu`` just took; None to keep running, or why the run ends."""
    reason = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)
    if reason & hv.VMX_EXIT_REASON_FAILED_ENTRY:
        qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
        return machine.fault(
            f"VM entry failed (exit reason {reason:#x}, detail {qual:#x}){_why_entry_failed(vcpu)}",
            SIGABRT,
            vcpu,
        )
    vmxsetup.reinject_event(vcpu)
    handler = HANDLERS.get(reason & 0xFFFF)
    if handler is None:
        name = hv.VMX_REASON_NAMES.get(reason & 0xFFFF, str(reason))
        return machine.fault(f"unhandled exit {name}", SIGABRT, vcpu)
    try:
        return handler(machine, vcpu)
    except GuestExit as exit_:
        return machine.guest_exit(exit_.status, f"the guest exited with status {exit_.status}")
    except GuestPowerOff:
        return machine.guest_exit(0, "the guest powered off")
    except GuestReset as reset:
        return machine.guest_reset(vcpu, reset.how)


advance = vmxsetup.skip_instruction


def inject_gp(vcpu: int) -> None:
    """Queue #GP(0) for the next entry."""
    vmxsetup.inject_exception(vcpu, hv.IDT_GP, 0)


def _io(machine: Machine, vcpu: int) -> Stop | None:
    qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    port = qual >> hv.EXIT_QUAL_IO_PORT_SHIFT & 0xFFFF
    size = (qual & hv.EXIT_QUAL_IO_SIZE_MASK) + 1
    if qual & hv.EXIT_QUAL_IO_STRING:
        return machine.fault(f"string I/O on port {port:#x} is not supported", SIGILL, vcpu)
    mask = (1 << (8 * size)) - 1
    if qual & hv.EXIT_QUAL_IO_IN:
        value = machine.ports.read(port, size) & mask
        rax = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX)
        rax = value if size == 4 else rax & ~mask | value  # 32-bit results zero-extend
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, rax)
        advance(vcpu)
        return None
    value = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & mask
    if port == machine.bios_port:
        machine.bios_call(vcpu)  # needs RIP at the stub's OUT
        advance(vcpu)
        return None
    advance(vcpu)
    machine.ports.write(port, size, value)
    return None


def _hlt(machine: Machine, vcpu: int) -> Stop | None:
    advance(vcpu)
    machine.halt(vcpu)
    return None


def _cpuid(machine: Machine, vcpu: int) -> Stop | None:
    leaf = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF
    subleaf = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF
    xcr0 = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_XCR0)
    cr4 = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR4)
    values = cpuid_model.cpuid(
        leaf,
        subleaf,
        xcr0=xcr0,
        cr4_osxsave=bool(cr4 & (1 << 18)),
        apic_id=machine.cpu(vcpu).index,
        avx=machine.cpu_avx,
        apic=True,
        tsc_hz=machine.tsc_hz,
    )
    for reg, value in zip(
        (hv.HV_X86_RAX, hv.HV_X86_RBX, hv.HV_X86_RCX, hv.HV_X86_RDX), values, strict=True
    ):
        hv.hv_vcpu_write_register(vcpu, reg, value)
    advance(vcpu)
    return None


def _rdmsr(machine: Machine, vcpu: int) -> Stop | None:
    msr = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF
    if msr == hv.MSR_EFER:
        value: int | None = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER)
    else:
        value = machine.read_msr(vcpu, msr)
    if value is None:
        log.info("guest read of unknown MSR %#x: #GP", msr)
        inject_gp(vcpu)
        return None
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, value & 0xFFFFFFFF)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RDX, value >> 32 & 0xFFFFFFFF)
    advance(vcpu)
    return None


def _wrmsr(machine: Machine, vcpu: int) -> Stop | None:
    msr = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF
    low = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF
    high = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RDX) & 0xFFFFFFFF
    if msr == hv.MSR_EFER:
        done = _write_efer(machine, vcpu, high << 32 | low)
    else:
        done = machine.write_msr(vcpu, msr, high << 32 | low)
    if not done:
        log.info("guest write of MSR %#x refused: #GP", msr)
        inject_gp(vcpu)
        return None
    advance(vcpu)
    return None


EFER_WRITABLE = hv.EFER_SCE | hv.EFER_LME | hv.EFER_LMA | hv.EFER_NXE


def _write_efer(machine: Machine, vcpu: int, value: int) -> bool:
    """WRMSR IA32_EFER: undefined bits or LME changed with paging on are #GP (False); LMA is
    the processor's (LME & PG), whatever the guest writes there."""
    old = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER)
    paging = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CR0) & hv.CR0_PG
    if value & ~EFER_WRITABLE or (paging and (old ^ value) & hv.EFER_LME):
        return False
    vmxsetup.write_efer(vcpu, value & ~hv.EFER_LMA, machine.memory)
    return True


def _mov_cr(machine: Machine, vcpu: int) -> Stop | None:
    access = vmxsetup.handle_cr_access(vcpu, machine.memory)
    if access.fault:
        log.info("guest write of CR%d = %#x refused: #GP", access.cr, access.value)
    return None


def _task_switch(machine: Machine, vcpu: int) -> Stop | None:
    qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    return machine.fault(
        f"task switch to TSS selector {qual & 0xFFFF:#x}: hardware task switching is not "
        "emulated (exit 9)",
        SIGILL,
        vcpu,
    )


def _xsetbv(machine: Machine, vcpu: int) -> Stop | None:
    index = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF
    low = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF
    high = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RDX) & 0xFFFFFFFF
    value = high << 32 | low
    supported = cpuid_model.supported_xcr0(avx=machine.cpu_avx)
    if index != 0 or not value & 1 or value & ~supported or (value & 4 and not value & 2):
        inject_gp(vcpu)
        return None
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, value)
    advance(vcpu)
    return None


def _ept(machine: Machine, vcpu: int) -> Stop | None:
    gpa = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS)
    qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    decoded = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DECODED)
    if not decoded and hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO) >> 31:
        # the access was the processor's, delivering an event, not the instruction at RIP
        return machine.fault(f"event delivery touched MMIO at {gpa:#x}", SIGSEGV, vcpu)
    if decoded:
        size = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_SIZE)
        mask = (1 << (8 * size)) - 1
        device, offset = device_at(machine, vcpu, gpa)
        if qual & hv.EPT_VIOLATION_DATA_WRITE:
            data = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA) & mask
            if device is None:
                machine.mmio.write(gpa, size, data)
            else:
                device.mmio_write(offset, size, data)
        else:
            if device is None:
                value = machine.mmio.read(gpa, size)
            else:
                value = device.mmio_read(offset, size)
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA, value & mask)
        return None
    return machine.emulate_mmio(vcpu, gpa, qual)


def _triple_fault(machine: Machine, vcpu: int) -> Stop | None:
    rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    return machine.triple_fault(vcpu, rip)


def _exception(machine: Machine, vcpu: int) -> Stop | None:
    info = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO)
    vector = info & 0xFF
    signal = SIGILL if vector == hv.IDT_UD else SIGSEGV
    return machine.fault(f"unexpected exception vector {vector}", signal, vcpu)


def _irq_window(machine: Machine, vcpu: int) -> Stop | None:
    proc = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, proc & ~hv.CPU_BASED_IRQ_WND)
    return None


def _ud(machine: Machine, vcpu: int) -> Stop | None:
    """Instructions the framework hands to the VMM that this machine does not offer: #UD."""
    vmxsetup.inject_exception(vcpu, hv.IDT_UD)
    return None


def _skip(machine: Machine, vcpu: int) -> Stop | None:
    """Instructions with nothing to do in a VM (INVD, WBINVD): done."""
    advance(vcpu)
    return None


def _rdpmc(machine: Machine, vcpu: int) -> Stop | None:
    """No performance counters are offered: RDPMC reads 0 (as QEMU's hvf support does)."""
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, 0)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RDX, 0)
    advance(vcpu)
    return None


HANDLERS: dict[int, Callable[[Machine, int], Stop | None]] = {
    hv.VMX_REASON_IO: _io,
    hv.VMX_REASON_HLT: _hlt,
    hv.VMX_REASON_CPUID: _cpuid,
    hv.VMX_REASON_RDMSR: _rdmsr,
    hv.VMX_REASON_WRMSR: _wrmsr,
    hv.VMX_REASON_XSETBV: _xsetbv,
    hv.VMX_REASON_EPT_VIOLATION: _ept,
    hv.VMX_REASON_TRIPLE_FAULT: _triple_fault,
    hv.VMX_REASON_EXC_NMI: _exception,
    hv.VMX_REASON_IRQ_WND: _irq_window,
    hv.VMX_REASON_VMCALL: _ud,
    hv.VMX_REASON_INVD: _skip,
    hv.VMX_REASON_WBINVD: _skip,
    hv.VMX_REASON_RDPMC: _rdpmc,
    hv.VMX_REASON_MOV_CR: _mov_cr,
    hv.VMX_REASON_TASK: _task_switch,
}
