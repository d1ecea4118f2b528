"""gdbstub.hv.vmx_rules: the VM-entry checks, the control-write rule, the entry gate and the
CR0/CR4 mask/shadow helpers, table-driven and without any backend.

The valid set-ups are the ones framework VMMs write (QEMU's hvf support at reset and in long
mode, hvdos's real mode, hyperkit's/ukvm's shapes); each forbidden set-up is one of those with one
thing changed, and must fail with the rule, the kind, the field and the qualification the SDM
gives. The capabilities are our backends' own table (``common.vmx_capabilities``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from gdbstub.hv import common, vmx_checks
from gdbstub.hv import constants as C
from gdbstub.hv import vmx_rules as R
from gdbstub.hv.errors import HvError

CAPS = R.Capabilities.read(common.vmx_capabilities().__getitem__)
"""Our backends' capabilities (unrestricted guest and EPT must be one, as on the Mac)."""

OPTIONAL_SECONDARY = dataclasses.replace(
    CAPS,
    pin=(CAPS.pin & ~0xFFFFFFFF | 0x16) | C.PIN_BASED_NMI << 32,  # NMI exiting optional
    proc=(CAPS.proc & ~C.CPU_BASED_SECONDARY_CTLS) | C.CPU_BASED_VIRTUAL_NMI_WND << 32,
    proc2=(CAPS.proc2 & ~0xFFFFFFFF) | (C.CPU_BASED2_PML | C.CPU_BASED2_UNRESTRICTED) << 32,
)
"""A processor on which secondary controls, unrestricted guest and NMI exiting are optional."""

MASK = (1 << 64) - 1
U = 1 << 16  # access rights: unusable


def cap2ctrl(cap: int, want: int) -> int:
    return (want | (cap & 0xFFFFFFFF)) & (cap >> 32)


def controls(
    caps: R.Capabilities = CAPS, proc: int = 0, proc2: int = 0, entry: int = 0, pin: int = 0
) -> dict[int, int]:
    return {
        C.VMCS_CTRL_PIN_BASED: cap2ctrl(caps.pin, pin),
        C.VMCS_CTRL_CPU_BASED: cap2ctrl(caps.proc, proc),
        C.VMCS_CTRL_CPU_BASED2: cap2ctrl(caps.proc2, proc2),
        C.VMCS_CTRL_VMENTRY_CONTROLS: cap2ctrl(caps.entry, entry),
        C.VMCS_CTRL_VMEXIT_CONTROLS: cap2ctrl(caps.exit, 0),
        C.VMCS_GUEST_LINK_POINTER: MASK,
    }


def segment(index: int, selector: int, base: int, limit: int, ar: int) -> dict[int, int]:
    return {
        C.VMCS_GUEST_ES + 2 * index: selector,
        C.VMCS_GUEST_ES_BASE + 2 * index: base,
        C.VMCS_GUEST_ES_LIMIT + 2 * index: limit,
        C.VMCS_GUEST_ES_AR + 2 * index: ar,
    }


ES, CS, SS, DS, FS, GS, LDTR, TR = range(8)


def qemu_reset() -> dict[int, int]:
    """QEMU's hvf vCPU at reset: CR0 0x60000010 behind mask PG|CD|NW|NE|ET (guest CR0 NE|ET),
    CR4 VMXE behind mask VMXE with shadow 0, HLT exiting and TPR shadow, CS F000:FFF0."""
    f = controls(
        proc=C.CPU_BASED_HLT | C.CPU_BASED_TPR_SHADOW | C.CPU_BASED_SECONDARY_CTLS,
        proc2=C.CPU_BASED2_VIRTUAL_APIC,
        pin=C.PIN_BASED_INTR | C.PIN_BASED_NMI | C.PIN_BASED_VIRTUAL_NMI,
    )
    f |= segment(CS, 0xF000, 0xFFFF0000, 0xFFFF, 0x9B)
    for i in (ES, SS, DS, FS, GS):
        f |= segment(i, 0, 0, 0xFFFF, 0x93)
    f |= segment(LDTR, 0, 0, 0xFFFF, 0x82) | segment(TR, 0, 0, 0xFFFF, 0x8B)
    f |= {
        C.VMCS_GUEST_CR0: 0x30,
        C.VMCS_CTRL_CR0_MASK: 0xE0000030,
        C.VMCS_CTRL_CR0_SHADOW: 0x60000010,
        C.VMCS_GUEST_CR4: 0x2000,
        C.VMCS_CTRL_CR4_MASK: 0x2000,
        C.VMCS_CTRL_CR4_SHADOW: 0,
        C.VMCS_GUEST_GDTR_LIMIT: 0xFFFF,
        C.VMCS_GUEST_IDTR_LIMIT: 0xFFFF,
        C.VMCS_GUEST_RFLAGS: 2,
        C.VMCS_GUEST_RIP: 0xFFF0,
    }
    return f


def hvdos() -> dict[int, int]:
    """hvdos's real mode: CR0 0x20, CR4 0x2000 with no masks, LDTR unusable, TR 0x83 limit 0."""
    f = controls(proc=C.CPU_BASED_HLT)
    f |= segment(CS, 0, 0, 0xFFFF, 0x9B)
    for i in (ES, SS, DS, FS, GS):
        f |= segment(i, 0, 0, 0xFFFF, 0x93)
    f |= segment(LDTR, 0, 0, 0, U) | segment(TR, 0, 0, 0, 0x83)
    f |= {C.VMCS_GUEST_CR0: 0x20, C.VMCS_GUEST_CR4: 0x2000, C.VMCS_GUEST_RFLAGS: 2}
    f[C.VMCS_GUEST_RIP] = 0x100
    return f


def long_mode() -> dict[int, int]:
    """64-bit mode as a framework VMM loads it: CR0 PG|WP|NE|ET|MP|PE, CR4 VMXE|OSXMMEXCPT|OSFXSR|
    PAE behind mask VMXE, EFER LMA|LME|NXE with load-EFER, TR a 64-bit busy TSS."""
    f = controls(
        proc=C.CPU_BASED_HLT | C.CPU_BASED_CR8_LOAD | C.CPU_BASED_CR8_STORE,
        entry=C.VMENTRY_GUEST_IA32E | C.VMENTRY_LOAD_EFER,
    )
    f |= segment(CS, 0x08, 0, 0xFFFFFFFF, 0xA09B)
    for i in (ES, SS, DS, FS, GS):
        f |= segment(i, 0x10, 0, 0xFFFFFFFF, 0xC093)
    f |= segment(LDTR, 0, 0, 0, U) | segment(TR, 0x28, 0, 0x67, 0x8B)
    f |= {
        C.VMCS_GUEST_CR0: 0x80010033,
        C.VMCS_GUEST_CR4: 0x2620,
        C.VMCS_CTRL_CR4_MASK: 0x2000,
        C.VMCS_CTRL_CR4_SHADOW: 0x620,
        C.VMCS_GUEST_CR3: 0x1000,
        C.VMCS_GUEST_IA32_EFER: 0xD00,
        C.VMCS_GUEST_GDTR_BASE: 0x500,
        C.VMCS_GUEST_GDTR_LIMIT: 0x37,
        C.VMCS_GUEST_RFLAGS: 2,
        C.VMCS_GUEST_RIP: 0xFFFF_8000_0000_1000,
    }
    return f


