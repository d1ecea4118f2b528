"""Bookkeeping the KVM and emu backends share: what the framework checks and keeps for them.

On the real framework the kernel validates map ranges, keeps the guest-physical map and the
MSR permissions; the backends that build the framework themselves keep them here, once:

* ``entry_checks_enabled``: whether the VMX entry checks are on;
* ``bad`` / ``field_error``: the HvError for bad arguments and unknown or unsupported fields;
* ``new_region``, ``add_region``, ``split_regions``, ``region_at``: one address space's list
  of mapped regions (page-aligned, not overlapping, sorted); a failed call leaves it untouched;
* ``MsrPermissions``: native, managed and per-access MSR permissions of one vCPU;
  ``FRAMEWORK_MSRS`` / ``check_framework_msr``: the MSRs ``hv_vcpu_read/write_msr`` accept;
* ``decode_io``: the length and form of an IN/OUT/INS/OUTS, for the I/O exit contract;
* ``exit_fields``, ``ept_permission_bits``, ``check_fp_buffer``: exit records and argument
  checks both backends produce the same way;
* ``FrameworkBooks``: the base of those backends: spaces, vCPUs and owner threads, and the
  calls that only touch the books (map/unmap/protect, MSR permissions, destroy).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from ..buffers import Buffer, buffer_address
from . import constants as C
from .errors import HvError

PAGE = 4096
MSR_LIMIT = 0xFFFFFFFF
_MEMORY_FLAGS = C.HV_MEMORY_READ | C.HV_MEMORY_WRITE | C.HV_MEMORY_EXEC | C.HV_MEMORY_UEXEC


def entry_checks_enabled() -> bool:
    """Whether kvm and emu check each VM entry as VMX does (``vmx_rules.EntryGate``).

    On by default: a set-up the framework would refuse fails here too. ``GDBSTUB_VMX_CHECKS=0``
    turns them off (a VMM being ported that wants to see how far it gets without them)."""
    return os.environ.get("GDBSTUB_VMX_CHECKS", "1") != "0"


def bad(call: str, detail: str) -> HvError:
    """HV_BAD_ARGUMENT for ``call``."""
    return HvError(C.HV_BAD_ARGUMENT, call, detail)


def field_error(call: str, field_: int, backend: str) -> HvError:
    """HV_BAD_ARGUMENT for a number that is no VMCS field, HV_UNSUPPORTED for a known field the
    backend does not provide (naming it)."""
    name = C.VMCS_FIELD_NAMES.get(field_)
    if name is None:
        return bad(call, f"0x{field_:x} is not a VMCS field")
    return HvError(C.HV_UNSUPPORTED, call, f"{name} is not available on the {backend} backend")


# --- guest-physical map ------------------------------------------------------------------------


@dataclass
class Region:
    """One mapped range of a guest-physical address space."""

    gpa: int
    size: int
    uva: int
    flags: int
    keep: object = None


def check_range(call: str, gpa: int, size: int, flags: int) -> None:
    """Page-aligned, in range, known memory flags; else HV_BAD_ARGUMENT."""
    if size <= 0 or size % PAGE or gpa < 0 or gpa % PAGE or gpa + size > 1 << 52:
        raise bad(call, f"range 0x{gpa:x}+0x{size:x} is not page-aligned or out of range")
    if flags & ~_MEMORY_FLAGS:
        raise bad(call, f"unknown memory flags 0x{flags:x}")


def new_region(call: str, uva: Buffer | int, gpa: int, size: int, flags: int) -> Region:
    """A validated region for ``hv_vm_map``: ``uva`` is a page-aligned address or a writable,
    page-aligned buffer of at least ``size`` bytes (kept alive by the region)."""
    check_range(call, gpa, size, flags)
    if isinstance(uva, int):
        if uva <= 0 or uva % PAGE:
            raise bad(call, f"host address 0x{uva:x} is not page-aligned")
        return Region(gpa, size, uva, flags)
    try:
        address, length = buffer_address(uva)
    except (TypeError, ValueError) as exc:
        raise bad(call, f"host memory: {exc}") from exc
    if address % PAGE:
        raise bad(call, "host memory is not page-aligned (use hv_vm_allocate)")
    if length < size:
        raise bad(call, f"host memory holds 0x{length:x} bytes, map wants 0x{size:x}")
    return Region(gpa, size, address, flags, uva)


def add_region(regions: list[Region], call: str, region: Region) -> None:
    """Insert ``region`` (sorted); HV_BAD_ARGUMENT if it overlaps a mapping."""
    for other in regions:
        if region.gpa < other.gpa + other.size and other.gpa < region.gpa + region.size:
            raise bad(
                call, f"0x{region.gpa:x}+0x{region.size:x} overlaps a mapping at 0x{other.gpa:x}"
            )
    regions.append(region)
    regions.sort(key=lambda r: r.gpa)


def split_regions(
    regions: list[Region], call: str, gpa: int, size: int, flags: int = 0
) -> tuple[list[Region], list[Region]]:
    """``(all regions cut at gpa and gpa+size, the ones inside)``, without changing
    ``regions``; HV_BAD_ARGUMENT unless ``[gpa, gpa+size)`` is entirely mapped."""
    check_range(call, gpa, size, flags)
    end = gpa + size
    pieces: list[Region] = []
    for region in regions:
        top = region.gpa + region.size
        cuts = sorted({region.gpa, top} | {c for c in (gpa, end) if region.gpa < c < top})
        for lo, hi in itertools.pairwise(cuts):
            pieces.append(
                Region(lo, hi - lo, region.uva + (lo - region.gpa), region.flags, region.keep)
            )
    inside = [r for r in pieces if r.gpa >= gpa and r.gpa + r.size <= end]
    if sum(r.size for r in inside) != size:
        raise bad(call, f"0x{gpa:x}+0x{size:x} is not entirely mapped")
    return pieces, inside


def unmap_regions(regions: list[Region], call: str, gpa: int, size: int) -> None:
    """``hv_vm_unmap`` on the list (unchanged on error)."""
    pieces, inside = split_regions(regions, call, gpa, size)
    regions[:] = [r for r in pieces if r not in inside]


def protect_regions(regions: list[Region], call: str, gpa: int, size: int, flags: int) -> None:
    """``hv_vm_protect`` on the list (unchanged on error)."""
    pieces, inside = split_regions(regions, call, gpa, size, flags)
    for region in inside:
        region.flags = flags
    regions[:] = pieces


def region_at(regions: list[Region], gpa: int) -> Region | None:
    """The region holding ``gpa``, if any."""
    for region in regions:
        if region.gpa <= gpa < region.gpa + region.size:
            return region
    return None


# --- MSR permissions -----------------------------------------------------------------------------


@dataclass
class MsrPermissions:
    """What the guest may do natively with each MSR, as the framework keeps it per vCPU."""

    access: dict[int, int] = field(default_factory=dict)  # msr -> HV_MSR_READ | HV_MSR_WRITE
    managed: set[int] = field(default_factory=set)

    def allows(self, msr: int, flag: int) -> bool:
        """Whether the guest may do ``flag`` (HV_MSR_READ/WRITE) on ``msr`` without an exit."""
        return bool(self.access.get(msr, 0) & flag)

    def enable_native(self, msr: int, enable: bool) -> None:
        """``hv_vcpu_enable_native_msr``."""
        _check_msr("hv_vcpu_enable_native_msr", msr)
        if enable:
            self.access[msr] = C.HV_MSR_READ | C.HV_MSR_WRITE
        else:
            self.access.pop(msr, None)

    def enable_managed(self, msr: int, enable: bool) -> None:
        """``hv_vcpu_enable_managed_msr``: unbinding also takes the guest's access away."""
        _check_msr("hv_vcpu_enable_managed_msr", msr)
        if enable:
            self.managed.add(msr)
        else:
            self.managed.discard(msr)
            self.access.pop(msr, None)

    def set_access(self, msr: int, flags: int) -> None:
        """``hv_vcpu_set_msr_access`` on a managed MSR."""
        if msr not in self.managed:
            raise bad("hv_vcpu_set_msr_access", f"MSR {msr:#x} is not managed on this vCPU")
        if flags & ~(C.HV_MSR_READ | C.HV_MSR_WRITE):
            raise bad("hv_vcpu_set_msr_access", f"unknown flags {flags:#x}")
        if flags:
            self.access[msr] = flags
        else:
            self.access.pop(msr, None)


