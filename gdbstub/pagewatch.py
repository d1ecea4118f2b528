"""Page watchpoints: watch/rwatch/awatch served by protecting the guest pages of the data.

Theory of operation
-------------------
Where the vCPU has no data breakpoints in its debug registers (KVM on this host, hvf for a
range DR7 cannot cover), a watchpoint protects the guest-physical pages of the watched range
with ``hv_vm_protect``: read and execute for a write watchpoint, execute-only for a read or
access watchpoint (code on the page still runs; the backend executes it where the hardware
cannot and reports its data accesses). ``PageWatch.protected`` counts the watchpoints on each
page; ``page_flags`` derives a page's mapping from every watchpoint on it.

An access to a protected page is an EPT-violation exit (48), which ``on_ept_violation``
completes so the guest never sees the protection:

* Decoded (``GDBSTUB_VMCS_MMIO_DECODED``: KVM decoded it): a write lands in RAM here and is
  reported at once (KVM retired it before the exit); a read gets RAM's value and finishes on
  the next entry, under one monitor-trap (MTF) step, at whose exit its hit is reported.
* Undecoded (the framework's way): the page is opened (for reading only when the access was
  a read, so a write of the same instruction still exits), the instruction runs under the
  monitor trap flag, and at the MTF exit (``instruction_done``) the pages are closed again
  and the hit, if any, is reported: trap-after, as x86 data breakpoints are. The page is open
  for the whole step, so an instruction's second read of it would go unseen: for CMPS, which
  reads two operands, both are checked at the first fault (``compare_reads``).

A REP string instruction (MOVS, CMPS, SCAS, LODS, STOS with a count above 1) would run all its
remaining iterations in that one step on a backend whose MTF step completes the whole
instruction (KVM on this host), so later iterations' accesses would go unseen. It is run one
iteration at a time instead (``RepIteration``): the count register (RCX, ECX or CX, by the
address size) is set to 1 for the step; at its end the count goes back as count - 1 and, unless
that was the last iteration or a REPE/REPNE CMPS/SCAS ended on ZF, RIP goes back to the
instruction, whose next iteration faults on the page again. This is what hardware shows at a
data breakpoint inside a REP string instruction: RIP at the instruction, the count already
decremented. An iteration that did not run (an event was delivered first, or it faulted) gets
its whole count back. While such a step is pending (``WatchStep.pending``), HvTarget asks the
VMM not to inject interrupts (``step=True`` to its ``before_entry``), and a run that ends
before the step does (``abandon``: Ctrl-C, a VMM stop) puts the pages and the count back, so
the instruction simply faults again when resumed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from . import hv, paging, vmxsetup
from .breakpoints import STOP_REASONS, Breakpoint
from .memory import GuestMemory
from .vcpu import Stop

SIGTRAP = 5
PAGE = 4096
RFLAGS_ZF = 1 << 6

# one-byte opcodes of the string instructions with a memory access (INS/OUTS are I/O
# instructions: they exit to the VMM before touching memory)
_STRING_OPCODES = {0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE, 0xAF}
_COMPARES = {0xA6, 0xA7, 0xAE, 0xAF}  # CMPS, SCAS: REPE/REPNE also end on ZF
_CMPS = {0xA6, 0xA7}  # the one that reads two operands (DS:RSI, ES:RDI)
_REPE, _REPNE = 0xF3, 0xF2
_SEGMENT_BASES = {  # segment-override prefix -> the VMCS field of that segment's base
    0x26: hv.VMCS_GUEST_ES_BASE,
    0x2E: hv.VMCS_GUEST_CS_BASE,
    0x36: hv.VMCS_GUEST_SS_BASE,
    0x3E: hv.VMCS_GUEST_DS_BASE,
    0x64: hv.VMCS_GUEST_FS_BASE,
    0x65: hv.VMCS_GUEST_GS_BASE,
}


def set_monitor_trap(vcpu: int, on: bool) -> None:
    """Turn the monitor trap flag (one instruction, then exit 37) on or off."""
    proc = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    proc = proc | hv.CPU_BASED_MTF if on else proc & ~hv.CPU_BASED_MTF
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, proc)


@dataclass(frozen=True)
class StringInstruction:
    """A decoded string instruction (MOVS, CMPS, SCAS, LODS, STOS)."""

    opcode: int
    length: int
    element: int  # bytes per iteration and operand
    mask: int  # of the count and index registers: 0xFFFF, 0xFFFFFFFF or all 64 bits
    segment: int  # its source's segment-override prefix, 0 for DS
    rep: bool  # REP/REPE/REPNE prefixed
    ends_on_zf: int | None  # REPE/REPNE CMPS/SCAS: REPE ends when ZF = 0, REPNE when ZF = 1


@dataclass
class RepIteration:
    """One iteration of a REP string instruction being stepped (see the module docstring)."""

    start: int  # RIP of the instruction
    instruction: StringInstruction
    count: int  # the count before this iteration (above 1)

    @property
    def end(self) -> int:
        """RIP after the instruction."""
        return self.start + self.instruction.length


@dataclass
class WatchStep:
    """Per-vCPU state of an instruction being stepped through watched pages."""

    hit: Stop | None = None  # a hit, reported once the instruction (iteration) is done
    reprotect: list[tuple[int, int]] | None = None  # (page, flags) to restore after the step
    rep: RepIteration | None = None

    @property
    def pending(self) -> bool:
        """Whether an instruction is being stepped for the page watchpoints."""
        return self.hit is not None or bool(self.reprotect) or self.rep is not None


_LOCK = threading.Lock()  # a capstone handle is not safe to share between threads
_CS: dict[int, Any] = {}


@lru_cache(maxsize=256)
def decode_string(code: bytes, mode: int) -> StringInstruction | None:
    """The string instruction at the start of ``code`` (``mode`` 16, 32 or 64), or None
    when it is another instruction."""
    import capstone

    with _LOCK:
        cs = _CS.get(mode)
        if cs is None:
            modes = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
            cs = capstone.Cs(capstone.CS_ARCH_X86, modes[mode])
            cs.detail = True
            _CS[mode] = cs
        insn = next(iter(cs.disasm(code, 0, 1)), None)
        if insn is None:
            return None
        opcode, prefix, addr_size = list(insn.opcode), list(insn.prefix), insn.addr_size
        sizes = [op.size for op in insn.operands if op.type == capstone.x86.X86_OP_MEM]
        length = insn.size
    if opcode[0] not in _STRING_OPCODES or any(opcode[1:]) or not sizes:
        return None
    rep = prefix[0] in (_REPE, _REPNE)
    ends_on_zf = None
    if rep and opcode[0] in _COMPARES:
        ends_on_zf = 1 if prefix[0] == _REPNE else 0
    return StringInstruction(
        opcode[0], length, sizes[0], (1 << (8 * addr_size)) - 1, prefix[1], rep, ends_on_zf
    )


def _paging_state(vcpu: int) -> paging.PagingState:
    return paging.PagingState(
        cr0=hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR0),
        cr3=hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR3),
        cr4=hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR4),
        efer=hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER),
    )


def _physical(memory: GuestMemory, vcpu: int, linear: int, size: int) -> list[tuple[int, int]]:
    """Guest-physical pieces of ``[linear, +size)`` through the guest's page tables."""
    return paging.virtual_to_physical_chunks(memory.read, _paging_state(vcpu), linear, size)


