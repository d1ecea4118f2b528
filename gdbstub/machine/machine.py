"""The ``gdbstub run`` PC: RAM, firmware, a booted kernel and every device, written on gdbstub.hv.

Theory of operation
-------------------
``Machine`` creates the VM, maps RAM, writes what a PC's firmware leaves in memory (IVT and
BIOS stubs, BDA/EBDA, ACPI and MP tables), lets the loader place the kernel and its boot
structures, and puts the boot vCPU in the protocol's initial state through register and VMCS
calls. The devices (``platform.py``) and their interrupt wiring (``interrupts.py``) live here,
driven by exits, on every backend: the framework has no in-kernel interrupt controller or timer.

The debug target drives each vCPU's worker loop and asks the machine two things:

* ``handle_exit`` (``exits.py``): the exits a VMM owns (I/O, MMIO, HLT, CPUID, MSRs, ...).
* ``before_entry``: poll the timer devices against the virtual clock, inject the highest
  pending interrupt through ``VMCS_CTRL_VMENTRY_IRQ_INFO`` when RFLAGS.IF and the
  interruptibility state allow it, else ask for an interrupt-window exit; end the next run at
  the earliest device deadline; keep a halted vCPU out of the guest until an interrupt it can
  take is pending. While gdb steps, interrupts stay pending (``step_irqs`` off, as QEMU's
  default ``sstep`` flags), so a step never lands in an interrupt handler; stepping ``hlt``
  ends once an interrupt is pending, before it is delivered.

Virtual time (``clock.py``) stops while the debugger holds the VM (``on_stopped`` /
``on_resumed``), so a long stop delivers no storm of ticks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import hv, vmxsetup
from ..memory import GuestMemory
from ..vcpu import Entry, Stop
from . import exits, guestmsr
from .bus import MmioDevice
from .clock import Clock
from .devices.lapic import LocalApic
from .firmware import layout
from .firmware.acpi import build_acpi
from .firmware.bda import build_bda
from .firmware.bios import BiosServices, build_ivt_and_stubs
from .firmware.mptable import build_mptable
from .loader import BootPlan, CpuState, load_kernel, memory_map
from .mmio_emulate import emulate_mmio
from .platform import Platform, build_platform
from .resetlog import ResetLog

log = logging.getLogger(__name__)

SIGTRAP, SIGSEGV = 5, 11
RFLAGS_IF = 1 << 9
NVRAM_FIRST = 0x0E  # CMOS bytes after the clock and status registers
TSC_HZ = 1_000_000_000  # what the LAPIC's TSC-deadline arithmetic assumes (not advertised)

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


def write_cpu_state(vcpu: int, cpu: CpuState, memory: vmxsetup.PhysicalMemory) -> None:
    """Put ``vcpu`` in the loader's initial state (on the owner thread). The loader's CR0,
    CR4 and EFER are architectural (CR0 = 0x11 for 32-bit entries); they go in as a framework
    VMM must write them (``vmxsetup``: fixed bits behind masks and shadows, IA-32e mode from
    LME & PG, PDPTEs from ``memory``)."""
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
    vmxsetup.set_control_registers(
        vcpu, cr0=cpu.cr0, cr4=cpu.cr4, efer=cpu.efer, cr3=cpu.cr3, memory=memory
    )
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, cpu.xcr0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, 0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY, 0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ACTIVITY_STATE, hv.GUEST_ACTIVITY_ACTIVE)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_TPR, 0)


def set_vmm_controls(vcpu: int) -> None:
    """The controls every VMM of ours runs with (``vmxsetup.control_words``: HLT exiting, TPR
    shadow, secondary controls with unrestricted guest, load EFER; no RDTSCP, which the CPUID
    model does not offer), no exception intercepted, native MSRs as QEMU has them."""
    for field_, value in vmxsetup.control_words().items():
        hv.hv_vmx_vcpu_write_vmcs(vcpu, field_, value)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_TPR_THRESHOLD, 0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 0)
    for msr in NATIVE_MSRS:
        try:
            hv.hv_vcpu_enable_native_msr(vcpu, msr, True)
        except hv.HvError:
            log.debug("MSR %#x cannot be native on this backend", msr)


def measure_tsc_hz(vcpu: int, seconds: float = 0.05) -> int:
    """The rate of ``vcpu``'s TSC from IA32_TSC reads ``seconds`` apart (0 if the backend
    cannot read it). Each read is bracketed by the host clock, and the tightest of three
    brackets is taken at either end, so a slow read does not skew the rate."""

    def sample() -> tuple[int, int]:
        best: tuple[int, int, int] | None = None
        for _ in range(3):
            before = time.monotonic_ns()
            tsc = hv.hv_vcpu_read_msr(vcpu, hv.MSR_TSC)
            after = time.monotonic_ns()
            if best is None or after - before < best[0]:
                best = (after - before, (before + after) // 2, tsc)
        assert best is not None
        return best[1], best[2]

    try:
        t0, c0 = sample()
        time.sleep(seconds)
        t1, c1 = sample()
    except hv.HvError:
        return 0
    if t1 <= t0 or c1 <= c0:
        return 0
    return (c1 - c0) * 1_000_000_000 // (t1 - t0)


@dataclass
class VcpuState:
    """What the machine keeps per vCPU."""

    vcpu: int
    index: int
    owner: int  # thread ident of the owner
    lapic: LocalApic
    halted: bool = False
    tpr: int = 0  # last TPR read on the owner thread (for other threads' describe())
    poke: Callable[[], None] | None = None
    msrs: dict[int, int] = field(default_factory=dict)  # the machine's own MSRs (guestmsr.py)
    tsc_at_stop: int | None = None  # the guest TSC when the debugger stopped the vCPU


class Machine:
    """RAM + firmware + kernel + devices, and the VMM's exit handling (module docstring)."""

    def __init__(
        self,
        kernel: str | Path | BootPlan,
        *,
        memory_size: int = 256 << 20,
        serial_sink: Callable[[bytes], None] = lambda data: None,
        cmdline: str = "",
        initrd: str | Path | None = None,
        no_reboot: bool = False,
        clock: Clock | None = None,
    ) -> None:
        """Boot ``kernel`` (a path, or a plan from ``load_kernel``) in a new VM."""
        if isinstance(kernel, BootPlan):
            self.plan = kernel
            memory_size = kernel.mem_size
        else:
            self.plan = load_kernel(
                kernel,
                mem_size=memory_size,
                cmdline=cmdline,
                initrd=initrd,
                rsdp_addr=layout.ACPI_ADDR,
            )
        self.memory_size = memory_size
        self.no_reboot = no_reboot
        self.clock = clock or Clock()
        self.clock.pause()  # time starts when the vCPUs first run
        self._serial_sink = serial_sink
        hv.hv_vm_create(hv.HV_VM_DEFAULT)
        self.memory = GuestMemory()
        self.memory.allocate(0, memory_size)
        self._new_platform()
        self._load_images()
        self.what = "running"
        self.cpu_avx = True
        """Whether CPUID offers AVX (the debug target's probe turns it off where the vCPU
        cannot execute AVX instructions)."""
        self.step_irqs = False
        self.tsc_hz = 0
        """The guest TSC's rate (measured on the first vCPU; CPUID leaves 0x15/0x16)."""
        self.tsc_settable = True
        """Whether the guest TSC is put back after a debugger stop (false where the backend
        cannot write it: this host's kvm_pvm)."""
        """Whether single steps may deliver interrupts (``monitor step-irqs on``)."""
        self.bios_port = layout.BIOS_PORT
        self.debugger_attached: Callable[[], bool] = lambda: False
        self.after_reset: list[Callable[[], None]] = []
        self.resets = 0
        self._reset_log = ResetLog(log)
        self.symbols: dict[str, int] = {}
        """The kernel's symbols (name -> address), for messages about where the guest is."""
        self._cpus: dict[int, VcpuState] = {}
        self._triple_fault_reported = False
        self._reset_due = False
        self._bios = BiosServices(
            mem_map=memory_map(memory_size), mem_size=memory_size, tty=serial_sink
        )

    # --- building -------------------------------------------------------------------------------

    def _new_platform(self) -> Platform:
        platform = build_platform(
            self.clock.now_ns, mem_size=self.memory_size, serial_sink=self._serial_sink
        )
        platform.router.pic.bios_setup()
        platform.router.pic.write(layout.ELCR + 1, 1, 1 << (layout.IRQ_SCI - 8))
        self.ports = platform.ports
        self.mmio = platform.mmio
        self.router = platform.router
        self.uart = platform.uart
        self.platform = platform
        return platform

    def _load_images(self) -> None:
        """What firmware and the boot loader leave in RAM."""
        write = self.memory.write
        for gpa, data in build_ivt_and_stubs():
            write(gpa, data)
        for gpa, data in build_bda(mem_size=self.memory_size):
            write(gpa, data)
        write(layout.ACPI_ADDR, build_acpi(cpus=1).blob)
        write(layout.MPTABLE_ADDR, build_mptable(cpus=1))
        self.plan.apply(write)

    def setup_vcpu(self, vcpu: int) -> None:
        """Initial state and controls of a new vCPU, and its local APIC (owner thread)."""
        if not self.tsc_hz:
            self.tsc_hz = measure_tsc_hz(vcpu)
        set_vmm_controls(vcpu)
        write_cpu_state(vcpu, self.plan.cpu, self.memory)
        index = len(self._cpus)
        state = VcpuState(vcpu, index, threading.get_ident(), self._new_lapic(vcpu, index))
        self._cpus[vcpu] = state
        self.router.add_lapic(state.lapic)

    def _new_lapic(self, vcpu: int, index: int) -> LocalApic:
        def get_tpr() -> int:
            state = self._cpus.get(vcpu)
            if state is None or threading.get_ident() != state.owner:
                return state.tpr if state is not None else 0
            state.tpr = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_TPR) & 0xFF
            return state.tpr

        def set_tpr(value: int) -> None:
            hv.hv_vcpu_write_register(vcpu, hv.HV_X86_TPR, value & 0xFF)
            self._cpus[vcpu].tpr = value & 0xFF

        def tsc() -> int:
            return self.clock.now_ns() * TSC_HZ // 1_000_000_000

        return LocalApic(
            apic_id=index,
            clock=self.clock.now_ns,
            tsc=tsc,
            tsc_hz=TSC_HZ,
            get_tpr=get_tpr,
            set_tpr=set_tpr,
            on_eoi=self.router.lapic_eoi,
            notify=lambda: self.router.wake(index),
            bsp=index == 0,
        )

    def bind_vcpu(self, vcpu: int, poke: Callable[[], None]) -> None:
        """The worker's poke, for devices that raise interrupts from any thread."""
        state = self._cpus[vcpu]
        state.poke = poke
        self.router.set_waker(state.index, poke)

    def cpu(self, vcpu: int) -> VcpuState:
        """The machine's state of ``vcpu``."""
        return self._cpus[vcpu]

    def close(self) -> None:
        """Destroy the VM (vCPUs must be gone)."""
        try:
            hv.hv_vm_destroy()
        except hv.HvError as exc:
            log.debug("hv_vm_destroy: %s", exc)

    # --- the debugger's view --------------------------------------------------------------------

    def on_stopped(self) -> None:
        """Every vCPU stopped for the debugger: virtual time stops."""
        self.clock.pause()

    def on_resumed(self) -> None:
        """The vCPUs run again: virtual time flows."""
        self.clock.resume()

    def vcpu_stopped(self, vcpu: int) -> None:
        """A run of ``vcpu`` ended (owner thread): remember its TSC, which the next entry
        puts back, so the time the debugger held the VM does not show in the guest's TSC."""
        state = self._cpus.get(vcpu)
        if state is None:
            return
        try:
            state.tsc_at_stop = hv.hv_vcpu_read_msr(vcpu, hv.MSR_TSC)
        except hv.HvError:
            state.tsc_at_stop = None

    def _restore_tsc(self, vcpu: int, state: VcpuState) -> None:
        tsc, state.tsc_at_stop = state.tsc_at_stop, None
        if tsc is None or not self.tsc_settable:
            return
        try:
            hv.hv_vcpu_write_msr(vcpu, hv.MSR_TSC, tsc)
        except hv.HvError:
            self.tsc_hz = 0
        """The guest TSC's rate (measured on the first vCPU; CPUID leaves 0x15/0x16)."""
        self.tsc_settable = True  # the backend cannot offset the TSC (docs/linux.md)

    def is_halted(self, vcpu: int) -> bool:
        """Whether ``vcpu`` waits in HLT."""
        state = self._cpus.get(vcpu)
        return state is not None and state.halted

    def leave_halt(self, vcpu: int) -> None:
        """The debugger moved RIP: the vCPU no longer waits in HLT."""
        state = self._cpus.get(vcpu)
        if state is not None:
            state.halted = False

    def describe_interrupts(self) -> str:
        """``monitor info irq``."""
        return self.router.describe()

    def describe_timers(self) -> str:
        """``monitor info timers``."""
        lines = [f"virtual time: {self.clock.now_ns() / 1e9:.6f} s"]
        lines.append(self.platform.describe_timers())
        lines += [f"local APIC {s.index} timer:\n{s.lapic.describe()}" for s in self._cpus.values()]
        return "\n".join(lines)

    # --- entries --------------------------------------------------------------------------------

    def _poll_timers(self, now: int) -> int | None:
        """Fire due device timers; the earliest next deadline (virtual ns)."""
        earliest: int | None = None
        for device in [*self.platform.timers, *self.router.lapics]:
            due = device.next_deadline_ns()
            if due is not None and due <= now:
                device.poll(now)
                due = device.next_deadline_ns()
            if due is not None and (earliest is None or due < earliest):
                earliest = due
        return earliest

    def before_entry(self, vcpu: int, step: bool) -> Entry:
        """Timers, interrupt injection and halting before an entry (module docstring)."""
        state = self._cpus[vcpu]
        if state.tsc_at_stop is not None:
            self._restore_tsc(vcpu, state)
        if self._reset_due:
            self._reset_due = False
            self.reset(vcpu)
        due = self._poll_timers(self.clock.now_ns())
        deadline = None if due is None else self.clock.host_ns(due)
        pending = self.router.pending(state.index)
        if state.halted:
            if pending is None or not self._interruptible(vcpu):
                return Entry(deadline=deadline, halted=True)
            state.halted = False
            self.what = "running"
            if step and not self.step_irqs:
                return Entry(stop=Stop("debug", SIGTRAP))
        if step and not self.step_irqs:
            return Entry()
        if pending is not None:
            self._inject(vcpu, state, pending)
        return Entry(deadline=deadline)

    @staticmethod
    def _interruptible(vcpu: int) -> bool:
        return bool(hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RFLAGS) & RFLAGS_IF)

    def _inject(self, vcpu: int, state: VcpuState, pending: int) -> None:
        """Inject ``pending`` now if the guest can take it, else ask for an interrupt window."""
        queued = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO)
        blocked = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY) & 3
        # an event already in the entry slot (one an exit interrupted, re-injected; an
        # exception a handler queued) goes first: the interrupt waits for the next window
        if not queued & hv.IRQ_INFO_VALID and not blocked and self._interruptible(vcpu):
            vector = self.router.acknowledge(state.index, pending)
            info = hv.IRQ_INFO_VALID | hv.IRQ_INFO_EXT_IRQ | vector
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, info)
            return
        proc = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
        if not proc & hv.CPU_BASED_IRQ_WND:
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, proc | hv.CPU_BASED_IRQ_WND)

    # --- exits ----------------------------------------------------------------------------------

    def handle_exit(self, vcpu: int) -> Stop | None:
        """Handle the exit the vCPU just took; None to keep running, or why the run ends."""
        return exits.handle_exit(self, vcpu)

    def halt(self, vcpu: int) -> None:
        """HLT (RIP already past it): wait for an interrupt."""
        self._cpus[vcpu].halted = True
        enabled = self._interruptible(vcpu)
        self.what = "halted with interrupts " + ("enabled" if enabled else "disabled")

    def fault(self, what: str, signal: int, vcpu: int) -> Stop:
        """End the run with a fault the debugger reports (the message says where)."""
        if " rip " not in what:
            try:
                rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
            except hv.HvError:
                pass
            else:
                what = f"{what} at rip {rip:#x}{self.symbolize(rip)}"
        self.what = what
        return Stop("fault", signal=signal, message=what)

    def symbolize(self, address: int) -> str:
        """`` <symbol+offset>`` for ``address`` when the kernel has symbols, else ``""``."""
        best: tuple[int, str] | None = None
        for name, value in self.symbols.items():
            if value <= address and (best is None or value > best[0]):
                best = (value, name)
        if best is None or address - best[0] > 0x10000:
            return ""
        offset = address - best[0]
        return f" <{best[1]}{f'+{offset:#x}' if offset else ''}>"

    def guest_exit(self, status: int, what: str) -> Stop:
        """The guest ended the machine (isa-debug-exit, ACPI soft-off)."""
        self.what = what
        return Stop("exited", exit_status=status, message=what)

    def triple_fault(self, vcpu: int, rip: int) -> Stop | None:
        """A triple fault: shown to an attached debugger first, then a reset (as a PC does)."""
        what = f"triple fault (the CPU shut down) near rip {rip:#x}"
        if self.debugger_attached() and not self._triple_fault_reported:
            self._triple_fault_reported = True
            self._reset_due = True
            return self.fault(what + "; continue resets the machine", SIGSEGV, vcpu)
        self._triple_fault_reported = False
        return self.guest_reset(vcpu, what)

    def guest_reset(self, vcpu: int, how: str) -> Stop | None:
        """The guest reset the machine: start again, or end the process under ``--no-reboot``."""
        if self.no_reboot:
            log.warning("gdbstub: the guest reset (%s); --no-reboot: exiting", how)
            return self.guest_exit(0, f"the guest reset ({how}) and --no-reboot is set")
        self._reset_log.reset(how)
        self.reset(vcpu)
        return None

    def reset(self, vcpu: int) -> None:
        """Power-cycle the PC: RAM, firmware, kernel and devices anew, the vCPU at its entry."""
        self._reset_due = False
        self.resets += 1
        self.memory.write(0, bytes(self.memory_size))
        self._load_images()
        wakers = {s.index: s.poke for s in self._cpus.values()}
        nvram = bytes(self.platform.rtc.cmos[NVRAM_FIRST:])
        self._new_platform()
        self.platform.rtc.cmos[NVRAM_FIRST:] = nvram  # CMOS memory survives a reset
        for state in self._cpus.values():
            state.lapic = self._new_lapic(state.vcpu, state.index)
            state.halted = False
            self.router.add_lapic(state.lapic)
            if wakers.get(state.index) is not None:
                self.router.set_waker(state.index, wakers[state.index])  # type: ignore[arg-type]
        write_cpu_state(vcpu, self.plan.cpu, self.memory)
        self.what = "running"
        for listener in self.after_reset:
            listener()

    def read_msr(self, vcpu: int, msr: int) -> int | None:
        """A guest RDMSR: the local APIC's, the machine's, then the backend's; None = #GP."""
        return guestmsr.read(self, self._cpus[vcpu], vcpu, msr)

    def write_msr(self, vcpu: int, msr: int, value: int) -> bool:
        """A guest WRMSR; False = #GP."""
        return guestmsr.write(self, self._cpus[vcpu], vcpu, msr, value)

    def lapic_device(self, vcpu: int) -> MmioDevice:
        """The local APIC ``vcpu`` sees at 0xFEE00000."""
        return self._cpus[vcpu].lapic

    def emulate_mmio(self, vcpu: int, gpa: int, qual: int) -> Stop | None:
        """An EPT violation nothing decoded: decode the instruction and perform it."""
        return emulate_mmio(self, vcpu, gpa, qual)

    def bios_call(self, vcpu: int) -> None:
        """A BIOS stub's port write: run the service (``firmware/bios.py``)."""
        from .bioscall import bios_call

        bios_call(self, self._bios, vcpu)