def _check_msr(call: str, msr: int) -> None:
    if not 0 <= msr <= MSR_LIMIT:
        raise bad(call, f"MSR {msr:#x} out of range")


def _msr_ranges(*spans: tuple[int, int]) -> frozenset[int]:
    return frozenset(msr for first, last in spans for msr in range(first, last + 1))


FRAMEWORK_MSRS: frozenset[int] = _msr_ranges(
    (C.HV_MSR_IA32_TSC, C.HV_MSR_IA32_TSC),
    (C.HV_MSR_IA32_SPEC_CTRL, C.HV_MSR_IA32_PRED_CMD),
    (C.HV_MSR_IA32_PMC0, C.HV_MSR_IA32_PMC7),
    (C.HV_MSR_IA32_ARCH_CAPABILITIES, C.HV_MSR_IA32_FLUSH_CMD),
    (C.HV_MSR_IA32_SYSENTER_CS, C.HV_MSR_IA32_SYSENTER_EIP),
    (C.HV_MSR_IA32_PERFEVNTSEL0, C.HV_MSR_IA32_PERFEVNTSEL7),
    (C.HV_MSR_LBR_SELECT, C.HV_MSR_LASTBRANCH_TOS),
    (C.HV_MSR_IA32_DEBUGCTL, C.HV_MSR_IA32_DEBUGCTL),
    (C.HV_MSR_LASTINT_FROM_IP, C.HV_MSR_LASTINT_TO_IP),
    (C.HV_MSR_IA32_FIXED_CTR0, C.HV_MSR_IA32_FIXED_CTR3),
    (C.HV_MSR_PERF_METRICS, C.HV_MSR_PERF_METRICS),
    (C.HV_MSR_IA32_FIXED_CTR_CTRL, C.HV_MSR_IA32_PERF_GLOBAL_INUSE),
    (C.HV_MSR_IA32_A_PMC0, C.HV_MSR_IA32_A_PMC7),
    (C.HV_MSR_LASTBRANCH_0_FROM_IP, C.HV_MSR_LASTBRANCH_31_FROM_IP),
    (C.HV_MSR_LASTBRANCH_0_TO_IP, C.HV_MSR_LASTBRANCH_31_TO_IP),
    (C.HV_MSR_IA32_XSS, C.HV_MSR_IA32_XSS),
    (C.HV_MSR_LASTBRANCH_INFO_0, C.HV_MSR_LASTBRANCH_INFO_31),
    (C.HV_MSR_IA32_EFER, C.HV_MSR_IA32_FMASK),
    (C.HV_MSR_IA32_FS_BASE, C.HV_MSR_IA32_TSC_AUX),
)
"""The MSRs the framework keeps per vCPU (the ``HV_MSR_*`` enum of hv_arch_vmx.h): what
``hv_vcpu_read_msr`` / ``hv_vcpu_write_msr`` accept on every backend. Any other MSR
(IA32_APIC_BASE, PAT - a VMCS field -, the MTRRs, MISC_ENABLE, x2APIC...) is the VMM's: the
calls refuse it (:func:`check_framework_msr`) and a guest RDMSR/WRMSR of it exits (31/32)."""