def user64() -> dict[int, int]:
    """Long mode at CPL3 (DPL 3 code and stack, RPL 3 selectors)."""
    f = long_mode()
    f |= segment(CS, 0x33, 0, 0xFFFFFFFF, 0xA0FB)
    for i in (ES, SS, DS, FS, GS):
        f |= segment(i, 0x2B, 0, 0xFFFFFFFF, 0xC0F3)
    f[C.VMCS_GUEST_RIP] = 0x401000
    return f


def pae32() -> dict[int, int]:
    """32-bit protected mode with PAE paging: the PDPTEs come from the VMCS (EPT is on)."""
    f = controls(proc=C.CPU_BASED_TPR_SHADOW)
    f |= segment(CS, 0x08, 0, 0xFFFFFFFF, 0xC09B)
    for i in (ES, SS, DS, FS, GS):
        f |= segment(i, 0x10, 0, 0xFFFFFFFF, 0xC093)
    f |= segment(LDTR, 0, 0, 0, U) | segment(TR, 0x20, 0x1000, 0x67, 0x8B)
    f |= {
        C.VMCS_GUEST_CR0: 0x80000031,
        C.VMCS_GUEST_CR4: 0x2020,
        C.VMCS_GUEST_CR3: 0x3000,
        C.VMCS_GUEST_PDPTE0: 0x4001,
        C.VMCS_GUEST_PDPTE1: 0,
        C.VMCS_GUEST_RFLAGS: 0x202,
        C.VMCS_GUEST_RIP: 0xC0001000,
    }
    return f


def v8086() -> dict[int, int]:
    """Virtual-8086 mode under a 32-bit protected-mode monitor."""
    f = pae32()
    f[C.VMCS_GUEST_CR0] = 0x31
    for i in (ES, CS, SS, DS, FS, GS):
        f |= segment(i, 0x1234, 0x12340, 0xFFFF, 0xF3)
    f[C.VMCS_GUEST_RFLAGS] = 0x20202
    f[C.VMCS_GUEST_RIP] = 0x100
    return f


BASES: dict[str, Callable[[], dict[int, int]]] = {
    "qemu-reset": qemu_reset,
    "hvdos": hvdos,
    "long": long_mode,
    "user64": user64,
    "pae32": pae32,
    "v8086": v8086,
}

VALID: list[tuple[str, str, dict[int, int]]] = [
    (name, "as written", {}) for name in BASES
] + [
    ("qemu-reset", "unusable DS with any other access rights", {C.VMCS_GUEST_DS_AR: U | 0xF1F}),
    ("qemu-reset", "SS usable type 7 (expand-down)", {C.VMCS_GUEST_SS_AR: 0x97}),
    ("qemu-reset", "CS as data (type 3, DPL 0) with unrestricted guest",
     {C.VMCS_GUEST_CS_AR: 0x93}),
    ("qemu-reset", "TR a 16-bit busy TSS outside IA-32e mode", {C.VMCS_GUEST_TR_AR: 0x83}),
    ("qemu-reset", "limit 0xfffff with G=1",
     {C.VMCS_GUEST_FS_LIMIT: 0xFFFFF, C.VMCS_GUEST_FS_AR: 0x8093}),
    ("qemu-reset", "HLT activity", {C.VMCS_GUEST_ACTIVITY_STATE: 1}),
    ("qemu-reset", "#GP injected without error code in real mode",
     {C.VMCS_CTRL_VMENTRY_IRQ_INFO: C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | 13}),
    ("qemu-reset", "external interrupt injected in HLT with IF",
     {C.VMCS_GUEST_ACTIVITY_STATE: 1, C.VMCS_GUEST_RFLAGS: 0x202,
      C.VMCS_CTRL_VMENTRY_IRQ_INFO: C.IRQ_INFO_VALID | 0x20}),
    ("qemu-reset", "STI blocking with IF, BS pending for TF",
     {C.VMCS_GUEST_RFLAGS: 0x302, C.VMCS_GUEST_INTERRUPTIBILITY: 1,
      C.VMCS_GUEST_DEBUG_EXC: 1 << 14}),
    ("qemu-reset", "TPR threshold 0 with the TPR shadow and VTPR 0", {R.FIELD_VTPR: 0}),
    ("long", "EFER.LMA without the IA-32e control when EFER is not loaded",
     {C.VMCS_CTRL_VMENTRY_CONTROLS: cap2ctrl(CAPS.entry, 0),
      C.VMCS_GUEST_CS_AR: 0xC09B, C.VMCS_GUEST_RIP: 0x1000, C.VMCS_GUEST_TR_AR: 0x8B}),
    ("long", "#PF injected with error code",
     {C.VMCS_CTRL_VMENTRY_IRQ_INFO: C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC
      | C.IRQ_INFO_ERROR_VALID | 14, C.VMCS_CTRL_VMENTRY_EXC_ERROR: 2}),
    ("long", "INT3 re-injected as a software exception of length 1",
     {C.VMCS_CTRL_VMENTRY_IRQ_INFO: C.IRQ_INFO_VALID | C.IRQ_INFO_SOFT_EXC | 3,
      C.VMCS_CTRL_VMENTRY_INSTR_LEN: 1}),
    ("pae32", "a PDPTE that is not present may hold anything", {C.VMCS_GUEST_PDPTE2: 0x1E6}),
    ("pae32", "NMI injected",
     {C.VMCS_CTRL_VMENTRY_IRQ_INFO: C.IRQ_INFO_VALID | C.IRQ_INFO_NMI | 2}),
]  # fmt: skip


@pytest.mark.parametrize(("base", "what", "change"), VALID, ids=[f"{b}: {w}" for b, w, _ in VALID])
def test_framework_style_setups_pass(base: str, what: str, change: dict[int, int]) -> None:
    fields = BASES[base]() | change
    assert R.check_entry(fields, CAPS) is None
    gate = R.EntryGate(CAPS)
    assert gate.check(fields) is None and gate.dirty == 0


G, CTRL = "guest-state", "controls"
IRQ = C.VMCS_CTRL_VMENTRY_IRQ_INFO
VALID_IRQ = C.IRQ_INFO_VALID

