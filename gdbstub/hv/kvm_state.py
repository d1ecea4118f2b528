"""The KVM backend's books: address spaces, vCPUs and each vCPU's register cache.

Theory of operation
-------------------
A :class:`Space` is one KVM VM; a :class:`Vcpu` is a KVM vCPU plus what the framework keeps and
KVM does not: the owner thread, VMCS controls, exit fields, MSR permissions, caches.

Guest state is fetched from KVM when first needed and written back once, before the next entry
or on ``hv_vcpu_flush`` (:meth:`KvmState._get`, :meth:`KvmState._dirty`,
:meth:`KvmState._flush`): per structure (regs, sregs, debug registers, vCPU events)
``vcpu.state`` is 0 (not fetched), 1 (clean) or 2 (dirty), and every exit resets it. Where KVM
has KVM_CAP_SYNC_REGS the regs and sregs structures *are* ``kvm_run``'s sync area: KVM stores
them there at every exit and loads the ones flagged in kvm_dirty_regs at entry, so an exit
costs no ioctl and no copy (``hv_vcpu_flush`` still commits them by ioctl).

Two flags keep the common entry cheap (kvm_run): ``vcpu.kvm_rip`` is KVM's RIP while KVM's
registers equal the cache but for RIP (an I/O instruction KVM completed, rewound for the VMM),
and ``vcpu.plain_entry`` says the next entry owes KVM nothing but the dirty flags;
:meth:`KvmState._dirty` drops them where it must.

:class:`KvmState` is the first base of ``KvmBackend``; the other kvm_* modules with a base class
add to it in this order, each importing only the ones before it: kvm_state, kvm_memory,
kvm_msrs, kvm_regs, kvm_entry, kvm_emufail, kvm_exits, kvm_run (then kvm itself).
"""

from __future__ import annotations

import mmap
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from . import common, kvm_probes, vmx_rules
from . import constants as C
from . import kvm_abi as K
from .posix import ThreadTimer, ioctl

PAGE = 4096
MASK64 = (1 << 64) - 1
_pack_u64 = struct.Struct("<Q").pack_into

"""PAE page-directory-pointer entries: kept for read-back; KVM loads its own from CR3."""

_GET_REQUESTS = {
    "regs": K.KVM_GET_REGS,
    "sregs": K.KVM_GET_SREGS,
    "dregs": K.KVM_GET_DEBUGREGS,
    "events": K.KVM_GET_VCPU_EVENTS,
}


def words(regs: K.KvmRegs) -> memoryview:
    """``struct kvm_regs`` as 64-bit words (indexing is cheaper than ctypes attributes)."""
    return memoryview(regs).cast("B").cast("Q")