def check_framework_msr(call: str, msr: int) -> None:
    """HV_BAD_ARGUMENT unless ``msr`` is one of :data:`FRAMEWORK_MSRS` (the framework's
    answer for another MSR is not documented; HV_BAD_ARGUMENT is the one for a bad MSR
    number, and what the Mac probe checks)."""
    if msr not in FRAMEWORK_MSRS:
        _check_msr(call, msr)
        raise bad(call, f"MSR {msr:#x} is not one the framework keeps (HV_MSR_*)")


# --- I/O instructions ----------------------------------------------------------------------------

IN_OPCODES = frozenset({0xE4, 0xE5, 0xEC, 0xED, 0x6C, 0x6D})
IMM_OPCODES = frozenset({0xE4, 0xE5, 0xE6, 0xE7})
STRING_OPCODES = frozenset({0x6C, 0x6D, 0x6E, 0x6F})
PREFIXES = frozenset({0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65})


def decode_io(code: bytes) -> tuple[int, int | None, int]:
    """Decode an IN/OUT/INS/OUTS at the start of ``code``: (length, opcode or None, imm8)."""
    i = 0
    while i < min(len(code), 4) and (code[i] in PREFIXES or 0x40 <= code[i] <= 0x4F):
        i += 1
    if i >= len(code):
        return 0, None, 0
    op = code[i]
    if op in IMM_OPCODES:
        return (i + 2, op, code[i + 1]) if i + 1 < len(code) else (0, None, 0)
    if op in (0xEC, 0xED, 0xEE, 0xEF) or op in STRING_OPCODES:
        return i + 1, op, 0
    return 0, None, 0


