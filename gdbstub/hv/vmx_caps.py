"""Capabilities and failures of the VM-entry checks (see ``vmx_rules``, the API).

Theory of operation
-------------------
:class:`Capabilities` is what a backend reports through ``hv_vmx_read_capability``, in the form
the checks use; :class:`EntryFailure` is what a failed check says and how a backend reports it.
The control words are constrained by the allowed-0/allowed-1 halves of their capability: the
framework (macOS 11+) publishes them per field through ``hv_vmx_vcpu_get_cap_write_vmcs`` and
may refuse a write outside them, which :func:`check_control_write` and :func:`cap_write_vmcs`
model. Values are the Intel SDM's (vol. 3, "VM Entries" and appendix A).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from . import constants as C
from .errors import HvError

# --- constants -------------------------------------------------------------------------------

ENTRY_FAILED_GUEST_STATE = C.VMX_EXIT_REASON_FAILED_ENTRY | C.VMX_REASON_VMENTRY_GUEST
"""0x80000021: VM entry failed on the guest-state checks (the run itself succeeds)."""
QUAL_DEFAULT = 0
QUAL_PDPTE = 2
QUAL_NMI_STI = 3
QUAL_LINK_POINTER = 4
INSTR_ERROR_CONTROLS = 7
"""VM-instruction error of a VM entry with invalid control fields."""

FIELD_VTPR = 0x10100
"""Pseudo-field (not an Apple encoding) for the virtual TPR byte (``HV_X86_TPR``): put it in the
mapping to have the TPR-threshold-versus-VTPR check made; without it the check is skipped."""

CONTROL_CAPS = {
    C.VMCS_CTRL_PIN_BASED: C.HV_VMX_CAP_PINBASED,
    C.VMCS_CTRL_CPU_BASED: C.HV_VMX_CAP_PROCBASED,
    C.VMCS_CTRL_CPU_BASED2: C.HV_VMX_CAP_PROCBASED2,
    C.VMCS_CTRL_VMENTRY_CONTROLS: C.HV_VMX_CAP_ENTRY,
    C.VMCS_CTRL_VMEXIT_CONTROLS: C.HV_VMX_CAP_EXIT,
}
"""Control word -> the ``hv_vmx_read_capability`` value that constrains it."""

CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR0_TS, CR0_NW, CR0_CD = 1 << 3, 1 << 29, 1 << 30
CR4_PAE, CR4_PCIDE, CR4_CET = 1 << 5, 1 << 17, 1 << 23
RFLAGS_TF, RFLAGS_IF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 17
"""Bits of CR0, CR4 and RFLAGS the rules name."""

# --- capabilities --------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a backend reports through ``hv_vmx_read_capability``, as the checks need it.

    The control images are the framework's: low 32 bits the bits that must be 1, high 32 bits
    the bits that may be 1. The other fields have defaults for a backend that reports no
    HV_VMX_CAP_BASIC / HV_VMX_CAP_MISC (ours): an Intel Mac of the Skylake..Comet Lake years."""

    pin: int
    proc: int
    proc2: int
    entry: int
    exit: int
    cr0_fixed0: int = 0x80000021
    cr0_fixed1: int = 0xFFFFFFFF
    cr4_fixed0: int = 0x2000
    cr4_fixed1: int = 0x1767FF
    activity_states: frozenset[int] = frozenset({0, 1, 2, 3})
    """IA32_VMX_MISC bits 8:6: activity states the processor can enter (0 always)."""
    zero_length_injection: bool = True
    """IA32_VMX_MISC bit 30: software events may be injected with instruction length 0."""
    error_code_flexible: bool = False
    """IA32_VMX_BASIC bit 56: hardware exceptions may be injected with or without error code."""
    phys_bits: int = 39
    """MAXPHYADDR for the CR3 and PDPTE checks (39, the narrowest of the Intel Macs)."""
    linear_bits: int = 48

    @classmethod
    def read(cls, read_capability: Callable[[int], int]) -> Capabilities:
        """Capabilities from ``hv_vmx_read_capability`` (or a table's ``__getitem__``). BASIC
        and MISC are optional: the framework has them from macOS 11, our backends not."""
        caps = cls(
            pin=read_capability(C.HV_VMX_CAP_PINBASED),
            proc=read_capability(C.HV_VMX_CAP_PROCBASED),
            proc2=read_capability(C.HV_VMX_CAP_PROCBASED2),
            entry=read_capability(C.HV_VMX_CAP_ENTRY),
            exit=read_capability(C.HV_VMX_CAP_EXIT),
            cr0_fixed0=read_capability(C.HV_VMX_CAP_CR0_FIXED0),
            cr0_fixed1=read_capability(C.HV_VMX_CAP_CR0_FIXED1),
            cr4_fixed0=read_capability(C.HV_VMX_CAP_CR4_FIXED0),
            cr4_fixed1=read_capability(C.HV_VMX_CAP_CR4_FIXED1),
        )
        try:
            misc = read_capability(C.HV_VMX_CAP_MISC)
        except (HvError, KeyError):
            pass
        else:
            states = {0} | {state for state, bit in ((1, 6), (2, 7), (3, 8)) if misc >> bit & 1}
            caps = replace(
                caps,
                activity_states=frozenset(states),
                zero_length_injection=bool(misc >> 30 & 1),
            )
        try:
            basic = read_capability(C.HV_VMX_CAP_BASIC)
        except (HvError, KeyError):
            return caps
        return replace(caps, error_code_flexible=bool(basic >> 56 & 1))

    def control(self, field: int) -> tuple[int, int]:
        """``(must be one, may be one)`` of control word ``field``."""
        cap = {
            C.VMCS_CTRL_PIN_BASED: self.pin,
            C.VMCS_CTRL_CPU_BASED: self.proc,
            C.VMCS_CTRL_CPU_BASED2: self.proc2,
            C.VMCS_CTRL_VMENTRY_CONTROLS: self.entry,
            C.VMCS_CTRL_VMEXIT_CONTROLS: self.exit,
        }[field]
        return cap & 0xFFFFFFFF, cap >> 32


