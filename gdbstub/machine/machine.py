"""A minimal PC for ``gdbstub run``: RAM, a booted kernel, COM1, debug-exit; written on gdbstub.hv.

Theory of operation
-------------------
``Machine`` creates the VM, maps RAM, lets the loader place the kernel and its boot structures,
and puts the vCPU in the protocol's initial state through register and VMCS calls. It then
handles the exits a VMM owns (``handle_exit``), exactly as on the framework:

* I/O (30): the port bus answers; the machine writes RAX for IN and advances RIP by
  VMCS_RO_VMEXIT_INSTR_LEN. A write to isa-debug-exit ends the machine (``Stop("exited")``).
* HLT (12): RIP is advanced past the HLT and the vCPU is *parked*: there is no interrupt source
  yet, so it sleeps until the debugger stops it (``Stop("halted")`` is never sent to gdb; the
  worker waits for a kick).
* CPUID (10), RDMSR/WRMSR (31/32): answered from the CPUID model and the vCPU's MSRs; an MSR the
  vCPU does not have raises #GP in the guest.
* EPT violations (48): there is no MMIO device; reads give all ones and writes are dropped (on
  KVM the access is already decoded; elsewhere the instruction is decoded with capstone).
* Triple fault (2) and failed entries: the run stops with a fault the debugger reports; ``what``
  remembers the reason for ``monitor`` commands.

The debug target wraps ``handle_exit``: it consumes debug exits first (breakpoints, steps,
watchpoints) and hands everything else to the machine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from .. import hv
from ..memory import GuestMemory
from ..vcpu import Stop
from . import cpuid as cpuid_model
from .bus import GuestExit
from .loader import BootPlan, CpuState, load_kernel
from .platform import standard_bus

log = logging.getLogger(__name__)

SIGTRAP, SIGSEGV, SIGILL, SIGABRT = 5, 11, 4, 6

# MSRs the guest may access without exits (as QEMU and hyperkit enable them on the framework).
NATIVE_MSRS = (
    hv.MSR_STAR,
    hv.MSR_LSTAR,
    hv.MSR_CSTAR,
    hv.MSR_SF_MASK,
    hv.MSR_FSBASE,
    hv.MSR_GSBASE,
    hv.MSR_KGSBASE,
    hv.MSR_TSC_AUX,
    hv.MSR_TSC,
    hv.MSR_IA32_SYSENTER_CS,
    hv.MSR_IA32_SYSENTER_ESP,
    hv.MSR_IA32_SYSENTER_EIP,
)

_SEGMENT_FIELDS = {
    # name: (selector, limit, AR, base) VMCS encodings
    "es": (hv.VMCS_GUEST_ES, hv.VMCS_GUEST_ES_LIMIT, hv.VMCS_GUEST_ES_AR, hv.VMCS_GUEST_ES_BASE),
    "cs": (hv.VMCS_GUEST_CS, hv.VMCS_GUEST_CS_LIMIT, hv.VMCS_GUEST_CS_AR, hv.VMCS_GUEST_CS_BASE),
    "ss": (hv.VMCS_GUEST_SS, hv.VMCS_GUEST_SS_LIMIT, hv.VMCS_GUEST_SS_AR, hv.VMCS_GUEST_SS_BASE),
    "ds": (hv.VMCS_GUEST_DS, hv.VMCS_GUEST_DS_LIMIT, hv.VMCS_GUEST_DS_AR, hv.VMCS_GUEST_DS_BASE),
    "fs": (hv.VMCS_GUEST_FS, hv.VMCS_GUEST_FS_LIMIT, hv.VMCS_GUEST_FS_AR, hv.VMCS_GUEST_FS_BASE),
    "gs": (hv.VMCS_GUEST_GS, hv.VMCS_GUEST_GS_LIMIT, hv.VMCS_GUEST_GS_AR, hv.VMCS_GUEST_GS_BASE),
    "ldtr": (
        hv.VMCS_GUEST_LDTR,
        hv.VMCS_GUEST_LDTR_LIMIT,
        hv.VMCS_GUEST_LDTR_AR,
        hv.VMCS_GUEST_LDTR_BASE,
    ),
    "tr": (hv.VMCS_GUEST_TR, hv.VMCS_GUEST_TR_LIMIT, hv.VMCS_GUEST_TR_AR, hv.VMCS_GUEST_TR_BASE),
}


def write_cpu_state(vcpu: int, cpu: CpuState) -> None:
    """Put ``vcpu`` in the loader's initial state (on the owner thread)."""
    for name, value in cpu.gprs().items():
        hv.hv_vcpu_write_register(vcpu, getattr(hv, f"HV_X86_{name.upper()}"), value)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, cpu.rip)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RFLAGS, cpu.rflags)
    for name, seg in cpu.segments().items():
        selector, limit, ar, base = _SEGMENT_FIELDS[name]
        hv.hv_vmx_vcpu_write_vmcs(vcpu, selector, seg.selector)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, limit, seg.limit)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, ar, seg.ar)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, base, seg.base)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_GDTR_BASE, cpu.gdtr.base)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_GDTR_LIMIT, cpu.gdtr.limit)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_IDTR_BASE, cpu.idtr.base)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_IDTR_LIMIT, cpu.idtr.limit)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER, cpu.efer)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_CR0, cpu.cr0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_CR3, cpu.cr3)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_CR4, cpu.cr4)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CR0_SHADOW, cpu.cr0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CR4_SHADOW, cpu.cr4)
    entry = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_ENTRY)
    ia32e = hv.VMENTRY_GUEST_IA32E if cpu.efer & hv.EFER_LMA else 0
    hv.hv_vmx_vcpu_write_vmcs(
        vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS, hv.cap2ctrl(entry, ia32e | hv.VMENTRY_LOAD_EFER)
    )
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, cpu.xcr0)