# --- exit records and argument checks ---------------------------------------------------------

EXIT_FIELD_NAMES = {
    "qual": C.VMCS_RO_EXIT_QUALIFIC,
    "length": C.VMCS_RO_VMEXIT_INSTR_LEN,
    "gpa": C.VMCS_GUEST_PHYSICAL_ADDRESS,
    "gla": C.VMCS_RO_GUEST_LIN_ADDR,
    "irq_info": C.VMCS_RO_VMEXIT_IRQ_INFO,
    "irq_error": C.VMCS_RO_VMEXIT_IRQ_ERROR,
    "idt_info": C.VMCS_RO_IDT_VECTOR_INFO,
    "idt_error": C.VMCS_RO_IDT_VECTOR_ERROR,
    "mmio_data": C.GDBSTUB_VMCS_MMIO_DATA,
    "mmio_size": C.GDBSTUB_VMCS_MMIO_SIZE,
    "mmio_decoded": C.GDBSTUB_VMCS_MMIO_DECODED,
    "instr_error": C.VMCS_RO_INSTR_ERROR,
}
"""Keyword names of ``exit_fields`` -> the VMCS exit-information fields they set."""


def exit_fields(reason: int, **fields: int) -> dict[int, int]:
    """The exit fields of one exit: the reason and the named fields (``EXIT_FIELD_NAMES``)."""
    record = {C.VMCS_RO_EXIT_REASON: reason}
    for key, value in fields.items():
        record[EXIT_FIELD_NAMES[key]] = value
    return record


def ept_permission_bits(flags: int) -> int:
    """EPT-violation qualification bits for what the mapping (HV_MEMORY_* ``flags``) allows."""
    bits = 0
    if flags & C.HV_MEMORY_READ:
        bits |= C.EPT_VIOLATION_GPA_READABLE
    if flags & C.HV_MEMORY_WRITE:
        bits |= C.EPT_VIOLATION_GPA_WRITEABLE
    if flags & C.HV_MEMORY_EXEC:
        bits |= C.EPT_VIOLATION_GPA_EXECUTABLE
    return bits


def check_fp_buffer(call: str, buffer: Buffer, size: int, needed: int) -> memoryview:
    """``buffer`` as bytes if ``size`` covers the ``needed`` XSAVE image and fits in it."""
    try:
        view = memoryview(buffer).cast("B")
    except TypeError as exc:
        raise bad(call, f"buffer: {exc}") from exc
    if size < needed or size > len(view):
        raise bad(
            call, f"fpstate needs {needed} bytes, got size {size} with a buffer of {len(view)}"
        )
    return view


# --- the VM-wide books ---------------------------------------------------------------------------


class SpaceRecord(Protocol):
    """What the books need of a backend's address space."""

    regions: list[Region]


class VcpuRecord(Protocol):
    """What the books need of a backend's vCPU."""

    owner: int
    msr: MsrPermissions
    exec_ns: int
    kick: threading.Event

    @property
    def destroyed(self) -> bool: ...

    @property
    def space(self) -> object: ...


SpaceT = TypeVar("SpaceT", bound=SpaceRecord)
VcpuT = TypeVar("VcpuT", bound=VcpuRecord)


