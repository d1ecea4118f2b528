"""CR0/CR4 guest/host masks and read shadows, CR3/CR8 exiting, and EFER at entry and exit.

Theory of operation
-------------------
A framework VMM owns the CR0/CR4 bits it sets in the guest/host masks (QEMU's hvf support: CR0
mask PG|CD|NW|NE|ET, CR4 mask VMXE): the guest reads those bits from the read shadows, and an
instruction that would give one of them a value other than the shadow's exits (28) for the VMM
to emulate. The functions here say what VMX does for each instruction, so that a software vCPU
(emu) can do the same and a VMM can emulate the exit; they are pure functions of the values
involved. ``entry_efer`` and ``entry_controls_after_exit`` give the IA32_EFER the guest runs
with and the IA-32e mode guest control the processor leaves behind at an exit. Intel SDM vol. 3:
"Changes to Instruction Behavior in VMX Non-Root Operation", "Instructions That Cause VM Exits
Conditionally", "Loading Guest Control Registers", "Saving Control Registers".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

from . import constants as C
from .vmx_caps import CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR0_TS, Capabilities

# --- EFER and the IA-32e mode guest control -------------------------------------------------------


def entry_efer(fields: Mapping[int, int]) -> int:
    """The IA32_EFER the guest runs with after entry: the EFER field with "load IA32_EFER",
    else the field with LMA taken from the IA-32e mode guest control and, when CR0.PG is set,
    LME too (SDM 26.3.2.1)."""
    efer = fields.get(C.VMCS_GUEST_IA32_EFER, 0)
    entry = fields.get(C.VMCS_CTRL_VMENTRY_CONTROLS, 0)
    if entry & C.VMENTRY_LOAD_EFER:
        return efer
    bits = C.EFER_LMA | (C.EFER_LME if fields.get(C.VMCS_GUEST_CR0, 0) & CR0_PG else 0)
    return efer & ~bits | (bits if entry & C.VMENTRY_GUEST_IA32E else 0)


def entry_controls_after_exit(entry: int, efer: int) -> int:
    """The VM-entry controls after an exit: the processor stores IA32_EFER.LMA into the IA-32e
    mode guest control at every VM exit (SDM 27.3.1)."""
    lma = efer & C.EFER_LMA
    return entry | C.VMENTRY_GUEST_IA32E if lma else entry & ~C.VMENTRY_GUEST_IA32E


# --- CR0/CR4 guest/host masks and read shadows, CR3/CR8 exiting --------------------------------


class CrWrite(NamedTuple):
    """Outcome of a guest instruction that writes CR0/CR4: ``action`` is ``"exit"`` (exit 28,
    the VMM emulates), ``"fault"`` (#GP(0) in the guest) or ``"load"`` (the CR becomes
    ``value``; bits owned by the VMM through the mask keep their values)."""

    action: Literal["exit", "fault", "load"]
    value: int


def cr_guest_view(value: int, mask: int, shadow: int) -> int:
    """What the guest reads (MOV from CR0/CR4, SMSW): its own bits where the mask is 0, the
    read shadow where the mask is 1."""
    return (value & ~mask) | (shadow & mask)


def _fixed(cr: int, caps: Capabilities, unrestricted: bool) -> tuple[int, int]:
    if cr == 0:
        fixed0 = caps.cr0_fixed0 & ~(CR0_NW | CR0_CD)
        if unrestricted:
            fixed0 &= ~(CR0_PE | CR0_PG)
        return fixed0, caps.cr0_fixed1 | CR0_NW | CR0_CD
    if cr == 4:
        return caps.cr4_fixed0, caps.cr4_fixed1
    raise ValueError(f"CR{cr} has no guest/host mask")


def mov_to_cr(
    cr: int,
    new: int,
    current: int,
    mask: int,
    shadow: int,
    caps: Capabilities,
    unrestricted: bool = True,
) -> CrWrite:
    """A guest MOV to CR0 or CR4 of ``new``. It exits when a masked bit of ``new`` differs from
    the read shadow; otherwise the unmasked bits are loaded, and a value VMX operation does not
    allow in them (the fixed bits; PE/PG free with unrestricted guest) is a #GP. The
    architectural #GP rules of MOV to CR are the CPU model's, not checked here."""
    if (new ^ shadow) & mask:
        return CrWrite("exit", current)
    value = (current & mask) | (new & ~mask)
    fixed0, fixed1 = _fixed(cr, caps, unrestricted)
    if value & fixed0 != fixed0 or value & ~fixed1:
        return CrWrite("fault", current)
    return CrWrite("load", value)


