"""The emu backend's vCPU state: QEMU's CPU state inside unicorn contexts, and guest memory.

Theory of operation
-------------------
unicorn's register API sets only selectors in 64-bit mode. Bases, limits, access rights, EFER,
the derived ``hflags`` and fields unicorn has no register for (QEMU's exception in flight, the
TSC offset) are written by patching the CPU state inside a saved unicorn context (offsets
probed once at start-up, :func:`probe_layout`) and restoring it.

Guest memory is read and written by walking the guest's page tables here, in Python, over the
VMM's RAM buffers, never through unicorn's MMU: a lookup there that misses raises a #PF (or
#GP) inside the emulated CPU, which sets CR2 and QEMU's "exception in flight", and the latter
turns the guest's next real #PF into a #DF (and the one after into a shutdown). unicorn does
such lookups itself when it drops translations (``hook_del``, ``ctl_remove_cache``,
``mem_unmap``, the end address of ``emu_start``, which the backend therefore does not use:
exits are enabled with an empty list). :meth:`CpuState._quiet` runs those calls with CR2 saved
and restored; the exception in flight is cleared before every entry that follows one
(``Vcpu.stale_fault``), as it is after every event the backend delivers itself.

:class:`CpuState` is the first base of ``EmuBackend``; the other emu_* modules add to it.
"""

from __future__ import annotations

import ctypes
import importlib
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from . import common
from . import constants as C
from .errors import HvError
from .vmx_rules import Capabilities, EntryGate, entry_controls_after_exit

if TYPE_CHECKING:
    from .emu_code import BlockHooks
    from .emu_codewatch import CodePage, CodeRun

# unicorn ships partial type hints; it is used untyped here.
unicorn: Any = importlib.import_module("unicorn")
X: Any = importlib.import_module("unicorn.x86_const")

PAGE = 4096
M64 = (1 << 64) - 1
_T = TypeVar("_T")

# Segment caches: VMCS order (ES, CS, SS, DS, FS, GS, LDTR, TR); QEMU's segs[] order is
# ES, CS, SS, DS, FS, GS too, followed by ldt, tr.
_SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")
SELECTOR_REGS = {
    C.HV_X86_ES: 0,
    C.HV_X86_CS: 1,
    C.HV_X86_SS: 2,
    C.HV_X86_DS: 3,
    C.HV_X86_FS: 4,
    C.HV_X86_GS: 5,
    C.HV_X86_LDTR: 6,
    C.HV_X86_TR: 7,
}

# Offsets inside QEMU's CPUX86State (x86-64 target), relative to its start in a uc_context.
ENV_EFLAGS = 136
ENV_HFLAGS = 176
ENV_SEGS = 184  # 8 SegmentCache {u32 selector; u64 base; u32 limit; u32 flags} = 24 bytes
ENV_GDT = ENV_SEGS + 8 * 24
ENV_IDT = ENV_GDT + 24
ENV_CR = ENV_IDT + 24
ENV_EFER = 592

# QEMU hflags bits and descriptor flag bits.
HF_CPL = 3
HF_INHIBIT_IRQ = 1 << 3  # the STI / MOV SS interrupt shadow
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP_EM_TS = 7 << 9
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_OSFXSR = 1 << 22
DESC_P = 1 << 15
DESC_L = 1 << 21
DESC_B = 1 << 22


def ar_to_flags(ar: int) -> int:
    if ar & 0x10000 or not ar & 0x80:
        return 0
    return (ar & 0xFF) << 8 | ((ar >> 12) & 0xF) << 20


TR_INDEX = 7  # VMCS segment order: ES, CS, SS, DS, FS, GS, LDTR, TR
TSS_AVAILABLE = (1, 9)  # 16- and 32/64-bit available TSS types; busy is the same | 2