def string_at_rip(memory: GuestMemory, vcpu: int) -> StringInstruction | None:
    """The string instruction at CS:RIP, or None for any other instruction."""
    rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    mode = vmxsetup.code_mode(vcpu)
    base = 0 if mode == 64 else hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_CS_BASE)
    linear = (base + rip) & ((1 << 64) - 1 if mode == 64 else 0xFFFFFFFF)
    code = b"".join(memory.read(gpa, size) for gpa, size in _physical(memory, vcpu, linear, 15))
    return decode_string(code, mode)


def compare_reads(memory: GuestMemory, vcpu: int, insn: StringInstruction) -> list[tuple[int, int]]:
    """The guest-physical pieces a CMPS iteration reads (its source and its ES:RDI
    operand), for an instruction that reads two operands; empty for the others."""
    if insn.opcode not in _CMPS:
        return []
    mode_64 = vmxsetup.code_mode(vcpu) == 64
    wrap = (1 << 64) - 1 if mode_64 else 0xFFFFFFFF

    def linear(index: int, segment: int) -> int:
        field = _SEGMENT_BASES.get(segment, hv.VMCS_GUEST_DS_BASE)
        base = hv.hv_vmx_vcpu_read_vmcs(vcpu, field)
        if mode_64 and segment not in (0x64, 0x65):
            base = 0
        offset = hv.hv_vcpu_read_register(vcpu, index) & insn.mask
        return (base + offset) & wrap

    pieces = _physical(memory, vcpu, linear(hv.HV_X86_RSI, insn.segment), insn.element)
    pieces += _physical(memory, vcpu, linear(hv.HV_X86_RDI, 0x26), insn.element)
    return pieces


def _write_count(vcpu: int, mask: int, value: int) -> None:
    rcx = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RCX, (rcx & ~mask) | (value & mask))