def clts(current: int, mask: int, shadow: int) -> CrWrite:
    """CLTS: exits when CR0.TS is set in both the mask and the shadow; leaves a masked TS
    alone (the guest already reads 0) and clears an unmasked one."""
    if mask & shadow & CR0_TS:
        return CrWrite("exit", current)
    return CrWrite("load", current if mask & CR0_TS else current & ~CR0_TS)


def lmsw(source: int, current: int, mask: int, shadow: int) -> CrWrite:
    """LMSW ``source``: exits when it would set a masked PE the shadow has clear, or change a
    masked MP/EM/TS from the shadow; otherwise loads the unmasked bits 3:0 (LMSW never clears
    PE)."""
    if mask & CR0_PE and not shadow & CR0_PE and source & CR0_PE:
        return CrWrite("exit", current)
    if (source ^ shadow) & mask & 0xE:
        return CrWrite("exit", current)
    writable = 0xF & ~mask
    value = (current & ~writable) | (source & writable) | (current & CR0_PE)
    return CrWrite("load", value)


CR_ACCESS_MOV_TO, CR_ACCESS_MOV_FROM, CR_ACCESS_CLTS, CR_ACCESS_LMSW = range(4)


def cr_access_qualification(
    cr: int, access: int, gpr: int = 0, lmsw_source: int = 0, lmsw_memory: bool = False
) -> int:
    """Exit qualification of exit 28: CR number (3:0), access type (5:4: 0 MOV to CR, 1 MOV from
    CR, 2 CLTS, 3 LMSW), LMSW operand type (6: memory), GPR (11:8, x86 encoding order: 0 RAX,
    1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15), LMSW source data (31:16)."""
    return (
        cr & 0xF
        | (access & 3) << 4
        | (1 << 6 if lmsw_memory else 0)
        | (gpr & 0xF) << 8
        | (lmsw_source & 0xFFFF) << 16
    )


def mov_cr3_exits(proc: int, to_cr: bool, value: int = 0, targets: tuple[int, ...] = ()) -> bool:
    """Whether MOV to/from CR3 exits: CR3-store exiting for reads; CR3-load exiting for writes
    unless ``value`` is one of the CR3-target values (the first CR3-target-count ones)."""
    if not to_cr:
        return bool(proc & C.CPU_BASED_CR3_STORE)
    return bool(proc & C.CPU_BASED_CR3_LOAD) and value not in targets


def mov_cr8_exits(proc: int, to_cr: bool) -> bool:
    """Whether MOV to/from CR8 exits (CR8-load / CR8-store exiting). Without an exit and with
    the TPR shadow, the access reads or writes the virtual TPR (bits 7:4 = CR8); a write below
    the TPR threshold then exits 43 after the instruction (:func:`tpr_below_threshold`)."""
    return bool(proc & (C.CPU_BASED_CR8_LOAD if to_cr else C.CPU_BASED_CR8_STORE))


def tpr_below_threshold(vtpr: int, threshold: int) -> bool:
    """A write of the virtual TPR (with TPR shadow, no virtual-interrupt delivery) that leaves
    its priority class below the TPR threshold causes exit 43."""
    return vtpr >> 4 < threshold & 0xF