# (base, change, kind, rule, field, qualification, words in the message)
FORBIDDEN: list[tuple[str, dict[int, int], str, str, int, int, str]] = [
    # 26.2.1: control words against the allowed-0/allowed-1 halves
    ("qemu-reset", {C.VMCS_CTRL_PIN_BASED: 0}, CTRL, "pin-controls", C.VMCS_CTRL_PIN_BASED, 0,
     "must-be-one"),
    ("qemu-reset", {C.VMCS_CTRL_CPU_BASED: cap2ctrl(CAPS.proc, 0) | C.CPU_BASED_CR3_LOAD},
     CTRL, "proc-controls", C.VMCS_CTRL_CPU_BASED, 0, "15"),
    ("qemu-reset", {C.VMCS_CTRL_CPU_BASED: cap2ctrl(CAPS.proc, 0) | 1}, CTRL, "proc-controls",
     C.VMCS_CTRL_CPU_BASED, 0, "not allowed"),
    ("qemu-reset", {C.VMCS_CTRL_CPU_BASED2: cap2ctrl(CAPS.proc2, 0) | C.CPU_BASED2_PML}, CTRL,
     "proc2-controls", C.VMCS_CTRL_CPU_BASED2, 0, "17"),
    ("qemu-reset", {C.VMCS_CTRL_VMENTRY_CONTROLS: cap2ctrl(CAPS.entry, 0) | C.VMENTRY_SMM}, CTRL,
     "entry-controls", C.VMCS_CTRL_VMENTRY_CONTROLS, 0, "10"),
    ("qemu-reset", {C.VMCS_CTRL_VMEXIT_CONTROLS: 1 << 32}, CTRL, "exit-controls",
     C.VMCS_CTRL_VMEXIT_CONTROLS, 0, "63:32"),
    ("qemu-reset", {C.VMCS_CTRL_TPR_THRESHOLD: 0x10}, CTRL, "tpr-threshold",
     C.VMCS_CTRL_TPR_THRESHOLD, 0, "31:4"),
    ("qemu-reset", {C.VMCS_CTRL_TPR_THRESHOLD: 3, R.FIELD_VTPR: 0x20}, CTRL, "tpr-threshold",
     C.VMCS_CTRL_TPR_THRESHOLD, 0, "virtual TPR"),
    ("qemu-reset", {C.VMCS_CTRL_VMEXIT_CONTROLS: cap2ctrl(CAPS.exit, 0) | C.VMEXIT_SAVE_VMX_TIMER},
     CTRL, "exit-controls", C.VMCS_CTRL_VMEXIT_CONTROLS, 0, "22"),
    # 26.2.1.3: event injection
    ("qemu-reset", {IRQ: VALID_IRQ | 1 << 8 | 32}, CTRL, "entry-event", IRQ, 0, "type 1"),
    ("qemu-reset", {IRQ: VALID_IRQ | C.IRQ_INFO_NMI | 3}, CTRL, "entry-event", IRQ, 0, "vector 3"),
    ("qemu-reset", {IRQ: VALID_IRQ | C.IRQ_INFO_HARD_EXC | 32}, CTRL, "entry-event", IRQ, 0, "32"),
    ("qemu-reset", {IRQ: VALID_IRQ | 1 << 12}, CTRL, "entry-event", IRQ, 0, "30:12"),
    ("long", {IRQ: VALID_IRQ | C.IRQ_INFO_HARD_EXC | 13}, CTRL, "entry-event", IRQ, 0,
     "needs an error code"),
    ("long", {IRQ: VALID_IRQ | C.IRQ_INFO_HARD_EXC | C.IRQ_INFO_ERROR_VALID | 6}, CTRL,
     "entry-event", IRQ, 0, "must not have"),
    ("qemu-reset", {IRQ: VALID_IRQ | C.IRQ_INFO_HARD_EXC | C.IRQ_INFO_ERROR_VALID | 13}, CTRL,
     "entry-event", IRQ, 0, "must not have"),
    ("long", {IRQ: VALID_IRQ | C.IRQ_INFO_HARD_EXC | C.IRQ_INFO_ERROR_VALID | 13,
              C.VMCS_CTRL_VMENTRY_EXC_ERROR: 0x10000}, CTRL, "entry-event",
     C.VMCS_CTRL_VMENTRY_EXC_ERROR, 0, "31:16"),
    ("long", {IRQ: VALID_IRQ | C.IRQ_INFO_SOFT_IRQ | 0x80, C.VMCS_CTRL_VMENTRY_INSTR_LEN: 16},
     CTRL, "entry-event", C.VMCS_CTRL_VMENTRY_INSTR_LEN, 0, "length 16"),
    # 26.3.1.1: CR0/CR4 fixed bits, IA-32e mode, EFER, DR7, DEBUGCTL, PAT, SYSENTER
    ("qemu-reset", {C.VMCS_GUEST_CR4: 0}, G, "cr4-fixed", C.VMCS_GUEST_CR4, 0, "13"),
    ("qemu-reset", {C.VMCS_GUEST_CR0: 0x10}, G, "cr0-fixed", C.VMCS_GUEST_CR0, 0, "5"),
    ("long", {C.VMCS_GUEST_CR0: 0x80010013}, G, "cr0-fixed", C.VMCS_GUEST_CR0, 0, "5"),
    ("qemu-reset", {C.VMCS_GUEST_CR0: 0x1_0000_0030}, G, "cr0-fixed", C.VMCS_GUEST_CR0, 0, "32"),
    ("qemu-reset", {C.VMCS_GUEST_CR0: 0x80000030}, G, "cr0-pg-without-pe", C.VMCS_GUEST_CR0, 0,
     "PG without PE"),
    ("qemu-reset", {C.VMCS_GUEST_CR4: 0x3000}, G, "cr4-fixed", C.VMCS_GUEST_CR4, 0, "12"),
    ("long", {C.VMCS_GUEST_CR4: 0x2600}, G, "ia32e-without-paging", C.VMCS_CTRL_VMENTRY_CONTROLS,
     0, "PAE"),
    ("qemu-reset", {C.VMCS_CTRL_VMENTRY_CONTROLS: cap2ctrl(CAPS.entry, C.VMENTRY_GUEST_IA32E)}, G,
     "ia32e-without-paging", C.VMCS_CTRL_VMENTRY_CONTROLS, 0, "CR0.PG"),
    ("pae32", {C.VMCS_GUEST_CR4: 0x22020}, G, "pcide-outside-ia32e", C.VMCS_GUEST_CR4, 0, "PCIDE"),
    ("long", {C.VMCS_GUEST_CR3: 1 << 39}, G, "cr3-reserved", C.VMCS_GUEST_CR3, 0, "39"),
    ("long", {C.VMCS_GUEST_DR7: 1 << 32}, G, "dr7-high", C.VMCS_GUEST_DR7, 0, "63:32"),
    ("long", {C.VMCS_GUEST_IA32_DEBUGCTL: 1 << 2}, G, "debugctl-reserved",
     C.VMCS_GUEST_IA32_DEBUGCTL, 0, "reserved"),
    ("long", {C.VMCS_GUEST_SYSENTER_EIP: 1 << 47}, G, "sysenter-canonical",
     C.VMCS_GUEST_SYSENTER_EIP, 0, "canonical"),
    ("long", {C.VMCS_CTRL_VMENTRY_CONTROLS: cap2ctrl(CAPS.entry, C.VMENTRY_GUEST_IA32E
              | C.VMENTRY_LOAD_EFER | C.VMENTRY_LOAD_IA32_PAT), C.VMCS_GUEST_IA32_PAT: 0x0002},
     G, "pat-invalid", C.VMCS_GUEST_IA32_PAT, 0, "memory type"),
    ("long", {C.VMCS_GUEST_IA32_EFER: 0xD00 | 1 << 12}, G, "efer-reserved",
     C.VMCS_GUEST_IA32_EFER, 0, "reserved"),
    ("long", {C.VMCS_GUEST_IA32_EFER: 0x900}, G, "efer-lma", C.VMCS_GUEST_IA32_EFER, 0,
     "IA-32e mode guest"),
    ("pae32", {C.VMCS_CTRL_VMENTRY_CONTROLS: cap2ctrl(CAPS.entry, C.VMENTRY_LOAD_EFER),
               C.VMCS_GUEST_IA32_EFER: 0x500}, G, "efer-lma", C.VMCS_GUEST_IA32_EFER, 0, "LMA"),
    ("pae32", {C.VMCS_CTRL_VMENTRY_CONTROLS: cap2ctrl(CAPS.entry, C.VMENTRY_LOAD_EFER),
               C.VMCS_GUEST_IA32_EFER: 0x100}, G, "efer-lma", C.VMCS_GUEST_IA32_EFER, 0, "LME"),
    # 26.3.1.2: segment registers
    ("qemu-reset", {C.VMCS_GUEST_TR_LIMIT: 0xFFFFFFFF}, G, "segment-granularity",
     C.VMCS_GUEST_TR_AR, 0, "TR.limit"),
    ("long", {C.VMCS_GUEST_DS_LIMIT: 0xFFFFF000}, G, "segment-granularity", C.VMCS_GUEST_DS_AR, 0,
     "DS.limit"),
    ("qemu-reset", {C.VMCS_GUEST_TR_AR: 0x89}, G, "tr-type", C.VMCS_GUEST_TR_AR, 0, "busy TSS"),
    ("long", {C.VMCS_GUEST_TR_AR: 0x83}, G, "tr-type", C.VMCS_GUEST_TR_AR, 0, "type 3"),
    ("long", {C.VMCS_GUEST_TR_AR: 0x1008B}, G, "tr-unusable", C.VMCS_GUEST_TR_AR, 0, "usable"),
    ("long", {C.VMCS_GUEST_TR_AR: 0x9B}, G, "system-segment", C.VMCS_GUEST_TR_AR, 0, "TR.S"),
    ("long", {C.VMCS_GUEST_TR_AR: 0x0B}, G, "segment-present", C.VMCS_GUEST_TR_AR, 0, "TR"),
    ("long", {C.VMCS_GUEST_TR: 0x2C}, G, "selector-ti", C.VMCS_GUEST_TR, 0, "TI"),
    ("long", {C.VMCS_GUEST_LDTR_AR: 0x82, C.VMCS_GUEST_LDTR: 4}, G, "selector-ti",
     C.VMCS_GUEST_LDTR, 0, "LDTR"),
    ("qemu-reset", {C.VMCS_GUEST_LDTR_AR: 0x83}, G, "ldtr-type", C.VMCS_GUEST_LDTR_AR, 0, "LDT"),
    ("qemu-reset", {C.VMCS_GUEST_CS_AR: 0x91}, G, "segment-type", C.VMCS_GUEST_CS_AR, 0,
     "CS type 1"),
    ("qemu-reset", {C.VMCS_GUEST_SS_AR: 0x9B}, G, "segment-type", C.VMCS_GUEST_SS_AR, 0,
     "SS type 11"),
    ("qemu-reset", {C.VMCS_GUEST_DS_AR: 0x99}, G, "segment-type", C.VMCS_GUEST_DS_AR, 0,
     "readable"),
    ("qemu-reset", {C.VMCS_GUEST_ES_AR: 0x92}, G, "segment-type", C.VMCS_GUEST_ES_AR, 0,
     "accessed"),
    ("qemu-reset", {C.VMCS_GUEST_GS_AR: 0x83}, G, "segment-s", C.VMCS_GUEST_GS_AR, 0, "GS.S"),
    ("qemu-reset", {C.VMCS_GUEST_FS_AR: 0x13}, G, "segment-present", C.VMCS_GUEST_FS_AR, 0, "FS"),
    ("qemu-reset", {C.VMCS_GUEST_DS_AR: 0x193}, G, "segment-reserved", C.VMCS_GUEST_DS_AR, 0,
     "reserved"),
    ("long", {C.VMCS_GUEST_CS_AR: 0xE09B}, G, "cs-long-db", C.VMCS_GUEST_CS_AR, 0, "D/B"),
    ("long", {C.VMCS_GUEST_CS_BASE: 1 << 32}, G, "segment-base", C.VMCS_GUEST_CS_BASE, 0, "63:32"),
    ("long", {C.VMCS_GUEST_FS_BASE: 1 << 47}, G, "segment-base", C.VMCS_GUEST_FS_BASE, 0,
     "canonical"),
    ("qemu-reset", {C.VMCS_GUEST_SS_AR: 0xF3, C.VMCS_GUEST_CS_AR: 0xFB}, G, "segment-dpl",
     C.VMCS_GUEST_SS_AR, 0, "real mode"),
    ("qemu-reset", {C.VMCS_GUEST_CS_AR: 0xB3}, G, "segment-dpl", C.VMCS_GUEST_CS_AR, 0, "DPL 0"),
    ("user64", {C.VMCS_GUEST_CS_AR: 0xA09B}, G, "segment-dpl", C.VMCS_GUEST_CS_AR, 0, "SS.DPL"),
    ("user64", {C.VMCS_GUEST_CS_AR: 0xA0FF, C.VMCS_GUEST_SS_AR: 0xC093}, G, "segment-dpl",
     C.VMCS_GUEST_CS_AR, 0, "conforming"),
    ("v8086", {C.VMCS_GUEST_DS_AR: 0x93}, G, "v8086-segment", C.VMCS_GUEST_DS_AR, 0, "0xf3"),
    ("v8086", {C.VMCS_GUEST_ES_BASE: 0}, G, "v8086-segment", C.VMCS_GUEST_ES_BASE, 0, "<< 4"),
    ("v8086", {C.VMCS_GUEST_SS_LIMIT: 0xFFFFF}, G, "v8086-segment", C.VMCS_GUEST_SS_LIMIT, 0,
     "0xffff"),
    # 26.3.1.3 / 26.3.1.4: descriptor tables, RIP, RFLAGS
    ("qemu-reset", {C.VMCS_GUEST_GDTR_LIMIT: 0x10000}, G, "descriptor-table",
     C.VMCS_GUEST_GDTR_LIMIT, 0, "31:16"),
    ("long", {C.VMCS_GUEST_IDTR_BASE: 0x0000_8000_0000_0000}, G, "descriptor-table",
     C.VMCS_GUEST_IDTR_BASE, 0, "canonical"),
    ("qemu-reset", {C.VMCS_GUEST_RIP: 1 << 32}, G, "rip", C.VMCS_GUEST_RIP, 0, "63:32"),
    ("long", {C.VMCS_GUEST_RIP: 1 << 47}, G, "rip", C.VMCS_GUEST_RIP, 0, "canonical"),
    ("qemu-reset", {C.VMCS_GUEST_RFLAGS: 0}, G, "rflags-reserved", C.VMCS_GUEST_RFLAGS, 0, "bit 1"),
    ("qemu-reset", {C.VMCS_GUEST_RFLAGS: 0xA}, G, "rflags-reserved", C.VMCS_GUEST_RFLAGS, 0,
     "reserved"),
    ("v8086", {C.VMCS_GUEST_CR0: 0x30}, G, "rflags-vm", C.VMCS_GUEST_RFLAGS, 0, "CR0.PE"),
    ("qemu-reset", {IRQ: VALID_IRQ | 0x20}, G, "rflags-if", C.VMCS_GUEST_RFLAGS, 0, "RFLAGS.IF"),
    # 26.3.1.5: activity, interruptibility, pending debug exceptions, link pointer
    ("qemu-reset", {C.VMCS_GUEST_ACTIVITY_STATE: 4}, G, "activity-state",
     C.VMCS_GUEST_ACTIVITY_STATE, 0, "not supported"),
    ("user64", {C.VMCS_GUEST_ACTIVITY_STATE: 1}, G, "activity-state", C.VMCS_GUEST_ACTIVITY_STATE,
     0, "SS.DPL"),
    ("qemu-reset", {C.VMCS_GUEST_ACTIVITY_STATE: 1, C.VMCS_GUEST_RFLAGS: 0x202,
                    C.VMCS_GUEST_INTERRUPTIBILITY: 1}, G, "activity-state",
     C.VMCS_GUEST_ACTIVITY_STATE, 0, "active state"),
    ("qemu-reset", {C.VMCS_GUEST_ACTIVITY_STATE: 3, IRQ: VALID_IRQ | C.IRQ_INFO_NMI | 2}, G,
     "activity-state", C.VMCS_GUEST_ACTIVITY_STATE, 0, "activity state 3"),
    ("qemu-reset", {C.VMCS_GUEST_ACTIVITY_STATE: 1, IRQ: VALID_IRQ | C.IRQ_INFO_HARD_EXC | 6}, G,
     "activity-state", C.VMCS_GUEST_ACTIVITY_STATE, 0, "vector 6"),
    ("qemu-reset", {C.VMCS_GUEST_INTERRUPTIBILITY: 1}, G, "interruptibility",
     C.VMCS_GUEST_INTERRUPTIBILITY, 0, "IF clear"),
    ("qemu-reset", {C.VMCS_GUEST_INTERRUPTIBILITY: 3, C.VMCS_GUEST_RFLAGS: 0x202}, G,
     "interruptibility", C.VMCS_GUEST_INTERRUPTIBILITY, 0, "both"),
    ("qemu-reset", {C.VMCS_GUEST_INTERRUPTIBILITY: 0x20}, G, "interruptibility",
     C.VMCS_GUEST_INTERRUPTIBILITY, 0, "reserved"),
    ("qemu-reset", {C.VMCS_GUEST_INTERRUPTIBILITY: 4}, G, "interruptibility",
     C.VMCS_GUEST_INTERRUPTIBILITY, 0, "SMM"),
    ("qemu-reset", {C.VMCS_GUEST_INTERRUPTIBILITY: 1, C.VMCS_GUEST_RFLAGS: 0x202,
                    IRQ: VALID_IRQ | 0x20}, G, "interruptibility", C.VMCS_GUEST_INTERRUPTIBILITY,
     0, "external interrupt"),
    ("qemu-reset", {C.VMCS_GUEST_INTERRUPTIBILITY: 1, C.VMCS_GUEST_RFLAGS: 0x202,
                    IRQ: VALID_IRQ | C.IRQ_INFO_NMI | 2}, G, "interruptibility",
     C.VMCS_GUEST_INTERRUPTIBILITY, R.QUAL_NMI_STI, "NMI"),
    ("qemu-reset", {C.VMCS_GUEST_INTERRUPTIBILITY: 2, IRQ: VALID_IRQ | C.IRQ_INFO_NMI | 2}, G,
     "interruptibility", C.VMCS_GUEST_INTERRUPTIBILITY, 0, "NMI"),
    ("qemu-reset", {C.VMCS_GUEST_INTERRUPTIBILITY: 8, IRQ: VALID_IRQ | C.IRQ_INFO_NMI | 2}, G,
     "interruptibility", C.VMCS_GUEST_INTERRUPTIBILITY, 0, "virtual NMI"),
    ("qemu-reset", {C.VMCS_GUEST_DEBUG_EXC: 1 << 4}, G, "pending-debug", C.VMCS_GUEST_DEBUG_EXC, 0,
     "reserved"),
    ("qemu-reset", {C.VMCS_GUEST_RFLAGS: 0x302, C.VMCS_GUEST_INTERRUPTIBILITY: 1}, G,
     "pending-debug", C.VMCS_GUEST_DEBUG_EXC, 0, "BS"),
    ("qemu-reset", {C.VMCS_GUEST_ACTIVITY_STATE: 1, C.VMCS_GUEST_DEBUG_EXC: 1 << 14}, G,
     "pending-debug", C.VMCS_GUEST_DEBUG_EXC, 0, "BS"),
    ("qemu-reset", {C.VMCS_GUEST_LINK_POINTER: 0}, G, "link-pointer", C.VMCS_GUEST_LINK_POINTER,
     R.QUAL_LINK_POINTER, "link pointer"),
    # 26.3.1.6: PDPTEs
    ("pae32", {C.VMCS_GUEST_PDPTE1: 0x5003}, G, "pdpte", C.VMCS_GUEST_PDPTE1, R.QUAL_PDPTE,
     "PDPTE1"),
    ("pae32", {C.VMCS_GUEST_PDPTE3: 1 | 1 << 45}, G, "pdpte", C.VMCS_GUEST_PDPTE3, R.QUAL_PDPTE,
     "PDPTE3"),
]  # fmt: skip