def start_one_iteration(vcpu: int, insn: StringInstruction) -> RepIteration | None:
    """If ``insn`` (at RIP) is a REP string instruction with a count above 1, set its count
    register to 1 (the step runs one iteration) and return what ``finish_iteration`` needs;
    else None."""
    if not insn.rep:
        return None
    count = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & insn.mask
    if count <= 1:
        return None
    _write_count(vcpu, insn.mask, 1)
    return RepIteration(hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP), insn, count)


def finish_iteration(vcpu: int, rep: RepIteration) -> None:
    """After the step of ``start_one_iteration``: the count and RIP as hardware has them
    after that iteration (or the whole count back if the iteration did not run)."""
    mask = rep.instruction.mask
    if hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & mask:
        _write_count(vcpu, mask, rep.count)  # not run: an event came first, or it faulted
        return
    left = rep.count - 1
    _write_count(vcpu, mask, left)
    ended = left == 0
    if rep.instruction.ends_on_zf is not None:
        zf = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RFLAGS) & RFLAGS_ZF
        ended = ended or bool(zf) == bool(rep.instruction.ends_on_zf)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, rep.end if ended else rep.start)


@dataclass
class PageWatch:
    """The protected-pages table and the exit handlers of page watchpoints.

    ``breakpoints`` is the target's table of every breakpoint (the page ones are those with
    mechanism ``"page"``); ``protected`` maps each protected guest page to its number of page
    watchpoints.
    """

    memory: GuestMemory
    breakpoints: dict[tuple[int, int, int], Breakpoint]
    protected: dict[int, int] = field(default_factory=dict)
    set_step: Callable[[int, bool], None] = set_monitor_trap

    # --- inserting and removing ---------------------------------------------------------------

    def is_ram(self, gpa: int, size: int) -> bool:
        """Whether ``[gpa, gpa + size)`` lies within one RAM range."""
        return any(s <= gpa and gpa + size <= s + n for s, n in self.memory.ranges())

    def insert(
        self, kind: int, address: int, length: int, chunks: list[tuple[int, int]]
    ) -> Breakpoint:
        """Add a page watchpoint on the guest-physical ``chunks`` of ``[address, +length)``
        to ``breakpoints`` and protect its pages; ``ValueError`` if they are not all RAM."""
        if sum(size for _, size in chunks) < length or not all(
            self.is_ram(gpa, size) for gpa, size in chunks
        ):
            raise ValueError("not guest RAM")  # (never protect pages that are not guest RAM)
        bp = Breakpoint(kind, address, length, "page", physical=chunks)
        self.breakpoints[(kind, address, length)] = bp  # (for page_flags)
        for gpa, size in chunks:
            for page in range(gpa & ~(PAGE - 1), gpa + size, PAGE):
                self.protected[page] = self.protected.get(page, 0) + 1
                hv.hv_vm_protect(page, PAGE, self.page_flags(page))
        return bp

    def remove(self, bp: Breakpoint) -> None:
        """Give the pages of a removed page watchpoint back what the others still need."""
        for gpa, size in bp.physical:
            for page in range(gpa & ~(PAGE - 1), gpa + size, PAGE):
                self.protected[page] -= 1
                if not self.protected[page]:
                    del self.protected[page]
                hv.hv_vm_protect(page, PAGE, self.page_flags(page))

    def page_flags(self, page: int) -> int:
        """How a watched page is mapped: read and execute for write watchpoints only;
        execute-only when a read or access watchpoint is on it."""
        flags = hv.HV_MEMORY_READ | hv.HV_MEMORY_WRITE | hv.HV_MEMORY_EXEC
        for bp in self.breakpoints.values():
            if bp.mechanism != "page":
                continue
            if any(gpa < page + PAGE and page < gpa + size for gpa, size in bp.physical):
                flags &= (
                    hv.HV_MEMORY_READ | hv.HV_MEMORY_EXEC if bp.kind == 2 else hv.HV_MEMORY_EXEC
                )
        return flags

    def owns(self, gpa: int) -> bool:
        """Whether ``gpa`` lies in a page protected for a watchpoint."""
        return gpa & ~(PAGE - 1) in self.protected

    # --- exits --------------------------------------------------------------------------------

    def on_ept_violation(self, state: WatchStep, vcpu: int, gpa: int, step: bool) -> Stop:
        """Complete an access to a protected page (``owns(gpa)``); Stop("continue") unless
        the instruction is done and touched a watched range."""
        qual = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
        if not hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DECODED):
            return self._step_through(state, vcpu, gpa, qual)
        size = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_SIZE)
        is_write = bool(qual & hv.EPT_VIOLATION_DATA_WRITE)
        if is_write:
            data = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA)
            self.memory.write(gpa, data.to_bytes(8, "little")[:size])
        else:
            value = int.from_bytes(self.memory.read(gpa, size), "little")
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA, value)
        hit = self._hit(gpa, size, is_write)
        if is_write:
            # KVM retires a decoded write (the instruction, or one iteration of a REP string
            # instruction) before it exits: the access is done (stored above), and so is a
            # read of the same instruction that hit or opened a page: report now, trap-after
            # (a monitor-trap step would run one instruction more)
            state.hit = state.hit or hit
            if state.pending or step:
                return self.instruction_done(state, vcpu, step)
            return Stop("continue")
        if hit is not None and state.hit is None:
            # x86 watchpoints trap after the access: a decoded read completes on the next
            # entry; finish the instruction with one monitor-trap step (see instruction_done)
            state.hit = hit
            self.set_step(vcpu, True)
        return Stop("continue")

    def instruction_done(self, state: WatchStep, vcpu: int, step: bool) -> Stop:
        """The instruction (or REP iteration) that touched a watched page is complete: close
        the pages opened for it, put the REP count and RIP where the iteration left them, end
        the monitor-trap step gdb did not ask for, and report its hit if any (a step gdb asked
        for ends here in any case)."""
        hit, state.hit = state.hit, None
        self._restore(state, vcpu)
        if not step:
            self.set_step(vcpu, False)
            return hit or Stop("continue")
        return hit or Stop("debug", SIGTRAP)

    def abandon(self, state: WatchStep, vcpu: int) -> None:
        """The run ended (Ctrl-C, a VMM stop) in the middle of a step for a watched page: put
        the pages and the REP count back; the instruction faults again when resumed."""
        state.hit = None
        self._restore(state, vcpu)

    def _restore(self, state: WatchStep, vcpu: int) -> None:
        for page, flags in state.reprotect or ():
            hv.hv_vm_protect(page, PAGE, flags)
        state.reprotect = None
        if state.rep is not None:
            finish_iteration(vcpu, state.rep)
            state.rep = None

    def _hit(self, gpa: int, size: int, is_write: bool) -> Stop | None:
        """The stop for the first page watchpoint an access of ``size`` bytes at ``gpa``
        touches (counting the hit), or None."""
        for bp in self.breakpoints.values():
            if bp.mechanism != "page" or bp.kind == (3 if is_write else 2):
                continue
            if any(gpa < start + length and start < gpa + size for start, length in bp.physical):
                bp.hits += 1
                return Stop("debug", SIGTRAP, reason=STOP_REASONS[bp.kind], address=bp.address)
        return None

    def _step_through(self, state: WatchStep, vcpu: int, gpa: int, qual: int) -> Stop:
        """The framework's way (nothing decoded the access): open the page, let the vCPU
        execute the faulting instruction (one iteration of a REP string instruction) under
        the monitor trap flag, close the page again at the MTF exit and report the hit then
        (trap-after, as x86 watchpoints are)."""
        page = gpa & ~(PAGE - 1)
        is_write = bool(qual & hv.EPT_VIOLATION_DATA_WRITE)
        fetch = bool(qual & hv.EPT_VIOLATION_INST_FETCH)
        hit = None
        if not fetch:  # (a fetch is not a data access)
            # the access size, where the backend knows it (KVM's software CPU), else any
            # access of up to 8 bytes counts
            accesses = [(gpa, hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_SIZE) or 8)]
            if not state.reprotect and state.rep is None:  # the instruction's first fault
                insn = string_at_rip(self.memory, vcpu)
                if insn is not None:
                    if not is_write:  # CMPS: its other read of this page is not seen once open
                        accesses += [
                            a
                            for a in compare_reads(self.memory, vcpu, insn)
                            if a[0] & ~(PAGE - 1) == page
                        ]
                    state.rep = start_one_iteration(vcpu, insn)
            hit = next(filter(None, (self._hit(a, n, is_write) for a, n in accesses)), None)
        # a read opens the page for reading only: a write of the same instruction (movsb)
        # still exits and is seen
        opened = hv.HV_MEMORY_READ | hv.HV_MEMORY_EXEC
        if is_write or fetch:
            opened |= hv.HV_MEMORY_WRITE
        flags = self.page_flags(page)
        hv.hv_vm_protect(page, PAGE, opened)
        if all(p != page for p, _ in state.reprotect or ()):
            state.reprotect = [*(state.reprotect or []), (page, flags)]
        state.hit = state.hit or hit
        self.set_step(vcpu, True)
        return Stop("continue")
