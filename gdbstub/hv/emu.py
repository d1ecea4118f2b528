"""The Hypervisor.framework API on a software vCPU (unicorn).

Theory of operation
-------------------
Each vCPU is one ``unicorn.Uc`` (x86, 64-bit build; real, protected and long mode follow CR0,
EFER and the segment caches, exactly as in QEMU, which unicorn is). Guest memory is the VMM's
own buffers mapped with ``mem_map_ptr``, so the VMM and the guest see the same bytes. The
semantics are the KVM backend's (see ``kvm.py``); what unicorn lacks, this module builds:

* **Hidden segment state.** unicorn's register API sets only selectors in 64-bit mode. Bases,
  limits, access rights, EFER and the derived ``hflags`` are written by patching the CPU state
  inside a saved unicorn context (offsets probed once at start-up) and restoring it.
* **Threads, kicks, deadlines.** A vCPU belongs to its creating thread. ``hv_vcpu_interrupt``
  sets a stop flag and calls ``emu_stop`` (repeatedly, until the owner has noticed, so a kick
  that races with the start of ``emu_start`` is not lost); a kick before entry makes the next
  run return exit 1 at once. Deadlines are ``emu_start`` timeouts (exit 52).
* **Instruction exits.** Code is scanned (capstone) the first time it runs for IN/OUT/INS/
  OUTS, HLT, RDMSR/WRMSR and CPUID, and a code hook goes on exactly those addresses. Block
  hooks (``_BlockHooks``) cover the guest-linear addresses not scanned yet: a block starting
  there calls into Python, which scans it and on to where any block starting inside it ends
  (the first control transfer), then cuts that span out of the hooked ranges and has it
  retranslated. Scanned code thus runs at unicorn's own speed, without a Python call per
  block. A code hook stops emulation *before* the instruction, so RIP is
  at the instruction and nothing of it has executed (the framework's contract): the VMM
  completes it and advances RIP by VMCS_RO_VMEXIT_INSTR_LEN. CPUID always exits (reason 10),
  as on the framework. RDMSR/WRMSR exit (31/32) unless the MSR is native or granted; then they
  execute in unicorn. INT3 is not scanned for: it reaches the interrupt hook (below) whenever
  it executes, so an int3 written a moment ago is seen like any other.
* **Code written by the host.** The VMM and the debugger write guest RAM through their own
  buffers, which unicorn never sees. Every guest-physical page holding a scanned block is
  remembered with a copy of its bytes; each entry (``hv_vcpu_run``/``run_until``) compares
  them (runs of contiguous pages at once: about 1 us plus 0.2 us a page). In a changed page
  the differing bytes are found; the blocks and instruction sites overlapping them are
  forgotten (rescanned when executed) and the translated blocks are flushed, so the guest runs
  what the host wrote, as on the framework. Data written next to code costs only the compare.
  A code hook also checks that its instruction is still there (guest-modified code).
* **Exceptions.** Faults and traps reach a UC_HOOK_INTR hook. Vectors set in the exception
  bitmap exit (reason 0 with interruption info; #BP from INT3 as the framework reports it:
  software exception, RIP back at the int3, instruction length 1); others are delivered
  through the guest's IDT by this module (as is an event injected through
  VMCS_CTRL_VMENTRY_IRQ_INFO; a software one returns after VMCS_CTRL_VMENTRY_INSTR_LEN bytes):
  real-mode IVT, protected-mode and long-mode interrupt/trap gates, same privilege level
  only, no task gates. A delivery that fails becomes #DF, then a triple fault (exit 2). Error
  codes: #PF has P from a page walk plus W/I from the faulting access when known; other
  faults push 0. unicorn 2.1 drops the #UD of an invalid opcode once any code hook exists
  (emu_start returns at the instruction with no event): a run that stops without progress
  and without a kick or deadline, or a single step that stays on UD0/UD1/UD2 or on bytes that
  do not decode, raises #UD here.
* **Debug registers.** DR0-DR3/DR7 are evaluated here: execution breakpoints are code hooks on
  the exact linear addresses (fault-like, RIP at the instruction, RFLAGS.RF suppresses one
  hit); data breakpoints write-protect (or, for read/write, access-protect) the guest-physical
  page, single-step the access with the page opened, and raise a trap-like #DB (RIP after the
  instruction) when the access overlaps the DR range. With #DB in the exception bitmap they
  exit (reason 0, vector 1, DR6 bits B0-B3/BS in the qualification), else #DB is delivered to
  the guest. MTF is ``emu_start(count=1)`` (exit 37). Interrupt-window exiting (exit 7) steps
  one instruction at a time while RFLAGS.IF is clear or an STI shadow is pending (MOV SS
  shadows are not tracked).
* **Memory exits.** Unmapped or protected accesses stop with RIP at the instruction and exit 48
  with GPA and access bits; the MMIO extension fields read 0 (not decoded): the VMM decodes.
* **MSR permissions and address spaces** are kept as in ``kvm.py``. An address space is a
  list of regions; every vCPU's ``Uc`` maps the regions of its space, and ``hv_vcpu_set_space``
  remaps them.

Approximations: the TSC is unicorn's (not settable; ``hv_vm_sync_tsc`` and IA32_TSC reads and
writes are kept as an offset on the emulated clock, guest RDTSC does not see them); no
VEX-encoded (AVX) instructions (unicorn 2 is QEMU 5.0's TCG: #UD), though the YMM state
round-trips through the XSAVE image; hv_vcpu_read_msr/write_msr know only the MSRs unicorn keeps
(_KNOWN_MSRS); XCR0 is kept here; string I/O (INS/OUTS) exits like other I/O but the VMM
has to emulate the memory side; interrupt delivery does not switch stacks on a privilege change
(except long-mode IST).
Code the guest itself rewrites is rescanned at the next entry, not at once: an IN/OUT/HLT/MSR/
CPUID the guest writes into an already scanned block and runs within the same entry executes
in unicorn without an exit. Code is scanned by guest-linear address. Spans leave the block
hooks only where the code is the same in every address space (paging off, or the upper half
in long mode); elsewhere every block still calls the hook, and a block at an address scanned
before with the same length (another process's code there) is not scanned again.
An `inc; jmp` loop runs at about 1.5e8 iterations per second (0.6e6 when every block called the
block hook).
"""

from __future__ import annotations

import bisect
import ctypes
import importlib
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import capstone

from ..buffers import Buffer
from . import common
from . import constants as C
from .errors import HvError

_EXIT_FIELDS = C.VMCS_EXIT_INFORMATION_FIELDS | C.GDBSTUB_VMCS_MMIO_FIELDS

# unicorn ships partial type hints; it is used untyped here.
unicorn: Any = importlib.import_module("unicorn")
X: Any = importlib.import_module("unicorn.x86_const")

PAGE = 4096
_FOREVER = C.HV_DEADLINE_FOREVER
_UNTIL = (1 << 64) - 1
_M64 = (1 << 64) - 1

_GPR = {
    C.HV_X86_RIP: X.UC_X86_REG_RIP,
    C.HV_X86_RFLAGS: X.UC_X86_REG_RFLAGS,
    C.HV_X86_RAX: X.UC_X86_REG_RAX,
    C.HV_X86_RCX: X.UC_X86_REG_RCX,
    C.HV_X86_RDX: X.UC_X86_REG_RDX,
    C.HV_X86_RBX: X.UC_X86_REG_RBX,
    C.HV_X86_RSI: X.UC_X86_REG_RSI,
    C.HV_X86_RDI: X.UC_X86_REG_RDI,
    C.HV_X86_RSP: X.UC_X86_REG_RSP,
    C.HV_X86_RBP: X.UC_X86_REG_RBP,
    C.HV_X86_R8: X.UC_X86_REG_R8,
    C.HV_X86_R9: X.UC_X86_REG_R9,
    C.HV_X86_R10: X.UC_X86_REG_R10,
    C.HV_X86_R11: X.UC_X86_REG_R11,
    C.HV_X86_R12: X.UC_X86_REG_R12,
    C.HV_X86_R13: X.UC_X86_REG_R13,
    C.HV_X86_R14: X.UC_X86_REG_R14,
    C.HV_X86_R15: X.UC_X86_REG_R15,
}

# Segment caches: VMCS order (ES, CS, SS, DS, FS, GS, LDTR, TR); QEMU's segs[] order is
# ES, CS, SS, DS, FS, GS too, followed by ldt, tr.
_SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")
_SELECTOR_REGS = {
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
_ENV_EFLAGS = 136
_ENV_HFLAGS = 176
_ENV_SEGS = 184  # 8 SegmentCache {u32 selector; u64 base; u32 limit; u32 flags} = 24 bytes
_ENV_GDT = _ENV_SEGS + 8 * 24
_ENV_IDT = _ENV_GDT + 24
_ENV_CR = _ENV_IDT + 24
_ENV_EFER = 592

# QEMU hflags bits and descriptor flag bits.
_HF_CPL = 3
_HF_CS32 = 1 << 4
_HF_SS32 = 1 << 5
_HF_ADDSEG = 1 << 6
_HF_PE = 1 << 7
_HF_MP_EM_TS = 7 << 9
_HF_LMA = 1 << 14
_HF_CS64 = 1 << 15
_HF_OSFXSR = 1 << 22
_DESC_P = 1 << 15
_DESC_L = 1 << 21
_DESC_B = 1 << 22


_XSAVE_SIZE = 832  # legacy area, XSAVE header, AVX (YMM upper halves) at 576
_XSTATE_X87_SSE_AVX = 7
# MSRs the software vCPU has (QEMU's rdmsr/wrmsr in unicorn keep these; it reads any other as 0
# and drops writes): others are HV_BAD_ARGUMENT for hv_vcpu_read_msr/write_msr, as on KVM for
# an MSR it does not know.
_KNOWN_MSRS = frozenset(
    {C.MSR_TSC, 0xFE, 0x179, 0x17A, 0x17B, C.MSR_IA32_MISC_ENABLE, C.MSR_IA32_PAT, 0x2FF}
    | set(range(C.MSR_IA32_SYSENTER_CS, C.MSR_IA32_SYSENTER_EIP + 1))
    | set(range(0x200, 0x210))  # variable-range MTRRs
    | {0x250, 0x258, 0x259, *range(0x268, 0x270)}  # fixed-range MTRRs
    | set(range(0x400, 0x400 + 4 * 10))  # machine-check banks (MCG_CAP: 10)
    | {0xD90}  # IA32_BNDCFGS
    | set(range(C.MSR_EFER, C.MSR_SF_MASK + 1))
    | set(range(C.MSR_FSBASE, C.MSR_TSC_AUX + 1))
    | {0xC0010117}  # VM_HSAVE_PA
)
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17})
_VCPU_MAX = 64
_SPACE_MAX = 8

_MSR_FIELDS = {
    C.VMCS_GUEST_IA32_PAT: C.MSR_IA32_PAT,
    C.VMCS_GUEST_IA32_DEBUGCTL: C.MSR_IA32_DEBUGCTL,
    C.VMCS_GUEST_IA32_SYSENTER_CS: C.MSR_IA32_SYSENTER_CS,
    C.VMCS_GUEST_SYSENTER_ESP: C.MSR_IA32_SYSENTER_ESP,
    C.VMCS_GUEST_SYSENTER_EIP: C.MSR_IA32_SYSENTER_EIP,
    C.VMCS_GUEST_IA32_EFER: C.MSR_EFER,
}