def flags_to_ar(flags: int, tr: bool = False) -> int:
    """VMCS access rights of a segment cache QEMU loaded. A code or data segment has its
    accessed bit set, as the processor sets it in the descriptor when it loads one (QEMU's far
    JMP/CALL leave it clear in the cache, and VM entry refuses a CS without it). TR's TSS is
    busy, as LTR marks it (QEMU's LTR sets the busy bit in the descriptor but caches the type
    it read, and VM entry refuses a TR that is not busy)."""
    if not flags & DESC_P:
        return 0x10000
    ar = (flags >> 8) & 0xFF | ((flags >> 20) & 0xF) << 12
    if tr and ar & 0xF in TSS_AVAILABLE:
        return ar | 2
    return ar | 1 if ar & 0x10 else ar


class Guard(Exception):
    """A fault met while delivering an event: the exception it raises instead (``vector``,
    ``error`` code, and ``cr2`` for a #PF), which the delivery escalates as hardware does."""

    def __init__(
        self, message: str, vector: int = C.IDT_GP, error: int = 0, cr2: int | None = None
    ) -> None:
        super().__init__(message)
        self.vector = vector
        self.error = error
        self.cr2 = cr2


class EptFault(Exception):
    """An access of event delivery to guest-physical memory that is not mapped or does not
    allow it: an EPT violation (exit 48) that interrupts the delivery."""

    def __init__(self, gpa: int, linear: int, write: bool, flags: int) -> None:
        super().__init__(f"EPT violation at guest-physical 0x{gpa:x}")
        self.gpa = gpa
        self.linear = linear
        self.write = write
        self.flags = flags  # what the mapping allows (HV_MEMORY_*), 0 if nothing is mapped


class TaskGate(Exception):
    """Event delivery met a task gate in the IDT: a task switch (exit 9) to ``selector``."""

    def __init__(self, selector: int) -> None:
        super().__init__(f"task gate to TSS 0x{selector:x}")
        self.selector = selector


@dataclass
class Space:
    asid: int
    regions: list[common.Region] = field(default_factory=list)


class ExitRun(Exception):
    """Raised inside the run loop when an exit for the caller has been recorded."""