def _forbidden_id(row: tuple[str, dict[int, int], str, str, int, int, str]) -> str:
    base, change, _kind, rule, *_ = row
    names = ",".join(C.VMCS_FIELD_NAMES.get(f, hex(f)).removeprefix("VMCS_") for f in change)
    return f"{rule}: {base} {names}"


@pytest.mark.parametrize(
    ("base", "change", "kind", "rule", "field", "qual", "words"),
    FORBIDDEN,
    ids=[_forbidden_id(row) for row in FORBIDDEN],
)
def test_forbidden_setups_fail_as_vmx_does(
    base: str, change: dict[int, int], kind: str, rule: str, field: int, qual: int, words: str
) -> None:
    fields = BASES[base]() | change
    failure = R.check_entry(fields, CAPS)
    assert failure is not None, "entry accepted"
    assert (failure.kind, failure.rule, failure.field, failure.qualification) == (
        kind, rule, field, qual
    ), str(failure)  # fmt: skip
    assert words in failure.message
    if kind == G:
        assert failure.status == C.HV_SUCCESS and failure.exit_reason == 0x80000021
        assert failure.exit_fields() == {C.VMCS_RO_EXIT_REASON: 0x80000021,
                                         C.VMCS_RO_EXIT_QUALIFIC: qual}  # fmt: skip
        assert R.check_controls(fields, CAPS) is None
        assert R.check_guest_state(fields, CAPS) == failure
    else:
        assert failure.status == C.HV_ERROR and failure.exit_reason is None
        assert failure.exit_fields() == {C.VMCS_RO_INSTR_ERROR: 7}
        assert R.check_controls(fields, CAPS) == failure
    assert C.VMCS_FIELD_NAMES.get(field, "?") in str(failure) or field not in C.VMCS_FIELD_NAMES


