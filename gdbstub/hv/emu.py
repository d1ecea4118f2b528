"""The Hypervisor.framework API on a software vCPU (unicorn).

Theory of operation
-------------------
Each vCPU is one ``unicorn.Uc`` (x86, 64-bit build; real, protected and long mode follow CR0,
EFER and the segment caches, exactly as in QEMU, which unicorn is). Guest memory is the VMM's
own buffers mapped with ``mem_map_ptr``, so the VMM and the guest see the same bytes. The
semantics are the KVM backend's (see ``kvm.py``); what unicorn lacks, this module builds:

* **Hidden segment state** (``emu_state``). unicorn's register API sets only selectors in
  64-bit mode. Bases, limits, access rights, EFER, the derived ``hflags``, QEMU's exception in
  flight and the TSC offset are written by patching the CPU state inside a saved unicorn
  context (offsets probed once at start-up) and restoring it. Guest memory is read by walking
  the page tables in Python, never through unicorn's MMU, and unicorn calls that look up
  guest-linear addresses themselves (dropping translations) run with CR2 saved: CR2 and the
  exception state are exactly what the guest's code left (``emu_start`` gets no end address:
  unicorn looked that up in the guest's page tables after every run, leaving
  CR2 = 0xffff_ffff_ffff_fffe and a #PF "in flight" that made the next real one a #DF).
* **Threads, kicks, deadlines** (``emu_timer``). A vCPU belongs to its creating thread.
  Nothing calls unicorn's ``emu_stop`` from another thread: unicorn takes that request after
  any memory access, with RIP back at the instruction, so a read-modify-write whose store was
  done ran a second time on resume (the Linux decompressor's "XZ-compressed data is corrupt",
  random kernel crashes). ``hv_vcpu_interrupt`` sets a stop flag and arms the vCPU's
  ``StopSwitch``, a native block hook that stops emulation at the next block start; a kick
  before entry makes the next run return exit 1 at once. Deadlines (exit 52) are armed in one
  watchdog thread (``Watchdog``), not as ``emu_start`` timeouts, which start and join a thread
  on every call (about 180 us).
* **Instruction exits** (``emu_code``, ``emu_nets``). IN/OUT/INS/OUTS, HLT, RDMSR/WRMSR and
  CPUID (and IRETQ/SYSRETQ, below) get a code hook on their exact address ("site"); above CPL0
  (I/O: above IOPL) they fault instead. Block hooks (``BlockHooks``) cover the guest-linear
  addresses not scanned yet: a block starting there calls into Python, which decodes it
  (capstone). Code that is the same in every address space (paging off, the upper half in long
  mode: a kernel) is then scanned a 256 KiB chunk at a time by byte patterns (RDMSR, WRMSR,
  CPUID, SYSRET, IRETQ: every match gets a hook) and cut out of the block hooks in one go, so
  it runs at unicorn's own speed and the hook lists stay short (unicorn walks them on every
  translated block and instruction: 10,000 block hooks made translation 30 times slower).
  IN/OUT/CPUID and HLT without a hook are caught by safety nets the first time they run
  (``emu_nets``: the rest of their block is undone, registers and memory) and get one. A code
  hook stops emulation *before* the instruction, so RIP is
  at the instruction and nothing of it has executed (the framework's contract): the VMM
  completes it and advances RIP by VMCS_RO_VMEXIT_INSTR_LEN. CPUID always exits (reason 10),
  as on the framework. RDMSR/WRMSR exit (31/32) unless the MSR is native or granted; then they
  execute in unicorn. INT3 is not scanned for: it reaches the interrupt hook (below) whenever
  it executes, so an int3 written a moment ago is seen like any other.
* **Code written by the host** (``emu_codewatch``). The VMM and the debugger write guest RAM
  through their own buffers, which unicorn never sees. Every guest-physical page holding
  scanned code is remembered with a copy of its bytes and compared at entries
  (``hv_vcpu_run``/``run_until``): all of them while they are at most 256 or after the vCPU was
  out of emulation for 50 ms (a debugger stop), else 16 in rotation, so a kernel's thousands of
  code pages do not cost megabytes of compares at each of thousands of entries a second. In a
  page where a few bytes changed, the sites there are dropped, chunk pages are searched again
  there and their translations of those bytes removed; a page rewritten wholesale (data next
  to code, code a loader unpacked over old code, patched alternatives) is searched again whole;
  blocks decoded one by one are forgotten and every translation flushed, so the guest runs
  what the host wrote, as on the framework. A code hook also checks that its instruction is
  still there.
* **Exceptions** (``emu_events``). Faults and traps reach a UC_HOOK_INTR hook. Vectors set in
  the exception bitmap exit (reason 0 with interruption info and the error code QEMU computed;
  #BP from INT3 as the framework reports it: software exception, RIP back at the int3,
  instruction length 1); others are delivered through the guest's IDT by the backend (as is an
  event injected through VMCS_CTRL_VMENTRY_IRQ_INFO, which also wakes a vCPU in HLT; a
  software one returns after VMCS_CTRL_VMENTRY_INSTR_LEN bytes): real-mode IVT, protected-mode
  and long-mode interrupt/trap gates with the gate DPL check of software interrupts and the
  stack switch of a privilege change (TSS RSP0/IST in long mode, SS0:ESP0 in protected mode);
  a task gate is a task switch, exit 9 (``emu_task``), and an exit in the middle of a delivery
  reports the event in the IDT-vectoring information (``emu_ept``). A fault during delivery is
  raised and combined as the SDM's double-fault table says (#DF, then a triple fault: exit 2).
  unicorn 2.1 drops the #UD of an invalid
  opcode once any code hook exists (emu_start returns at the instruction with no event): a run
  that stops without progress and without a kick or deadline, or a single step that stays on
  UD0/UD1/UD2 or on bytes that do not decode, raises #UD here.
* **System calls** (``emu_events``). unicorn 2.1 steps over SYSCALL and SYSENTER without their
  effect; an instruction hook records them and the backend applies it (RCX/R11, FMASK, CS/SS
  from STAR, LSTAR/CSTAR; the SYSENTER MSRs). SYSRET/SYSEXIT/IRETQ are QEMU's; an IRETQ or
  SYSRETQ to a non-canonical address raises #GP(0) at the instruction, as on Intel hardware.
* **Debug registers** (``emu_debug``). DR0-DR3/DR7 are evaluated here: execution breakpoints are
  code hooks on the exact linear addresses (fault-like, RIP at the instruction, RFLAGS.RF
  suppresses one hit); data breakpoints write-protect (or, for read/write, access-protect) the
  guest-physical page, single-step the access with the page opened, and raise a trap-like #DB (RIP
  after the instruction) when the access overlaps the DR range. With #DB in the exception bitmap
  they exit (reason 0, vector 1, DR6 bits B0-B3/BS in the qualification), else #DB is delivered to
  the guest. MTF is ``emu_start(count=1)`` (exit 37). Interrupt-window exiting (exit 7) runs the
  guest in 0.5 ms slices and looks at RFLAGS.IF and QEMU's STI/MOV SS shadow between them (the
  exit comes up to a slice late; single-stepping a kernel's long IF=0 stretches cost 0.7 ms an
  instruction).
* **Memory exits** (``emu_ept``). Unmapped or protected accesses stop with RIP at the
  instruction and exit 48 with GPA, access bits and, like hardware, the guest-linear address
  (qualification bits 7/8); the MMIO extension fields read 0 (not decoded): the VMM decodes.
* **MSR permissions and address spaces** are kept as in ``kvm.py``. An address space is a
  list of regions; every vCPU's ``Uc`` maps the regions of its space, and ``hv_vcpu_set_space``
  remaps them.

The guest TSC is the host's tick counter plus an offset that ``hv_vm_sync_tsc`` and IA32_TSC
writes set and guest RDTSC/RDTSCP see (``emu_regs``). Approximations: no VEX-encoded (AVX)
instructions (unicorn 2 is QEMU 5.0's TCG: #UD), though the YMM state round-trips through the
XSAVE image; hv_vcpu_read_msr/write_msr know only the MSRs unicorn keeps (_KNOWN_MSRS); XCR0 is
kept here; string I/O (INS/OUTS) exits like other I/O but the VMM has to emulate the memory
side; SYSCALL outside 64-bit mode behaves as on AMD (CSTAR, STAR[31:0]) where Intel raises #UD.
Code the guest itself rewrites is searched again when a compare sees it, not at once: an
RDMSR/WRMSR patched into scanned code (a few bytes) and run before that executes in unicorn
(IN/OUT/CPUID/HLT are caught by the nets). Code is scanned by guest-linear address. Spans leave
the block hooks only where the code is the same in every address space (paging off, the upper
half in long mode, or 64-bit CPL0 code in the lower half until CR3 changes: the bzImage
decompressor); elsewhere every block still calls the hook (a process's code: about 1.5 us a
block). Every block calls unicorn's hook helper at its start (the stop switch). An `inc; jmp`
loop runs at about 1.5e8 iterations per second (0.6e6 when every block called the block hook).
Debian 12's kernel (PVH, busybox initramfs) reaches its shell in about a minute.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

from . import common
from . import constants as C
from .emu_code import UD_IDS, BlockHooks, disassembler
from .emu_regs import _XSAVE_SIZE as _XSAVE_SIZE  # tests read it here
from .emu_state import (
    HF_INHIBIT_IRQ,
    PAGE,
    ExitRun,
    Space,
    Vcpu,
    X,
    flush_tlb,
    probe_layout,
    unicorn,
)
from .emu_task import TaskSwitches
from .emu_timer import StopSwitch, Watchdog
from .errors import HvError
from .vmx_rules import Capabilities

_FOREVER = C.HV_DEADLINE_FOREVER
_UNTIL = 0  # emu_start's end address: unused, exits are enabled with none listed
_VCPU_MAX = 64
_SPACE_MAX = 8
WINDOW_SLICE_NS = 500_000  # interrupt-window exiting: how long to run before looking at IF


class EmuBackend(TaskSwitches):
    """``gdbstub.hv`` on unicorn (see the module docstring)."""

    name = "emu"
    _capabilities = common.vmx_capabilities()
    _caps = Capabilities.read(_capabilities.__getitem__)

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._spaces: dict[int, Space] = {}
        self._vcpus: dict[int, Vcpu] = {}
        self._live: dict[int, Vcpu] = {}  # not destroyed
        self._next_vcpu = 0
        self._next_space = 1
        self._layout = probe_layout()
        self._env = self._layout.env
        self._watchdog = Watchdog()

    # --- VM --------------------------------------------------------------------------------------

    def hv_capability(self, cap: int) -> int:
        if cap == C.HV_CAP_VCPUMAX:
            return _VCPU_MAX
        if cap == C.HV_CAP_ADDRSPACEMAX:
            return _SPACE_MAX
        raise common.bad("hv_capability", f"unknown capability {cap}")

    def hv_vm_create(self, flags: int) -> None:
        with self._lock:
            if self._spaces:
                raise HvError(C.HV_BUSY, "hv_vm_create", "this process already has a VM")
            if flags & ~0x7FF:
                raise common.bad("hv_vm_create", f"unknown flags 0x{flags:x}")
            self._spaces[0] = Space(0)
            self._next_vcpu = 0
            self._next_space = 1

    # --- memory ----------------------------------------------------------------------------------

    def _sync_map(self, space: Space, call: str = "") -> None:
        for vcpu in self._vcpus.values():
            if vcpu.space is space and not vcpu.destroyed:
                vcpu.uc_dirty_memory = True
                if vcpu.owner == threading.get_ident() and not vcpu.running:
                    self._remap(vcpu)

    # --- address spaces --------------------------------------------------------------------------

    def hv_vm_space_create(self) -> int:
        with self._lock:
            self._space0("hv_vm_space_create")
            if len(self._spaces) >= _SPACE_MAX:
                raise HvError(C.HV_NO_RESOURCES, "hv_vm_space_create", "too many address spaces")
            asid = self._next_space
            self._next_space += 1
            self._spaces[asid] = Space(asid)
            return asid

    def hv_vcpu_set_space(self, vid: int, asid: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_set_space")
        with self._lock:
            target = self._space(asid, "hv_vcpu_set_space")
        if target is vcpu.space:
            return
        # A fresh Uc for the new space (remapping one Uc in place leaves stale translations):
        # the CPU state moves through a context; hooks and instruction sites are rebuilt.
        ctx = vcpu.uc.context_save()
        vcpu.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        vcpu.space = target
        vcpu.watch_pages.clear()
        vcpu.sites.clear()
        vcpu.site_hooks.clear()
        vcpu.new_sites.clear()
        vcpu.scanned.clear()
        vcpu.spans.clear()
        vcpu.uncut.clear()
        vcpu.forgotten.clear()
        vcpu.unpaged_spans.clear()
        vcpu.low_spans.clear()
        vcpu.code.clear()
        vcpu.code_runs = None
        vcpu.check_cursor = 0
        vcpu.dr_exec_hooks.clear()
        vcpu.read_hook = None
        vcpu.dr_dirty = True
        self._install_hooks(vcpu)
        self._remap(vcpu)
        vcpu.uc.context_restore(ctx)
        vcpu.stale_fault = True  # the remapping above may have faulted in the new Uc

    # --- vCPU lifecycle --------------------------------------------------------------------------

    def hv_vcpu_create(self, flags: int) -> int:
        if flags & ~(C.HV_VCPU_ACCEL_RDPMC | C.HV_VCPU_TSC_RELATIVE):
            raise common.bad("hv_vcpu_create", f"unknown flags 0x{flags:x}")
        with self._lock:
            space = self._space0("hv_vcpu_create")
            if sum(1 for v in self._vcpus.values() if not v.destroyed) >= _VCPU_MAX:
                raise HvError(C.HV_NO_RESOURCES, "hv_vcpu_create", "too many vCPUs")
            vid = self._next_vcpu
            self._next_vcpu += 1
            uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
            vcpu = Vcpu(vid, space, uc, self._caps)
            self._adopt(vid, vcpu)
        self._install_hooks(vcpu)
        self._reset_state(vcpu)
        self._remap(vcpu)
        return vid

    def hv_vcpu_destroy(self, vid: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_destroy")
        vcpu.destroyed = True
        self._disown(vid)
        vcpu.uc = None

    def _reset_state(self, vcpu: Vcpu) -> None:
        """The x86 reset state (real mode at f000:fff0), as a fresh KVM vCPU has it."""
        uc = vcpu.uc
        uc.reg_write(X.UC_X86_REG_CR4, 0)
        uc.reg_write(X.UC_X86_REG_CR0, 0x60000010)
        self._patch(
            vcpu,
            efer=0,
            segs={
                0: (0, 0, 0xFFFF, 0x93),
                1: (0xF000, 0xFFFF0000, 0xFFFF, 0x9B),
                2: (0, 0, 0xFFFF, 0x93),
                3: (0, 0, 0xFFFF, 0x93),
                4: (0, 0, 0xFFFF, 0x93),
                5: (0, 0, 0xFFFF, 0x93),
                6: (0, 0, 0xFFFF, 0x82),
                7: (0, 0, 0xFFFF, 0x8B),
            },
            gdt=(0, 0xFFFF),
            idt=(0, 0xFFFF),
        )
        uc.reg_write(X.UC_X86_REG_RIP, 0xFFF0)
        uc.reg_write(X.UC_X86_REG_RFLAGS, 2)
        uc.reg_write(X.UC_X86_REG_RDX, 0x600)
        uc.reg_write(X.UC_X86_REG_DR6, 0xFFFF0FF0)
        uc.reg_write(X.UC_X86_REG_DR7, 0x400)
        uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F80)
        uc.reg_write(X.UC_X86_REG_FPCW, 0x37F)
        uc.reg_write(X.UC_X86_REG_MSR, (C.MSR_IA32_PAT, 0x0007040600070406))

    # --- hooks -----------------------------------------------------------------------------------

    def _install_hooks(self, vcpu: Vcpu) -> None:
        uc = vcpu.uc

        scanned, spans = vcpu.scanned, vcpu.spans

        def on_block(uc_: Any, address: int, size: int, _data: Any) -> None:
            # else scanned already (the block was translated before its span was cut)
            if (address, size) not in scanned and address & ~0xFFF not in spans:
                self._scan_block(vcpu, address, size)

        def on_intr(uc_: Any, intno: int, _data: Any) -> None:
            self._on_interrupt(vcpu, intno)

        def on_invalid_insn(uc_: Any, _data: Any) -> bool:
            vcpu.pending_event = (C.IDT_UD, C.IRQ_INFO_HARD_EXC, None)
            return False

        def on_bad_memory(
            uc_: Any, access: int, address: int, size: int, value: int, _data: Any
        ) -> bool:
            vcpu.mem_fault = (access, address, size)
            return False

        def on_syscall(uc_: Any, _data: Any) -> None:
            vcpu.system_insn = ("syscall", int(uc_.reg_read(X.UC_X86_REG_RIP)))
            uc_.emu_stop()

        def on_sysenter(uc_: Any, _data: Any) -> None:
            vcpu.system_insn = ("sysenter", int(uc_.reg_read(X.UC_X86_REG_RIP)))
            uc_.emu_stop()

        # no end address: unicorn would look it up in the guest's page tables after each run
        uc.ctl_exits_enabled(True)
        vcpu.stopper = StopSwitch(uc)  # stops from other threads (kicks, the watchdog)
        vcpu.block_hooks = BlockHooks(uc, on_block)
        uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
        uc.hook_add(unicorn.UC_HOOK_INSN, on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        uc.hook_add(unicorn.UC_HOOK_INSN, on_sysenter, None, 1, 0, X.UC_X86_INS_SYSENTER)
        uc.hook_add(unicorn.UC_HOOK_INSN_INVALID, on_invalid_insn)
        vcpu.bad_memory = on_bad_memory  # hooked where accesses can fail (_remap)
        vcpu.bad_memory_hooks = []
        self._install_nets(vcpu)

    # --- running ---------------------------------------------------------------------------------

    def hv_vcpu_interrupt(self, vids: list[int]) -> None:
        for vcpu in self._kick_targets(vids):
            # never unicorn's emu_stop from this thread (see emu_timer.StopSwitch); the stop
            # switch stays armed until the owner's emu_start returns: repeat while it runs
            for _ in range(2000):
                with vcpu.lock:
                    if not vcpu.running or not vcpu.kick.is_set() or vcpu.uc is None:
                        break
                    vcpu.stopper.arm()
                time.sleep(0.0005)

    def hv_vcpu_run(self, vid: int) -> None:
        self._run(self._vcpu(vid, "hv_vcpu_run"), None, any_exit=True)

    def hv_vcpu_run_until(self, vid: int, deadline: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_run_until")
        if not 0 <= deadline <= _FOREVER:
            raise common.bad("hv_vcpu_run_until", "deadline out of range")
        self._run(vcpu, None if deadline == _FOREVER else deadline, any_exit=False)

    def _run(self, vcpu: Vcpu, deadline: int | None, *, any_exit: bool) -> None:
        vcpu.exit_recorded = False
        if vcpu.gate.dirty and common.entry_checks_enabled() and self._entry_fails(vcpu):
            return
        try:
            self._run_entries(vcpu, deadline, any_exit)
        finally:
            vcpu.left_ns = time.monotonic_ns()

    def _run_entries(self, vcpu: Vcpu, deadline: int | None, any_exit: bool) -> None:
        if vcpu.kick.is_set():
            vcpu.kick.clear()
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
            return
        if deadline is not None and time.monotonic_ns() >= deadline:
            self._set_exit(vcpu, C.VMX_REASON_VMX_TIMER_EXPIRED)
            return
        if vcpu.uc_dirty_memory:
            self._remap(vcpu)
        if vcpu.code:
            self._check_code(vcpu)
        self._paging_changed(vcpu)
        try:
            self._inject_entry_event(vcpu)
            while True:
                if vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] == C.GUEST_ACTIVITY_HLT:
                    self._halt_wait(vcpu, deadline)
                    return
                if self._enter(vcpu, deadline, any_exit):
                    return
        except ExitRun:
            return

    def _paging_changed(self, vcpu: Vcpu) -> None:
        """Code scanned with paging off (or with another CR3, in the lower half) is scanned
        again where it runs now."""
        if vcpu.unpaged_spans and vcpu.uc.reg_read(X.UC_X86_REG_CR0) & 1 << 31:
            self._forget_unpaged(vcpu, vcpu.unpaged_spans)
        if vcpu.low_spans and vcpu.uc.reg_read(X.UC_X86_REG_CR3) != vcpu.low_cr3:
            self._forget_unpaged(vcpu, vcpu.low_spans)

    def _halt_wait(self, vcpu: Vcpu, deadline: int | None) -> None:
        timeout = None if deadline is None else max(0.0, (deadline - time.monotonic_ns()) / 1e9)
        if vcpu.kick.wait(timeout):
            vcpu.kick.clear()
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
        else:
            self._set_exit(vcpu, C.VMX_REASON_VMX_TIMER_EXPIRED)

    def _inhibited(self, vcpu: Vcpu) -> bool:
        """Whether QEMU holds off interrupts for one instruction (after STI, MOV SS)."""
        return bool(self._snapshot(vcpu).hflags & HF_INHIBIT_IRQ)

    def _timer_stop(self, vcpu: Vcpu, kind: str, token: int) -> None:
        """The watchdog: the entry ``token`` reached its deadline (or window slice)."""
        with vcpu.lock:
            if vcpu.running and vcpu.entry_token == token and vcpu.uc is not None:
                vcpu.timer_fired = kind
                vcpu.stopper.arm()

    def _enter(self, vcpu: Vcpu, deadline: int | None, any_exit: bool) -> bool:
        """One emu_start; True when an exit for the caller has been recorded."""
        uc = vcpu.uc
        if vcpu.uncut or vcpu.forgotten:
            self._quiet(vcpu, self._cut_scanned, vcpu)
        if vcpu.new_sites:
            self._quiet(vcpu, self._add_sites, vcpu)
        if vcpu.dr_dirty:
            self._quiet(vcpu, self._apply_debug, vcpu)
        rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
        if rflags & (1 << 16):  # RF: the execution breakpoint at RIP does not fire once
            vcpu.skip_rip = self._linear_rip(vcpu)
            uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~(1 << 16))
        stepping = bool(vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_MTF)
        window = bool(vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_IRQ_WND)
        stop_at, kind = deadline, "deadline"
        if window:
            # interrupt-window exiting: exit before the first instruction at which the guest
            # can take an interrupt (IF set, no STI/MOV SS shadow); until then the guest runs
            # in slices, and IF is looked at between them
            blocking = C.GUEST_INTRBILITY_STI_BLOCKING | C.GUEST_INTRBILITY_MOVSS_BLOCKING
            if (
                rflags & 0x200
                and not vcpu.controls[C.VMCS_GUEST_INTERRUPTIBILITY] & blocking
                and not self._inhibited(vcpu)
            ):
                self._set_exit(vcpu, C.VMX_REASON_IRQ_WND)
                return True
            slice_end = time.monotonic_ns() + WINDOW_SLICE_NS
            if not stepping and (deadline is None or slice_end < deadline):
                stop_at, kind = slice_end, "slice"
        vcpu.pending_event = None
        vcpu.mem_fault = None
        vcpu.halted = False
        vcpu.emulate_msr = None
        vcpu.emulate = vcpu.after_emulate = None
        vcpu.system_insn = None
        vcpu.timer_fired = None
        if vcpu.stale_fault or vcpu.tsc_dirty:
            self._patch(vcpu)  # no exception in flight; the TSC offset
        start_rip = int(uc.reg_read(X.UC_X86_REG_RIP))
        start_linear = self._linear_rip(vcpu) if stepping else None
        self._step_mode(vcpu, stepping)
        error: Any = None
        token = 0
        if stop_at is not None:
            token = self._watchdog.arm(stop_at, functools.partial(self._timer_stop, vcpu, kind))
        with vcpu.lock:
            if vcpu.kick.is_set():
                vcpu.kick.clear()
                self._watchdog.disarm(token)
                self._set_exit(vcpu, C.VMX_REASON_IRQ)
                return True
            vcpu.running = True
            vcpu.entry_token = token
        start = time.thread_time_ns()
        try:
            uc.emu_start(start_rip, _UNTIL, 0, 1 if stepping else 0)
        except unicorn.UcError as exc:
            error = exc
        finally:
            vcpu.exec_ns += time.thread_time_ns() - start
            with vcpu.lock:
                vcpu.running = False
                vcpu.stopper.disarm()
            if token:
                self._watchdog.disarm(token)
        vcpu.skip_rip = None
        if vcpu.recovery is not None:  # an instruction site ran without its hook (emu_nets)
            self._finish_recovery(vcpu)
            if vcpu.pending_event is not None:
                return self._exception(vcpu)
            return False
        if vcpu.exit_recorded:
            return True
        if vcpu.new_sites:
            self._quiet(vcpu, self._add_sites, vcpu)
            if vcpu.system_insn is None:
                return False
        if vcpu.system_insn is not None:
            self._system_instruction(vcpu)
            if vcpu.pending_event is not None:
                return self._exception(vcpu)
            return self._after_instruction(vcpu, stepping, deadline, any_exit)
        if vcpu.emulate_msr:
            self._emulate_msr(vcpu)
            return self._after_instruction(vcpu, stepping, deadline, any_exit)
        if vcpu.emulate is not None:
            vcpu.emulate()
            if vcpu.pending_event is not None:
                return self._exception(vcpu)
            if vcpu.after_emulate is not None:
                self._set_exit(vcpu, vcpu.after_emulate)
                return True
            return self._after_instruction(vcpu, stepping, deadline, any_exit)
        if vcpu.mem_fault is not None:
            return self._memory_fault(vcpu, stepping, deadline, any_exit)
        if vcpu.pending_event is not None:
            return self._exception(vcpu)
        if error is not None:
            self._set_exit(
                vcpu, C.VMX_EXIT_REASON_FAILED_ENTRY | C.VMX_REASON_VMENTRY_GUEST, qual=error.errno
            )
            return True
        if vcpu.halted:
            uc.reg_write(X.UC_X86_REG_RIP, uc.reg_read(X.UC_X86_REG_RIP) + 1)
            vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] = C.GUEST_ACTIVITY_HLT
            return False
        if vcpu.uncut and (not stepping or int(uc.reg_read(X.UC_X86_REG_RIP)) == start_rip):
            return False  # stopped to take newly scanned code out of the block hooks
        if vcpu.timer_fired == "slice":
            return False  # look at the interrupt window again
        if (
            vcpu.timer_fired is None
            and not vcpu.kick.is_set()
            and (stepping or int(uc.reg_read(X.UC_X86_REG_RIP)) != start_rip)
            and self._missed_hlt(vcpu, start_linear, stepping)
        ):
            return False  # a HLT without its code hook ended the run: it has one now
        if self._lost_invalid_opcode(vcpu, start_rip, stepping, deadline):
            vcpu.pending_event = (C.IDT_UD, C.IRQ_INFO_HARD_EXC, None)
            return self._exception(vcpu)
        return self._after_instruction(vcpu, stepping, deadline, any_exit)

    def _lost_invalid_opcode(
        self, vcpu: Vcpu, start_rip: int, stepping: bool, deadline: int | None
    ) -> bool:
        """unicorn (2.1) drops the #UD of an invalid opcode once any code hook exists: emu_start
        returns with RIP still at the instruction and no event. Free-running, returning without
        progress and without a kick or a deadline means exactly that; single-stepping (where
        ``jmp $`` stays put too), the bytes at RIP must be UD0/UD1/UD2 or not decode."""
        if int(vcpu.uc.reg_read(X.UC_X86_REG_RIP)) != start_rip or vcpu.kick.is_set():
            return False
        if vcpu.timer_fired is not None:
            return False
        if deadline is not None and time.monotonic_ns() >= deadline - 2_000_000:
            return False
        if not stepping:
            return True
        linear = self._linear_rip(vcpu)
        code = self._read_linear(vcpu, linear, 15)
        insn = next(iter(disassembler(self._cpu_bits(vcpu)).disasm(code, linear, 1)), None)
        return insn is None or insn.id in UD_IDS

    @staticmethod
    def _step_mode(vcpu: Vcpu, stepping: bool) -> None:
        """unicorn counts instructions only in blocks translated while counting: retranslate."""
        if vcpu.stepping != stepping:
            vcpu.stepping = stepping
            vcpu.uc.ctl_flush_tb()

    def _after_instruction(
        self, vcpu: Vcpu, stepping: bool, deadline: int | None, any_exit: bool
    ) -> bool:
        if vcpu.kick.is_set():
            vcpu.kick.clear()
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
            return True
        if stepping:
            self._set_exit(vcpu, C.VMX_REASON_MTF)
            return True
        return self._end_without_exit(vcpu, deadline, any_exit)

    def _emulate_msr(self, vcpu: Vcpu) -> None:
        uc = vcpu.uc
        msr = uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF
        if vcpu.emulate_msr == "wrmsr":
            value = (uc.reg_read(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32
            self._set_msr(vcpu, msr, value | (uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF))
        else:
            value = self._get_msr(vcpu, msr)
            uc.reg_write(X.UC_X86_REG_RAX, value & 0xFFFFFFFF)
            uc.reg_write(X.UC_X86_REG_RDX, value >> 32)
        uc.reg_write(X.UC_X86_REG_RIP, uc.reg_read(X.UC_X86_REG_RIP) + 2)

    def _memory_fault(
        self, vcpu: Vcpu, stepping: bool, deadline: int | None, any_exit: bool
    ) -> bool:
        assert vcpu.mem_fault is not None
        access, address, size = vcpu.mem_fault
        vcpu.mem_fault = None
        write = access in (unicorn.UC_MEM_WRITE_UNMAPPED, unicorn.UC_MEM_WRITE_PROT)
        fetch = access in (unicorn.UC_MEM_FETCH_UNMAPPED, unicorn.UC_MEM_FETCH_PROT)
        gpa = address
        page = gpa & ~0xFFF
        region = common.region_at(vcpu.space.regions, gpa)
        needed = C.HV_MEMORY_WRITE if write else C.HV_MEMORY_EXEC if fetch else C.HV_MEMORY_READ
        if region is not None and region.flags & needed and page in vcpu.watch_pages:
            return self._watch_step(vcpu, page, address, size, write, stepping, deadline, any_exit)
        self._ept_exit(vcpu, access, gpa)
        return True

    def _watch_step(
        self,
        vcpu: Vcpu,
        page: int,
        address: int,
        size: int,
        write: bool,
        stepping: bool,
        deadline: int | None,
        any_exit: bool,
    ) -> bool:
        """An access to a watched page: run the instruction with the page open, recording
        every access it makes to the page (a MOVSB that faulted on its read may write the
        watched byte), then check them against the watch list."""
        uc = vcpu.uc
        found = common.region_at(vcpu.space.regions, page)
        assert found is not None
        region = found
        accesses: list[tuple[int, int, bool]] = [(address, size, write)]

        def on_access(uc_: Any, access: int, gpa: int, length: int, _v: int, _d: Any) -> None:
            accesses.append((gpa, length, access == unicorn.UC_MEM_WRITE))

        self._quiet(vcpu, uc.mem_protect, page, PAGE, self._uc_perms(region.flags))
        flush_tlb(uc)
        rip = int(uc.reg_read(X.UC_X86_REG_RIP))
        hook = uc.hook_add(
            unicorn.UC_HOOK_MEM_READ | unicorn.UC_HOOK_MEM_WRITE,
            on_access,
            None,
            page,
            page + 0xFFF,
        )
        try:
            self._step_mode(vcpu, True)
            # a translation made before the hook existed would store past it: drop this one
            here = self._linear_rip(vcpu)
            self._quiet(vcpu, uc.ctl_remove_cache, here, here + 16)
            uc.emu_start(rip, _UNTIL, 0, 1)
        except unicorn.UcError:
            pass
        finally:
            self._quiet(vcpu, uc.hook_del, hook)
            perms = self._uc_perms(region.flags) & ~vcpu.watch_pages[page]
            self._quiet(vcpu, uc.mem_protect, page, PAGE, perms)
            flush_tlb(uc)
        if vcpu.exit_recorded or vcpu.new_sites or vcpu.pending_event:
            if vcpu.new_sites:
                self._quiet(vcpu, self._add_sites, vcpu)
            if vcpu.pending_event is not None:
                return self._exception(vcpu)
            return bool(vcpu.exit_recorded)
        hits = 0
        for gpa, length, stored in accesses:
            linear = self._access_linear(vcpu, gpa)
            for bit, lo, hi, reads in vcpu.watch:
                if not (stored or reads):
                    continue
                for start in (gpa, linear):
                    if start is not None and start < hi and lo < start + length:
                        hits |= bit
        if hits:
            if vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & (1 << C.IDT_DB):
                self._set_exit(
                    vcpu,
                    C.VMX_REASON_EXC_NMI,
                    qual=hits,
                    irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | C.IDT_DB,
                )
                return True
            self._set_dr6(vcpu, hits)
            self._deliver_or_fault(
                vcpu, C.IDT_DB, C.IRQ_INFO_HARD_EXC, None, int(uc.reg_read(X.UC_X86_REG_RIP))
            )
        return self._after_instruction(vcpu, stepping, deadline, any_exit)