# Instructions that exit (or may), found by scanning blocks: capstone id -> kind.
_SITE_KINDS = {
    capstone.x86.X86_INS_IN: "io",
    capstone.x86.X86_INS_OUT: "io",
    capstone.x86.X86_INS_INSB: "io",
    capstone.x86.X86_INS_INSW: "io",
    capstone.x86.X86_INS_INSD: "io",
    capstone.x86.X86_INS_OUTSB: "io",
    capstone.x86.X86_INS_OUTSW: "io",
    capstone.x86.X86_INS_OUTSD: "io",
    capstone.x86.X86_INS_HLT: "hlt",
    capstone.x86.X86_INS_RDMSR: "rdmsr",
    capstone.x86.X86_INS_WRMSR: "wrmsr",
    capstone.x86.X86_INS_CPUID: "cpuid",
}
# What a site's bytes must still be (after prefixes) for its hook to act on it.
_SITE_OPCODES = {
    "hlt": (b"\xf4",),
    "rdmsr": (b"\x0f\x32",),
    "wrmsr": (b"\x0f\x30",),
    "cpuid": (b"\x0f\xa2",),
}
_UD_IDS = frozenset({capstone.x86.X86_INS_UD0, capstone.x86.X86_INS_UD1, capstone.x86.X86_INS_UD2})
_STRING_IO = frozenset({0x6C, 0x6D, 0x6E, 0x6F})

_DISASM: dict[int, Any] = {}

# Instructions that end a translated block (TCG ends blocks at every control transfer).
_BLOCK_ENDS = frozenset(
    getattr(capstone.x86, name)
    for name in dir(capstone.x86)
    if name.startswith("X86_INS_J")
    or name.startswith("X86_INS_LOOP")
    or name
    in (
        "X86_INS_CALL",
        "X86_INS_LCALL",
        "X86_INS_LJMP",
        "X86_INS_RET",
        "X86_INS_RETF",
        "X86_INS_RETFQ",
        "X86_INS_IRET",
        "X86_INS_IRETD",
        "X86_INS_IRETQ",
        "X86_INS_INT",
        "X86_INS_INT1",
        "X86_INS_INT3",
        "X86_INS_INTO",
        "X86_INS_SYSCALL",
        "X86_INS_SYSENTER",
        "X86_INS_SYSEXIT",
        "X86_INS_SYSRET",
        "X86_INS_HLT",
    )
)
# The most bytes one translated block can span from its first instruction: QEMU's x86
# translator ends a block once it is PAGE - 32 bytes long (plus the instruction that crossed).
_BLOCK_BYTES = PAGE - 32 + 15


def _load_memcmp() -> Callable[[int, bytes, int], int] | None:
    try:
        function: Any = ctypes.CDLL(None).memcmp
    except (OSError, TypeError, AttributeError):  # pragma: no cover - no C library to load
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_memcmp = _load_memcmp()
_SMALL_RUN = 8 * PAGE


def _disassembler(bits: int) -> Any:
    md = _DISASM.get(bits)
    if md is None:
        mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
        md = capstone.Cs(capstone.CS_ARCH_X86, mode)
        _DISASM[bits] = md
    return md


def _ar_to_flags(ar: int) -> int:
    if ar & 0x10000 or not ar & 0x80:
        return 0
    return (ar & 0xFF) << 8 | ((ar >> 12) & 0xF) << 20


def _flags_to_ar(flags: int) -> int:
    if not flags & _DESC_P:
        return 0x10000
    return (flags >> 8) & 0xFF | ((flags >> 20) & 0xF) << 12


class _Guard(Exception):
    """A guest-state problem met while delivering an event (escalates to #DF / triple fault)."""


@dataclass
class _Space:
    asid: int
    regions: list[common.Region] = field(default_factory=list)


@dataclass
class _CodePage:
    """A guest-physical page holding scanned code, watched for writes by the host."""

    view: memoryview | None  # the page in the VMM's buffer (None: no longer mapped)
    saved: bytes  # its bytes when last checked
    blocks: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # key -> span
    sites: dict[int, tuple[int, int]] = field(default_factory=dict)  # linear address -> span


@dataclass
class _CodeRun:
    """Watched pages contiguous in guest and host memory, compared in one go at each entry."""

    address: int  # host address (0: no longer mapped)
    view: memoryview | None
    saved: bytes  # their bytes when last checked
    pages: list[int]

    def changed(self) -> bool:
        if self.view is None:
            return True
        if len(self.saved) <= _SMALL_RUN or _memcmp is None:
            return bytes(self.view) != self.saved  # cheaper than a ctypes call when small
        return _memcmp(self.address, self.saved, len(self.saved)) != 0


class _BlockHooks:
    """UC_HOOK_BLOCK hooks over the guest-linear addresses whose code is not scanned yet.

    unicorn decides when it translates a block whether the block calls a block hook (one whose
    range holds the block's first address). Code is scanned the first time it runs; its span
    is then cut out of these ranges and its translation dropped, so scanned code runs without
    a call into Python per block. The ranges are the gaps between scanned spans: disjoint,
    kept by first address."""

    def __init__(self, uc: Any, callback: Callable[..., None]) -> None:
        self.uc = uc
        self.callback = callback
        self.firsts: list[int] = []
        self.gaps: dict[int, tuple[int, Any]] = {}  # first address -> (last address, hook)
        self._add(0, _M64)

    def _add(self, first: int, last: int) -> None:
        if first <= last:
            bisect.insort(self.firsts, first)
            hook = self.uc.hook_add(unicorn.UC_HOOK_BLOCK, self.callback, None, first, last)
            self.gaps[first] = (last, hook)

    def cut(self, lo: int, hi: int) -> None:
        """Take the scanned span ``[lo, hi)`` out of the hooked ranges."""
        overlapping = []
        i = bisect.bisect_right(self.firsts, hi - 1) - 1
        while i >= 0 and self.gaps[self.firsts[i]][0] >= lo:
            overlapping.append(self.firsts[i])
            i -= 1
        for first in overlapping:
            last, hook = self.gaps.pop(first)
            self.firsts.remove(first)
            self.uc.hook_del(hook)
            self._add(first, lo - 1)
            self._add(hi, last)
        # translated with the hook: translate again (page by page: unicorn translates the
        # first address of a range and takes the rest as physically contiguous)
        while overlapping and lo < hi:
            piece = min(hi, (lo | (PAGE - 1)) + 1)
            self.uc.ctl_remove_cache(lo, piece)
            lo = piece

    def uncover(self, lo: int, hi: int, still_scanned: list[tuple[int, int]]) -> None:
        """Hook ``[lo, hi)`` again (its code was forgotten), but for what other spans still
        scanned cover and what is hooked already."""
        holes = still_scanned + [
            (first, last + 1) for first, (last, _) in self.gaps.items() if first < hi and lo <= last
        ]
        pieces = [(lo, hi)]
        for a, b in holes:
            pieces = [
                piece
                for x, y in pieces
                for piece in ((x, min(y, a)), (max(x, b), y))
                if piece[0] < piece[1]
            ]
        for x, y in pieces:
            self._add(x, y - 1)


class _Exit(Exception):
    """Raised inside the run loop when an exit for the caller has been recorded."""


class _Vcpu:
    def __init__(self, vid: int, space: _Space, uc: Any) -> None:
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
        # access rights as the VMM wrote them, by segment index, with the QEMU cache entry
        # (selector, base, limit, flags) they became: QEMU has no "unusable" bit and drops the
        # other bits of an unusable segment; while the entry is unchanged they read back as
        # written (as on KVM), once the guest reloads the segment they come from QEMU's flags
        self.seg_ar: dict[int, tuple[tuple[int, int, int, int], int]] = {}
        self.msr = common.MsrPermissions()
        self.tsc_offset = 0
        self.xcr0 = 1
        # instruction sites: linear address -> kind; hooks by linear address
        self.sites: dict[int, str] = {}
        self.site_hooks: dict[int, int] = {}
        self.new_sites: dict[int, str] = {}
        self.scanned: set[tuple[int, int]] = set()
        # scanned code by block key: the guest-linear span it covers, and the spans not yet
        # cut out of the block hooks (cut outside emulation, at the next entry)
        self.spans: dict[tuple[int, int], tuple[int, int]] = {}
        self.uncut: list[tuple[int, int]] = []
        self.forgotten: list[tuple[int, int]] = []  # cut spans whose code was forgotten
        self.unpaged_spans: set[tuple[int, int]] = set()  # spans scanned with paging off
        self.block_hooks: _BlockHooks | None = None
        self.code: dict[int, _CodePage] = {}  # gpa page -> scanned code on it
        self.code_runs: list[_CodeRun] | None = None
        self.dr_exec_hooks: dict[int, int] = {}
        self.dr_exec: dict[int, int] = {}  # linear address -> DR index bits
        self.watch: list[tuple[int, int, int, bool]] = []  # (bit, lo, hi, reads too)
        self.watch_pages: dict[int, int] = {}  # gpa page -> UC perms to remove
        self.dr_dirty = True
        self.skip_rip: int | None = None  # RF: one execution breakpoint hit suppressed here
        self.pending_event: tuple[int, int, int | None] | None = None  # (vector, type, error)
        self.mem_fault: tuple[int, int, int] | None = None  # (access, address, size)
        self.stepping = False