def test_controls_are_checked_before_guest_state() -> None:
    fields = qemu_reset() | {C.VMCS_GUEST_CR4: 0, C.VMCS_CTRL_PIN_BASED: 0}
    failure = R.check_entry(fields, CAPS)
    assert failure is not None and failure.rule == "pin-controls"


# --- what the capabilities decide -------------------------------------------------------------


def test_our_capabilities_are_a_macs() -> None:
    """TPR shadow and CR8-load/store exiting available, CR3-load/store exiting allowed 0, EPT
    and unrestricted guest must be one, CR4.VMXE and CR0.PE/NE/PG fixed to 1."""
    for caps_table in (common.vmx_capabilities(), common.vmx_capabilities(C.CPU_BASED2_INVPCID)):
        caps = R.Capabilities.read(caps_table.__getitem__)
        must, may = caps.control(C.VMCS_CTRL_CPU_BASED)
        for bit in (C.CPU_BASED_TPR_SHADOW, C.CPU_BASED_CR8_LOAD, C.CPU_BASED_CR8_STORE):
            assert may & bit and not must & bit
        assert not must & (C.CPU_BASED_CR3_LOAD | C.CPU_BASED_CR3_STORE)
        assert must & C.CPU_BASED_SECONDARY_CTLS
        must2, _ = caps.control(C.VMCS_CTRL_CPU_BASED2)
        assert must2 & C.CPU_BASED2_EPT and must2 & C.CPU_BASED2_UNRESTRICTED
        assert (caps.cr0_fixed0, caps.cr4_fixed0) == (0x80000021, 0x2000)
        initial = common.initial_controls()
        for word in R.CONTROL_CAPS:
            assert R.check_control_write(word, initial[word], caps), hex(word)