@dataclass
class Space:
    """A guest-physical address space: one KVM VM."""

    asid: int
    vm_fd: int
    regions: list[common.Region] = field(default_factory=list)
    slots: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    free_slot: int = 0
    filter_bitmaps: list[Any] = field(default_factory=list)
    # KVM vCPUs of vCPUs that moved to another space: KVM frees a vCPU only with its VM and
    # refuses a second one with the same id (EEXIST), so a vCPU coming back reuses its own.
    parked: dict[int, tuple[int, mmap.mmap]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IoSite:
    """What one I/O exit location decoded to, valid while ``code`` still holds ``window``
    (``code`` views guest memory through a cached translation: dropped with the translations)."""

    code: Any  # ctypes.c_char array over the guest bytes from RIP-15 to the end of the page
    window: bytes
    code2: Any  # the rest of the 30 bytes around RIP on the next page, or None
    window2: bytes
    back: int  # RIP at the exit minus the instruction's start
    completed: bool
    is_in: bool
    fields: dict[int, int]  # the exit's fields but RCX/RSI/RDI/RIP (shared: never mutated)


class _NoCode:
    raw = None  # never equal to a window: an IoSite that is not cached


NO_CODE = _NoCode()


def forget_translations(vcpu: Vcpu) -> None:
    """Drop the vCPU's cached guest-linear translations and the I/O sites that view code through
    them (the guest-physical map or the paging state changed)."""
    vcpu.xlate_cache.clear()
    vcpu.io_cache.clear()


class Vcpu:
    """Per-vCPU state: fd, kvm_run, register cache, VMCS controls, exit fields."""

    def __init__(self, vid: int, space: Space, fd: int, run: mmap.mmap) -> None:
        self.vid = vid
        self.space = space
        self.fd = fd
        self.run = run
        self.owner = threading.get_ident()
        self.destroyed = False
        self.kick = threading.Event()  # set by hv_vcpu_interrupt, cleared when reported
        self.kicked = False  # set after ``kick``: the cheap check before an entry
        self.timer: ThreadTimer | None = None
        self.exec_ns = 0
        self.regs = K.KvmRegs()
        self.sregs = K.KvmSregs()
        self.regs_q = words(self.regs)  # the same memory as 64-bit words (_GPR_INDEX)
        # KVM's RIP when KVM's regs equal the cache but for RIP (rewound to an I/O
        # instruction KVM had completed): an entry with that RIP back needs no register load
        self.kvm_rip: int | None = None
        self.dregs = K.KvmDebugregs()
        self.events = K.KvmVcpuEvents()
        # cache state per struct: 0 = not fetched, 1 = clean, 2 = dirty
        self.state = {"regs": 0, "sregs": 0, "dregs": 0, "events": 0}
        self.controls = common.initial_controls()
        self.exit: dict[int, int] = {C.VMCS_RO_EXIT_REASON: 0}
        self.guest_debug_dirty = True
        self.msr = common.MsrPermissions()
        # completion owed to KVM for the last exit: ("msr", rip) / ("in", rax) / ("mmio", 0)
        self.pending: tuple[str, int] | None = None
        self.pending_tsc: tuple[int, int] | None = None  # (tsc value, monotonic ns when set)
        self.xlate_cache: dict[tuple[int, int, int, int], int] = {}
        # exits whose instruction was located: (linear rip, kind, key) -> (code window, result)
        self.insn_cache: dict[tuple[int, str, int], tuple[bytes, tuple[int, int, bool]]] = {}
        # I/O exits at a known place: EXIT_SNAPSHOT -> IoSite
        self.io_cache: dict[tuple[int, ...], IoSite] = {}
        self.sync = False  # KVM_CAP_SYNC_REGS: regs and sregs travel in kvm_run
        self.run_address = 0
        self.io_exit_rip = 0  # RIP of the last I/O exit (VMCS_RO_IO_RIP)
        # False when something may need doing before the next entry (see _plain_entry)
        self.plain_entry = False
        self.soft: Any = None  # kvm_softcpu.SoftCpu, made at the first emulation failure
        # CR4 bits the VMM wrote that KVM refuses (VMXE): kept here, never handed to KVM
        self.cr4_kept = 0
        # the VMX entry checks (kvm_gate), None while common.entry_checks_enabled() is off
        self.gate: vmx_rules.EntryGate | None = None
        # the VMM wrote the VM-entry controls since the last entry: they read back as
        # written; otherwise as the processor leaves them at an exit (IA-32e = EFER.LMA)
        self.entry_written = False


class KvmState(common.FrameworkBooks[Space, Vcpu]):
    """The books, the register cache and exit recording (see the module docstring)."""

    _kvm: int  # /dev/kvm
    _tsc_khz: int
    _habits: dict[str, bool] | None
    _int3: bool | None

    # --- register cache ---------------------------------------------------------------------------

    def _get(self, vcpu: Vcpu, what: str) -> Any:
        obj = getattr(vcpu, what)
        if vcpu.state[what] == 0:
            ioctl(vcpu.fd, _GET_REQUESTS[what], obj)
            vcpu.state[what] = 1
        return obj

    def _dirty(self, vcpu: Vcpu, what: str) -> Any:
        obj = self._get(vcpu, what)
        vcpu.state[what] = 2
        if what == "regs":
            vcpu.kvm_rip = None
        elif what in ("dregs", "events"):
            vcpu.plain_entry = False
        return obj

    def _flush(self, vcpu: Vcpu, entering: bool = False) -> None:
        """Write back dirty cached state (once, before an entry or on hv_vcpu_flush).

        ``entering``: KVM_RUN follows at once, so with sync regs the dirty regs/sregs are
        handed over in kvm_run (KVM loads them at entry) instead of by ioctl."""
        state = vcpu.state
        vcpu.kvm_rip = None
        if entering and vcpu.sync:
            # regs/sregs live in kvm_run: flag the dirty ones, KVM loads them at entry
            dirty = 0
            if state["sregs"] == 2:
                dirty = K.KVM_SYNC_X86_SREGS
                state["sregs"] = 1
            if state["regs"] == 2:
                dirty |= K.KVM_SYNC_X86_REGS
                state["regs"] = 1
            if dirty:
                _pack_u64(vcpu.run, K.RUN_DIRTY_REGS, dirty)
            if state["dregs"] != 2 and state["events"] != 2:
                return
        if state["sregs"] == 2:
            ioctl(vcpu.fd, K.KVM_SET_SREGS, vcpu.sregs)
            state["sregs"] = 1
        if state["regs"] == 2:
            ioctl(vcpu.fd, K.KVM_SET_REGS, vcpu.regs)
            state["regs"] = 1
        if state["dregs"] == 2:
            ioctl(vcpu.fd, K.KVM_SET_DEBUGREGS, vcpu.dregs)
            state["dregs"] = 1
        if state["events"] == 2:
            vcpu.events.flags = K.KVM_VCPUEVENT_VALID_SHADOW
            ioctl(vcpu.fd, K.KVM_SET_VCPU_EVENTS, vcpu.events)
            state["events"] = 1

    def _invalidate(self, vcpu: Vcpu) -> None:
        for key in vcpu.state:
            vcpu.state[key] = 0

    def hv_vcpu_flush(self, vid: int) -> None:
        self._flush(self._vcpu(vid, "hv_vcpu_flush"))

    def _set_exit(self, vcpu: Vcpu, reason: int, **fields: int) -> None:
        vcpu.exit = common.exit_fields(reason, **fields)

    # --- host habits (probed once) ----------------------------------------------------------------

    def _completes_before_exit(self, kind: str) -> bool:
        """Whether this host's KVM finishes a ``kind`` instruction before the exit (probed once;
        kind "tsc" instead tells whether a host write of IA32_TSC reaches the guest)."""
        if self._habits is None:
            self._habits = kvm_probes.probe_habits()
        return self._habits.get(kind, False)

    def _emulates_int3(self) -> bool:
        """Whether KVM fails on a guest INT3 (and INT n) at CPL0 and the backend reports or
        delivers it instead (probed once per process, see kvm_probes.probe_int3)."""
        if self._int3 is None:
            self._int3 = kvm_probes.probe_int3()
        return self._int3
