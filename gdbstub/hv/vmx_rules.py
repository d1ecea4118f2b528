"""The VM-entry checks VMX performs, for the backends that build the framework (kvm, emu).

Theory of operation
-------------------
On a Mac the processor itself checks every VM entry (Intel SDM vol. 3, "VM Entries": checks on
the VMX controls, then on the guest-state area) and the framework hands the VMM the result. A
backend that builds the framework from something more lenient (KVM, unicorn) asks this module
instead, before it lets the guest run:

* :func:`check_entry` takes the VMCS fields (a ``Mapping`` from Apple's field encodings to
  values; a backend passes a :class:`VmcsView` over its own ``hv_vmx_vcpu_read_vmcs``) and the
  backend's :class:`Capabilities`, and returns ``None`` or the first :class:`EntryFailure`, in
  the SDM's order. A failed guest-state check is what VMX reports as a VM exit: the run returns
  HV_SUCCESS, VMCS_RO_EXIT_REASON reads 0x80000021 and the qualification is the SDM's (0, or 2
  for PDPTEs, 3 for an NMI injected under STI blocking, 4 for the VMCS link pointer). A failed
  control check is VMfailValid on hardware (no exit; VM-instruction error 7); the framework's
  answer to that is not documented, and this module proposes HV_ERROR from the run call with
  VMCS_RO_INSTR_ERROR 7 (``EntryFailure.status``).
* :class:`EntryGate` makes the checks cheap per entry. Hardware leaves a valid state behind at
  every exit, so only what the VMM wrote since the last successful check can make an entry
  fail: the backend calls ``gate.touch(field)`` (``touch_register``, ``touch_msr``) from its
  write paths, and ``gate.check(view)`` before each entry re-runs only the groups of checks that
  read a touched field (nothing at all when nothing was written).
* :func:`check_control_write` says whether the framework (macOS 11+, which publishes the
  allowed-0/allowed-1 settings of a field through ``hv_vmx_vcpu_get_cap_write_vmcs``) refuses
  a control-word write: :func:`cap_write_vmcs` is that call's answer built from the
  capabilities.
* The CR0/CR4 guest/host mask and read shadow: :func:`cr_guest_view` (what the guest reads),
  :func:`mov_to_cr`, :func:`clts`, :func:`lmsw` (exit 28, #GP or the value loaded),
  :func:`cr_access_qualification`, and the CR3/CR8 exiting rules.

The checks themselves live in ``vmx_checks`` (by SDM section), the capability and failure types
in ``vmx_caps``, the CR helpers in ``vmx_cr``; this module is the one to import.

What the checks leave to the framework, as the framework keeps it from the VMM: the host
state, the EPT pointer, VPID, I/O and MSR bitmaps, the virtual-APIC and APIC-access pages and
the MSR-load areas. Checks on those are not made. Facts are from the SDM's lists (the section
numbers are those of the 2016-2022 editions: 26.2 controls, 26.3.1 guest state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from . import constants as C
from .errors import HvError
from .vmx_caps import (
    CONTROL_CAPS,
    ENTRY_FAILED_GUEST_STATE,
    FIELD_VTPR,
    INSTR_ERROR_CONTROLS,
    QUAL_DEFAULT,
    QUAL_LINK_POINTER,
    QUAL_NMI_STI,
    QUAL_PDPTE,
    Capabilities,
    EntryFailure,
    cap_write_vmcs,
    check_control_write,
    control_write_error,
)
from .vmx_checks import ALL_GROUPS, ENTRY_FIELDS, FIELD_GROUPS, GROUP_FIELDS, GROUPS, run_groups
from .vmx_cr import (
    CR_ACCESS_CLTS,
    CR_ACCESS_LMSW,
    CR_ACCESS_MOV_FROM,
    CR_ACCESS_MOV_TO,
    CrWrite,
    clts,
    cr_access_qualification,
    cr_guest_view,
    entry_controls_after_exit,
    entry_efer,
    lmsw,
    mov_cr3_exits,
    mov_cr8_exits,
    mov_to_cr,
    tpr_below_threshold,
)

__all__ = [
    "ALL_GROUPS",
    "CONTROL_CAPS",
    "CR_ACCESS_CLTS",
    "CR_ACCESS_LMSW",
    "CR_ACCESS_MOV_FROM",
    "CR_ACCESS_MOV_TO",
    "ENTRY_FAILED_GUEST_STATE",
    "ENTRY_FIELDS",
    "FIELD_VTPR",
    "GROUPS",
    "GROUP_FIELDS",
    "INSTR_ERROR_CONTROLS",
    "MSR_FIELDS",
    "QUAL_DEFAULT",
    "QUAL_LINK_POINTER",
    "QUAL_NMI_STI",
    "QUAL_PDPTE",
    "REGISTER_FIELDS",
    "Capabilities",
    "CrWrite",
    "EntryFailure",
    "EntryGate",
    "VmcsView",
    "cap_write_vmcs",
    "check_control_write",
    "check_controls",
    "check_entry",
    "check_guest_state",
    "clts",
    "control_write_error",
    "cr_access_qualification",
    "cr_guest_view",
    "entry_controls_after_exit",
    "entry_efer",
    "lmsw",
    "mov_cr3_exits",
    "mov_cr8_exits",
    "mov_to_cr",
    "tpr_below_threshold",
]

Fields = Mapping[int, int]


def check_entry(fields: Fields, caps: Capabilities) -> EntryFailure | None:
    """Every VM-entry check, controls first: None, or the first failure in the SDM's order.

    ``fields``: VMCS field encoding -> value (a dict, or a :class:`VmcsView`). A field that is
    absent reads 0, except VMCS_GUEST_LINK_POINTER (all ones); :data:`FIELD_VTPR` is optional."""
    return run_groups(fields, caps, ALL_GROUPS)


def check_controls(fields: Fields, caps: Capabilities) -> EntryFailure | None:
    """The checks on the VMX controls and event injection (SDM 26.2.1) only."""
    return run_groups(fields, caps, 1)


def check_guest_state(fields: Fields, caps: Capabilities) -> EntryFailure | None:
    """The checks on the guest-state area (SDM 26.3.1) only."""
    return run_groups(fields, caps, ALL_GROUPS & ~1)


REGISTER_FIELDS: dict[int, int] = {
    C.HV_X86_RIP: C.VMCS_GUEST_RIP,
    C.HV_X86_RFLAGS: C.VMCS_GUEST_RFLAGS,
    C.HV_X86_CS: C.VMCS_GUEST_CS,
    C.HV_X86_SS: C.VMCS_GUEST_SS,
    C.HV_X86_DS: C.VMCS_GUEST_DS,
    C.HV_X86_ES: C.VMCS_GUEST_ES,
    C.HV_X86_FS: C.VMCS_GUEST_FS,
    C.HV_X86_GS: C.VMCS_GUEST_GS,
    C.HV_X86_IDT_BASE: C.VMCS_GUEST_IDTR_BASE,
    C.HV_X86_IDT_LIMIT: C.VMCS_GUEST_IDTR_LIMIT,
    C.HV_X86_GDT_BASE: C.VMCS_GUEST_GDTR_BASE,
    C.HV_X86_GDT_LIMIT: C.VMCS_GUEST_GDTR_LIMIT,
    C.HV_X86_LDTR: C.VMCS_GUEST_LDTR,
    C.HV_X86_LDT_BASE: C.VMCS_GUEST_LDTR_BASE,
    C.HV_X86_LDT_LIMIT: C.VMCS_GUEST_LDTR_LIMIT,
    C.HV_X86_LDT_AR: C.VMCS_GUEST_LDTR_AR,
    C.HV_X86_TR: C.VMCS_GUEST_TR,
    C.HV_X86_TSS_BASE: C.VMCS_GUEST_TR_BASE,
    C.HV_X86_TSS_LIMIT: C.VMCS_GUEST_TR_LIMIT,
    C.HV_X86_TSS_AR: C.VMCS_GUEST_TR_AR,
    C.HV_X86_CR0: C.VMCS_GUEST_CR0,
    C.HV_X86_CR3: C.VMCS_GUEST_CR3,
    C.HV_X86_CR4: C.VMCS_GUEST_CR4,
    C.HV_X86_DR7: C.VMCS_GUEST_DR7,
    C.HV_X86_TPR: FIELD_VTPR,
}
"""``hv_x86_reg_t`` -> the VMCS field it is (for ``EntryGate.touch_register``)."""

MSR_FIELDS: dict[int, int] = {
    C.MSR_EFER: C.VMCS_GUEST_IA32_EFER,
    C.MSR_IA32_PAT: C.VMCS_GUEST_IA32_PAT,
    C.MSR_IA32_DEBUGCTL: C.VMCS_GUEST_IA32_DEBUGCTL,
    C.MSR_IA32_SYSENTER_CS: C.VMCS_GUEST_IA32_SYSENTER_CS,
    C.MSR_IA32_SYSENTER_ESP: C.VMCS_GUEST_SYSENTER_ESP,
    C.MSR_IA32_SYSENTER_EIP: C.VMCS_GUEST_SYSENTER_EIP,
    C.MSR_FSBASE: C.VMCS_GUEST_FS_BASE,
    C.MSR_GSBASE: C.VMCS_GUEST_GS_BASE,
}
"""MSR -> the VMCS guest field that holds it (for ``EntryGate.touch_msr``)."""


class VmcsView(Mapping[int, int]):
    """A read-through, memoizing ``Mapping`` over a backend's VMCS read call, for one check.

    ``read(field)`` is e.g. the backend's ``hv_vmx_vcpu_read_vmcs`` bound to a vCPU; a field it
    refuses with HvError reads as absent (the check's default). ``extra`` adds pseudo-fields
    such as :data:`FIELD_VTPR`. Build a new view per check: values are cached."""

    def __init__(self, read: Callable[[int], int], extra: Mapping[int, int] | None = None) -> None:
        self._read = read
        self._cache: dict[int, int | None] = dict(extra or {})

    def __getitem__(self, field: int) -> int:
        try:
            value = self._cache[field]
        except KeyError:
            value = self._load(field)
        if value is None:
            raise KeyError(field)
        return value

    def get(self, field: int, default: int | None = None) -> int | None:  # type: ignore[override]
        """``Mapping.get`` without its generic layers (the checks call it for every field)."""
        try:
            value = self._cache[field]
        except KeyError:
            value = self._load(field)
        return default if value is None else value

    def _load(self, field: int) -> int | None:
        value: int | None
        if field == FIELD_VTPR:
            value = None
        else:
            try:
                value = self._read(field)
            except HvError:
                value = None
        self._cache[field] = value
        return value

    def __iter__(self) -> Iterator[int]:
        return (k for k, v in self._cache.items() if v is not None)

    def __len__(self) -> int:
        return sum(1 for v in self._cache.values() if v is not None)


class EntryGate:
    """Per-vCPU bookkeeping that keeps the entry checks cheap.

    A new gate has every group dirty. The backend calls :meth:`touch` for each VMCS field the
    VMM writes (``touch_register`` / ``touch_msr`` for register and MSR writes) and
    :meth:`check` before each entry: it runs only the groups that read a touched field, and
    forgets the touches once all of them pass (a failure keeps them, so the next entry fails
    the same way until the VMM changes something)."""

    __slots__ = ("caps", "dirty")

    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps
        self.dirty = ALL_GROUPS

    def touch(self, field: int) -> None:
        """VMCS field ``field`` was written."""
        self.dirty |= FIELD_GROUPS.get(field, 0)

    def touch_register(self, reg: int) -> None:
        """``hv_x86_reg_t`` register ``reg`` was written."""
        field = REGISTER_FIELDS.get(reg)
        if field is not None:
            self.dirty |= FIELD_GROUPS.get(field, 0)

    def touch_msr(self, msr: int) -> None:
        """MSR ``msr`` was written through ``hv_vcpu_write_msr``."""
        field = MSR_FIELDS.get(msr)
        if field is not None:
            self.dirty |= FIELD_GROUPS.get(field, 0)

    def touch_all(self) -> None:
        """Everything may have changed (a state restore, a new address space...)."""
        self.dirty = ALL_GROUPS

    def check(self, fields: Fields) -> EntryFailure | None:
        """The entry checks the touched fields need (None at once when nothing was touched)."""
        if not self.dirty:
            return None
        failure = run_groups(fields, self.caps, self.dirty)
        if failure is None:
            self.dirty = 0
        return failure