def test_unrestricted_guest_is_what_relaxes_pe_and_pg() -> None:
    real = hvdos() | controls(OPTIONAL_SECONDARY, proc=C.CPU_BASED_SECONDARY_CTLS,
                              proc2=C.CPU_BASED2_UNRESTRICTED | C.CPU_BASED2_EPT)  # fmt: skip
    assert R.check_entry(real, OPTIONAL_SECONDARY) is None
    no_secondary = real | {C.VMCS_CTRL_CPU_BASED: cap2ctrl(OPTIONAL_SECONDARY.proc, 0)}
    failure = R.check_entry(no_secondary, OPTIONAL_SECONDARY)
    assert failure is not None and failure.rule == "cr0-fixed" and "0, 31" in failure.message
    # the secondary word is not checked while it is not activated
    garbage = no_secondary | {C.VMCS_CTRL_CPU_BASED2: 0xFFFFFFFF, C.VMCS_GUEST_CR0: 0x80000021}
    assert R.check_entry(garbage, OPTIONAL_SECONDARY) is None
    # unrestricted guest needs EPT; without it, CS may not be a data segment
    failure = R.check_entry(real | {C.VMCS_CTRL_CPU_BASED2: C.CPU_BASED2_UNRESTRICTED},
                            OPTIONAL_SECONDARY)  # fmt: skip
    assert failure is not None and failure.rule == "unrestricted-guest"
    protected = pae32() | controls(OPTIONAL_SECONDARY)
    assert R.check_entry(protected, OPTIONAL_SECONDARY) is None
    failure = R.check_entry(protected | {C.VMCS_GUEST_CS_AR: 0xC093}, OPTIONAL_SECONDARY)
    assert failure is not None and failure.rule == "segment-type"
    failure = R.check_entry(protected | {C.VMCS_GUEST_SS: 0x13}, OPTIONAL_SECONDARY)
    assert failure is not None and failure.rule == "ss-rpl"
    failure = R.check_entry(protected | {C.VMCS_GUEST_DS: 0x13}, OPTIONAL_SECONDARY)
    assert failure is not None and failure.rule == "segment-dpl" and "RPL" in failure.message


PERMISSIVE = R.Capabilities(
    pin=0xFFFFFFFF << 32, proc=0xFFFFFFFF << 32, proc2=0xFFFFFFFF << 32,
    entry=0xFFFFFFFF << 32, exit=0xFFFFFFFF << 32, cr4_fixed1=0xFFFFFFFF,
)  # fmt: skip
"""Every control allowed either way: the rules between controls become reachable."""


@pytest.mark.parametrize(
    ("change", "kind", "rule"),
    [
        ({C.VMCS_CTRL_PIN_BASED: C.PIN_BASED_VIRTUAL_NMI}, CTRL, "virtual-nmi"),
        ({C.VMCS_CTRL_CPU_BASED: C.CPU_BASED_SECONDARY_CTLS | C.CPU_BASED_VIRTUAL_NMI_WND},
         CTRL, "nmi-window"),
        ({C.VMCS_CTRL_CPU_BASED2: C.CPU_BASED2_X2APIC}, CTRL, "apic-virtualization"),
        ({C.VMCS_CTRL_CPU_BASED: C.CPU_BASED_SECONDARY_CTLS | C.CPU_BASED_TPR_SHADOW,
          C.VMCS_CTRL_CPU_BASED2: C.CPU_BASED2_X2APIC | C.CPU_BASED2_VIRTUAL_APIC},
         CTRL, "apic-virtualization"),
        ({C.VMCS_CTRL_CPU_BASED: C.CPU_BASED_SECONDARY_CTLS | C.CPU_BASED_TPR_SHADOW,
          C.VMCS_CTRL_CPU_BASED2: C.CPU_BASED2_VIRT_INTR_DELIVERY}, CTRL, "apic-virtualization"),
        ({C.VMCS_CTRL_PIN_BASED: C.PIN_BASED_POSTED_INTR | C.PIN_BASED_INTR}, CTRL,
         "posted-interrupts"),
        ({C.VMCS_CTRL_CPU_BASED2: C.CPU_BASED2_UNRESTRICTED}, CTRL, "unrestricted-guest"),
        ({C.VMCS_CTRL_VMEXIT_CONTROLS: C.VMEXIT_SAVE_VMX_TIMER}, CTRL, "preemption-timer"),
        ({C.VMCS_CTRL_VMENTRY_CONTROLS: C.VMENTRY_SMM}, CTRL, "entry-smm"),
        ({IRQ: VALID_IRQ | 7 << 8}, CTRL, "entry-event"),  # MTF pending: allowed here...
        ({C.VMCS_GUEST_CR4: 0x802020}, G, "cr4-cet-without-wp"),
    ],
)  # fmt: skip
def test_rules_between_controls(change: dict[int, int], kind: str, rule: str) -> None:
    base = pae32() | {C.VMCS_CTRL_CPU_BASED: C.CPU_BASED_SECONDARY_CTLS,
                      C.VMCS_CTRL_CPU_BASED2: C.CPU_BASED2_EPT, C.VMCS_CTRL_PIN_BASED: 0,
                      C.VMCS_CTRL_VMENTRY_CONTROLS: 0, C.VMCS_CTRL_VMEXIT_CONTROLS: 0}  # fmt: skip
    assert R.check_entry(base, PERMISSIVE) is None
    failure = R.check_entry(base | change, PERMISSIVE)
    if change.get(IRQ) == VALID_IRQ | 7 << 8:
        assert failure is None  # ...a pending MTF exit (type 7, vector 0) with MTF allowed
        no_mtf = dataclasses.replace(PERMISSIVE, proc=PERMISSIVE.proc & ~(C.CPU_BASED_MTF << 32))
        failure = R.check_entry(base | change, no_mtf)
    assert failure is not None and (failure.kind, failure.rule) == (kind, rule), str(failure)


def test_capabilities_read_misc_and_basic() -> None:
    table = common.vmx_capabilities() | {
        C.HV_VMX_CAP_MISC: 1 << 6,  # HLT only, no zero-length injection
        C.HV_VMX_CAP_BASIC: 1 << 56,
    }
    caps = R.Capabilities.read(table.__getitem__)
    assert caps.activity_states == {0, 1} and not caps.zero_length_injection
    assert caps.error_code_flexible
    shutdown = qemu_reset() | {C.VMCS_GUEST_ACTIVITY_STATE: 2}
    assert R.check_entry(shutdown, CAPS) is None
    failure = R.check_entry(shutdown, caps)
    assert failure is not None and failure.rule == "activity-state"
    soft = long_mode() | {IRQ: VALID_IRQ | C.IRQ_INFO_SOFT_IRQ | 0x80}
    assert R.check_entry(soft, CAPS) is None
    failure = R.check_entry(soft, caps)
    assert failure is not None and failure.field == C.VMCS_CTRL_VMENTRY_INSTR_LEN
    gp = long_mode() | {IRQ: VALID_IRQ | C.IRQ_INFO_HARD_EXC | 13}
    assert R.check_entry(gp, caps) is None  # BASIC[56]: with or without error code

    def hvf_like(cap: int) -> int:
        if cap in (C.HV_VMX_CAP_MISC, C.HV_VMX_CAP_BASIC):
            raise HvError(C.HV_UNSUPPORTED, "hv_vmx_read_capability")
        return table[cap]

    assert R.Capabilities.read(hvf_like) == CAPS


