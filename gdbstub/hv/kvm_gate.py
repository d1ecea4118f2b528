"""The VMX entry checks on the KVM backend: ``vmx_rules.EntryGate`` wired to a KVM vCPU.

Theory of operation
-------------------
KVM accepts guest states VMX refuses (CR4 without VMXE, CR0 without NE, segment limits that
disagree with their granularity, an IA-32e entry control that disagrees with EFER.LMA...), so
a VMM that runs here could fail its first entry on a Mac. When ``common.entry_checks_enabled()``
holds at ``hv_vcpu_create``, each vCPU gets an :class:`~gdbstub.hv.vmx_rules.EntryGate`:

* every write path of the VMM (``hv_vcpu_write_register``, ``hv_vmx_vcpu_write_vmcs``,
  ``hv_vcpu_write_msr``, ``hv_vcpu_set_space``) touches it, and a control-word write outside
  the capability's allowed-0/allowed-1 settings is refused with HV_BAD_ARGUMENT, where the
  framework refuses it (:func:`refuse_control_write`);
* before each entry (``hv_vcpu_run``, ``hv_vcpu_run_until``) the backend runs the groups of
  checks that read a touched field (none when the VMM wrote nothing since the last successful
  check) over :func:`entry_view`, a ``VmcsView`` of its own ``hv_vmx_vcpu_read_vmcs``.
  A failed guest-state check is what VMX reports: the run returns HV_SUCCESS and
  VMCS_RO_EXIT_REASON reads 0x80000021 with the SDM's qualification. A failed control check
  raises ``HvError(EntryFailure.status)`` (HV_ERROR) with VMCS_RO_INSTR_ERROR 7, and no exit
  (:func:`outcome`). An entry that passes loads IA32_EFER as VMX does (:func:`entry_efer`).

Without the switch the gate is ``None`` and the write paths and entries pay one ``is None``.
The state the backend changes itself (an exit, a completed instruction) is left valid by the
guest as hardware leaves it at an exit, so it touches nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from . import common, vmx_rules
from . import constants as C
from .errors import HvError

_REGISTER_CHECKS = 1 << [name for name, _ in vmx_rules.GROUPS].index("registers")


@cache
def capabilities(table: tuple[tuple[int, int], ...]) -> vmx_rules.Capabilities:
    """The checks' view of a backend's ``hv_vmx_read_capability`` table (items)."""
    return vmx_rules.Capabilities.read(dict(table).__getitem__)


def new_gate(table: dict[int, int]) -> vmx_rules.EntryGate | None:
    """A gate for a new vCPU, or None while the entry checks are off."""
    if not common.entry_checks_enabled():
        return None
    return vmx_rules.EntryGate(capabilities(tuple(sorted(table.items()))))


def refuse_control_write(gate: vmx_rules.EntryGate, field_: int, value: int) -> None:
    """HV_BAD_ARGUMENT where the framework refuses ``hv_vmx_vcpu_write_vmcs(field_, value)``
    (a control word outside its allowed-0/allowed-1 settings); the field is touched otherwise."""
    problem = vmx_rules.control_write_error(field_, value, gate.caps)
    if problem is not None:
        name = C.VMCS_FIELD_NAMES.get(field_, f"0x{field_:x}")
        raise common.bad("hv_vmx_vcpu_write_vmcs", f"{name}: {problem}")
    gate.touch(field_)


def entry_view(read_vmcs: Callable[[int], int], vtpr: int | None) -> vmx_rules.VmcsView:
    """The fields of one entry check: ``read_vmcs`` (the backend's ``hv_vmx_vcpu_read_vmcs``
    for the vCPU, without the owner check) and the virtual TPR byte ``vtpr`` (None: the
    TPR-threshold check is skipped; only the checks on the controls read it)."""
    return vmx_rules.VmcsView(read_vmcs, None if vtpr is None else {vmx_rules.FIELD_VTPR: vtpr})


def entry_efer(view: vmx_rules.VmcsView, dirty: int) -> int | None:
    """The IA32_EFER a passed entry loads when it differs from the EFER field (without "load
    IA32_EFER", LMA - and LME under CR0.PG - come from the IA-32e mode guest control), or
    None. Only the checks on the registers (a ``dirty`` group) read the fields involved: when
    they did not run, nothing the VMM wrote can have changed it."""
    if not dirty & _REGISTER_CHECKS:
        return None
    efer = vmx_rules.entry_efer(view)
    return None if efer == view.get(C.VMCS_GUEST_IA32_EFER, 0) else efer


def outcome(
    failure: vmx_rules.EntryFailure, last_exit: dict[int, int], call: str
) -> tuple[dict[int, int], HvError | None]:
    """What a failed entry leaves: ``(exit fields, error to raise or None)``. A guest-state
    failure is an exit (0x80000021, the SDM's qualification) and the run succeeds; a control
    failure is no exit (the last exit's fields stay, VMCS_RO_INSTR_ERROR reads 7) and the run
    returns ``failure.status``."""
    if failure.kind == "controls":
        return {**last_exit, **failure.exit_fields()}, HvError(failure.status, call, str(failure))
    return failure.exit_fields(), None