# --- failures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryFailure:
    """Why a VM entry fails: ``rule`` names the check, ``field`` the VMCS field at fault."""

    kind: Literal["controls", "guest-state"]
    rule: str
    message: str
    field: int | None = None
    qualification: int = QUAL_DEFAULT

    @property
    def status(self) -> int:
        """What the run call returns: HV_SUCCESS for a guest-state failure (an exit), HV_ERROR
        for a control failure (VMfailValid; the framework's code for it is unverified)."""
        return C.HV_SUCCESS if self.kind == "guest-state" else C.HV_ERROR

    @property
    def exit_reason(self) -> int | None:
        """0x80000021 for a guest-state failure; None (no exit) for a control failure."""
        return ENTRY_FAILED_GUEST_STATE if self.kind == "guest-state" else None

    @property
    def instr_error(self) -> int:
        """VMCS_RO_INSTR_ERROR after the failure (7 for controls, else 0)."""
        return INSTR_ERROR_CONTROLS if self.kind == "controls" else 0

    def exit_fields(self) -> dict[int, int]:
        """The exit-information fields to report (``common.exit_fields`` form)."""
        if self.kind == "controls":
            return {C.VMCS_RO_INSTR_ERROR: INSTR_ERROR_CONTROLS}
        return {
            C.VMCS_RO_EXIT_REASON: ENTRY_FAILED_GUEST_STATE,
            C.VMCS_RO_EXIT_QUALIFIC: self.qualification,
        }

    def __str__(self) -> str:
        name = C.VMCS_FIELD_NAMES.get(self.field or -1, "")
        where = f" ({name})" if name else ""
        if self.kind == "controls":
            return f"VM entry with invalid control fields{where}: {self.message}"
        return (
            f"VM entry failed (exit 0x{ENTRY_FAILED_GUEST_STATE:x}, qualification "
            f"{self.qualification}){where}: {self.message}"
        )


def bit_list(value: int) -> str:
    """The set bits of ``value``, for messages: ``"0, 5, 31"``."""
    return ", ".join(str(b) for b in range(64) if value >> b & 1)


# --- control words (SDM 26.2.1) --------------------------------------------------------------

CONTROL_RULES = {
    C.VMCS_CTRL_PIN_BASED: "pin-controls",
    C.VMCS_CTRL_CPU_BASED: "proc-controls",
    C.VMCS_CTRL_CPU_BASED2: "proc2-controls",
    C.VMCS_CTRL_VMEXIT_CONTROLS: "exit-controls",
    C.VMCS_CTRL_VMENTRY_CONTROLS: "entry-controls",
}


def control_write_error(field: int, value: int, caps: Capabilities) -> str | None:
    """Why ``value`` violates the allowed-0/allowed-1 settings of control word ``field``, or
    None (also for any field that is not one of the five control words)."""
    if field not in CONTROL_RULES:
        return None
    must, may = caps.control(field)
    if value >> 32:
        return f"bits 63:32 of a 32-bit control word set (0x{value:x})"
    if value & must != must:
        return f"must-be-one bit(s) {bit_list(must & ~value)} clear (value 0x{value:x})"
    if value & ~may:
        return f"bit(s) {bit_list(value & ~may)} not allowed to be 1 (value 0x{value:x})"
    return None


def check_control_write(field: int, value: int, caps: Capabilities) -> bool:
    """False where the framework refuses ``hv_vmx_vcpu_write_vmcs(field, value)``.

    Assumed (reference 4.6: "from 11.0, writing bits outside the masks from get_cap_write_vmcs
    may fail"): a write to the pin/primary/secondary/entry/exit control words outside
    :func:`cap_write_vmcs` is refused, with HV_BAD_ARGUMENT (:func:`control_write_error` gives
    the message); every other field is accepted and checked at entry instead."""
    return control_write_error(field, value, caps) is None


def cap_write_vmcs(field: int, caps: Capabilities) -> tuple[int, int]:
    """``hv_vmx_vcpu_get_cap_write_vmcs(field)`` built from the capabilities: ``(allowed_0,
    allowed_1)`` (a bit set in allowed_0 must be 1, a bit clear in allowed_1 must be 0).

    Control words: their capability halves. Guest CR0/CR4: the fixed bits (PE/PG free when
    unrestricted guest is must-be-one) - an assumption the Mac probe checks. Any other field:
    free within its width (bits 14:13 of the encoding)."""
    if field in CONTROL_RULES:
        return caps.control(field)
    if field == C.VMCS_GUEST_CR0:
        fixed0 = caps.cr0_fixed0
        if caps.proc2 & C.CPU_BASED2_UNRESTRICTED and caps.proc & C.CPU_BASED_SECONDARY_CTLS:
            fixed0 &= ~(CR0_PE | CR0_PG)
        return fixed0, caps.cr0_fixed1
    if field == C.VMCS_GUEST_CR4:
        return caps.cr4_fixed0, caps.cr4_fixed1
    width = (16, 64, 32, 64)[field >> 13 & 3]
    return 0, (1 << width) - 1