def test_control_writes_the_framework_refuses() -> None:
    for word, cap in R.CONTROL_CAPS.items():
        value = common.vmx_capabilities()[cap]
        must, may = R.cap_write_vmcs(word, CAPS)
        assert (must, may) == (value & 0xFFFFFFFF, value >> 32)
        assert R.check_control_write(word, cap2ctrl(value, 0xFFFFFFFF), CAPS)
        assert R.check_control_write(word, must, CAPS)
        if must:
            assert not R.check_control_write(word, must & (must - 1), CAPS)
            assert "must-be-one" in (R.control_write_error(word, 0, CAPS) or "")
        assert not R.check_control_write(word, may | 1 << 32, CAPS)
        if ~may & 0xFFFFFFFF:
            bad = (~may & 0xFFFFFFFF) & -(~may & 0xFFFFFFFF)  # lowest disallowed bit
            assert not R.check_control_write(word, must | bad, CAPS)
    assert not R.check_control_write(C.VMCS_CTRL_CPU_BASED, C.CPU_BASED_HLT, CAPS)
    # everything else is accepted at write time and judged at entry
    assert R.check_control_write(C.VMCS_GUEST_CR4, 0, CAPS)
    assert R.check_control_write(C.VMCS_CTRL_EXC_BITMAP, 0xFFFFFFFF, CAPS)


def test_cap_write_vmcs_of_other_fields() -> None:
    assert R.cap_write_vmcs(C.VMCS_GUEST_CR0, CAPS) == (0x20, 0xFFFFFFFF)  # PE/PG free
    assert R.cap_write_vmcs(C.VMCS_GUEST_CR0, OPTIONAL_SECONDARY) == (0x80000021, 0xFFFFFFFF)
    assert R.cap_write_vmcs(C.VMCS_GUEST_CR4, CAPS) == (0x2000, 0x1767FF)
    assert R.cap_write_vmcs(C.VMCS_GUEST_CS, CAPS) == (0, 0xFFFF)  # 16-bit
    assert R.cap_write_vmcs(C.VMCS_GUEST_IA32_EFER, CAPS) == (0, MASK)  # 64-bit
    assert R.cap_write_vmcs(C.VMCS_CTRL_EXC_BITMAP, CAPS) == (0, 0xFFFFFFFF)  # 32-bit
    assert R.cap_write_vmcs(C.VMCS_GUEST_RIP, CAPS) == (0, MASK)  # natural width


def test_failure_text_names_field_and_qualification() -> None:
    failure = R.check_entry(qemu_reset() | {C.VMCS_GUEST_LINK_POINTER: 0x1000}, CAPS)
    assert failure is not None
    assert str(failure).startswith("VM entry failed (exit 0x80000021, qualification 4)")
    assert "VMCS_GUEST_LINK_POINTER" in str(failure)
    failure = R.check_entry(qemu_reset() | {C.VMCS_CTRL_PIN_BASED: 0}, CAPS)
    assert failure is not None and str(failure).startswith("VM entry with invalid control fields")


# --- the gate: only touched groups, nothing when nothing was written ---------------------------


class Recording(Mapping[int, int]):
    """A field mapping that records every field read (and can forbid reading)."""

    def __init__(self, fields: dict[int, int], forbid: bool = False) -> None:
        self.fields, self.forbid, self.read = fields, forbid, set[int]()

    def __getitem__(self, key: int) -> int:
        assert not self.forbid, f"read {key:#x}"
        self.read.add(key)
        return self.fields[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)


def _all_states() -> Iterator[dict[int, int]]:
    for base in BASES.values():
        yield base()
    for base, change, *_ in FORBIDDEN:
        yield BASES[base]() | change
    for base, _what, change in VALID:
        yield BASES[base]() | change


def test_group_fields_list_every_field_each_group_reads() -> None:
    for fields in _all_states():
        for bit, (name, _check) in enumerate(R.GROUPS):
            view = Recording(fields)
            vmx_checks.run_groups(view, CAPS, 1 << bit)
            assert view.read <= R.GROUP_FIELDS[bit], (name, [hex(f) for f in view.read])
    assert frozenset().union(*R.GROUP_FIELDS) == R.ENTRY_FIELDS


def test_gate_checks_nothing_until_something_is_written() -> None:
    gate = R.EntryGate(CAPS)
    assert gate.check(qemu_reset()) is None
    assert gate.check(Recording(qemu_reset(), forbid=True)) is None  # no field read at all
    gate.touch(C.VMCS_CTRL_EXC_BITMAP)  # read by no check
    gate.touch_register(C.HV_X86_RAX)
    gate.touch_msr(C.MSR_LSTAR)
    assert gate.dirty == 0


def test_gate_reruns_only_the_groups_a_write_can_affect() -> None:
    gate = R.EntryGate(CAPS)
    fields = qemu_reset()
    assert gate.check(fields) is None
    gate.touch_register(C.HV_X86_RIP)  # the VMM advanced RIP after an I/O exit
    view = Recording(fields)
    assert gate.check(view) is None
    rip_group = [name for name, _ in R.GROUPS].index("rip-rflags")
    assert view.read and view.read <= R.GROUP_FIELDS[rip_group]
    assert C.VMCS_GUEST_CR4 not in view.read


@pytest.mark.parametrize(
    ("touch", "change", "rule"),
    [
        (lambda g: g.touch(C.VMCS_GUEST_CR4), {C.VMCS_GUEST_CR4: 0}, "cr4-fixed"),
        (lambda g: g.touch_register(C.HV_X86_CR0), {C.VMCS_GUEST_CR0: 0x10}, "cr0-fixed"),
        (lambda g: g.touch_register(C.HV_X86_TSS_LIMIT), {C.VMCS_GUEST_TR_LIMIT: 0xFFFFFFFF},
         "segment-granularity"),
        (lambda g: g.touch_msr(C.MSR_EFER), {C.VMCS_GUEST_IA32_EFER: 0x100}, "efer-lma"),
        (lambda g: g.touch_msr(C.MSR_GSBASE), {C.VMCS_GUEST_GS_BASE: 1 << 60}, "segment-base"),
        (lambda g: g.touch(IRQ), {IRQ: VALID_IRQ | C.IRQ_INFO_HARD_EXC | 13}, "entry-event"),
        (lambda g: g.touch_register(C.HV_X86_TPR),
         {R.FIELD_VTPR: 0, C.VMCS_CTRL_TPR_THRESHOLD: 1}, "tpr-threshold"),
    ],
)  # fmt: skip
def test_gate_catches_each_kind_of_write(
    touch: Callable[[R.EntryGate], None], change: dict[int, int], rule: str
) -> None:
    gate = R.EntryGate(CAPS)
    base = long_mode() | {C.VMCS_CTRL_CPU_BASED: cap2ctrl(CAPS.proc, C.CPU_BASED_TPR_SHADOW)}
    assert gate.check(base) is None
    assert gate.check(base | change) is None  # untouched: not looked at
    touch(gate)
    for _ in range(2):  # a failure keeps the touch: the next entry fails the same way
        failure = gate.check(base | change)
        assert failure is not None and failure.rule == rule
    assert gate.check(base) is None and gate.dirty == 0
    gate.touch_all()
    assert gate.check(base | change) is not None


def test_vmcs_view_reads_through_once_and_maps_refusals_to_defaults() -> None:
    calls: list[int] = []
    fields = long_mode()

    def read(field: int) -> int:
        calls.append(field)
        if field not in fields:
            raise HvError(C.HV_UNSUPPORTED, "hv_vmx_vcpu_read_vmcs")
        return fields[field]

    view = R.VmcsView(read, {R.FIELD_VTPR: 0x30})
    assert R.check_entry(view, CAPS) is None
    assert len(calls) == len(set(calls))  # memoized
    assert view.get(C.VMCS_GUEST_PDPTE0, 7) == 7 and view[R.FIELD_VTPR] == 0x30
    assert C.VMCS_GUEST_CR4 in view and C.VMCS_GUEST_PDPTE0 not in view
    broken = R.VmcsView(lambda f: (fields | {C.VMCS_GUEST_CR4: 0x620}).get(f, 0))
    failure = R.check_entry(broken, CAPS)
    assert failure is not None and failure.rule == "cr4-fixed"