class FrameworkBooks(Generic[SpaceT, VcpuT]):
    """What the framework's kernel keeps for a VM, for backends that build the framework:
    address spaces and their guest-physical maps, vCPUs with their owner threads and MSR
    permissions, and the calls that only touch those books. A backend sets ``_spaces``,
    ``_vcpus``, ``_live``, ``_lock`` and ``_capabilities`` and implements the three hooks."""

    _spaces: dict[int, SpaceT]
    _vcpus: dict[int, VcpuT]
    _live: dict[int, VcpuT]
    _lock: threading.RLock
    _capabilities: dict[int, int]

    # --- hooks -------------------------------------------------------------------------------

    def _sync_map(self, space: SpaceT, call: str) -> None:
        """Make the backend's memory match ``space.regions`` (under ``_lock``)."""
        raise NotImplementedError

    def _msr_changed(self, vcpu: VcpuT) -> None:
        """``vcpu.msr`` changed (the backend may have a filter to update)."""

    def _close_space(self, space: SpaceT) -> None:
        """Release the backend's resources of a destroyed space (under ``_lock``)."""

    # --- lookups -----------------------------------------------------------------------------

    def _space0(self, call: str) -> SpaceT:
        space = self._spaces.get(0)
        if space is None:
            raise HvError(C.HV_ERROR, call, "no VM: call hv_vm_create first")
        return space

    def _space(self, asid: int, call: str) -> SpaceT:
        self._space0(call)
        space = self._spaces.get(asid)
        if space is None:
            raise bad(call, f"unknown address space {asid}")
        return space

    def _vcpu(self, vid: int, call: str) -> VcpuT:
        """The vCPU ``vid`` if it exists and the calling thread owns it (HV_BAD_ARGUMENT)."""
        vcpu = self._live.get(vid)
        if vcpu is None:
            raise bad(call, f"no vCPU {vid}")
        if vcpu.owner != threading.get_ident():
            raise bad(call, f"vCPU {vid} belongs to another thread")
        return vcpu

    def _adopt(self, vid: int, vcpu: VcpuT) -> None:
        """Enter a new vCPU in the books (``vcpu.owner`` is the calling thread)."""
        self._vcpus[vid] = vcpu
        self._live[vid] = vcpu

    def _disown(self, vid: int) -> None:
        """vCPU ``vid`` is destroyed: its id names nothing from now on."""
        self._live.pop(vid, None)

    def _kick_targets(self, vids: list[int]) -> list[VcpuT]:
        """The vCPUs ``hv_vcpu_interrupt`` names (any thread), their kick flags set; one
        unknown id raises before anybody is kicked."""
        targets = []
        for vid in vids:
            vcpu = self._live.get(vid)
            if vcpu is None:
                raise bad("hv_vcpu_interrupt", f"no vCPU {vid}")
            targets.append(vcpu)
        for vcpu in targets:
            vcpu.kick.set()
        return targets

    def _set_exit(self, vcpu: VcpuT, reason: int, **fields: int) -> None:
        """Record an exit for the caller of run/run_until (``exit_fields``)."""
        raise NotImplementedError

    def _end_without_exit(self, vcpu: VcpuT, deadline: int | None, any_exit: bool) -> bool:
        """The guest stopped without an exit of its own (a signal, a stop request): record a
        kick (exit 1), the deadline (exit 52) or, for ``hv_vcpu_run``, any stop (exit 1).
        False: nothing for the caller, run on."""
        if vcpu.kick.is_set():
            vcpu.kick.clear()
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
            return True
        if deadline is not None and time.monotonic_ns() >= deadline:
            self._set_exit(vcpu, C.VMX_REASON_VMX_TIMER_EXPIRED)
            return True
        if any_exit:
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
            return True
        return False

    # --- time --------------------------------------------------------------------------------

    def hv_vcpu_get_exec_time(self, vid: int) -> int:
        return self._vcpu(vid, "hv_vcpu_get_exec_time").exec_ns

    def mach_absolute_time(self) -> int:
        return time.monotonic_ns()

    def mach_timebase_info(self) -> tuple[int, int]:
        return (1, 1)

    # --- VM and memory -----------------------------------------------------------------------

    def hv_vm_destroy(self) -> None:
        with self._lock:
            self._space0("hv_vm_destroy")
            if any(not v.destroyed for v in self._vcpus.values()):
                raise HvError(C.HV_BUSY, "hv_vm_destroy", "vCPUs still exist")
            for space in self._spaces.values():
                self._close_space(space)
            self._spaces.clear()
            self._vcpus.clear()
            self._live.clear()

    def hv_vm_space_destroy(self, asid: int) -> None:
        with self._lock:
            if asid == C.HV_VM_SPACE_DEFAULT:
                raise bad("hv_vm_space_destroy", "the default address space cannot be destroyed")
            space = self._space(asid, "hv_vm_space_destroy")
            if any(v.space is space and not v.destroyed for v in self._vcpus.values()):
                raise HvError(C.HV_BUSY, "hv_vm_space_destroy", f"a vCPU is in space {asid}")
            self._close_space(space)
            del self._spaces[asid]

    def hv_vm_map(self, uva: Buffer | int, gpa: int, size: int, flags: int) -> None:
        self.hv_vm_map_space(0, uva, gpa, size, flags, call="hv_vm_map")

    def hv_vm_unmap(self, gpa: int, size: int) -> None:
        self.hv_vm_unmap_space(0, gpa, size, call="hv_vm_unmap")

    def hv_vm_protect(self, gpa: int, size: int, flags: int) -> None:
        self.hv_vm_protect_space(0, gpa, size, flags, call="hv_vm_protect")

    def hv_vm_map_space(
        self,
        asid: int,
        uva: Buffer | int,
        gpa: int,
        size: int,
        flags: int,
        call: str = "hv_vm_map_space",
    ) -> None:
        region = new_region(call, uva, gpa, size, flags)
        with self._lock:
            space = self._space(asid, call)
            add_region(space.regions, call, region)
            self._sync_map(space, call)

    def hv_vm_unmap_space(
        self, asid: int, gpa: int, size: int, call: str = "hv_vm_unmap_space"
    ) -> None:
        with self._lock:
            space = self._space(asid, call)
            unmap_regions(space.regions, call, gpa, size)
            self._sync_map(space, call)

    def hv_vm_protect_space(
        self, asid: int, gpa: int, size: int, flags: int, call: str = "hv_vm_protect_space"
    ) -> None:
        with self._lock:
            space = self._space(asid, call)
            protect_regions(space.regions, call, gpa, size, flags)
            self._sync_map(space, call)

    # --- MSR permissions and capabilities ----------------------------------------------------

    def hv_vcpu_enable_native_msr(self, vid: int, msr: int, enable: bool) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_enable_native_msr")
        vcpu.msr.enable_native(msr, enable)
        self._msr_changed(vcpu)

    def hv_vcpu_enable_managed_msr(self, vid: int, msr: int, enable: bool) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_enable_managed_msr")
        vcpu.msr.enable_managed(msr, enable)
        self._msr_changed(vcpu)

    def hv_vcpu_set_msr_access(self, vid: int, msr: int, flags: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_set_msr_access")
        vcpu.msr.set_access(msr, flags)
        self._msr_changed(vcpu)

    def hv_vmx_read_capability(self, field_: int) -> int:
        value = self._capabilities.get(field_)
        if value is None:
            raise HvError(C.HV_UNSUPPORTED, "hv_vmx_read_capability", f"capability {field_}")
        return value


# --- VMX capabilities -----------------------------------------------------------------------
# Capability images (low 32 bits: must be one; high 32 bits: may be one) of the controls these
# backends implement. Default-one bits follow the Intel SDM; I/O always exits. A new vCPU starts
# with the must-be-one values, as a VMM that combines its wishes by cap2ctrl expects.
# As on an Intel Mac (hyperkit needs CR3-load/store exiting allowed 0 and CR8-load/store exiting
# allowed 1, QEMU asks for the TPR shadow): the default-one CR3-load/store exiting bits (15, 16)
# are not must-be-one, and TPR shadow and CR8-load/store exiting may be one. The instruction
# exits a Mac offers are may-be-one on every backend (emu raises them; kvm accepts the controls
# but KVM absorbs the exits: docs/library.md), so a VMM sees the same capability words as there.

PROC_EXITS_MAY = (
    C.CPU_BASED_INVLPG
    | C.CPU_BASED_MWAIT
    | C.CPU_BASED_RDPMC
    | C.CPU_BASED_RDTSC
    | C.CPU_BASED_MOV_DR
    | C.CPU_BASED_MONITOR
    | C.CPU_BASED_PAUSE
)
PROC2_EXITS_MAY = C.CPU_BASED2_WBINVD

PIN_MUST = 0x16 | C.PIN_BASED_INTR | C.PIN_BASED_NMI
PROC_MUST = 0x04006172 | C.CPU_BASED_UNCOND_IO | C.CPU_BASED_SECONDARY_CTLS
PROC2_MUST = C.CPU_BASED2_EPT | C.CPU_BASED2_UNRESTRICTED
ENTRY_MUST = 0x11FF
EXIT_MUST = 0x36DFF


def initial_controls() -> dict[int, int]:
    """A new vCPU's VMCS controls and the guest fields the backends keep beside them."""
    return {
        C.VMCS_CTRL_PIN_BASED: PIN_MUST,
        C.VMCS_CTRL_CPU_BASED: PROC_MUST,
        C.VMCS_CTRL_CPU_BASED2: PROC2_MUST,
        C.VMCS_CTRL_VMENTRY_CONTROLS: ENTRY_MUST,
        C.VMCS_CTRL_VMEXIT_CONTROLS: EXIT_MUST,
        C.VMCS_CTRL_EXC_BITMAP: 0,
        C.VMCS_CTRL_VMENTRY_IRQ_INFO: 0,
        C.VMCS_CTRL_VMENTRY_EXC_ERROR: 0,
        C.VMCS_CTRL_VMENTRY_INSTR_LEN: 0,
        C.VMCS_CTRL_TPR_THRESHOLD: 0,
        C.VMCS_CTRL_CR0_MASK: 0,
        C.VMCS_CTRL_CR4_MASK: 0,
        C.VMCS_CTRL_CR0_SHADOW: 0,
        C.VMCS_CTRL_CR4_SHADOW: 0,
        C.VMCS_CTRL_PF_ERROR_MASK: 0,
        C.VMCS_CTRL_PF_ERROR_MATCH: 0,
        C.VMCS_GUEST_DEBUG_EXC: 0,
        C.VMCS_GUEST_LINK_POINTER: (1 << 64) - 1,
        # PAE PDPTEs: kept as the VMM wrote them (KVM and unicorn load theirs from CR3)
        C.VMCS_GUEST_PDPTE0: 0,
        C.VMCS_GUEST_PDPTE1: 0,
        C.VMCS_GUEST_PDPTE2: 0,
        C.VMCS_GUEST_PDPTE3: 0,
        C.VMCS_GUEST_ACTIVITY_STATE: C.GUEST_ACTIVITY_ACTIVE,
    }


def vmx_capabilities(proc2_extra: int = 0) -> dict[int, int]:
    """The ``hv_vmx_read_capability`` table; ``proc2_extra``: secondary controls the backend
    also allows."""
    pin_may = PIN_MUST | C.PIN_BASED_VIRTUAL_NMI | C.PIN_BASED_PREEMPTION_TIMER
    proc_may = PROC_MUST | C.CPU_BASED_IRQ_WND | C.CPU_BASED_HLT | C.CPU_BASED_MTF
    proc_may |= C.CPU_BASED_TPR_SHADOW | C.CPU_BASED_CR8_LOAD | C.CPU_BASED_CR8_STORE
    proc_may |= PROC_EXITS_MAY
    proc2_may = PROC2_MUST | C.CPU_BASED2_RDTSCP | PROC2_EXITS_MAY | proc2_extra
    entry_may = ENTRY_MUST | C.VMENTRY_GUEST_IA32E | C.VMENTRY_LOAD_EFER | C.VMENTRY_LOAD_IA32_PAT
    exit_may = EXIT_MUST | C.VMEXIT_SAVE_EFER | C.VMEXIT_LOAD_EFER | C.VMEXIT_SAVE_IA32_PAT
    pin, proc = PIN_MUST | pin_may << 32, PROC_MUST | proc_may << 32
    entry, exit_ = ENTRY_MUST | entry_may << 32, EXIT_MUST | exit_may << 32
    return {
        C.HV_VMX_CAP_PINBASED: pin,
        C.HV_VMX_CAP_PROCBASED: proc,
        C.HV_VMX_CAP_PROCBASED2: PROC2_MUST | proc2_may << 32,
        C.HV_VMX_CAP_ENTRY: entry,
        C.HV_VMX_CAP_EXIT: exit_,
        C.HV_VMX_CAP_TRUE_PINBASED: pin,
        C.HV_VMX_CAP_TRUE_PROCBASED: proc,
        C.HV_VMX_CAP_TRUE_ENTRY: entry,
        C.HV_VMX_CAP_TRUE_EXIT: exit_,
        C.HV_VMX_CAP_PREEMPTION_TIMER: 5,
        C.HV_VMX_CAP_CR0_FIXED0: 0x80000021,
        C.HV_VMX_CAP_CR0_FIXED1: 0xFFFFFFFF,
        C.HV_VMX_CAP_CR4_FIXED0: 0x2000,
        C.HV_VMX_CAP_CR4_FIXED1: 0x1767FF,
    }
