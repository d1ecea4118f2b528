"""The debug target: gdb's view (threads, registers, memory, breakpoints) of gdbstub.hv vCPUs.

Theory of operation
-------------------
One vCPU is one gdb thread (thread id = vCPU index + 1), each owned by a ``VcpuWorker``.
The target is all-stop: ``resume`` starts the vCPUs gdb asked for; when one stops (breakpoint,
step, watchpoint, fault, guest exit, Ctrl-C) the others are kicked, and once every vCPU is
paused one ``StopEvent`` is queued and ``wake_fd`` becomes readable for the server.

Every exit goes first through the target's debug handler, then to the VMM's ``handle_exit``:

* MTF (37) ends a single step; an exit the VMM completes while stepping (I/O, HLT, CPUID, MSR)
  also ends it, since the VMM executed the instruction.
* #BP (exit 0, vector 3) at one of our int3 breakpoints is a ``swbreak`` stop; any other int3
  is the guest's own and is re-injected with the exit's instruction length.
* #DB (exit 0, vector 1) names the debug-register slot in DR6 bits 0-3: a breakpoint or a
  watchpoint (with its data address); other #DBs are re-injected.
* An exit 48 on a page protected for a watchpoint goes to ``pagewatch.PageWatch``, which
  completes the access (one iteration at a time for a REP string instruction) and stops only
  when it touched the watched range.

At a stop the worker reads what every stop needs (``read_stop_registers``: the expedited
registers and the paging state); the whole set (general, segment, control and debug registers,
MSR bases, the XSAVE image) is read once, when gdb or lldb first asks for a register it lacks,
into a cache that is written back through the worker. Memory addresses are
guest-virtual, translated by walking the selected vCPU's page tables (``paging``), unless
physical mode is on. Breakpoint mechanisms come from a probe on a scratch vCPU at start-up.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from . import hv, memregion, paging, regs, vmxsetup
from .breakpoints import STOP_REASONS, Breakpoint, dr7_value, dr_length_ok
from .hvprobe import HostDebugFeatures, probe_host
from .memory import GuestMemory
from .pagewatch import PageWatch, WatchStep, set_monitor_trap
from .target import NotSupported, ResumeAction, StopEvent, TargetError
from .vcpu import Entry, Stop, VcpuWorker
from .vcpuregs import read_cpu, read_stop_registers, write_cpu

log = logging.getLogger(__name__)

SIGINT, SIGTRAP = 2, 5
PAGE = 4096


class Vmm(Protocol):
    """What the target needs from the VMM in front of which it is put."""

    memory: GuestMemory

    def setup_vcpu(self, vcpu: int) -> None:
        """Initial state of a new vCPU (called on its owner thread)."""

    def handle_exit(self, vcpu: int) -> Stop | None:
        """Handle a VM exit the debugger did not consume; None to keep running."""


class PlatformVmm(Vmm, Protocol):
    """A VMM with interrupts and timers (``gdbstub run``'s machine); every method optional.

    * ``bind_vcpu(vcpu, poke)``: the worker's ``poke`` for a device that raises an interrupt.
    * ``before_entry(vcpu, step) -> Entry``: inject what is pending, say when the run must end
      for a device timer, or keep a halted vCPU out of the guest. While stepping, interrupts
      stay pending (a step does not land in an interrupt handler).
    * ``is_halted(vcpu)`` / ``leave_halt(vcpu)``: the vCPU waits in HLT; the debugger moved it.
    * ``on_stopped()`` / ``on_resumed()``: every vCPU stopped for the debugger / runs again
      (virtual time stops meanwhile); ``vcpu_stopped(vcpu)``: one vCPU's run ended (called on
      its owner thread).
    """

    def before_entry(self, vcpu: int, step: bool) -> Entry:
        """Decide the next entry of ``vcpu`` (owner thread)."""
        ...


@dataclass
class _Thread:
    worker: VcpuWorker
    regs: dict[str, int] | None = None  # register cache for the current stop
    # what every stop needs (read_stop_registers), until ``regs`` is read
    stop_regs: dict[str, int] | None = None
    fpstate: bytearray | None = None
    dirty: set[str] = field(default_factory=set)
    watch: WatchStep = field(default_factory=WatchStep)  # an instruction on watched pages
    parked: bool = False  # halted in a VMM without interrupts: only Ctrl-C wakes it


class HvTarget:
    """A ``gdbstub.target.Target`` over gdbstub.hv vCPUs (see the module docstring)."""

    def __init__(
        self,
        vmm: Vmm,
        vcpu_count: int = 1,
        *,
        probe: bool = True,
        symbols: dict[str, int] | None = None,
    ) -> None:
        self.vmm = vmm
        self.memory = vmm.memory
        self.symbols = symbols or {}
        self.features = probe_host(vmm.memory) if probe else HostDebugFeatures()
        self.physical_mode = False
        self._stops: queue.SimpleQueue[StopEvent] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._lock = threading.Lock()
        self._threads: dict[int, _Thread] = {}
        self._breakpoints: dict[tuple[int, int, int], Breakpoint] = {}
        self._run_breakpoints: list[Breakpoint] = []  # those inserted for the last resume
        self._slots: list[Breakpoint | None] = [None] * 4
        self._pages = PageWatch(vmm.memory, self._breakpoints)
        self._pending_stop: tuple[int, Stop] | None = None
        self._last = StopEvent(
            thread=1, signal=SIGTRAP, reason=None, address=None, exit_status=None, expedite=()
        )
        self._exited: int | None = None
        self._step_flags = 0x7  # QEMU's default sstep flags: steps skip interrupt handlers
        self.quit_requested = False
        """Set by ``monitor quit``: the session ends the VM after the reply."""
        bind = getattr(vmm, "bind_vcpu", None)
        for index in range(vcpu_count):
            worker = VcpuWorker(index, self._on_worker_stop, setup=vmm.setup_vcpu)
            self._threads[index + 1] = _Thread(worker)
            if bind is not None:
                bind(worker.vcpu, worker.poke)
        self._hook("on_stopped")
        listeners = getattr(vmm, "after_reset", None)
        if isinstance(listeners, list):
            listeners.append(self.replant_breakpoints)
        log.info("debug features of this host:\n%s", self.features.describe())

    # --- threads ------------------------------------------------------------------------------

    @property
    def wake_fd(self) -> int:
        """Readable while a stop is waiting in ``take_stop``."""
        return self._wake_r

    def thread_ids(self) -> list[int]:
        """gdb thread ids: vCPU index + 1."""
        return sorted(self._threads)

    def _thread(self, tid: int) -> _Thread:
        thread = self._threads.get(tid if tid > 0 else min(self._threads))
        if thread is None:
            raise TargetError(0x16)
        return thread

    def thread_state(self, tid: int) -> str:
        """``running``, ``halted`` (stopped while waiting in HLT) or ``stopped``."""
        thread = self._thread(tid)
        is_halted = getattr(self.vmm, "is_halted", None)
        halted = thread.parked or (is_halted is not None and is_halted(thread.worker.vcpu))
        return "running" if thread.worker.running else "halted" if halted else "stopped"

    def thread_extra_info(self, tid: int) -> str:
        """``vCPU n [state]`` for ``info threads``."""
        return f"vCPU {self._thread(tid).worker.index} [{self.thread_state(tid)}]"

    def pc_regnum(self) -> int:
        """gdb's number of rip."""
        return regs.by_name["rip"].regnum

    def capabilities(self) -> frozenset[str]:
        """What gdb may ask for: breakpoints, watchpoints, stepping, AVX registers."""
        caps = {"swbreak", "hwbreak", "watch"}
        if self.features.step:
            caps.add("step")
        if self.features.avx:
            caps.add("avx")
        return frozenset(caps)

    def host_info(self) -> dict[str, str]:
        """For lldb's qHostInfo / qProcessInfo."""
        return {
            "triple": "x86_64-unknown-none",
            "ptrsize": "8",
            "endian": "little",
            "ostype": "none",
            "vendor": "unknown",
        }

    def target_xml(self, annex: str) -> bytes | None:
        """The target description files (target.xml and its includes)."""
        return regs.xml_file(annex, with_avx=self.features.avx)

    # --- registers ----------------------------------------------------------------------------

    def _regs(self, thread: _Thread) -> dict[str, int]:
        if thread.regs is None:
            if thread.worker.running:
                raise TargetError(0x10)
            values, image = thread.worker.call(read_cpu)
            thread.regs, thread.fpstate = values, image
        return thread.regs

    def _commit(self, thread: _Thread) -> None:
        if thread.dirty and thread.regs is not None and thread.fpstate is not None:
            values, names, image = thread.regs, set(thread.dirty), thread.fpstate
            thread.worker.call(lambda vcpu: write_cpu(vcpu, values, names, image, self.memory))
            leave_halt = getattr(self.vmm, "leave_halt", None)
            if "rip" in names:
                thread.parked = False
                if leave_halt is not None:
                    leave_halt(thread.worker.vcpu)
            thread.dirty.clear()

    def read_registers(self, tid: int) -> bytes:
        """The ``g`` blob."""
        return regs.encode_g(self._regs(self._thread(tid)), self.features.avx)

    def write_registers(self, tid: int, data: bytes) -> None:
        """``G``: replace every register."""
        thread = self._thread(tid)
        current = self._regs(thread)
        try:
            new = regs.decode_g(data, self.features.avx)
        except ValueError as exc:
            raise TargetError(0x16) from exc
        for name, value in new.items():
            if current.get(name) != value:
                current[name] = value
                thread.dirty.add(name)
        self._commit(thread)

    def read_register(self, tid: int, regnum: int) -> bytes:
        """``p``."""
        reg = regs.by_num.get(regnum)
        if reg is None or (not self.features.avx and reg.name.startswith("ymm")):
            raise TargetError(0x16)
        return regs.encode_register(reg.name, self._regs(self._thread(tid)).get(reg.name, 0))

    def write_register(self, tid: int, regnum: int, data: bytes) -> None:
        """``P``."""
        reg = regs.by_num.get(regnum)
        if reg is None:
            raise TargetError(0x16)
        thread = self._thread(tid)
        try:
            self._regs(thread)[reg.name] = regs.decode_register(reg.name, data)
        except ValueError as exc:
            raise TargetError(0x16) from exc
        thread.dirty.add(reg.name)
        self._commit(thread)

    def _stop_values(self, thread: _Thread) -> dict[str, int]:
        """The registers of read_stop_registers: from the full cache once that is read (it
        has the VMM's and gdb's writes), else as read at the stop."""
        if thread.regs is not None:
            return thread.regs
        if thread.stop_regs is None:
            if thread.worker.running:
                raise TargetError(0x10)
            thread.stop_regs = thread.worker.call(read_stop_registers)
        return thread.stop_regs

    def _expedite(self, thread: _Thread) -> tuple[tuple[int, bytes], ...]:
        values = self._stop_values(thread)
        return tuple(
            (regs.by_name[name].regnum, regs.encode_register(name, values[name]))
            for name in regs.EXPEDITED
        )

    # --- memory -------------------------------------------------------------------------------

    def set_step_flags(self, flags: int) -> None:
        """QEMU's ``sstep`` flags; without NOIRQ (2) a step may enter an interrupt handler."""
        if hasattr(self.vmm, "step_irqs"):
            self.vmm.step_irqs = not flags & 0x2
        self._step_flags = flags

    def step_flags(self) -> int:
        """The ``sstep`` flags in force (0x7 unless gdb or ``monitor step-irqs`` changed them)."""
        return self._step_flags

    def set_physical_memory_mode(self, on: bool) -> None:
        """Addresses are guest-physical (on) or guest-virtual (off, the default)."""
        self.physical_mode = on

    def _paging_state(self, thread: _Thread) -> paging.PagingState:
        values = self._stop_values(thread)
        return paging.PagingState(
            cr0=values["cr0"], cr3=values["cr3"], cr4=values["cr4"], efer=values["efer"]
        )

    def physical_chunks(self, tid: int, address: int, length: int) -> list[tuple[int, int]]:
        """Guest-physical pieces of ``[address, address+length)`` up to the first hole."""
        if self.physical_mode:
            return [(address, length)]
        state = self._paging_state(self._thread(tid))
        return paging.virtual_to_physical_chunks(self.memory.read, state, address, length)

    def read_memory(self, tid: int, address: int, length: int) -> bytes:
        """``m``: what is readable from ``address`` (a prefix), E14 when nothing is."""
        out = bytearray()
        for gpa, size in self.physical_chunks(tid, address, length):
            data = self.memory.read(gpa, size)
            out += data
            if len(data) < size:
                break
        if not out and length:
            raise TargetError.bad_address()
        self._hide_breakpoints(address, out)
        return bytes(out)

    def _hide_breakpoints(self, address: int, data: bytearray) -> None:
        for bp in self._breakpoints.values():
            if bp.mechanism == "int3" and address <= bp.address < address + len(data):
                data[bp.address - address] = bp.saved[0]

    def write_memory(self, tid: int, address: int, data: bytes) -> None:
        """``M``/``X``: write, keeping our int3 bytes in place (and their saved originals new)."""
        payload = bytearray(data)
        for bp in self._breakpoints.values():
            if bp.mechanism == "int3" and address <= bp.address < address + len(data):
                bp.saved = bytes([payload[bp.address - address]])
                payload[bp.address - address] = 0xCC
        done = 0
        for gpa, size in self.physical_chunks(tid, address, len(payload)):
            written = self.memory.write(gpa, bytes(payload[done : done + size]))
            done += written
            if written < size:
                break
        if done < len(payload):
            raise TargetError.bad_address()

    # --- breakpoints --------------------------------------------------------------------------

    def insert_breakpoint(self, kind: int, address: int, length: int) -> None:
        """``Z0``..``Z4``."""
        key = (kind, address, length)
        if key in self._breakpoints:
            return
        tid = self.thread_ids()[0]
        if kind == 0 and self.features.int3 and self._mapped_ram(tid, address):
            bp = self._insert_int3(tid, address, length)
        elif kind in (0, 1):
            bp = self._insert_dr(Breakpoint(kind, address, 1, "dr"))
        elif kind in (2, 3, 4):
            if self.features.dr_data and dr_length_ok(address, length):
                bp = self._insert_dr(Breakpoint(kind, address, length, "dr"))
            else:
                bp = self._insert_page_watch(tid, kind, address, length)
        else:
            raise NotSupported()
        self._breakpoints[key] = bp
        log.info("%s", bp.describe())

    def remove_breakpoint(self, kind: int, address: int, length: int) -> None:
        """``z0``..``z4``."""
        bp = self._breakpoints.pop((kind, address, length), None)
        if bp is None:
            return
        if bp.mechanism == "int3":
            for gpa, _ in bp.physical:
                self.memory.write(gpa, bp.saved)
        elif bp.mechanism == "dr":
            self._slots[bp.slot] = None
            self._program_debug_registers()
        else:
            self._pages.remove(bp)

    def _mapped_ram(self, tid: int, address: int) -> bool:
        """Whether ``address`` is mapped to RAM now (else a software breakpoint, for example
        in higher-half code before the guest turned paging on, goes to a debug register)."""
        chunks = self.physical_chunks(tid, address, 1)
        return bool(chunks) and self.memory.contains(chunks[0][0])

    def replant_breakpoints(self) -> None:
        """After the VMM reloaded guest RAM (a machine reset): plant the int3s again."""
        for bp in self._breakpoints.values():
            if bp.mechanism == "int3" and bp.physical:
                gpa = bp.physical[0][0]
                bp.saved = self.memory.read(gpa, 1)
                self.memory.write(gpa, b"\xcc")

    def _insert_int3(self, tid: int, address: int, length: int) -> Breakpoint:
        chunks = self.physical_chunks(tid, address, 1)
        if not chunks or not self.memory.contains(chunks[0][0]):
            raise TargetError.bad_address()
        gpa = chunks[0][0]
        bp = Breakpoint(
            0, address, max(length, 1), "int3", physical=[(gpa, 1)], saved=self.memory.read(gpa, 1)
        )
        self.memory.write(gpa, b"\xcc")
        self._set_exception_bitmap()
        return bp

    def _insert_dr(self, bp: Breakpoint) -> Breakpoint:
        if not self.features.dr_exec and bp.kind < 2:
            raise NotSupported()
        for index, used in enumerate(self._slots):
            if used is None:
                bp.slot = index
                self._slots[index] = bp
                self._program_debug_registers()
                return bp
        raise TargetError(0x1C)  # ENOSPC: all four debug registers in use

    def _program_debug_registers(self) -> None:
        dr7 = dr7_value(self._slots)
        addresses = [bp.address if bp else 0 for bp in self._slots]
        for thread in self._threads.values():

            def program(vcpu: int) -> None:
                for index, value in enumerate(addresses):
                    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR0 + index, value)
                hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR7, dr7)

            thread.worker.call(program)
            if thread.regs is not None:
                thread.regs.update({f"dr{i}": a for i, a in enumerate(addresses)}, dr7=dr7)
        self._set_exception_bitmap()

    def _set_exception_bitmap(self) -> None:
        bitmap = 0
        if any(bp.mechanism == "int3" for bp in self._breakpoints.values()) or self.features.int3:
            bitmap |= 1 << hv.IDT_BP  # also so that a guest's own int3 is seen and re-injected
        if any(self._slots):
            bitmap |= 1 << hv.IDT_DB

        def write_bitmap(vcpu: int) -> None:
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, bitmap)

        for thread in self._threads.values():
            thread.worker.call(write_bitmap)

    def _insert_page_watch(self, tid: int, kind: int, address: int, length: int) -> Breakpoint:
        try:
            return self._pages.insert(
                kind, address, length, self.physical_chunks(tid, address, length)
            )
        except ValueError as exc:
            raise TargetError.bad_address() from exc

    def breakpoint_report(self) -> str:
        """``monitor info breakpoints``: those inserted now, else those of the last run (gdb
        takes its breakpoints out whenever the guest stops and puts them back to resume)."""
        lines = [bp.describe() for bp in self._breakpoints.values()]
        if not lines and self._run_breakpoints:
            lines = ["none inserted while the guest is stopped (gdb removes them at every stop);"]
            lines += ["inserted for the last run:"]
            lines += [bp.describe() for bp in self._run_breakpoints]
        return "\n".join(lines or ["no breakpoints"]) + "\n" + self.features.describe() + "\n"

    def memory_region(self, tid: int, address: int) -> memregion.Region:
        """The mapped (or unmapped) region around ``address``, for lldb's qMemoryRegionInfo."""
        if self.physical_mode:
            for start, size in self.memory.ranges():
                if start <= address < start + size:
                    return memregion.Region(start, size, "rwx")
            return memregion.Region(address & ~(PAGE - 1), PAGE, "")
        state = self._paging_state(self._thread(tid))
        return memregion.region_at(self.memory.read, state, address)

    # --- running ------------------------------------------------------------------------------

    def resume(self, actions: dict[int, ResumeAction], default: ResumeAction | None) -> None:
        """Run the threads gdb asked for (all-stop); the stop arrives through ``take_stop``."""
        if self._exited is not None:
            self._queue(
                StopEvent(
                    thread=1,
                    signal=0,
                    reason=None,
                    address=None,
                    exit_status=self._exited,
                    expedite=(),
                )
            )
            return
        plan: list[tuple[_Thread, bool]] = []
        for tid, thread in self._threads.items():
            action = actions.get(tid, default)
            if action is None or action.kind == "t":
                continue
            plan.append((thread, action.kind in ("s", "r")))
        if not plan:
            raise TargetError(0x16)
        with self._lock:
            self._pending_stop = None
        self._run_breakpoints = list(self._breakpoints.values())
        for thread, _ in plan:
            self._commit(thread)
        self._hook("on_resumed")
        vmm_entry = getattr(self.vmm, "before_entry", None)
        for thread, step in plan:
            thread.regs = thread.fpstate = thread.stop_regs = None
            thread.worker.resume(
                self._handler(thread, step),
                partial(self._before_entry, vmm_entry, step=step, thread=thread),
                prepare=partial(set_monitor_trap, on=step),
            )

    @staticmethod
    def _before_entry(
        vmm_entry: Callable[[int, bool], Entry] | None, vcpu: int, step: bool, thread: _Thread
    ) -> Entry:
        """The VMM's ``before_entry``; a step through a watched page counts as a step (no
        interrupt lands between an instruction's access and its MTF exit)."""
        if vmm_entry is not None:
            return vmm_entry(vcpu, step or thread.watch.pending)
        return Entry(halted=thread.parked)

    def _hook(self, name: str) -> None:
        """Call the VMM's optional ``name()`` (``on_stopped``, ``on_resumed``)."""
        hook = getattr(self.vmm, name, None)
        if hook is not None:
            hook()

    def _handler(self, thread: _Thread, step: bool) -> Callable[[int], Stop | None]:
        is_halted = getattr(self.vmm, "is_halted", None)

        def handle(vcpu: int) -> Stop | None:
            stop = self._debug_exit(thread, vcpu, step)
            if stop is not None:
                vmxsetup.reinject_event(vcpu)  # an event the exit interrupted goes on
                return stop if stop.kind != "continue" else None
            stop = self.vmm.handle_exit(vcpu)
            if stop is not None and stop.kind == "halted":
                # a VMM without interrupts: the worker waits for Ctrl-C unless stepping
                if step:
                    return stop
                thread.parked = True
                return None
            if stop is None and step:
                if is_halted is not None and is_halted(vcpu):
                    return None  # before_entry ends the step once an interrupt is pending
                return Stop("debug", SIGTRAP)  # the VMM completed the stepped instruction
            return stop

        return handle

    def _debug_exit(self, thread: _Thread, vcpu: int, step: bool) -> Stop | None:
        """Consume the exits that belong to the debugger; Stop("continue") = consumed, go on."""
        reason = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)
        if reason == hv.VMX_REASON_MTF and thread.watch.pending:
            return self._pages.instruction_done(thread.watch, vcpu, step)
        if reason == hv.VMX_REASON_MTF:
            return Stop("debug", SIGTRAP) if step else Stop("continue")
        if reason == hv.VMX_REASON_EXC_NMI:
            info = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO)
            vector = info & 0xFF
            if vector == hv.IDT_BP:
                return self._on_int3(vcpu, info)
            if vector == hv.IDT_DB:
                return self._on_db(vcpu, info, step)
            return None
        if reason == hv.VMX_REASON_EPT_VIOLATION:
            gpa = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS)
            if self._pages.owns(gpa):
                return self._pages.on_ept_violation(thread.watch, vcpu, gpa, step)
        return None

    def _on_int3(self, vcpu: int, info: int) -> Stop:
        rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
        for bp in self._breakpoints.values():
            if bp.mechanism == "int3" and bp.address == rip:
                bp.hits += 1
                return Stop("debug", SIGTRAP, reason="swbreak")
        # the guest's own int3: deliver it as the CPU would have
        length = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) or 1
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_INSTR_LEN, length)
        hv.hv_vmx_vcpu_write_vmcs(
            vcpu,
            hv.VMCS_CTRL_VMENTRY_IRQ_INFO,
            hv.IRQ_INFO_VALID | hv.IRQ_INFO_SOFT_EXC | hv.IDT_BP,
        )
        return Stop("continue")

    def _on_db(self, vcpu: int, info: int, step: bool) -> Stop:
        dr6 = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
        for index in range(4):
            bp = self._slots[index]
            if dr6 & (1 << index) and bp is not None:
                bp.hits += 1
                if bp.kind in (0, 1):
                    return Stop("debug", SIGTRAP, reason=STOP_REASONS[bp.kind])
                return Stop("debug", SIGTRAP, reason=STOP_REASONS[bp.kind], address=bp.address)
        if dr6 & hv.DR6_BS and step:
            return Stop("debug", SIGTRAP)
        hv.hv_vmx_vcpu_write_vmcs(
            vcpu,
            hv.VMCS_CTRL_VMENTRY_IRQ_INFO,
            hv.IRQ_INFO_VALID | hv.IRQ_INFO_HARD_EXC | hv.IDT_DB,
        )
        return Stop("continue")

    def interrupt(self) -> None:
        """Ctrl-C: stop every running vCPU (hv_vcpu_interrupt)."""
        for thread in self._threads.values():
            if thread.worker.running:
                thread.worker.kick()

    def _on_worker_stop(self, worker: VcpuWorker, stop: Stop) -> None:
        vcpu_stopped = getattr(self.vmm, "vcpu_stopped", None)
        tid = worker.index + 1
        if self._threads[tid].watch.pending:  # on the owner thread: the run ended mid-step
            self._pages.abandon(self._threads[tid].watch, worker.vcpu)
        if vcpu_stopped is not None:  # on the owner thread, before anyone looks at the vCPU
            vcpu_stopped(worker.vcpu)
        with self._lock:
            thread = self._threads[tid]
            first = self._pending_stop is None
            if first or (
                self._pending_stop is not None
                and self._pending_stop[1].kind == "interrupted"
                and stop.kind != "interrupted"
            ):
                self._pending_stop = (tid, stop)
            others = [t for t in self._threads.values() if t.worker.running and t is not thread]
            everyone_stopped = not others
        if first:
            for other in others:
                other.worker.kick()
        if everyone_stopped and self._pending_stop is not None:
            self._hook("on_stopped")
            report_tid, report = self._pending_stop
            self._queue(self._stop_event(report_tid, report))

    def _stop_event(self, tid: int, stop: Stop) -> StopEvent:
        thread = self._threads[tid]
        thread.worker.call(lambda vcpu: set_monitor_trap(vcpu, False))
        if stop.kind == "exited":
            self._exited = stop.exit_status
            return StopEvent(
                thread=tid,
                signal=0,
                reason=None,
                address=None,
                exit_status=stop.exit_status,
                expedite=(),
            )
        if stop.message:
            log.warning("vCPU %d: %s", tid - 1, stop.message)
        try:
            expedite = self._expedite(thread)
        except Exception:  # a vCPU that cannot report registers still reports the stop
            expedite = ()
        return StopEvent(
            thread=tid,
            signal=stop.signal,
            reason=stop.reason,
            address=stop.address,
            exit_status=None,
            expedite=expedite,
        )

    def _queue(self, event: StopEvent) -> None:
        self._last = event
        self._stops.put(event)
        os.write(self._wake_w, b"!")

    def take_stop(self) -> StopEvent | None:
        """The next stop, if one is waiting (non-blocking)."""
        try:
            os.read(self._wake_r, 1)
        except BlockingIOError:
            pass
        try:
            return self._stops.get_nowait()
        except queue.Empty:
            return None

    def wait_stop(self, timeout: float | None = None) -> StopEvent | None:
        """Block until a stop arrives (for embedding without a server)."""
        try:
            event = self._stops.get(timeout=timeout)
        except queue.Empty:
            return None
        try:
            os.read(self._wake_r, 1)
        except BlockingIOError:
            pass
        return event

    def last_stop(self) -> StopEvent:
        """The most recent stop (for ``?``)."""
        return self._last

    @property
    def exit_status(self) -> int | None:
        """The guest's exit status once it has exited through the machine, else None."""
        return self._exited

    def is_running(self) -> bool:
        """Whether any vCPU is running."""
        return any(t.worker.running for t in self._threads.values())

    # --- sessions -----------------------------------------------------------------------------

    def remove_all_breakpoints(self) -> None:
        """Remove every breakpoint and watchpoint a debugger inserted; the guest's memory
        shows its own bytes again. Nothing is resumed (a client that vanished without ``D``
        leaves the guest as it was). Debug registers are written on the vCPU threads, so
        every vCPU must be stopped."""
        for kind, address, length in list(self._breakpoints):
            try:
                self.remove_breakpoint(kind, address, length)
            except (hv.HvError, TargetError) as exc:
                log.warning("could not remove the Z%d at %#x: %s", kind, address, exc)
        self._run_breakpoints = []  # the next client does not see this one's

    def detach(self) -> None:
        """Remove the debugger's breakpoints and let the guest run."""
        self.remove_all_breakpoints()
        if self._exited is None and not self.is_running():
            self.resume({}, ResumeAction(kind="c", signal=None, range=None))

    def kill(self) -> None:
        """End the VM (the process exits after the server's reply)."""
        self.interrupt()

    def monitor(self, command: str) -> str:
        """``monitor`` commands (see ``gdbstub.monitor``)."""
        from .monitor import run_monitor_command

        return run_monitor_command(self, command)

    # --- helpers for monitor commands ---------------------------------------------------------

    def on_vcpu(self, tid: int, fn: Callable[[int], Any]) -> Any:
        """Run ``fn(vcpu)`` on the owner thread of thread ``tid`` (it must be stopped)."""
        thread = self._thread(tid)
        if thread.worker.running:
            raise TargetError(0x10)
        return thread.worker.call(fn)

    def invalidate_registers(self) -> None:
        """Forget cached registers (after a monitor command changed the vCPU behind gdb)."""
        for thread in self._threads.values():
            thread.regs = thread.fpstate = thread.stop_regs = None

    def code_mode(self, tid: int) -> int:
        """Capstone mode of the code thread ``tid`` runs: 16, 32 or 64-bit."""
        import capstone

        values = self._stop_values(self._thread(tid))
        cs_ar = self.on_vcpu(tid, lambda v: hv.hv_vmx_vcpu_read_vmcs(v, hv.VMCS_GUEST_CS_AR))
        if values["efer"] & hv.EFER_LMA and cs_ar & (1 << 13):
            return int(capstone.CS_MODE_64)
        if values["cr0"] & 1 and cs_ar & (1 << 14):
            return int(capstone.CS_MODE_32)
        return int(capstone.CS_MODE_16)

    def registers(self, tid: int) -> dict[str, int]:
        """The register cache of ``tid`` (gdb names)."""
        return dict(self._regs(self._thread(tid)))

    def close(self) -> None:
        """Stop and destroy every vCPU."""
        self.interrupt()
        for thread in self._threads.values():
            thread.worker.close()