# --- EFER and the IA-32e control ----------------------------------------------------------------


def test_entry_efer_follows_load_efer_or_the_ia32e_control() -> None:
    f = long_mode()
    assert R.entry_efer(f) == 0xD00
    no_load = cap2ctrl(CAPS.entry, C.VMENTRY_GUEST_IA32E)
    assert (
        R.entry_efer(f | {C.VMCS_CTRL_VMENTRY_CONTROLS: no_load, C.VMCS_GUEST_IA32_EFER: 0x800})
        == 0xD00
    )
    legacy = {C.VMCS_CTRL_VMENTRY_CONTROLS: cap2ctrl(CAPS.entry, 0), C.VMCS_GUEST_CR0: 0x31}
    assert R.entry_efer(legacy | {C.VMCS_GUEST_IA32_EFER: 0xD00}) == 0x900  # LME kept, no PG
    assert (
        R.entry_efer(legacy | {C.VMCS_GUEST_IA32_EFER: 0xD01, C.VMCS_GUEST_CR0: 0x80000031})
        == 0x801
    )
    entry = cap2ctrl(CAPS.entry, C.VMENTRY_LOAD_EFER)
    assert R.entry_controls_after_exit(entry, 0xD00) == entry | C.VMENTRY_GUEST_IA32E
    assert R.entry_controls_after_exit(entry | C.VMENTRY_GUEST_IA32E, 0x100) == entry


# --- CR0/CR4 masks and shadows ----------------------------------------------------------------

QEMU_CR0_MASK, QEMU_CR4_MASK = 0xE0000030, 0x2000


def test_guest_reads_the_shadow_under_the_mask() -> None:
    assert R.cr_guest_view(0x30, QEMU_CR0_MASK, 0x60000010) == 0x60000010
    assert R.cr_guest_view(0x80000031, QEMU_CR0_MASK, 0x80000011) == 0x80000011
    assert R.cr_guest_view(0x2620, QEMU_CR4_MASK, 0x620) == 0x620
    assert R.cr_guest_view(0x2620, 0, 0) == 0x2620  # hvdos: no mask, the guest sees VMXE


@pytest.mark.parametrize(
    ("cr", "new", "current", "mask", "shadow", "expected"),
    [
        # CR4: setting PAE under QEMU's mask loads, keeping VMXE; touching VMXE exits
        (4, 0x20, 0x2000, QEMU_CR4_MASK, 0, ("load", 0x2020)),
        (4, 0x2020, 0x2000, QEMU_CR4_MASK, 0, ("exit", 0x2000)),
        (4, 0x20, 0x2020, QEMU_CR4_MASK, 0x2000, ("exit", 0x2020)),
        # hvdos masks nothing in CR4: clearing VMXE is a #GP, not an exit
        (4, 0x20, 0x2000, 0, 0, ("fault", 0x2000)),
        (4, 0x3000, 0x2000, 0, 0, ("fault", 0x2000)),  # LA57 not allowed
        # CR0: QEMU owns PG/CD/NW/NE/ET; turning PE on (shadow PE 0) loads, PG on exits
        (0, 0x60000011, 0x30, QEMU_CR0_MASK, 0x60000010, ("load", 0x31)),
        (0, 0xE0000011, 0x31, QEMU_CR0_MASK, 0x60000011, ("exit", 0x31)),
        # hvdos masks CD/NW only: clearing NE faults, clearing PE is fine (unrestricted guest)
        (0, 0x10, 0x31, 0x60000000, 0, ("fault", 0x31)),
        (0, 0x30, 0x31, 0x60000000, 0, ("load", 0x30)),
    ],
)
def test_mov_to_cr(
    cr: int, new: int, current: int, mask: int, shadow: int, expected: tuple[str, int]
) -> None:
    assert R.mov_to_cr(cr, new, current, mask, shadow, CAPS) == expected


def test_mov_to_cr0_without_unrestricted_guest_keeps_pe() -> None:
    assert R.mov_to_cr(0, 0x30, 0x31, 0, 0, CAPS, unrestricted=False).action == "fault"
    with pytest.raises(ValueError):
        R.mov_to_cr(3, 0, 0, 0, 0, CAPS)


def test_clts_and_lmsw() -> None:
    ts = 1 << 3
    assert R.clts(0x39, ts, ts) == ("exit", 0x39)
    assert R.clts(0x39, ts, 0) == ("load", 0x39)  # masked TS, shadow clear: no change
    assert R.clts(0x39, 0, 0) == ("load", 0x31)
    # LMSW sets PE under a mask whose shadow has PE clear: exit
    assert R.lmsw(0x1, 0x30, 0x1, 0x0).action == "exit"
    assert R.lmsw(0x0, 0x31, 0x1, 0x1) == ("load", 0x31)  # LMSW never clears PE
    assert R.lmsw(0x8, 0x31, 0, 0) == ("load", 0x39)
    assert R.lmsw(0x8, 0x31, 0x8, 0).action == "exit"  # masked TS differs from the shadow
    assert R.lmsw(0x9, 0x30, 0x8, 0x8) == ("load", 0x31)


def test_cr_access_qualification_layout() -> None:
    # mov cr4, rbx (to CR4, GPR 3); mov rax, cr8 (from CR8); clts; lmsw [mem] with 0x1234
    assert R.cr_access_qualification(4, R.CR_ACCESS_MOV_TO, 3) == 0x304
    assert R.cr_access_qualification(8, R.CR_ACCESS_MOV_FROM, 0) == 0x18
    assert R.cr_access_qualification(0, R.CR_ACCESS_CLTS) == 0x20
    assert R.cr_access_qualification(0, R.CR_ACCESS_LMSW, 0, 0x1234, True) == 0x1234_0070


def test_cr3_and_cr8_exiting() -> None:
    proc = C.CPU_BASED_CR8_LOAD | C.CPU_BASED_CR8_STORE
    assert R.mov_cr8_exits(proc, True) and R.mov_cr8_exits(proc, False)
    assert not R.mov_cr8_exits(C.CPU_BASED_TPR_SHADOW, True)
    assert not R.mov_cr3_exits(proc, True, 0x1000) and not R.mov_cr3_exits(proc, False)
    cr3 = C.CPU_BASED_CR3_LOAD | C.CPU_BASED_CR3_STORE
    assert R.mov_cr3_exits(cr3, False) and R.mov_cr3_exits(cr3, True, 0x1000)
    assert not R.mov_cr3_exits(cr3, True, 0x1000, (0x1000,))
    assert R.tpr_below_threshold(0x10, 2) and not R.tpr_below_threshold(0x20, 2)


def test_module_surface() -> None:
    """The names the backends are told to use exist and are what the docstrings say."""
    names: list[Any] = [getattr(R, name) for name in R.__all__]
    assert all(name is not None for name in names)
    assert R.ENTRY_FAILED_GUEST_STATE == 0x80000021 and R.INSTR_ERROR_CONTROLS == 7
    assert {R.REGISTER_FIELDS[C.HV_X86_CR4], R.MSR_FIELDS[C.MSR_EFER]} == {
        C.VMCS_GUEST_CR4, C.VMCS_GUEST_IA32_EFER}  # fmt: skip