class Vcpu:
    def __init__(self, vid: int, space: Space, uc: Any, caps: Capabilities) -> None:
        self.vid = vid
        self.space = space
        self.uc = uc
        self.owner = threading.get_ident()
        self.destroyed = False
        self.kick = threading.Event()
        self.lock = threading.Lock()
        self.running = False
        self.exec_ns = 0
        self.controls = common.initial_controls()
        self.controls[C.VMCS_GUEST_INTERRUPTIBILITY] = 0  # kept here (kvm: KVM's events)
        self.exit: dict[int, int] = {C.VMCS_RO_EXIT_REASON: 0}
        # the VM-entry checks: what the VMM wrote since the last entry that passed them
        self.gate = EntryGate(caps)
        # access rights as the VMM wrote them, by segment index, with the QEMU cache entry
        # (selector, base, limit, flags) they became: QEMU has no "unusable" bit and drops the
        # other bits of an unusable segment; while the entry is unchanged they read back as
        # written (as on KVM), once the guest reloads the segment they come from QEMU's flags
        self.seg_ar: dict[int, tuple[tuple[int, int, int, int], int]] = {}
        self.msr = common.MsrPermissions()
        self.kept_msrs: dict[int, int] = {}  # framework MSRs unicorn does not keep
        self.tsc_offset = 0
        self.xcr0 = 1
        # instruction sites: linear address -> kind; hooks by linear address
        self.sites: dict[int, str] = {}
        self.site_hooks: dict[int, int] = {}
        self.new_sites: dict[int, str] = {}
        # blocks scanned one by one (code that is not the same in every address space)
        self.scanned: set[tuple[int, int]] = set()
        # pages scanned as part of a chunk, by guest-linear page address: the span each one
        # covers, and the spans not yet cut out of the block hooks (cut outside emulation, at
        # the next entry)
        self.spans: dict[int, tuple[int, int]] = {}
        self.uncut: list[tuple[int, int]] = []
        self.forgotten: list[tuple[int, int]] = []  # cut spans whose code was forgotten
        self.unpaged_spans: set[int] = set()  # pages scanned with paging off
        self.low_spans: set[int] = set()  # 64-bit CPL0 pages of the lower half
        self.low_cr3 = 0  # the CR3 they were scanned with
        self.block_hooks: BlockHooks | None = None
        # the UC_HOOK_MEM_INVALID callback and its hooks, over the guest-physical ranges where an
        # access can fail (emu_code._hook_bad_memory)
        self.bad_memory: Callable[..., bool] | None = None
        self.bad_memory_hooks: list[Any] = []
        self.code: dict[int, CodePage] = {}  # gpa page -> scanned code on it
        self.code_runs: list[CodeRun] | None = None
        self.check_cursor = 0  # next run of code pages to compare (emu_codewatch._check_code)
        self.left_ns = 0  # when the last hv_vcpu_run returned
        # the safety nets (emu_nets): an instruction site that ran without its code hook
        self.recovery: Any = None
        self.write_hook: Any = None
        self.timer_fired: str | None = None  # "deadline" or "slice": the watchdog stopped it
        self.entry_token = 0  # the watchdog's token of the running entry
        self.stopper: Any = None  # emu_timer.StopSwitch: stops from other threads
        self.dr_exec_hooks: dict[int, int] = {}
        self.read_hook: Any = None  # loads checked while a read watch is armed (emu_debug)
        self.dr_exec: dict[int, int] = {}  # linear address -> DR index bits
        self.watch: list[tuple[int, int, int, bool]] = []  # (bit, lo, hi, reads too)
        self.watch_pages: dict[int, int] = {}  # gpa page -> UC perms to remove
        self.dr_dirty = True
        self.skip_rip: int | None = None  # RF: one execution breakpoint hit suppressed here
        self.pending_event: tuple[int, int, int | None] | None = None  # (vector, type, error)
        self.mem_fault: tuple[int, int, int] | None = None  # (access, address, size)
        self.stepping = False

        # set inside hooks, acted on when emu_start has returned
        self.exit_recorded = False
        self.halted = False
        self.emulate_msr: str | None = None
        # a system instruction stopped before, to be given its effect here (emu_sys), and the
        # trap-like exit that follows it (TPR threshold)
        self.emulate: Callable[[], None] | None = None
        self.after_emulate: int | None = None
        self.system_insn: tuple[str, int] | None = None  # (syscall/sysenter, its address)
        self.uc_dirty_memory = False
        # QEMU's exception in flight may be stale (a fault was raised inside unicorn)
        self.stale_fault = False
        self.tsc_dirty = True  # tsc_offset is not in unicorn's CPU state yet


class Snapshot:
    """One saved copy of a vCPU's CPU state, read field by field (one context save)."""

    def __init__(self, blob: bytes, env: int) -> None:
        self.blob = blob
        self.env = env

    def seg(self, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, QEMU flags) of segment ``index`` (VMCS order)."""
        selector, base, limit, flags = struct.unpack_from(
            "<I4xQII", self.blob, self.env + ENV_SEGS + 24 * index
        )
        return selector & 0xFFFF, base, limit, flags

    def table(self, which: int) -> tuple[int, int]:
        """(base, limit) of the GDT (0) or the IDT (1)."""
        off = self.env + (ENV_GDT if which == 0 else ENV_IDT)
        _, base, limit, _ = struct.unpack_from("<I4xQII", self.blob, off)
        return base, limit

    @property
    def efer(self) -> int:
        return int(struct.unpack_from("<Q", self.blob, self.env + ENV_EFER)[0])

    @property
    def hflags(self) -> int:
        return int(struct.unpack_from("<I", self.blob, self.env + ENV_HFLAGS)[0])

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL


def flush_tlb(uc: Any) -> None:
    """Drop unicorn's software TLB (permissions and translations are looked up again)."""
    uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)


@dataclass(frozen=True)
class Layout:
    """Offsets in a saved unicorn context of the CPUX86State fields this backend patches."""

    env: int  # start of CPUX86State
    error_code: int  # env->error_code (the error code of the exception being raised)
    old_exception: int  # env->old_exception (QEMU's double-fault bookkeeping)
    tsc_offset: int  # env->tsc_offset (RDTSC/RDTSCP/RDMSR read host ticks + this)