class EmuBackend(common.FrameworkBooks["_Space", "_Vcpu"]):
    """``gdbstub.hv`` on unicorn (see the module docstring)."""

    name = "emu"
    _capabilities = common.vmx_capabilities()

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._spaces: dict[int, _Space] = {}
        self._vcpus: dict[int, _Vcpu] = {}
        self._live: dict[int, _Vcpu] = {}  # not destroyed
        self._next_vcpu = 0
        self._next_space = 1
        self._env = self._probe_env()

    @staticmethod
    def _probe_env() -> int:
        """Offset of CPUX86State in a saved context; check the layout this module relies on."""
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.reg_write(X.UC_X86_REG_RAX, 0x1122334455667788)
        uc.reg_write(X.UC_X86_REG_RIP, 0x2122334455667788)
        uc.reg_write(X.UC_X86_REG_CS, 0x1234)
        uc.reg_write(X.UC_X86_REG_CR3, 0x55667000)
        blob = bytes(uc.context_save())
        env = blob.find((0x1122334455667788).to_bytes(8, "little"))
        ok = (
            env >= 0
            and struct.unpack_from("<Q", blob, env + 128)[0] == 0x2122334455667788
            and struct.unpack_from("<I", blob, env + _ENV_SEGS + 24)[0] == 0x1234
            and struct.unpack_from("<Q", blob, env + _ENV_CR + 24)[0] == 0x55667000
            and struct.unpack_from("<Q", blob, env + _ENV_EFER)[0] == 0x500
        )
        if not ok:
            raise HvError(C.HV_UNSUPPORTED, "hv_vm_create", "unknown unicorn CPU state layout")
        return env

    # --- lookup helpers --------------------------------------------------------------------------

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
            self._spaces[0] = _Space(0)
            self._next_vcpu = 0
            self._next_space = 1

    # --- memory ----------------------------------------------------------------------------------

    def _sync_map(self, space: _Space, call: str = "") -> None:
        for vcpu in self._vcpus.values():
            if vcpu.space is space and not vcpu.destroyed:
                vcpu.uc_dirty_memory = True  # type: ignore[attr-defined]
                if vcpu.owner == threading.get_ident() and not vcpu.running:
                    self._remap(vcpu)

    @staticmethod
    def _uc_perms(flags: int) -> int:
        perms = 0
        if flags & C.HV_MEMORY_READ:
            perms |= unicorn.UC_PROT_READ
        if flags & C.HV_MEMORY_WRITE:
            perms |= unicorn.UC_PROT_WRITE
        if flags & (C.HV_MEMORY_EXEC | C.HV_MEMORY_UEXEC):
            perms |= unicorn.UC_PROT_EXEC
        return perms

    def _remap(self, vcpu: _Vcpu) -> None:
        """Make the vCPU's unicorn memory map equal its space's regions (minus watched pages)."""
        uc = vcpu.uc
        for begin, end, _perms in list(uc.mem_regions()):
            uc.mem_unmap(begin, end - begin + 1)
        merged: list[list[int]] = []
        for region in vcpu.space.regions:
            if merged:
                g, s, u, f = merged[-1]
                if g + s == region.gpa and u + s == region.uva and f == region.flags:
                    merged[-1][1] += region.size
                    continue
            merged.append([region.gpa, region.size, region.uva, region.flags])
        for gpa, size, uva, flags in merged:
            uc.mem_map_ptr(gpa, size, self._uc_perms(flags), uva)
        for page, remove in vcpu.watch_pages.items():
            watched = common.region_at(vcpu.space.regions, page)
            if watched is not None:
                uc.mem_protect(page, PAGE, self._uc_perms(watched.flags) & ~remove)
        _flush_tlb(uc)
        uc.ctl_flush_tb()
        for gpa, code in vcpu.code.items():  # the host buffers may have moved
            code.view = self._page_view(vcpu.space, gpa)
        vcpu.code_runs = None
        vcpu.uc_dirty_memory = False  # type: ignore[attr-defined]

    # --- guest-physical and linear memory --------------------------------------------------------

    def _phys_read(self, vcpu: _Vcpu, gpa: int, size: int) -> bytes:
        out = b""
        while len(out) < size:
            address = gpa + len(out)
            region = common.region_at(vcpu.space.regions, address)
            if region is None:
                raise _Guard(f"guest-physical 0x{address:x} is not mapped")
            chunk = min(size - len(out), region.gpa + region.size - address)
            out += ctypes.string_at(region.uva + (address - region.gpa), chunk)
        return out

    def _phys_write(self, vcpu: _Vcpu, gpa: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            address = gpa + done
            region = common.region_at(vcpu.space.regions, address)
            if region is None:
                raise _Guard(f"guest-physical 0x{address:x} is not mapped")
            chunk = min(len(data) - done, region.gpa + region.size - address)
            ctypes.memmove(region.uva + (address - region.gpa), data[done : done + chunk], chunk)
            done += chunk

    def _translate(self, vcpu: _Vcpu, linear: int) -> int | None:
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
        except _Guard:
            return None

    def _read_linear(self, vcpu: _Vcpu, linear: int, size: int) -> bytes:
        out = b""
        while len(out) < size:
            address = (linear + len(out)) & _M64
            gpa = self._translate(vcpu, address)
            if gpa is None:
                break
            chunk = min(size - len(out), PAGE - (address & 0xFFF))
            try:
                out += self._phys_read(vcpu, gpa, chunk)
            except _Guard:
                break
        return out

    def _write_linear(self, vcpu: _Vcpu, linear: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            address = (linear + done) & _M64
            gpa = self._translate(vcpu, address)
            if gpa is None:
                raise _Guard(f"linear 0x{address:x} is not mapped")
            chunk = min(len(data) - done, PAGE - (address & 0xFFF))
            self._phys_write(vcpu, gpa, data[done : done + chunk])
            done += chunk

    # --- address spaces --------------------------------------------------------------------------

    def hv_vm_space_create(self) -> int:
        with self._lock:
            self._space0("hv_vm_space_create")
            if len(self._spaces) >= _SPACE_MAX:
                raise HvError(C.HV_NO_RESOURCES, "hv_vm_space_create", "too many address spaces")
            asid = self._next_space
            self._next_space += 1
            self._spaces[asid] = _Space(asid)
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
        vcpu.code.clear()
        vcpu.code_runs = None
        vcpu.dr_exec_hooks.clear()
        vcpu.dr_dirty = True
        self._install_hooks(vcpu)
        self._remap(vcpu)
        vcpu.uc.context_restore(ctx)

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
            vcpu = _Vcpu(vid, space, uc)
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

    def _reset_state(self, vcpu: _Vcpu) -> None:
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

    # --- CPU state inside a unicorn context ------------------------------------------------------

    def _blob(self, vcpu: _Vcpu) -> bytes:
        return bytes(vcpu.uc.context_save())

    def _efer(self, vcpu: _Vcpu) -> int:
        return int(struct.unpack_from("<Q", self._blob(vcpu), self._env + _ENV_EFER)[0])

    def _seg(self, vcpu: _Vcpu, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, ar) of segment ``index`` (VMCS order)."""
        blob = self._blob(vcpu)
        off = self._env + _ENV_SEGS + 24 * index
        selector, base, limit, flags = struct.unpack_from("<I4xQII", blob, off)
        written = vcpu.seg_ar.get(index)
        if written is not None and written[0] == (selector, base, limit, flags):
            return selector & 0xFFFF, base, limit, written[1]
        return selector & 0xFFFF, base, limit, _flags_to_ar(flags)

    def _table(self, vcpu: _Vcpu, which: int) -> tuple[int, int]:
        off = self._env + (_ENV_GDT if which == 0 else _ENV_IDT)
        _, base, limit, _ = struct.unpack_from("<I4xQII", self._blob(vcpu), off)
        return base, limit

    def _patch(
        self,
        vcpu: _Vcpu,
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
            current = struct.unpack_from("<I4xQII", data, env + _ENV_SEGS + 24 * index)
            if written is not None and written[0] == current:
                kept_ar[index] = written[1]
        if efer is not None:
            struct.pack_into("<Q", data, env + _ENV_EFER, efer)
        for index, (selector, base, limit, ar) in (segs or {}).items():
            off = env + _ENV_SEGS + 24 * index
            if selector is not None:
                struct.pack_into("<I", data, off, selector & 0xFFFF)
            if base is not None:
                struct.pack_into("<Q", data, off + 8, base & _M64)
            if limit is not None:
                struct.pack_into("<I", data, off + 16, limit & 0xFFFFFFFF)
            if ar is not None:
                struct.pack_into("<I", data, off + 20, _ar_to_flags(ar))
        for index, flags in (raw_flags or {}).items():
            struct.pack_into("<I", data, env + _ENV_SEGS + 24 * index + 20, flags)
        for off, table in ((_ENV_GDT, gdt), (_ENV_IDT, idt)):
            if table is not None:
                base, limit = table
                if base is not None:
                    struct.pack_into("<Q", data, env + off + 8, base & _M64)
                if limit is not None:
                    struct.pack_into("<I", data, env + off + 16, limit & 0xFFFF)
        self._recompute_hflags(data)
        target = ctypes.cast(ctx.context, ctypes.c_void_p).value or 0
        ctypes.memmove(target, bytes(data), len(data))
        uc.context_restore(ctx)
        for index in raw_flags or {}:
            vcpu.seg_ar.pop(index, None)
        for index, (_sel, _base, _limit, ar) in (segs or {}).items():
            if index in (raw_flags or {}):
                continue
            entry = struct.unpack_from("<I4xQII", data, env + _ENV_SEGS + 24 * index)
            if ar is not None:
                vcpu.seg_ar[index] = (entry, ar)
            elif index in kept_ar:
                vcpu.seg_ar[index] = (entry, kept_ar[index])
            else:
                vcpu.seg_ar.pop(index, None)

    def _recompute_hflags(self, data: bytearray) -> None:
        env = self._env
        hflags = struct.unpack_from("<I", data, env + _ENV_HFLAGS)[0]
        eflags = struct.unpack_from("<Q", data, env + _ENV_EFLAGS)[0]
        cr0 = struct.unpack_from("<Q", data, env + _ENV_CR)[0]
        cr4 = struct.unpack_from("<Q", data, env + _ENV_CR + 32)[0]
        efer = struct.unpack_from("<Q", data, env + _ENV_EFER)[0]

        def seg(index: int) -> tuple[int, int]:
            base, _, flags = struct.unpack_from("<QII", data, env + _ENV_SEGS + 24 * index + 8)
            return base, flags

        cs_flags = seg(1)[1]
        ss_flags = seg(2)[1]
        hflags &= ~(_HF_CPL | _HF_CS32 | _HF_SS32 | _HF_ADDSEG | _HF_PE | _HF_MP_EM_TS | _HF_LMA)
        hflags &= ~(_HF_CS64 | _HF_OSFXSR)
        if cr0 & 1:
            hflags |= _HF_PE | ((ss_flags >> 13) & 3)
        hflags |= (cr0 << 8) & _HF_MP_EM_TS
        if cr4 & (1 << 9):
            hflags |= _HF_OSFXSR
        if efer & C.EFER_LMA:
            hflags |= _HF_LMA
        if efer & C.EFER_LMA and cs_flags & _DESC_L:
            hflags |= _HF_CS32 | _HF_CS64
        elif cs_flags & _DESC_B:
            hflags |= _HF_CS32
        if ss_flags & _DESC_B:
            hflags |= _HF_SS32
        if not hflags & _HF_CS64:
            flat = seg(0)[0] | seg(3)[0] | seg(2)[0] == 0
            if not cr0 & 1 or eflags & (1 << 17) or not hflags & _HF_CS32 or not flat:
                hflags |= _HF_ADDSEG
        struct.pack_into("<I", data, env + _ENV_HFLAGS, hflags)

    def _set_efer(self, vcpu: _Vcpu, value: int) -> None:
        self._patch(vcpu, efer=value)

    def _write_cr(self, vcpu: _Vcpu, index: int, value: int) -> None:
        reg = (X.UC_X86_REG_CR0, 0, X.UC_X86_REG_CR2, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4)[index]
        efer = self._efer(vcpu)
        vcpu.uc.reg_write(reg, value)
        if index == 0:
            # LMA follows CR0.PG and EFER.LME (as a VM entry loads it from the VMCS/EFER).
            lma = C.EFER_LMA if value & (1 << 31) and efer & C.EFER_LME else 0
            self._patch(vcpu, efer=(efer & ~C.EFER_LMA) | lma)
        else:
            self._patch(vcpu)

    def _cpu_bits(self, vcpu: _Vcpu) -> int:
        blob = self._blob(vcpu)
        hflags = struct.unpack_from("<I", blob, self._env + _ENV_HFLAGS)[0]
        if hflags & _HF_CS64:
            return 64
        return 32 if hflags & _HF_CS32 else 16

    def _linear_rip(self, vcpu: _Vcpu) -> int:
        rip = vcpu.uc.reg_read(X.UC_X86_REG_RIP)
        if self._cpu_bits(vcpu) == 64:
            return int(rip)
        return int(self._seg(vcpu, 1)[1] + rip) & 0xFFFFFFFF

    # --- registers -------------------------------------------------------------------------------

    def hv_vcpu_flush(self, vid: int) -> None:
        self._vcpu(vid, "hv_vcpu_flush")

    def hv_vcpu_invalidate_tlb(self, vid: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_invalidate_tlb")
        _flush_tlb(vcpu.uc)
        vcpu.dr_dirty = True

    def hv_vcpu_read_register(self, vid: int, reg: int) -> int:
        vcpu = self._vcpu(vid, "hv_vcpu_read_register")
        return self._read_register(vcpu, reg)

    def _read_register(self, vcpu: _Vcpu, reg: int) -> int:
        if reg in _GPR:
            return int(vcpu.uc.reg_read(_GPR[reg])) & _M64
        return self._read_other_register(vcpu, reg)

    def _read_other_register(self, vcpu: _Vcpu, reg: int) -> int:
        """Anything but a GPR, RIP or RFLAGS. Kept apart from the GPR path: the closures below
        make every call of the function that holds them allocate cells."""
        uc = vcpu.uc
        if reg in _SELECTOR_REGS:
            return self._seg(vcpu, _SELECTOR_REGS[reg])[0]
        simple: dict[int, Callable[[], int]] = {
            C.HV_X86_IDT_BASE: lambda: self._table(vcpu, 1)[0],
            C.HV_X86_IDT_LIMIT: lambda: self._table(vcpu, 1)[1],
            C.HV_X86_GDT_BASE: lambda: self._table(vcpu, 0)[0],
            C.HV_X86_GDT_LIMIT: lambda: self._table(vcpu, 0)[1],
            C.HV_X86_LDT_BASE: lambda: self._seg(vcpu, 6)[1],
            C.HV_X86_LDT_LIMIT: lambda: self._seg(vcpu, 6)[2],
            C.HV_X86_LDT_AR: lambda: self._seg(vcpu, 6)[3],
            C.HV_X86_TSS_BASE: lambda: self._seg(vcpu, 7)[1],
            C.HV_X86_TSS_LIMIT: lambda: self._seg(vcpu, 7)[2],
            C.HV_X86_TSS_AR: lambda: self._seg(vcpu, 7)[3],
            C.HV_X86_CR0: lambda: uc.reg_read(X.UC_X86_REG_CR0),
            C.HV_X86_CR1: lambda: 0,
            C.HV_X86_CR2: lambda: uc.reg_read(X.UC_X86_REG_CR2),
            C.HV_X86_CR3: lambda: uc.reg_read(X.UC_X86_REG_CR3),
            C.HV_X86_CR4: lambda: uc.reg_read(X.UC_X86_REG_CR4),
            C.HV_X86_TPR: lambda: (uc.reg_read(X.UC_X86_REG_CR8) & 0xF) << 4,
            C.HV_X86_XCR0: lambda: vcpu.xcr0,
        }
        if reg in simple:
            return int(simple[reg]()) & _M64
        if C.HV_X86_DR0 <= reg <= C.HV_X86_DR7:
            index = reg - C.HV_X86_DR0
            index = {4: 6, 5: 7}.get(index, index)
            return int(uc.reg_read(X.UC_X86_REG_DR0 + index)) & _M64
        raise common.bad("hv_vcpu_read_register", f"unknown register {reg}")

    def hv_vcpu_write_register(self, vid: int, reg: int, value: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_write_register")
        if not 0 <= value < 1 << 64:
            raise common.bad("hv_vcpu_write_register", f"value {value:#x} does not fit 64 bits")
        self._write_register(vcpu, reg, value)

    def _write_register(self, vcpu: _Vcpu, reg: int, value: int) -> None:
        if reg in _GPR:
            vcpu.uc.reg_write(_GPR[reg], value)
            if reg == C.HV_X86_RFLAGS:
                self._patch(vcpu)
            return
        self._write_other_register(vcpu, reg, value)

    def _write_other_register(self, vcpu: _Vcpu, reg: int, value: int) -> None:
        """Anything but a GPR, RIP or RFLAGS (see _read_other_register)."""
        uc = vcpu.uc
        if reg in _SELECTOR_REGS:
            self._patch(vcpu, segs={_SELECTOR_REGS[reg]: (value, None, None, None)})
            return
        if reg in (C.HV_X86_CR0, C.HV_X86_CR2, C.HV_X86_CR3, C.HV_X86_CR4):
            self._write_cr(vcpu, {36: 0, 38: 2, 39: 3, 40: 4}[reg], value)
            vcpu.dr_dirty = True
            return
        patches: dict[int, Callable[[], None]] = {
            C.HV_X86_IDT_BASE: lambda: self._patch(vcpu, idt=(value, None)),
            C.HV_X86_IDT_LIMIT: lambda: self._patch(vcpu, idt=(None, value)),
            C.HV_X86_GDT_BASE: lambda: self._patch(vcpu, gdt=(value, None)),
            C.HV_X86_GDT_LIMIT: lambda: self._patch(vcpu, gdt=(None, value)),
            C.HV_X86_LDT_BASE: lambda: self._patch(vcpu, segs={6: (None, value, None, None)}),
            C.HV_X86_LDT_LIMIT: lambda: self._patch(vcpu, segs={6: (None, None, value, None)}),
            C.HV_X86_LDT_AR: lambda: self._patch(vcpu, segs={6: (None, None, None, value)}),
            C.HV_X86_TSS_BASE: lambda: self._patch(vcpu, segs={7: (None, value, None, None)}),
            C.HV_X86_TSS_LIMIT: lambda: self._patch(vcpu, segs={7: (None, None, value, None)}),
            C.HV_X86_TSS_AR: lambda: self._patch(vcpu, segs={7: (None, None, None, value)}),
            C.HV_X86_CR1: lambda: None,
            C.HV_X86_TPR: lambda: uc.reg_write(X.UC_X86_REG_CR8, (value >> 4) & 0xF),
        }
        if reg in patches:
            patches[reg]()
            return
        if C.HV_X86_DR0 <= reg <= C.HV_X86_DR7:
            index = reg - C.HV_X86_DR0
            index = {4: 6, 5: 7}.get(index, index)
            uc.reg_write(X.UC_X86_REG_DR0 + index, value)
            vcpu.dr_dirty = True
            return
        if reg == C.HV_X86_XCR0:
            if not value & 1 or value & ~0x7 or (value & 4 and not value & 2):
                raise common.bad("hv_vcpu_write_register", f"XCR0 {value:#x}: invalid")
            vcpu.xcr0 = value
            return
        raise common.bad("hv_vcpu_write_register", f"unknown register {reg}")

    # --- fpstate ---------------------------------------------------------------------------------

    def hv_vcpu_read_fpstate(self, vid: int, buffer: Buffer, size: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_read_fpstate")
        view = common.check_fp_buffer("hv_vcpu_read_fpstate", buffer, size, _XSAVE_SIZE)
        if view.readonly:
            raise common.bad("hv_vcpu_read_fpstate", "buffer is read-only")
        uc = vcpu.uc
        image = bytearray(_XSAVE_SIZE)
        fsw = uc.reg_read(X.UC_X86_REG_FPSW)
        top = (fsw >> 11) & 7
        tags = uc.reg_read(X.UC_X86_REG_FPTAG)
        abridged = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != 3)
        struct.pack_into("<HHBxH", image, 0, uc.reg_read(X.UC_X86_REG_FPCW), fsw, abridged, 0)
        struct.pack_into("<QQII", image, 8, uc.reg_read(X.UC_X86_REG_FIP), 0, 0, 0)
        struct.pack_into("<II", image, 24, uc.reg_read(X.UC_X86_REG_MXCSR), 0xFFFF)
        for i in range(8):
            mantissa, exponent = uc.reg_read(X.UC_X86_REG_FP0 + ((top + i) & 7))
            struct.pack_into("<QH", image, 32 + 16 * i, mantissa, exponent)
        for i in range(16):
            ymm = int(uc.reg_read(X.UC_X86_REG_YMM0 + i))
            image[160 + 16 * i : 176 + 16 * i] = (ymm & ((1 << 128) - 1)).to_bytes(16, "little")
            image[576 + 16 * i : 592 + 16 * i] = (ymm >> 128).to_bytes(16, "little")
        struct.pack_into("<Q", image, 512, _XSTATE_X87_SSE_AVX)
        view[:_XSAVE_SIZE] = image
        if size > _XSAVE_SIZE:
            view[_XSAVE_SIZE:size] = bytes(size - _XSAVE_SIZE)

    def hv_vcpu_write_fpstate(self, vid: int, buffer: Buffer, size: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_write_fpstate")
        view = common.check_fp_buffer("hv_vcpu_write_fpstate", buffer, size, _XSAVE_SIZE)
        image = bytes(view[:_XSAVE_SIZE])
        fcw, fsw, abridged = struct.unpack_from("<HHB", image, 0)
        mxcsr = struct.unpack_from("<I", image, 24)[0]
        xstate_bv = struct.unpack_from("<Q", image, 512)[0]
        if mxcsr & ~0xFFFF or xstate_bv & ~_XSTATE_X87_SSE_AVX:
            raise common.bad("hv_vcpu_write_fpstate", "invalid XSAVE image")
        uc = vcpu.uc
        uc.reg_write(X.UC_X86_REG_FPCW, fcw)
        uc.reg_write(X.UC_X86_REG_FPSW, fsw)
        top = (fsw >> 11) & 7
        uc.reg_write(X.UC_X86_REG_MXCSR, mxcsr)
        for i in range(8):
            mantissa, exponent = struct.unpack_from("<QH", image, 32 + 16 * i)
            uc.reg_write(X.UC_X86_REG_FP0 + ((top + i) & 7), (mantissa, exponent))
        tags = sum((0 if abridged >> i & 1 else 3) << (2 * i) for i in range(8))
        uc.reg_write(X.UC_X86_REG_FPTAG, tags)
        for i in range(16):
            low = int.from_bytes(image[160 + 16 * i : 176 + 16 * i], "little")
            high = int.from_bytes(image[576 + 16 * i : 592 + 16 * i], "little")
            if not xstate_bv & 4:
                high = 0
            uc.reg_write(X.UC_X86_REG_YMM0 + i, high << 128 | low)

    # --- MSRs ------------------------------------------------------------------------------------

    def _get_msr(self, vcpu: _Vcpu, msr: int) -> int:
        if msr == C.MSR_EFER:
            return self._efer(vcpu)
        if msr == C.MSR_TSC:
            return (self._tsc_now() + vcpu.tsc_offset) & _M64
        return int(vcpu.uc.reg_read(X.UC_X86_REG_MSR, msr)) & _M64

    def _set_msr(self, vcpu: _Vcpu, msr: int, value: int) -> None:
        if msr == C.MSR_EFER:
            self._set_efer(vcpu, value)
            vcpu.dr_dirty = True
        elif msr == C.MSR_TSC:
            vcpu.tsc_offset = (value - self._tsc_now()) & _M64
        else:
            vcpu.uc.reg_write(X.UC_X86_REG_MSR, (msr, value))

    @staticmethod
    def _tsc_now() -> int:
        return time.monotonic_ns()

    def hv_vcpu_read_msr(self, vid: int, msr: int) -> int:
        vcpu = self._vcpu(vid, "hv_vcpu_read_msr")
        if not 0 <= msr <= common.MSR_LIMIT:
            raise common.bad("hv_vcpu_read_msr", f"MSR {msr:#x} out of range")
        if msr not in _KNOWN_MSRS:
            raise common.bad("hv_vcpu_read_msr", f"MSR {msr:#x} is not implemented")
        return self._get_msr(vcpu, msr)

    def hv_vcpu_write_msr(self, vid: int, msr: int, value: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_write_msr")
        if not 0 <= msr <= common.MSR_LIMIT or not 0 <= value < 1 << 64:
            raise common.bad("hv_vcpu_write_msr", f"MSR {msr:#x} / value out of range")
        if msr not in _KNOWN_MSRS:
            raise common.bad("hv_vcpu_write_msr", f"MSR {msr:#x} is not implemented")
        self._set_msr(vcpu, msr, value)

    # --- TSC and time ----------------------------------------------------------------------------

    def hv_vm_sync_tsc(self, tsc: int) -> None:
        if not 0 <= tsc < 1 << 64:
            raise common.bad("hv_vm_sync_tsc", "TSC value out of range")
        self._space0("hv_vm_sync_tsc")
        now = self._tsc_now()
        with self._lock:
            for vcpu in self._vcpus.values():
                if not vcpu.destroyed:
                    vcpu.tsc_offset = (tsc - now) & _M64

    # --- VMCS ------------------------------------------------------------------------------------

    def hv_vmx_vcpu_read_vmcs(self, vid: int, field_: int) -> int:
        vcpu = self._vcpu(vid, "hv_vmx_vcpu_read_vmcs")
        if field_ in _EXIT_FIELDS:
            return vcpu.exit.get(field_, 0)
        guest = self._guest_field(vcpu, field_, None)
        if guest is not None:
            return guest
        if field_ in vcpu.controls:
            value = vcpu.controls[field_]
            if field_ == C.VMCS_CTRL_VMENTRY_CONTROLS:
                lma = self._efer(vcpu) & C.EFER_LMA
                value = value | C.VMENTRY_GUEST_IA32E if lma else value & ~C.VMENTRY_GUEST_IA32E
            return value
        raise common.field_error("hv_vmx_vcpu_read_vmcs", field_, "emu")

    def hv_vmx_vcpu_write_vmcs(self, vid: int, field_: int, value: int) -> None:
        vcpu = self._vcpu(vid, "hv_vmx_vcpu_write_vmcs")
        if not 0 <= value < 1 << 64:
            raise common.bad("hv_vmx_vcpu_write_vmcs", "value out of range")
        if field_ == C.GDBSTUB_VMCS_MMIO_DATA:
            vcpu.exit[field_] = value
            return
        if self._guest_field(vcpu, field_, value) is not None:
            return
        if field_ == C.VMCS_GUEST_ACTIVITY_STATE:
            if value not in (0, 1, 2, 3):
                raise common.bad("hv_vmx_vcpu_write_vmcs", f"activity state {value}")
            vcpu.controls[field_] = value
            return
        if field_ in vcpu.controls:
            vcpu.controls[field_] = value
            if field_ in (C.VMCS_CTRL_EXC_BITMAP, C.VMCS_CTRL_CPU_BASED):
                vcpu.dr_dirty = True
            return
        raise common.field_error("hv_vmx_vcpu_write_vmcs", field_, "emu")

    def _guest_field(self, vcpu: _Vcpu, field_: int, value: int | None) -> int | None:
        """Read (value None) or write a guest-state field; None if ``field_`` is not one."""
        if field_ in _MSR_FIELDS:
            if value is None:
                return self._get_msr(vcpu, _MSR_FIELDS[field_])
            self._set_msr(vcpu, _MSR_FIELDS[field_], value)
            return value
        simple = {
            C.VMCS_GUEST_RIP: C.HV_X86_RIP,
            C.VMCS_GUEST_RSP: C.HV_X86_RSP,
            C.VMCS_GUEST_RFLAGS: C.HV_X86_RFLAGS,
            C.VMCS_GUEST_CR0: C.HV_X86_CR0,
            C.VMCS_GUEST_CR3: C.HV_X86_CR3,
            C.VMCS_GUEST_CR4: C.HV_X86_CR4,
            C.VMCS_GUEST_DR7: C.HV_X86_DR7,
            C.VMCS_GUEST_GDTR_BASE: C.HV_X86_GDT_BASE,
            C.VMCS_GUEST_GDTR_LIMIT: C.HV_X86_GDT_LIMIT,
            C.VMCS_GUEST_IDTR_BASE: C.HV_X86_IDT_BASE,
            C.VMCS_GUEST_IDTR_LIMIT: C.HV_X86_IDT_LIMIT,
        }
        if field_ in simple:
            if value is None:
                return self._read_register(vcpu, simple[field_])
            if field_ in (C.VMCS_GUEST_GDTR_LIMIT, C.VMCS_GUEST_IDTR_LIMIT):
                value &= 0xFFFF
            self._write_register(vcpu, simple[field_], value)
            return value
        for kind, first in (
            ("selector", C.VMCS_GUEST_ES),
            ("limit", C.VMCS_GUEST_ES_LIMIT),
            ("ar", C.VMCS_GUEST_ES_AR),
            ("base", C.VMCS_GUEST_ES_BASE),
        ):
            if first <= field_ < first + 16 and not (field_ - first) % 2:
                index = (field_ - first) // 2
                selector, base, limit, ar = self._seg(vcpu, index)
                if value is None:
                    return {"selector": selector, "limit": limit, "ar": ar, "base": base}[kind]
                width = {"selector": 0xFFFF, "limit": 0xFFFFFFFF, "ar": 0x1F0FF}.get(kind, _M64)
                value &= width
                parts: list[int | None] = [None, None, None, None]
                parts[("selector", "base", "limit", "ar").index(kind)] = value
                self._patch(vcpu, segs={index: (parts[0], parts[1], parts[2], parts[3])})
                return value
        return None

    # --- hooks -----------------------------------------------------------------------------------

    def _install_hooks(self, vcpu: _Vcpu) -> None:
        uc = vcpu.uc

        scanned = vcpu.scanned

        def on_block(uc_: Any, address: int, size: int, _data: Any) -> None:
            if (address, size) not in scanned:  # else translated before its span was cut
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

        vcpu.block_hooks = _BlockHooks(uc, on_block)
        uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
        uc.hook_add(unicorn.UC_HOOK_INSN_INVALID, on_invalid_insn)
        uc.hook_add(unicorn.UC_HOOK_MEM_INVALID, on_bad_memory)

    def _scan_block(self, vcpu: _Vcpu, address: int, size: int) -> None:
        key = (address, size)
        if key in vcpu.scanned:
            return
        vcpu.scanned.add(key)
        insns, end, complete = self._decode_block(vcpu, address, size)
        # The guest-physical pages under the code, watched for host writes.
        spans: list[tuple[_CodePage, int, int, int]] = []  # (page, linear start, lo, hi)
        linear = address
        while linear < end:
            stop = min(end, (linear | 0xFFF) + 1)
            gpa = self._translate(vcpu, linear & _M64)
            if gpa is not None:
                page = self._code_page(vcpu, gpa & ~0xFFF)
                if page is not None:
                    lo = linear & 0xFFF
                    page.blocks[key] = (lo, lo + stop - linear)
                    spans.append((page, linear, lo, lo + stop - linear))
            linear = stop
        found = False
        for insn in insns:
            kind = _SITE_KINDS.get(insn.id)
            if kind is None:
                continue
            for page, start, lo, hi in spans:
                first = lo + insn.address - start
                if lo <= first < hi:
                    page.sites[insn.address] = (first, first + insn.size)
            if insn.address not in vcpu.sites:
                vcpu.new_sites[insn.address] = kind
                found = True
        shared = self._shared_code(vcpu, address) if complete else None
        if shared is not None:
            vcpu.spans[key] = (address, end)
            vcpu.uncut.append((address, end))
            if shared == "unpaged":
                vcpu.unpaged_spans.add(key)
        if found or shared is not None:
            vcpu.uc.emu_stop()  # sites and block hooks change outside emulation

    def _shared_code(self, vcpu: _Vcpu, address: int) -> str | None:
        """Whether code at guest-linear ``address`` is the code there in every address space,
        so that its span may leave the block hooks: "unpaged" (paging is off; such spans are
        forgotten when paging comes on) or "kernel" (the upper half of a long-mode address
        space, shared by every process). None for anything else: a process's code is
        scanned block by block as it is translated, so that another process at the same
        address gets scanned too."""
        if not vcpu.uc.reg_read(X.UC_X86_REG_CR0) & 1 << 31:
            return "unpaged"
        if self._cpu_bits(vcpu) == 64 and address >= 1 << 63:
            return "kernel"
        return None

    def _decode_block(self, vcpu: _Vcpu, address: int, size: int) -> tuple[list[Any], int, bool]:
        """The instructions of the block unicorn translated at ``address`` (``size`` bytes),
        and on to where any block starting in it ends: the first control transfer or the end
        of readable code. ``(instructions, end, complete)``; not complete when the code runs
        on past the longest block or stops decoding (capstone and QEMU may disagree there):
        then the span stays under the block hooks and each of its blocks is scanned as it
        is translated, as everywhere before scanning.

        Decoded a piece at a time (capstone decodes all it is given at once): the block
        unicorn reported, which normally ends in a control transfer, then 64 bytes at a time."""
        md = _disassembler(self._cpu_bits(vcpu))
        insns: list[Any] = []
        end, limit = address, address + _BLOCK_BYTES
        want = max(size, 1) + 15
        while end < limit:
            start = end
            code = self._read_linear(vcpu, start, min(want, limit - start))
            for insn in md.disasm(code, start):
                insns.append(insn)
                end = insn.address + insn.size
                if insn.id in _BLOCK_ENDS and end >= address + size:
                    return insns, end, True
            if end == start:  # nothing decoded: unreadable here, or bytes capstone rejects
                break
            want = 64
        complete = end < limit and not self._read_linear(vcpu, end, 1)  # readable code ended
        return insns, max(end, address + max(size, 1)), complete

    def _code_page(self, vcpu: _Vcpu, gpa: int) -> _CodePage | None:
        page = vcpu.code.get(gpa)
        if page is None:
            view = self._page_view(vcpu.space, gpa)
            if view is None:
                return None
            page = vcpu.code[gpa] = _CodePage(view, bytes(view))
            vcpu.code_runs = None
        return page

    def _page_view(self, space: _Space, gpa: int) -> memoryview | None:
        region = common.region_at(space.regions, gpa)
        if region is None:
            return None
        array = (ctypes.c_char * PAGE).from_address(region.uva + (gpa - region.gpa))
        return memoryview(array).cast("B")

    def _code_runs(self, vcpu: _Vcpu) -> list[_CodeRun]:
        """The watched pages as runs contiguous in guest and host memory."""
        groups: list[tuple[int, list[int]]] = []
        runs: list[_CodeRun] = []
        for gpa in sorted(vcpu.code):
            region = common.region_at(vcpu.space.regions, gpa)
            if region is None or vcpu.code[gpa].view is None:
                runs.append(_CodeRun(0, None, b"", [gpa]))
                continue
            uva = region.uva + (gpa - region.gpa)
            if groups:
                start, pages = groups[-1]
                if pages[-1] + PAGE == gpa and start + PAGE * len(pages) == uva:
                    pages.append(gpa)
                    continue
            groups.append((uva, [gpa]))
        for start, pages in groups:
            array = (ctypes.c_char * (PAGE * len(pages))).from_address(start)
            saved = b"".join(vcpu.code[gpa].saved for gpa in pages)
            runs.append(_CodeRun(start, memoryview(array).cast("B"), saved, pages))
        return runs

    def _check_code(self, vcpu: _Vcpu) -> None:
        """See what the host wrote into scanned code since the last entry (the VMM and the
        debugger write guest RAM through their own buffers, behind unicorn's back): forget the
        scans and instruction sites of the changed bytes and drop the translated blocks.

        Per entry: one compare per run of contiguous watched pages (about 1 us, plus 0.2 us a
        page); a changed page is diffed, so that data written next to code costs no
        retranslation."""
        if vcpu.code_runs is None:
            vcpu.code_runs = self._code_runs(vcpu)
        suspects = [gpa for run in vcpu.code_runs if run.changed() for gpa in run.pages]
        if not suspects:
            return
        vcpu.code_runs = None
        stale = False
        for gpa in suspects:
            page = vcpu.code[gpa]
            if page.view is None:
                current = b""
            else:
                current = bytes(page.view)
                if current == page.saved:
                    continue
            changed = _changed_spans(page.saved, current)
            page.saved = current
            for key, (lo, hi) in list(page.blocks.items()):
                if any(a < hi and lo < b for a, b in changed):
                    del page.blocks[key]
                    vcpu.scanned.discard(key)
                    span = vcpu.spans.pop(key, None)
                    if span is not None:
                        vcpu.forgotten.append(span)
                    stale = True
            for address, (lo, hi) in list(page.sites.items()):
                if any(a < hi and lo < b for a, b in changed):
                    del page.sites[address]
                    vcpu.sites.pop(address, None)
                    hook = vcpu.site_hooks.pop(address, None)
                    if hook is not None:
                        vcpu.uc.hook_del(hook)
                    stale = True
            if page.view is None or not page.blocks:
                del vcpu.code[gpa]
        if stale:
            vcpu.uc.ctl_flush_tb()

    def _add_sites(self, vcpu: _Vcpu) -> None:
        uc = vcpu.uc
        for address, kind in vcpu.new_sites.items():
            vcpu.sites[address] = kind

            def on_site(uc_: Any, addr: int, size: int, _data: Any, kind: str = kind) -> None:
                self._on_site(vcpu, addr, kind)

            vcpu.site_hooks[address] = uc.hook_add(
                unicorn.UC_HOOK_CODE, on_site, None, address, address
            )
            uc.ctl_remove_cache(address, address + 1)
        vcpu.new_sites.clear()

    def _stop(self, vcpu: _Vcpu, reason: int, **fields: int) -> None:
        self._set_exit(vcpu, reason, **fields)
        vcpu.uc.emu_stop()

    def _on_site(self, vcpu: _Vcpu, address: int, kind: str) -> None:
        if vcpu.exit_recorded:  # type: ignore[attr-defined]
            return
        uc = vcpu.uc
        if kind in _SITE_OPCODES and not self._site_intact(vcpu, address, kind):
            return  # rewritten by the guest since the scan (I/O is decoded again below)
        if kind == "io":
            self._exit_io(vcpu, address)
        elif kind == "hlt":
            if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_HLT:
                self._stop(vcpu, C.VMX_REASON_HLT, length=1)
            else:
                vcpu.halted = True  # type: ignore[attr-defined]
                uc.emu_stop()
        elif kind in ("rdmsr", "wrmsr"):
            msr = uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF
            bit = C.HV_MSR_WRITE if kind == "wrmsr" else C.HV_MSR_READ
            if not vcpu.msr.access.get(msr, 0) & bit:
                reason = C.VMX_REASON_WRMSR if kind == "wrmsr" else C.VMX_REASON_RDMSR
                self._stop(vcpu, reason, length=2)
            elif msr in (C.MSR_EFER, C.MSR_TSC):
                # emulated here: unicorn's own handling would miss our EFER/TSC model
                vcpu.emulate_msr = kind  # type: ignore[attr-defined]
                uc.emu_stop()
        elif kind == "cpuid":
            self._stop(vcpu, C.VMX_REASON_CPUID, length=2)

    def _site_intact(self, vcpu: _Vcpu, address: int, kind: str) -> bool:
        code = self._read_linear(vcpu, address, 6)
        i = 0
        while i < min(len(code), 4) and (code[i] in common.PREFIXES or 0x40 <= code[i] <= 0x4F):
            i += 1
        return any(code.startswith(op, i) for op in _SITE_OPCODES[kind])

    def _exit_io(self, vcpu: _Vcpu, address: int) -> None:
        uc = vcpu.uc
        code = self._read_linear(vcpu, address, 15)
        length, op, imm = common.decode_io(code)
        if op is None:
            return
        port = imm if op in common.IMM_OPCODES else uc.reg_read(X.UC_X86_REG_RDX) & 0xFFFF
        prefixes = code[: length - 1]
        if op in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E):
            opsize = 1
        elif self._cpu_bits(vcpu) == 16:
            opsize = 4 if 0x66 in prefixes else 2
        else:
            opsize = 2 if 0x66 in prefixes else 4
        qual = (opsize - 1) | port << C.EXIT_QUAL_IO_PORT_SHIFT
        if op in common.IN_OPCODES:
            qual |= C.EXIT_QUAL_IO_IN
        if op in _STRING_IO:
            qual |= C.EXIT_QUAL_IO_STRING
            if any(b in (0xF2, 0xF3) for b in code[: length - 1]):
                qual |= C.EXIT_QUAL_IO_REP
        self._stop(vcpu, C.VMX_REASON_IO, qual=qual, length=length)
        vcpu.exit[C.VMCS_RO_IO_RCX] = int(uc.reg_read(X.UC_X86_REG_RCX))
        vcpu.exit[C.VMCS_RO_IO_RSI] = int(uc.reg_read(X.UC_X86_REG_RSI))
        vcpu.exit[C.VMCS_RO_IO_RDI] = int(uc.reg_read(X.UC_X86_REG_RDI))
        vcpu.exit[C.VMCS_RO_IO_RIP] = int(uc.reg_read(X.UC_X86_REG_RIP))

    def _on_interrupt(self, vcpu: _Vcpu, intno: int) -> None:
        """A fault, trap or INT n raised by unicorn: remember it; the run loop decides."""
        linear = self._linear_rip(vcpu)
        before = self._read_linear(vcpu, (linear - 2) & _M64, 2)
        kind = C.IRQ_INFO_HARD_EXC
        if (intno, before[-1:]) in ((C.IDT_BP, b"\xcc"), (C.IDT_OF, b"\xce")):
            kind = C.IRQ_INFO_SOFT_EXC
        elif intno == C.IDT_DB and before[-1:] == b"\xf1":
            kind = C.IRQ_INFO_PRIV_SOFT_EXC
        elif len(before) == 2 and before[0] == 0xCD and before[1] == intno:
            kind = C.IRQ_INFO_SOFT_IRQ
        error: int | None = None
        if kind == C.IRQ_INFO_HARD_EXC and intno in _ERROR_CODE_VECTORS:
            error = 0
            if intno == C.IDT_PF:
                cr2 = vcpu.uc.reg_read(X.UC_X86_REG_CR2)
                error = 1 if self._translate(vcpu, cr2) is not None else 0
        vcpu.pending_event = (intno, kind, error)
        vcpu.uc.emu_stop()

    # --- debug registers -------------------------------------------------------------------------

    def _apply_debug(self, vcpu: _Vcpu) -> None:
        """Turn DR0-DR3/DR7 into code hooks (execution) and protected pages (data)."""
        uc = vcpu.uc
        vcpu.dr_dirty = False
        dr7 = uc.reg_read(X.UC_X86_REG_DR7)
        exec_bps: dict[int, int] = {}
        watch: list[tuple[int, int, int, bool]] = []
        pages: dict[int, int] = {}
        for i in range(4):
            if not dr7 >> (2 * i) & 3:
                continue
            address = int(uc.reg_read(X.UC_X86_REG_DR0 + i))
            rw = dr7 >> (16 + 4 * i) & 3
            length = {0: 1, 1: 2, 2: 8, 3: 4}[dr7 >> (18 + 4 * i) & 3]
            if rw == 0:
                exec_bps[address] = exec_bps.get(address, 0) | 1 << i
            elif rw in (1, 3):
                lo = address & ~(length - 1)
                watch.append((1 << i, lo, lo + length, rw == 3))
                for linear in {lo & ~0xFFF, (lo + length - 1) & ~0xFFF}:
                    gpa = self._translate(vcpu, linear)
                    if gpa is not None:
                        remove = unicorn.UC_PROT_WRITE
                        if rw == 3:
                            remove |= unicorn.UC_PROT_READ
                        pages[gpa & ~0xFFF] = pages.get(gpa & ~0xFFF, 0) | remove
        for address in [a for a in vcpu.dr_exec_hooks if a not in exec_bps]:
            uc.hook_del(vcpu.dr_exec_hooks.pop(address))
            uc.ctl_remove_cache(address, address + 1)
        for address in exec_bps:
            if address not in vcpu.dr_exec_hooks:

                def on_exec(uc_: Any, addr: int, size: int, _data: Any) -> None:
                    self._on_exec_breakpoint(vcpu, addr)

                vcpu.dr_exec_hooks[address] = uc.hook_add(
                    unicorn.UC_HOOK_CODE, on_exec, None, address, address
                )
                uc.ctl_remove_cache(address, address + 1)
        vcpu.dr_exec = exec_bps
        vcpu.watch = watch
        if pages != vcpu.watch_pages:
            vcpu.watch_pages = pages
            self._remap(vcpu)

    def _on_exec_breakpoint(self, vcpu: _Vcpu, address: int) -> None:
        if vcpu.exit_recorded or vcpu.pending_event is not None:  # type: ignore[attr-defined]
            return
        if vcpu.skip_rip == address:
            vcpu.skip_rip = None
            return
        bits = vcpu.dr_exec.get(address, 0)
        if not bits:
            return
        if vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & (1 << C.IDT_DB):
            self._stop(
                vcpu,
                C.VMX_REASON_EXC_NMI,
                qual=bits,
                irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | C.IDT_DB,
            )
        else:
            self._set_dr6(vcpu, bits)
            vcpu.pending_event = (C.IDT_DB, C.IRQ_INFO_HARD_EXC, None)
            vcpu.uc.emu_stop()

    def _set_dr6(self, vcpu: _Vcpu, bits: int) -> None:
        dr6 = vcpu.uc.reg_read(X.UC_X86_REG_DR6)
        vcpu.uc.reg_write(X.UC_X86_REG_DR6, (dr6 & ~0x400F) | bits | 0xFFFF0FF0)

    # --- running ---------------------------------------------------------------------------------

    def hv_vcpu_interrupt(self, vids: list[int]) -> None:
        for vcpu in self._kick_targets(vids):
            # emu_stop is lost if emu_start has not begun yet: repeat until the owner noticed.
            for _ in range(2000):
                with vcpu.lock:
                    if not vcpu.running or not vcpu.kick.is_set() or vcpu.uc is None:
                        break
                    vcpu.uc.emu_stop()
                time.sleep(0.0005)

    def hv_vcpu_run(self, vid: int) -> None:
        self._run(self._vcpu(vid, "hv_vcpu_run"), None, any_exit=True)

    def hv_vcpu_run_until(self, vid: int, deadline: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_run_until")
        if not 0 <= deadline <= _FOREVER:
            raise common.bad("hv_vcpu_run_until", "deadline out of range")
        self._run(vcpu, None if deadline == _FOREVER else deadline, any_exit=False)

    def _set_exit(self, vcpu: _Vcpu, reason: int, **fields: int) -> None:
        vcpu.exit = common.exit_fields(reason, **fields)
        vcpu.exit_recorded = True  # type: ignore[attr-defined]

    def _run(self, vcpu: _Vcpu, deadline: int | None, *, any_exit: bool) -> None:
        vcpu.exit_recorded = False  # type: ignore[attr-defined]
        if vcpu.kick.is_set():
            vcpu.kick.clear()
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
            return
        if deadline is not None and time.monotonic_ns() >= deadline:
            self._set_exit(vcpu, C.VMX_REASON_VMX_TIMER_EXPIRED)
            return
        if getattr(vcpu, "uc_dirty_memory", False):
            self._remap(vcpu)
        if vcpu.code:
            self._check_code(vcpu)
        if vcpu.unpaged_spans and vcpu.uc.reg_read(X.UC_X86_REG_CR0) & 1 << 31:
            self._forget_unpaged(vcpu)
        try:
            self._inject_entry_event(vcpu)
            while True:
                if vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] == C.GUEST_ACTIVITY_HLT:
                    self._halt_wait(vcpu, deadline)
                    return
                if self._enter(vcpu, deadline, any_exit):
                    return
        except _Exit:
            return

    def _halt_wait(self, vcpu: _Vcpu, deadline: int | None) -> None:
        timeout = None if deadline is None else max(0.0, (deadline - time.monotonic_ns()) / 1e9)
        if vcpu.kick.wait(timeout):
            vcpu.kick.clear()
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
        else:
            self._set_exit(vcpu, C.VMX_REASON_VMX_TIMER_EXPIRED)

    def _inject_entry_event(self, vcpu: _Vcpu) -> None:
        info = vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO]
        if not info & C.IRQ_INFO_VALID:
            return
        vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO] = info & ~C.IRQ_INFO_VALID
        vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] = C.GUEST_ACTIVITY_ACTIVE
        vector, kind = info & 0xFF, info & C.IRQ_INFO_TYPE_MASK
        error = (
            vcpu.controls[C.VMCS_CTRL_VMENTRY_EXC_ERROR] & 0xFFFFFFFF
            if info & C.IRQ_INFO_ERROR_VALID
            else None
        )
        rip = vcpu.uc.reg_read(X.UC_X86_REG_RIP)
        if kind in (C.IRQ_INFO_SOFT_EXC, C.IRQ_INFO_SOFT_IRQ, C.IRQ_INFO_PRIV_SOFT_EXC):
            rip += vcpu.controls[C.VMCS_CTRL_VMENTRY_INSTR_LEN]
        self._deliver_or_fault(vcpu, vector, kind, error, rip & _M64)

    def _deliver_or_fault(
        self, vcpu: _Vcpu, vector: int, kind: int, error: int | None, rip: int
    ) -> None:
        """Deliver an event through the guest IDT; escalate to #DF and a triple fault (exit 2)."""
        try:
            self._deliver(vcpu, vector, kind, error, rip)
            return
        except _Guard:
            pass
        if vector != C.IDT_DF and kind == C.IRQ_INFO_HARD_EXC:
            try:
                self._deliver(vcpu, C.IDT_DF, C.IRQ_INFO_HARD_EXC, 0, rip)
                return
            except _Guard:
                pass
        vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] = C.GUEST_ACTIVITY_SHUTDOWN
        self._set_exit(vcpu, C.VMX_REASON_TRIPLE_FAULT)
        raise _Exit

    def _deliver(self, vcpu: _Vcpu, vector: int, kind: int, error: int | None, rip: int) -> None:
        uc = vcpu.uc
        idt_base, idt_limit = self._table(vcpu, 1)
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        rflags = uc.reg_read(X.UC_X86_REG_RFLAGS) & 0xFFFFFFFF
        if kind == C.IRQ_INFO_HARD_EXC and vector not in _ERROR_CODE_VECTORS:
            error = None
        if not cr0 & 1:  # real mode: IVT
            if vector * 4 + 3 > idt_limit:
                raise _Guard("IVT entry beyond the limit")
            offset, segment = struct.unpack(
                "<HH", self._read_linear(vcpu, idt_base + vector * 4, 4)
            )
            ss_base = self._seg(vcpu, 2)[1]
            sp = uc.reg_read(X.UC_X86_REG_RSP) & 0xFFFF
            cs = self._seg(vcpu, 1)[0]
            frame = struct.pack("<HHH", rip & 0xFFFF, cs, rflags & 0xFFFF)
            sp = (sp - 6) & 0xFFFF
            self._write_linear(vcpu, ss_base + sp, frame)
            uc.reg_write(X.UC_X86_REG_RSP, sp)
            uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~0x40300)
            self._patch(vcpu, segs={1: (segment, segment << 4, 0xFFFF, None)})
            uc.reg_write(X.UC_X86_REG_RIP, offset)
            return
        long_mode = bool(self._efer(vcpu) & C.EFER_LMA)
        size = 16 if long_mode else 8
        if vector * size + size - 1 > idt_limit:
            raise _Guard("IDT entry beyond the limit")
        gate = self._read_linear(vcpu, idt_base + vector * size, size)
        if len(gate) != size:
            raise _Guard("IDT not mapped")
        low, selector, ist, type_attr, mid = struct.unpack_from("<HHBBH", gate)
        if not type_attr & 0x80 or (type_attr & 0xF) not in (0xE, 0xF):
            raise _Guard("not a present interrupt or trap gate")
        offset = low | mid << 16
        if long_mode:
            offset |= struct.unpack_from("<I", gate, 8)[0] << 32
        code_desc = self._descriptor(vcpu, selector)
        rsp = uc.reg_read(X.UC_X86_REG_RSP)
        cs = self._seg(vcpu, 1)[0]
        if long_mode:
            ss = self._seg(vcpu, 2)[0]
            new_rsp = rsp
            if ist & 7:
                tss = self._seg(vcpu, 7)[1]
                data = self._read_linear(vcpu, tss + 0x24 + 8 * ((ist & 7) - 1), 8)
                if len(data) != 8:
                    raise _Guard("TSS not mapped")
                new_rsp = struct.unpack("<Q", data)[0]
            new_rsp &= ~0xF
            values = [ss, rsp, rflags, cs, rip] + ([error] if error is not None else [])
            frame = b"".join(struct.pack("<Q", v & _M64) for v in reversed(values))
            new_rsp = (new_rsp - len(frame)) & _M64
            self._write_linear(vcpu, new_rsp, frame)
        else:
            ss_base = self._seg(vcpu, 2)[1]
            values = [rflags, cs, rip] + ([error] if error is not None else [])
            frame = b"".join(struct.pack("<I", v & 0xFFFFFFFF) for v in reversed(values))
            new_rsp = (rsp - len(frame)) & 0xFFFFFFFF
            self._write_linear(vcpu, (ss_base + new_rsp) & 0xFFFFFFFF, frame)
        uc.reg_write(X.UC_X86_REG_RSP, new_rsp)
        mask = 0x14100 | (0x200 if type_attr & 0xF == 0xE else 0)  # TF, NT, RF (+IF)
        uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~mask)
        base, limit, flags = code_desc
        self._patch(vcpu, segs={1: (selector, base, limit, None)}, raw_flags={1: flags})
        uc.reg_write(X.UC_X86_REG_RIP, offset)

    def _descriptor(self, vcpu: _Vcpu, selector: int) -> tuple[int, int, int]:
        """(base, limit, QEMU flags) of the GDT descriptor ``selector`` names."""
        gdt_base, gdt_limit = self._table(vcpu, 0)
        index = selector & ~7
        if selector & 4 or index == 0 or index + 7 > gdt_limit:
            raise _Guard(f"bad code selector 0x{selector:x}")
        data = self._read_linear(vcpu, gdt_base + index, 8)
        if len(data) != 8:
            raise _Guard("GDT not mapped")
        e1, e2 = struct.unpack("<II", data)
        if not e2 & _DESC_P:
            raise _Guard("code segment not present")
        base = (e1 >> 16) | (e2 & 0xFF) << 16 | (e2 & 0xFF000000)
        limit = (e1 & 0xFFFF) | (e2 & 0xF0000)
        if e2 & (1 << 23):
            limit = limit << 12 | 0xFFF
        return base, limit, e2

    def _enter(self, vcpu: _Vcpu, deadline: int | None, any_exit: bool) -> bool:
        """One emu_start; True when an exit for the caller has been recorded."""
        uc = vcpu.uc
        if vcpu.uncut or vcpu.forgotten:
            self._cut_scanned(vcpu)
        if vcpu.dr_dirty:
            self._apply_debug(vcpu)
        rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
        if rflags & (1 << 16):  # RF: the execution breakpoint at RIP does not fire once
            vcpu.skip_rip = self._linear_rip(vcpu)
            uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~(1 << 16))
        stepping = bool(vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_MTF)
        window = bool(vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_IRQ_WND)
        sti = False
        blocking = C.GUEST_INTRBILITY_STI_BLOCKING | C.GUEST_INTRBILITY_MOVSS_BLOCKING
        if window:
            # interrupt-window exiting: exit before the first instruction at which the guest
            # can take an interrupt (IF set, no STI/MOV SS shadow); until then, one instruction
            # at a time, so that the moment IF opens is seen
            if rflags & 0x200 and not vcpu.controls[C.VMCS_GUEST_INTERRUPTIBILITY] & blocking:
                self._set_exit(vcpu, C.VMX_REASON_IRQ_WND)
                return True
            sti = self._read_linear(vcpu, self._linear_rip(vcpu), 1) == b"\xfb"
        timeout_us = 0
        if deadline is not None:
            timeout_us = max(1, (deadline - time.monotonic_ns()) // 1000)
        vcpu.pending_event = None
        vcpu.mem_fault = None
        vcpu.halted = False  # type: ignore[attr-defined]
        vcpu.emulate_msr = None  # type: ignore[attr-defined]
        start_rip = int(uc.reg_read(X.UC_X86_REG_RIP))
        self._step_mode(vcpu, stepping or window)
        error: Any = None
        with vcpu.lock:
            if vcpu.kick.is_set():
                vcpu.kick.clear()
                self._set_exit(vcpu, C.VMX_REASON_IRQ)
                return True
            vcpu.running = True
        start = time.thread_time_ns()
        try:
            uc.emu_start(start_rip, _UNTIL, timeout_us, 1 if stepping or window else 0)
        except unicorn.UcError as exc:
            error = exc
        finally:
            vcpu.exec_ns += time.thread_time_ns() - start
            with vcpu.lock:
                vcpu.running = False
        vcpu.skip_rip = None
        if window:  # one instruction ran (or none): the STI shadow covers the next one only
            moved = int(uc.reg_read(X.UC_X86_REG_RIP)) != start_rip
            vcpu.controls[C.VMCS_GUEST_INTERRUPTIBILITY] &= ~blocking
            if sti and moved and not rflags & 0x200:
                vcpu.controls[C.VMCS_GUEST_INTERRUPTIBILITY] |= C.GUEST_INTRBILITY_STI_BLOCKING
        if vcpu.exit_recorded:  # type: ignore[attr-defined]
            return True
        if vcpu.new_sites:
            self._add_sites(vcpu)
            return False
        if vcpu.emulate_msr:  # type: ignore[attr-defined]
            self._emulate_msr(vcpu)
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
        if vcpu.halted:  # type: ignore[attr-defined]
            uc.reg_write(X.UC_X86_REG_RIP, uc.reg_read(X.UC_X86_REG_RIP) + 1)
            vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] = C.GUEST_ACTIVITY_HLT
            return False
        if vcpu.uncut and (
            not (stepping or window) or int(uc.reg_read(X.UC_X86_REG_RIP)) == start_rip
        ):
            return False  # stopped to take newly scanned code out of the block hooks
        if self._lost_invalid_opcode(vcpu, start_rip, stepping or window, deadline):
            vcpu.pending_event = (C.IDT_UD, C.IRQ_INFO_HARD_EXC, None)
            return self._exception(vcpu)
        return self._after_instruction(vcpu, stepping, deadline, any_exit)

    @staticmethod
    def _forget_unpaged(vcpu: _Vcpu) -> None:
        """Paging is on: code scanned with paging off is scanned again where it runs now
        (linear addresses mean other memory from here on)."""
        for key in vcpu.unpaged_spans:
            span = vcpu.spans.pop(key, None)
            if span is not None:
                vcpu.forgotten.append(span)
            vcpu.scanned.discard(key)
        vcpu.unpaged_spans.clear()
        vcpu.uc.ctl_flush_tb()

    @staticmethod
    def _cut_scanned(vcpu: _Vcpu) -> None:
        """Update the block hooks: hook forgotten code again, cut out newly scanned spans (the
        translations were flushed when code was forgotten)."""
        hooks = vcpu.block_hooks
        assert hooks is not None
        if vcpu.forgotten:
            for lo, hi in vcpu.forgotten:
                still = [(a, b) for a, b in vcpu.spans.values() if a < hi and lo < b]
                hooks.uncover(lo, hi, still)
            vcpu.forgotten.clear()
        live = set(vcpu.spans.values())
        for span in vcpu.uncut:
            if span in live:
                hooks.cut(*span)
        vcpu.uncut.clear()

    def _lost_invalid_opcode(
        self, vcpu: _Vcpu, start_rip: int, stepping: bool, deadline: int | None
    ) -> bool:
        """unicorn (2.1) drops the #UD of an invalid opcode once any code hook exists: emu_start
        returns with RIP still at the instruction and no event. Free-running, returning without
        progress and without a kick or a deadline means exactly that; single-stepping (where
        ``jmp $`` stays put too), the bytes at RIP must be UD0/UD1/UD2 or not decode."""
        if int(vcpu.uc.reg_read(X.UC_X86_REG_RIP)) != start_rip or vcpu.kick.is_set():
            return False
        if deadline is not None and time.monotonic_ns() >= deadline - 2_000_000:
            return False
        if not stepping:
            return True
        linear = self._linear_rip(vcpu)
        code = self._read_linear(vcpu, linear, 15)
        insn = next(iter(_disassembler(self._cpu_bits(vcpu)).disasm(code, linear, 1)), None)
        return insn is None or insn.id in _UD_IDS

    @staticmethod
    def _step_mode(vcpu: _Vcpu, stepping: bool) -> None:
        """unicorn counts instructions only in blocks translated while counting: retranslate."""
        if vcpu.stepping != stepping:
            vcpu.stepping = stepping
            vcpu.uc.ctl_flush_tb()

    def _after_instruction(
        self, vcpu: _Vcpu, stepping: bool, deadline: int | None, any_exit: bool
    ) -> bool:
        if vcpu.kick.is_set():
            vcpu.kick.clear()
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
            return True
        if stepping:
            self._set_exit(vcpu, C.VMX_REASON_MTF)
            return True
        return self._end_without_exit(vcpu, deadline, any_exit)

    def _emulate_msr(self, vcpu: _Vcpu) -> None:
        uc = vcpu.uc
        msr = uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF
        if vcpu.emulate_msr == "wrmsr":  # type: ignore[attr-defined]
            value = (uc.reg_read(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32
            self._set_msr(vcpu, msr, value | (uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF))
        else:
            value = self._get_msr(vcpu, msr)
            uc.reg_write(X.UC_X86_REG_RAX, value & 0xFFFFFFFF)
            uc.reg_write(X.UC_X86_REG_RDX, value >> 32)
        uc.reg_write(X.UC_X86_REG_RIP, uc.reg_read(X.UC_X86_REG_RIP) + 2)

    def _exception(self, vcpu: _Vcpu) -> bool:
        assert vcpu.pending_event is not None
        vector, kind, error = vcpu.pending_event
        vcpu.pending_event = None
        uc = vcpu.uc
        bitmap = vcpu.controls[C.VMCS_CTRL_EXC_BITMAP]
        if kind != C.IRQ_INFO_SOFT_IRQ and bitmap & (1 << vector):
            fields: dict[int, int] = {}
            length = 0
            rip = int(uc.reg_read(X.UC_X86_REG_RIP))
            if kind in (C.IRQ_INFO_SOFT_EXC, C.IRQ_INFO_PRIV_SOFT_EXC):
                length = 1
                uc.reg_write(X.UC_X86_REG_RIP, (rip - 1) & _M64)  # the framework: RIP at INT3
            info = C.IRQ_INFO_VALID | kind | vector
            if error is not None:
                info |= C.IRQ_INFO_ERROR_VALID
                fields[C.VMCS_RO_VMEXIT_IRQ_ERROR] = error
            qual = 0
            if vector == C.IDT_PF:
                qual = int(uc.reg_read(X.UC_X86_REG_CR2))
            elif vector == C.IDT_DB:
                qual = int(uc.reg_read(X.UC_X86_REG_DR6)) & (0xF | C.DR6_BD | C.DR6_BS)
            self._set_exit(vcpu, C.VMX_REASON_EXC_NMI, irq_info=info, length=length, qual=qual)
            vcpu.exit.update(fields)
            return True
        rip = int(uc.reg_read(X.UC_X86_REG_RIP))
        self._deliver_or_fault(vcpu, vector, kind, error, rip)
        return False

    def _memory_fault(
        self, vcpu: _Vcpu, stepping: bool, deadline: int | None, any_exit: bool
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
        perm = region.flags if region is not None else 0
        qual = (
            C.EPT_VIOLATION_DATA_WRITE
            if write
            else C.EPT_VIOLATION_INST_FETCH
            if fetch
            else C.EPT_VIOLATION_DATA_READ
        )
        qual |= common.ept_permission_bits(perm)
        self._set_exit(vcpu, C.VMX_REASON_EPT_VIOLATION, qual=qual, gpa=gpa)
        vcpu.exit[C.GDBSTUB_VMCS_MMIO_DECODED] = 0
        vcpu.exit[C.GDBSTUB_VMCS_MMIO_SIZE] = 0
        vcpu.exit[C.GDBSTUB_VMCS_MMIO_DATA] = 0
        return True

    def _watch_step(
        self,
        vcpu: _Vcpu,
        page: int,
        address: int,
        size: int,
        write: bool,
        stepping: bool,
        deadline: int | None,
        any_exit: bool,
    ) -> bool:
        """An access to a watched page: run the instruction with the page open, then check."""
        uc = vcpu.uc
        found = common.region_at(vcpu.space.regions, page)
        assert found is not None
        region = found
        linear = self._access_linear(vcpu, address)
        uc.mem_protect(page, PAGE, self._uc_perms(region.flags))
        _flush_tlb(uc)
        rip = int(uc.reg_read(X.UC_X86_REG_RIP))
        try:
            self._step_mode(vcpu, True)
            uc.emu_start(rip, _UNTIL, 0, 1)
        except unicorn.UcError:
            pass
        finally:
            uc.mem_protect(page, PAGE, self._uc_perms(region.flags) & ~vcpu.watch_pages[page])
            _flush_tlb(uc)
        if vcpu.exit_recorded or vcpu.new_sites or vcpu.pending_event:  # type: ignore[attr-defined]
            if vcpu.new_sites:
                self._add_sites(vcpu)
            if vcpu.pending_event is not None:
                return self._exception(vcpu)
            return bool(vcpu.exit_recorded)  # type: ignore[attr-defined]
        hits = 0
        for bit, lo, hi, reads in vcpu.watch:
            if not (write or reads):
                continue
            for start in (address, linear):
                if start is not None and start < hi and lo < start + size:
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

    def _access_linear(self, vcpu: _Vcpu, gpa: int) -> int | None:
        """A linear address of the watch list whose page maps to ``gpa``'s page, if any."""
        for _bit, lo, _hi, _reads in vcpu.watch:
            phys = self._translate(vcpu, lo)
            if phys is not None and phys & ~0xFFF == gpa & ~0xFFF:
                return (lo & ~0xFFF) | (gpa & 0xFFF)
        return None


def _flush_tlb(uc: Any) -> None:
    """Drop unicorn's software TLB (permissions and translations are looked up again)."""
    uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)


def _changed_spans(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """The byte ranges in which two versions of a page differ (everything if one is missing)."""
    if len(old) != len(new):
        return [(0, PAGE)]
    spans: list[tuple[int, int]] = []
    for chunk in range(0, len(old), 64):
        if old[chunk : chunk + 64] == new[chunk : chunk + 64]:
            continue
        for i in range(chunk, chunk + 64):
            if old[i] != new[i]:
                if spans and spans[-1][1] == i:
                    spans[-1] = (spans[-1][0], i + 1)
                else:
                    spans.append((i, i + 1))
    return spans