def set_vmm_controls(vcpu: int) -> None:
    """The controls every VMM of ours runs with: HLT exiting, native MSRs as QEMU has them."""
    proc = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_PROCBASED)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, hv.cap2ctrl(proc, hv.CPU_BASED_HLT))
    pin = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_PINBASED)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_PIN_BASED, hv.cap2ctrl(pin, 0))
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 0)
    for msr in NATIVE_MSRS:
        try:
            hv.hv_vcpu_enable_native_msr(vcpu, msr, True)
        except hv.HvError:
            log.debug("MSR %#x cannot be native on this backend", msr)


class Machine:
    """RAM + kernel + devices, and the VMM's exit handling (see the module docstring)."""

    def __init__(
        self,
        kernel: str | Path | BootPlan,
        *,
        memory_size: int = 256 << 20,
        serial_sink: Callable[[bytes], None] = lambda data: None,
        cmdline: str = "",
    ) -> None:
        """Boot ``kernel`` (a path, or a plan from ``load_kernel``) in a new VM."""
        if isinstance(kernel, BootPlan):
            self.plan = kernel
            memory_size = kernel.mem_size
        else:
            self.plan = load_kernel(kernel, mem_size=memory_size, cmdline=cmdline)
        hv.hv_vm_create(hv.HV_VM_DEFAULT)
        self.memory = GuestMemory()
        self.memory.allocate(0, memory_size)
        self.plan.apply(self._write_boot)
        self.bus, self.uart = standard_bus(serial_sink)
        self.what = "running"
        self.parked: set[int] = set()
        self.cpu_avx = True
        """Whether CPUID offers AVX (the debug target's probe turns it off where the vCPU
        cannot execute AVX instructions)."""
        self._lock = threading.Lock()

    def _write_boot(self, gpa: int, data: bytes) -> None:
        self.memory.write(gpa, data)

    def setup_vcpu(self, vcpu: int) -> None:
        """Initial state and controls of the boot vCPU (owner thread)."""
        set_vmm_controls(vcpu)
        write_cpu_state(vcpu, self.plan.cpu)

    def close(self) -> None:
        """Destroy the VM (vCPUs must be gone)."""
        try:
            hv.hv_vm_destroy()
        except hv.HvError as exc:
            log.debug("hv_vm_destroy: %s", exc)

    # --- exits -----------------------------------------------------------------------------------

    def handle_exit(self, vcpu: int) -> Stop | None:
        """Handle the exit the vCPU just took; None to keep running, or why the run ends."""
        reason = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)
        if reason & hv.VMX_EXIT_REASON_FAILED_ENTRY:
            qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
            self.what = f"VM entry failed (exit reason {reason:#x}, detail {qual:#x})"
            return Stop("fault", signal=SIGABRT, message=self.what)
        handler = _HANDLERS.get(reason & 0xFFFF)
        if handler is None:
            name = hv.VMX_REASON_NAMES.get(reason & 0xFFFF, str(reason))
            self.what = f"unhandled exit {name}"
            return Stop("fault", signal=SIGABRT, message=self.what)
        return handler(self, vcpu)

    def _advance(self, vcpu: int) -> None:
        rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
        length = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, (rip + length) % (1 << 64))
        # moving RIP ends STI/MOV-SS blocking, as on hardware
        if hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY) & 3:
            value = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY)
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY, value & ~3)

    def _io(self, vcpu: int) -> Stop | None:
        qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
        port = qual >> hv.EXIT_QUAL_IO_PORT_SHIFT & 0xFFFF
        size = (qual & hv.EXIT_QUAL_IO_SIZE_MASK) + 1
        if qual & hv.EXIT_QUAL_IO_STRING:
            self.what = f"string I/O on port {port:#x} is not supported"
            return Stop("fault", signal=SIGILL, message=self.what)
        mask = (1 << (8 * size)) - 1
        if qual & hv.EXIT_QUAL_IO_IN:
            value = self.bus.read(port, size) & mask
            rax = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX)
            rax = value if size == 4 else rax & ~mask | value  # 32-bit results zero-extend
            hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, rax)
            self._advance(vcpu)
            return None
        value = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & mask
        self._advance(vcpu)
        try:
            self.bus.write(port, size, value)
        except GuestExit as exit_:
            self.what = f"the guest exited with status {exit_.status}"
            return Stop("exited", exit_status=exit_.status, message=self.what)
        return None

    def _hlt(self, vcpu: int) -> Stop | None:
        self._advance(vcpu)
        rflags = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RFLAGS)
        self.what = "halted with interrupts " + ("enabled" if rflags & 0x200 else "disabled")
        self.parked.add(vcpu)
        return Stop("halted", signal=SIGTRAP, message=self.what)

    def _cpuid(self, vcpu: int) -> Stop | None:
        leaf = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF
        subleaf = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF
        xcr0 = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_XCR0)
        cr4 = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR4)
        values = cpuid_model.cpuid(
            leaf, subleaf, xcr0=xcr0, cr4_osxsave=bool(cr4 & (1 << 18)), avx=self.cpu_avx
        )
        for reg, value in zip(
            (hv.HV_X86_RAX, hv.HV_X86_RBX, hv.HV_X86_RCX, hv.HV_X86_RDX), values, strict=True
        ):
            hv.hv_vcpu_write_register(vcpu, reg, value)
        self._advance(vcpu)
        return None

    def _inject_gp(self, vcpu: int) -> None:
        info = hv.IRQ_INFO_VALID | hv.IRQ_INFO_HARD_EXC | hv.IRQ_INFO_ERROR_VALID | hv.IDT_GP
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_EXC_ERROR, 0)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, info)

    def _rdmsr(self, vcpu: int) -> Stop | None:
        msr = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF
        try:
            value = hv.hv_vcpu_read_msr(vcpu, msr)
        except hv.HvError:
            log.info("guest read of unknown MSR %#x: #GP", msr)
            self._inject_gp(vcpu)
            return None
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, value & 0xFFFFFFFF)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RDX, value >> 32)
        self._advance(vcpu)
        return None

    def _wrmsr(self, vcpu: int) -> Stop | None:
        msr = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF
        low = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF
        high = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RDX) & 0xFFFFFFFF
        try:
            hv.hv_vcpu_write_msr(vcpu, msr, high << 32 | low)
        except hv.HvError:
            log.info("guest write of MSR %#x refused: #GP", msr)
            self._inject_gp(vcpu)
            return None
        self._advance(vcpu)
        return None

    def _ept(self, vcpu: int) -> Stop | None:
        gpa = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS)
        qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
        if hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DECODED):
            size = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_SIZE)
            if not qual & hv.EPT_VIOLATION_DATA_WRITE:
                hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA, (1 << (8 * size)) - 1)
            log.info(
                "guest %s of %d bytes at unmapped %#x ignored",
                "write" if qual & 2 else "read",
                size,
                gpa,
            )
            return None
        self.what = f"guest access to unmapped memory at {gpa:#x}"
        return Stop("fault", signal=SIGSEGV, message=self.what)

    def _triple_fault(self, vcpu: int) -> Stop | None:
        rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
        self.what = f"triple fault (the CPU shut down) near rip {rip:#x}"
        return Stop("fault", signal=SIGSEGV, message=self.what)

    def _exception(self, vcpu: int) -> Stop | None:
        info = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO)
        vector = info & 0xFF
        self.what = f"unexpected exception vector {vector}"
        return Stop("fault", signal=SIGILL if vector == hv.IDT_UD else SIGSEGV, message=self.what)

    def _irq_window(self, vcpu: int) -> Stop | None:
        return None


_HANDLERS: dict[int, Callable[[Machine, int], Stop | None]] = {
    hv.VMX_REASON_IO: Machine._io,
    hv.VMX_REASON_HLT: Machine._hlt,
    hv.VMX_REASON_CPUID: Machine._cpuid,
    hv.VMX_REASON_RDMSR: Machine._rdmsr,
    hv.VMX_REASON_WRMSR: Machine._wrmsr,
    hv.VMX_REASON_EPT_VIOLATION: Machine._ept,
    hv.VMX_REASON_TRIPLE_FAULT: Machine._triple_fault,
    hv.VMX_REASON_EXC_NMI: Machine._exception,
    hv.VMX_REASON_IRQ_WND: Machine._irq_window,
}