def probe_layout() -> Layout:
    """Find CPUX86State in a saved context and check the layout this backend relies on."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.reg_write(X.UC_X86_REG_RAX, 0x1122334455667788)
    uc.reg_write(X.UC_X86_REG_RIP, 0x2122334455667788)
    uc.reg_write(X.UC_X86_REG_CS, 0x1234)
    uc.reg_write(X.UC_X86_REG_CR3, 0x55667000)
    uc.reg_write(X.UC_X86_REG_DR0, 0x3122334455667788)
    uc.reg_write(X.UC_X86_REG_DR7, 0x4122334455667788)
    blob = bytes(uc.context_save())
    env = blob.find((0x1122334455667788).to_bytes(8, "little"))
    dr0 = blob.find((0x3122334455667788).to_bytes(8, "little"))
    ok = (
        env >= 0
        and struct.unpack_from("<Q", blob, env + 128)[0] == 0x2122334455667788
        and struct.unpack_from("<I", blob, env + ENV_SEGS + 24)[0] == 0x1234
        and struct.unpack_from("<Q", blob, env + ENV_CR + 24)[0] == 0x55667000
        and struct.unpack_from("<Q", blob, env + ENV_EFER)[0] == 0x500
        and dr0 > env
        and struct.unpack_from("<Q", blob, dr0 + 56)[0] == 0x4122334455667788
    )
    # CPUX86State: int error_code; int exception_is_int; target_ulong exception_next_eip;
    # target_ulong dr[8]; 4 pointers (break/watchpoints); int old_exception; uint64_t
    # vm_vmcb; uint64_t tsc_offset. A fresh CPU has old_exception -1, tsc_offset 0.
    old_exception = dr0 + 64 + 32
    layout = Layout(env, dr0 - 16, old_exception, old_exception + 16)
    if not ok or struct.unpack_from("<iiQ", blob, old_exception) != (-1, 0, 0):
        raise HvError(C.HV_UNSUPPORTED, "hv_vm_create", "unknown unicorn CPU state layout")
    if struct.unpack_from("<Q", blob, layout.tsc_offset)[0] != 0:
        raise HvError(C.HV_UNSUPPORTED, "hv_vm_create", "unknown unicorn CPU state layout")
    return layout


class CpuState(common.FrameworkBooks["Space", "Vcpu"]):
    """CPU state in unicorn contexts, guest memory by page walk, exit records (see above)."""

    _layout: Layout
    _env: int  # _layout.env

    # --- exits -----------------------------------------------------------------------------------

    def _set_exit(self, vcpu: Vcpu, reason: int, **fields: int) -> None:
        vcpu.exit = common.exit_fields(reason, **fields)
        vcpu.exit_recorded = True
        # every VM exit stores IA32_EFER.LMA into the IA-32e mode guest entry control
        entry = vcpu.controls[C.VMCS_CTRL_VMENTRY_CONTROLS]
        efer = int(vcpu.uc.reg_read(X.UC_X86_REG_MSR, C.MSR_EFER))
        vcpu.controls[C.VMCS_CTRL_VMENTRY_CONTROLS] = entry_controls_after_exit(entry, efer)

    def _stop(self, vcpu: Vcpu, reason: int, **fields: int) -> None:
        self._set_exit(vcpu, reason, **fields)
        vcpu.uc.emu_stop()

    # --- unicorn calls that may fault inside the emulated CPU ------------------------------------

    @staticmethod
    def _quiet(vcpu: Vcpu, call: Callable[..., _T], *args: Any) -> _T:
        """``call(*args)``, a unicorn call that may look up a guest-linear address in unicorn's
        MMU (dropping translations does: hook_del, ctl_remove_cache, mem_unmap). A miss raises
        a #PF or #GP inside unicorn: CR2 is put back here, and the exception in flight is
        cleared before the next entry."""
        uc = vcpu.uc
        cr2 = uc.reg_read(X.UC_X86_REG_CR2)
        try:
            return call(*args)
        finally:
            vcpu.stale_fault = True
            if uc.reg_read(X.UC_X86_REG_CR2) != cr2:
                uc.reg_write(X.UC_X86_REG_CR2, cr2)

    # --- CPU state inside a unicorn context ------------------------------------------------------

    def _blob(self, vcpu: Vcpu) -> bytes:
        return bytes(vcpu.uc.context_save())

    def _snapshot(self, vcpu: Vcpu) -> Snapshot:
        return Snapshot(self._blob(vcpu), self._env)

    def _efer(self, vcpu: Vcpu) -> int:
        return int(struct.unpack_from("<Q", self._blob(vcpu), self._env + ENV_EFER)[0])

    def _seg(self, vcpu: Vcpu, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, ar) of segment ``index`` (VMCS order)."""
        blob = self._blob(vcpu)
        off = self._env + ENV_SEGS + 24 * index
        selector, base, limit, flags = struct.unpack_from("<I4xQII", blob, off)
        written = vcpu.seg_ar.get(index)
        if written is not None and written[0] == (selector, base, limit, flags):
            return selector & 0xFFFF, base, limit, written[1]
        return selector & 0xFFFF, base, limit, flags_to_ar(flags, index == TR_INDEX)

    def _table(self, vcpu: Vcpu, which: int) -> tuple[int, int]:
        off = self._env + (ENV_GDT if which == 0 else ENV_IDT)
        _, base, limit, _ = struct.unpack_from("<I4xQII", self._blob(vcpu), off)
        return base, limit

    def _patch(
        self,
        vcpu: Vcpu,
        *,
        efer: int | None = None,
        segs: dict[int, tuple[int | None, int | None, int | None, int | None]] | None = None,
        gdt: tuple[int | None, int | None] | None = None,
        idt: tuple[int | None, int | None] | None = None,
        raw_flags: dict[int, int] | None = None,
    ) -> None:
        """Write hidden CPU state through a context and recompute QEMU's hflags."""
        uc = vcpu.uc
        ctx = uc.context_save()
        data = bytearray(bytes(ctx))
        env = self._env
        kept_ar: dict[int, int] = {}  # written access rights still valid before this patch
        for index in segs or {}:
            written = vcpu.seg_ar.get(index)
            current = struct.unpack_from("<I4xQII", data, env + ENV_SEGS + 24 * index)
            if written is not None and written[0] == current:
                kept_ar[index] = written[1]
        if efer is not None:
            struct.pack_into("<Q", data, env + ENV_EFER, efer)
        for index, (selector, base, limit, ar) in (segs or {}).items():
            off = env + ENV_SEGS + 24 * index
            if selector is not None:
                struct.pack_into("<I", data, off, selector & 0xFFFF)
            if base is not None:
                struct.pack_into("<Q", data, off + 8, base & M64)
            if limit is not None:
                struct.pack_into("<I", data, off + 16, limit & 0xFFFFFFFF)
            if ar is not None:
                struct.pack_into("<I", data, off + 20, ar_to_flags(ar))
        for index, flags in (raw_flags or {}).items():
            struct.pack_into("<I", data, env + ENV_SEGS + 24 * index + 20, flags)
        for off, table in ((ENV_GDT, gdt), (ENV_IDT, idt)):
            if table is not None:
                base, limit = table
                if base is not None:
                    struct.pack_into("<Q", data, env + off + 8, base & M64)
                if limit is not None:
                    struct.pack_into("<I", data, env + off + 16, limit & 0xFFFF)
        # unicorn never delivers an exception (its interrupt hook takes them all), so QEMU's
        # exception in flight is never cleared by QEMU: no event is in flight between entries
        struct.pack_into("<i", data, self._layout.old_exception, -1)
        struct.pack_into("<Q", data, self._layout.tsc_offset, vcpu.tsc_offset)
        vcpu.stale_fault = vcpu.tsc_dirty = False
        self._recompute_hflags(data)
        target = ctypes.cast(ctx.context, ctypes.c_void_p).value or 0
        ctypes.memmove(target, bytes(data), len(data))
        uc.context_restore(ctx)
        for index in raw_flags or {}:
            vcpu.seg_ar.pop(index, None)
        for index, (_sel, _base, _limit, ar) in (segs or {}).items():
            if index in (raw_flags or {}):
                continue
            entry = struct.unpack_from("<I4xQII", data, env + ENV_SEGS + 24 * index)
            if ar is not None:
                vcpu.seg_ar[index] = (entry, ar)
            elif index in kept_ar:
                vcpu.seg_ar[index] = (entry, kept_ar[index])
            else:
                vcpu.seg_ar.pop(index, None)

    def _recompute_hflags(self, data: bytearray) -> None:
        env = self._env
        hflags = struct.unpack_from("<I", data, env + ENV_HFLAGS)[0]
        eflags = struct.unpack_from("<Q", data, env + ENV_EFLAGS)[0]
        cr0 = struct.unpack_from("<Q", data, env + ENV_CR)[0]
        cr4 = struct.unpack_from("<Q", data, env + ENV_CR + 32)[0]
        efer = struct.unpack_from("<Q", data, env + ENV_EFER)[0]

        def seg(index: int) -> tuple[int, int]:
            base, _, flags = struct.unpack_from("<QII", data, env + ENV_SEGS + 24 * index + 8)
            return base, flags

        cs_flags = seg(1)[1]
        ss_flags = seg(2)[1]
        hflags &= ~(HF_CPL | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_MP_EM_TS | HF_LMA)
        hflags &= ~(HF_CS64 | HF_OSFXSR)
        if cr0 & 1:
            hflags |= HF_PE | ((ss_flags >> 13) & 3)
        hflags |= (cr0 << 8) & HF_MP_EM_TS
        if cr4 & (1 << 9):
            hflags |= HF_OSFXSR
        if efer & C.EFER_LMA:
            hflags |= HF_LMA
        if efer & C.EFER_LMA and cs_flags & DESC_L:
            hflags |= HF_CS32 | HF_CS64
        elif cs_flags & DESC_B:
            hflags |= HF_CS32
        if ss_flags & DESC_B:
            hflags |= HF_SS32
        if not hflags & HF_CS64:
            flat = seg(0)[0] | seg(3)[0] | seg(2)[0] == 0
            if not cr0 & 1 or eflags & (1 << 17) or not hflags & HF_CS32 or not flat:
                hflags |= HF_ADDSEG
        struct.pack_into("<I", data, env + ENV_HFLAGS, hflags)

    def _set_efer(self, vcpu: Vcpu, value: int) -> None:
        self._patch(vcpu, efer=value)

    def _write_cr(self, vcpu: Vcpu, index: int, value: int) -> None:
        reg = (X.UC_X86_REG_CR0, 0, X.UC_X86_REG_CR2, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4)[index]
        efer = self._efer(vcpu)
        vcpu.uc.reg_write(reg, value)
        if index == 0:
            # LMA follows CR0.PG and EFER.LME (as a VM entry loads it from the VMCS/EFER).
            lma = C.EFER_LMA if value & (1 << 31) and efer & C.EFER_LME else 0
            self._patch(vcpu, efer=(efer & ~C.EFER_LMA) | lma)
        else:
            self._patch(vcpu)

    def _cpu_bits(self, vcpu: Vcpu) -> int:
        blob = self._blob(vcpu)
        hflags = struct.unpack_from("<I", blob, self._env + ENV_HFLAGS)[0]
        if hflags & HF_CS64:
            return 64
        return 32 if hflags & HF_CS32 else 16

    def _linear_rip(self, vcpu: Vcpu) -> int:
        rip = vcpu.uc.reg_read(X.UC_X86_REG_RIP)
        if self._cpu_bits(vcpu) == 64:
            return int(rip)
        return int(self._seg(vcpu, 1)[1] + rip) & 0xFFFFFFFF

    # --- guest-physical and linear memory --------------------------------------------------------

    def _phys_read(self, vcpu: Vcpu, gpa: int, size: int) -> bytes:
        out = b""
        while len(out) < size:
            address = gpa + len(out)
            region = common.region_at(vcpu.space.regions, address)
            if region is None:
                raise Guard(f"guest-physical 0x{address:x} is not mapped")
            chunk = min(size - len(out), region.gpa + region.size - address)
            out += ctypes.string_at(region.uva + (address - region.gpa), chunk)
        return out

    def _phys_write(self, vcpu: Vcpu, gpa: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            address = gpa + done
            region = common.region_at(vcpu.space.regions, address)
            if region is None:
                raise Guard(f"guest-physical 0x{address:x} is not mapped")
            chunk = min(len(data) - done, region.gpa + region.size - address)
            ctypes.memmove(region.uva + (address - region.gpa), data[done : done + chunk], chunk)
            done += chunk

    def _translate(self, vcpu: Vcpu, linear: int) -> int | None:
        """Guest-physical address of ``linear`` by the guest's page tables (None: not present)."""
        uc = vcpu.uc
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        if not cr0 & (1 << 31):
            return linear & 0xFFFFFFFF
        cr3 = uc.reg_read(X.UC_X86_REG_CR3)
        cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        efer = self._efer(vcpu)

        def entry(address: int, width: int) -> int:
            fmt = "<Q" if width == 8 else "<I"
            return int(struct.unpack(fmt, self._phys_read(vcpu, address, width))[0])

        try:
            if efer & C.EFER_LMA:
                table = cr3 & 0x000FFFFFFFFFF000
                for level, shift in enumerate((39, 30, 21, 12)):
                    e = entry(table + ((linear >> shift) & 0x1FF) * 8, 8)
                    if not e & 1:
                        return None
                    if level in (1, 2) and e & 0x80:
                        mask = (1 << shift) - 1
                        return int(e & 0x000FFFFFFFFFF000 & ~mask) | (linear & mask)
                    table = e & 0x000FFFFFFFFFF000
                return int(table) | (linear & 0xFFF)
            if cr4 & (1 << 5):  # PAE
                e = entry((cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8, 8)
                if not e & 1:
                    return None
                table = e & 0x000FFFFFFFFFF000
                e = entry(table + ((linear >> 21) & 0x1FF) * 8, 8)
                if not e & 1:
                    return None
                if e & 0x80:
                    return (e & 0x000FFFFFFFE00000) | (linear & 0x1FFFFF)
                e = entry((e & 0x000FFFFFFFFFF000) + ((linear >> 12) & 0x1FF) * 8, 8)
                return None if not e & 1 else (e & 0x000FFFFFFFFFF000) | (linear & 0xFFF)
            e = entry((cr3 & 0xFFFFF000) + ((linear >> 22) & 0x3FF) * 4, 4)
            if not e & 1:
                return None
            if e & 0x80 and cr4 & (1 << 4):
                return (e & 0xFFC00000) | (linear & 0x3FFFFF)
            e = entry((e & 0xFFFFF000) + ((linear >> 12) & 0x3FF) * 4, 4)
            return None if not e & 1 else (e & 0xFFFFF000) | (linear & 0xFFF)
        except Guard:
            return None

    def _read_linear(self, vcpu: Vcpu, linear: int, size: int) -> bytes:
        out = b""
        while len(out) < size:
            address = (linear + len(out)) & M64
            gpa = self._translate(vcpu, address)
            if gpa is None:
                break
            chunk = min(size - len(out), PAGE - (address & 0xFFF))
            try:
                out += self._phys_read(vcpu, gpa, chunk)
            except Guard:
                break
        return out

    def _write_linear(self, vcpu: Vcpu, linear: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            address = (linear + done) & M64
            gpa = self._translate(vcpu, address)
            if gpa is None:
                raise Guard(f"linear 0x{address:x} is not mapped", C.IDT_PF, 2, address)
            chunk = min(len(data) - done, PAGE - (address & 0xFFF))
            self._phys_write(vcpu, gpa, data[done : done + chunk])
            done += chunk

    def _read_exact(self, vcpu: Vcpu, linear: int, size: int) -> bytes:
        """``size`` bytes at ``linear``, or a Guard #PF (a supervisor read) at the first byte
        that is not mapped."""
        data = self._read_linear(vcpu, linear, size)
        if len(data) != size:
            address = (linear + len(data)) & M64
            raise Guard(f"linear 0x{address:x} is not mapped", C.IDT_PF, 0, address)
        return data
