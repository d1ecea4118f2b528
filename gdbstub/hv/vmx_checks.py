"""The checks VMX makes on a VM entry, as functions over a field mapping (see ``vmx_rules``).

Theory of operation
-------------------
Each check group reads VMCS fields through ``f.get(field, default)`` from a ``Mapping`` of
Apple's field encodings, and raises on the first rule broken; :func:`run_groups` turns that into
an :class:`~gdbstub.hv.vmx_caps.EntryFailure`. The groups follow the Intel SDM (vol. 3, "VM
Entries", section numbers of the 2016-2022 editions): 26.2.1 the VMX controls and event
injection; 26.3.1.1 control registers, debug registers and MSRs; 26.3.1.2 segment registers;
26.3.1.3 descriptor tables; 26.3.1.4 RIP and RFLAGS; 26.3.1.5 non-register state; 26.3.1.6 the
PDPTEs. :data:`GROUP_FIELDS` lists every field each group reads, so that a caller can re-run
only the groups a write can affect. Checks on what the framework owns (host state, EPT pointer,
VPID, bitmaps, APIC pages, MSR-load areas) are not made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from . import constants as C
from .vmx_caps import (
    CONTROL_RULES,
    CR0_CD,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_CET,
    CR4_PAE,
    CR4_PCIDE,
    FIELD_VTPR,
    QUAL_DEFAULT,
    QUAL_LINK_POINTER,
    QUAL_NMI_STI,
    QUAL_PDPTE,
    RFLAGS_IF,
    RFLAGS_TF,
    RFLAGS_VM,
    Capabilities,
    EntryFailure,
    bit_list,
    control_write_error,
)

_RFLAGS_RESERVED = ~0x3F7FD7 & (1 << 64) - 1  # bits 63:22, 15, 5, 3 (bit 1 must be 1)
_AR_UNUSABLE = 1 << 16
_AR_RESERVED = 0xF00 | 0xFFFE0000  # bits 11:8 and 31:17
_EFER_DEFINED = C.EFER_SCE | C.EFER_LME | C.EFER_LMA | C.EFER_NXE
_DEBUGCTL_DEFINED = 0x3 | 0xFFC0  # LBR, BTF, bits 15:6 (TR ... RTM_DEBUG)
_PENDING_DBG_DEFINED = 0xF | 1 << 12 | C.DR6_BS  # B0-B3, enabled breakpoint, BS
_EXC_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17})
_SEGMENTS = ("ES", "CS", "SS", "DS", "FS", "GS", "LDTR", "TR")
_ES, _CS, _SS, _DS, _FS, _GS, _LDTR, _TR = range(8)


class _Fail(Exception):
    def __init__(self, failure: EntryFailure) -> None:
        self.failure = failure


def _control(rule: str, message: str, field: int | None = None) -> _Fail:
    return _Fail(EntryFailure("controls", rule, message, field))


def _guest(rule: str, message: str, field: int | None = None, qual: int = 0) -> _Fail:
    return _Fail(EntryFailure("guest-state", rule, message, field, qual))


# --- helpers -------------------------------------------------------------------------------------

Fields = Mapping[int, int]


def _canonical(address: int, bits: int) -> bool:
    top = address >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def _unrestricted(f: Fields) -> bool:
    return bool(
        f.get(C.VMCS_CTRL_CPU_BASED, 0) & C.CPU_BASED_SECONDARY_CTLS
        and f.get(C.VMCS_CTRL_CPU_BASED2, 0) & C.CPU_BASED2_UNRESTRICTED
    )


def _secondary(f: Fields) -> int:
    if f.get(C.VMCS_CTRL_CPU_BASED, 0) & C.CPU_BASED_SECONDARY_CTLS:
        return f.get(C.VMCS_CTRL_CPU_BASED2, 0)
    return 0


def _ia32e(f: Fields) -> bool:
    return bool(f.get(C.VMCS_CTRL_VMENTRY_CONTROLS, 0) & C.VMENTRY_GUEST_IA32E)


def _check_controls(f: Fields, caps: Capabilities) -> None:
    for field, rule in CONTROL_RULES.items():
        if field == C.VMCS_CTRL_CPU_BASED2 and not (
            f.get(C.VMCS_CTRL_CPU_BASED, 0) & C.CPU_BASED_SECONDARY_CTLS
        ):
            continue  # the secondary controls are not checked (and read as 0) then
        problem = control_write_error(field, f.get(field, 0), caps)
        if problem is not None:
            raise _control(rule, problem, field)
    pin = f.get(C.VMCS_CTRL_PIN_BASED, 0)
    proc = f.get(C.VMCS_CTRL_CPU_BASED, 0)
    proc2 = _secondary(f)
    if pin & C.PIN_BASED_VIRTUAL_NMI and not pin & C.PIN_BASED_NMI:
        raise _control("virtual-nmi", "virtual NMIs need NMI exiting", C.VMCS_CTRL_PIN_BASED)
    if proc & C.CPU_BASED_VIRTUAL_NMI_WND and not pin & C.PIN_BASED_VIRTUAL_NMI:
        raise _control("nmi-window", "NMI-window exiting needs virtual NMIs", C.VMCS_CTRL_CPU_BASED)
    if proc & C.CPU_BASED_TPR_SHADOW and not proc2 & C.CPU_BASED2_VIRT_INTR_DELIVERY:
        threshold = f.get(C.VMCS_CTRL_TPR_THRESHOLD, 0)
        if threshold >> 4:
            raise _control(
                "tpr-threshold",
                f"TPR threshold 0x{threshold:x}: bits 31:4 must be 0",
                C.VMCS_CTRL_TPR_THRESHOLD,
            )
        vtpr = f.get(FIELD_VTPR)
        if vtpr is not None and not proc2 & C.CPU_BASED2_VIRTUAL_APIC and threshold > vtpr >> 4:
            raise _control(
                "tpr-threshold",
                f"TPR threshold {threshold} above the virtual TPR's class {vtpr >> 4}",
                C.VMCS_CTRL_TPR_THRESHOLD,
            )
    apic_virt = C.CPU_BASED2_X2APIC | C.CPU_BASED2_APIC_REG_VIRT | C.CPU_BASED2_VIRT_INTR_DELIVERY
    if not proc & C.CPU_BASED_TPR_SHADOW and proc2 & apic_virt:
        raise _control(
            "apic-virtualization",
            "x2APIC mode, APIC-register virtualization and virtual-"
            "interrupt delivery need the TPR shadow",
            C.VMCS_CTRL_CPU_BASED2,
        )
    if proc2 & C.CPU_BASED2_X2APIC and proc2 & C.CPU_BASED2_VIRTUAL_APIC:
        raise _control(
            "apic-virtualization",
            "virtualize x2APIC mode excludes virtualize APIC accesses",
            C.VMCS_CTRL_CPU_BASED2,
        )
    if proc2 & C.CPU_BASED2_VIRT_INTR_DELIVERY and not pin & C.PIN_BASED_INTR:
        raise _control(
            "apic-virtualization",
            "virtual-interrupt delivery needs external-interrupt exiting",
            C.VMCS_CTRL_PIN_BASED,
        )
    if pin & C.PIN_BASED_POSTED_INTR and not (
        proc2 & C.CPU_BASED2_VIRT_INTR_DELIVERY
        and f.get(C.VMCS_CTRL_VMEXIT_CONTROLS, 0) & C.VMEXIT_ACK_INTR
    ):
        raise _control(
            "posted-interrupts",
            "posted interrupts need virtual-interrupt delivery and acknowledge-interrupt-on-exit",
            C.VMCS_CTRL_PIN_BASED,
        )
    if proc2 & C.CPU_BASED2_UNRESTRICTED and not proc2 & C.CPU_BASED2_EPT:
        raise _control("unrestricted-guest", "unrestricted guest needs EPT", C.VMCS_CTRL_CPU_BASED2)
    exit_ = f.get(C.VMCS_CTRL_VMEXIT_CONTROLS, 0)
    if exit_ & C.VMEXIT_SAVE_VMX_TIMER and not pin & C.PIN_BASED_PREEMPTION_TIMER:
        raise _control(
            "preemption-timer",
            "saving the preemption timer needs it activated",
            C.VMCS_CTRL_VMEXIT_CONTROLS,
        )
    entry = f.get(C.VMCS_CTRL_VMENTRY_CONTROLS, 0)
    if entry & (C.VMENTRY_SMM | C.VMENTRY_DEACTIVATE_DUAL_MONITOR):
        raise _control(
            "entry-smm",
            "entry to SMM / deactivate dual-monitor treatment outside SMM",
            C.VMCS_CTRL_VMENTRY_CONTROLS,
        )
    _check_event_injection(f, caps)


def _check_event_injection(f: Fields, caps: Capabilities) -> None:
    info = f.get(C.VMCS_CTRL_VMENTRY_IRQ_INFO, 0)
    if not info & C.IRQ_INFO_VALID:
        return
    field = C.VMCS_CTRL_VMENTRY_IRQ_INFO
    kind, vector = info >> 8 & 7, info & 0xFF
    mtf_allowed = bool(caps.proc >> 32 & C.CPU_BASED_MTF)
    if kind == 1 or (kind == 7 and not mtf_allowed):
        raise _control("entry-event", f"interruption type {kind} is reserved", field)
    if (kind == 2 and vector != 2) or (kind == 3 and vector > 31) or (kind == 7 and vector):
        raise _control("entry-event", f"vector {vector} with interruption type {kind}", field)
    if info & 0x7FFFF000:
        raise _control("entry-event", f"reserved bits 30:12 set (0x{info:x})", field)
    protected = not _unrestricted(f) or f.get(C.VMCS_GUEST_CR0, 0) & CR0_PE
    has_code = bool(info & C.IRQ_INFO_ERROR_VALID)
    if not (kind == 3 and protected and caps.error_code_flexible):
        wants = kind == 3 and bool(protected) and vector in _EXC_WITH_ERROR_CODE
        if has_code != wants:
            what = "needs" if wants else "must not have"
            raise _control(
                "entry-event", f"vector {vector} type {kind} {what} an error code", field
            )
    error = f.get(C.VMCS_CTRL_VMENTRY_EXC_ERROR, 0)
    if has_code and error >> 16:
        raise _control(
            "entry-event",
            f"error code 0x{error:x}: bits 31:16 must be 0",
            C.VMCS_CTRL_VMENTRY_EXC_ERROR,
        )
    if kind in (4, 5, 6):
        length = f.get(C.VMCS_CTRL_VMENTRY_INSTR_LEN, 0)
        if length > 15 or (length == 0 and not caps.zero_length_injection):
            raise _control(
                "entry-event",
                f"instruction length {length} for a software event",
                C.VMCS_CTRL_VMENTRY_INSTR_LEN,
            )


# --- 26.3.1.1: control registers, debug registers, MSRs ---------------------------------------


def _check_registers(f: Fields, caps: Capabilities) -> None:
    cr0, cr4 = f.get(C.VMCS_GUEST_CR0, 0), f.get(C.VMCS_GUEST_CR4, 0)
    fixed0 = caps.cr0_fixed0 & ~(CR0_NW | CR0_CD)  # NW and CD are never checked
    if _unrestricted(f):
        fixed0 &= ~(CR0_PE | CR0_PG)
    fixed1 = caps.cr0_fixed1 | CR0_NW | CR0_CD
    if cr0 & fixed0 != fixed0 or cr0 & ~fixed1:
        bad = (fixed0 & ~cr0) | (cr0 & ~fixed1)
        raise _guest(
            "cr0-fixed",
            f"CR0 0x{cr0:x}: bit(s) {bit_list(bad)} fixed in VMX operation (fixed0 0x{fixed0:x})",
            C.VMCS_GUEST_CR0,
        )
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        raise _guest("cr0-pg-without-pe", f"CR0 0x{cr0:x}: PG without PE", C.VMCS_GUEST_CR0)
    if cr4 & caps.cr4_fixed0 != caps.cr4_fixed0 or cr4 & ~caps.cr4_fixed1:
        bad = (caps.cr4_fixed0 & ~cr4) | (cr4 & ~caps.cr4_fixed1)
        raise _guest(
            "cr4-fixed",
            f"CR4 0x{cr4:x}: bit(s) {bit_list(bad)} fixed in VMX "
            f"operation (fixed0 0x{caps.cr4_fixed0:x})",
            C.VMCS_GUEST_CR4,
        )
    if cr4 & CR4_CET and not cr0 & CR0_WP:
        raise _guest("cr4-cet-without-wp", "CR4.CET needs CR0.WP", C.VMCS_GUEST_CR4)
    entry = f.get(C.VMCS_CTRL_VMENTRY_CONTROLS, 0)
    if entry & C.VMENTRY_LOAD_DBG_CONTROLS:
        debugctl = f.get(C.VMCS_GUEST_IA32_DEBUGCTL, 0)
        if debugctl & ~_DEBUGCTL_DEFINED:
            raise _guest(
                "debugctl-reserved",
                f"IA32_DEBUGCTL 0x{debugctl:x}: reserved bits",
                C.VMCS_GUEST_IA32_DEBUGCTL,
            )
    if entry & C.VMENTRY_GUEST_IA32E:
        if not cr0 & CR0_PG or not cr4 & CR4_PAE:
            raise _guest(
                "ia32e-without-paging",
                "IA-32e mode guest needs CR0.PG and CR4.PAE",
                C.VMCS_CTRL_VMENTRY_CONTROLS,
            )
    elif cr4 & CR4_PCIDE:
        raise _guest("pcide-outside-ia32e", "CR4.PCIDE outside IA-32e mode", C.VMCS_GUEST_CR4)
    cr3 = f.get(C.VMCS_GUEST_CR3, 0)
    if cr3 >> caps.phys_bits:
        raise _guest(
            "cr3-reserved",
            f"CR3 0x{cr3:x} beyond {caps.phys_bits} physical address bits",
            C.VMCS_GUEST_CR3,
        )
    if entry & C.VMENTRY_LOAD_DBG_CONTROLS and f.get(C.VMCS_GUEST_DR7, 0) >> 32:
        raise _guest("dr7-high", "DR7 bits 63:32 must be 0", C.VMCS_GUEST_DR7)
    for field in (C.VMCS_GUEST_SYSENTER_ESP, C.VMCS_GUEST_SYSENTER_EIP):
        if not _canonical(f.get(field, 0), caps.linear_bits):
            raise _guest("sysenter-canonical", "IA32_SYSENTER_ESP/EIP must be canonical", field)
    if entry & C.VMENTRY_LOAD_IA32_PAT:
        pat = f.get(C.VMCS_GUEST_IA32_PAT, 0)
        if any((pat >> (8 * i) & 0xFF) not in (0, 1, 4, 5, 6, 7) for i in range(8)):
            raise _guest(
                "pat-invalid",
                f"IA32_PAT 0x{pat:x}: a byte is no memory type",
                C.VMCS_GUEST_IA32_PAT,
            )
    if entry & C.VMENTRY_LOAD_EFER:
        efer = f.get(C.VMCS_GUEST_IA32_EFER, 0)
        if efer & ~_EFER_DEFINED:
            raise _guest(
                "efer-reserved", f"IA32_EFER 0x{efer:x}: reserved bits", C.VMCS_GUEST_IA32_EFER
            )
        if bool(efer & C.EFER_LMA) != bool(entry & C.VMENTRY_GUEST_IA32E):
            raise _guest(
                "efer-lma",
                f"IA32_EFER.LMA ({efer >> 10 & 1}) differs from the IA-32e "
                "mode guest entry control",
                C.VMCS_GUEST_IA32_EFER,
            )
        if cr0 & CR0_PG and bool(efer & C.EFER_LMA) != bool(efer & C.EFER_LME):
            raise _guest(
                "efer-lma", "with CR0.PG, IA32_EFER.LMA must equal LME", C.VMCS_GUEST_IA32_EFER
            )


# --- 26.3.1.2: segment registers ---------------------------------------------------------------


def _seg(f: Fields, index: int) -> tuple[int, int, int, int]:
    """(selector, base, limit, access rights) of segment ``index`` (VMCS order)."""
    return (
        f.get(C.VMCS_GUEST_ES + 2 * index, 0),
        f.get(C.VMCS_GUEST_ES_BASE + 2 * index, 0),
        f.get(C.VMCS_GUEST_ES_LIMIT + 2 * index, 0),
        f.get(C.VMCS_GUEST_ES_AR + 2 * index, 0),
    )


def _check_segments(f: Fields, caps: Capabilities) -> None:
    segs = [_seg(f, i) for i in range(8)]
    v8086 = bool(f.get(C.VMCS_GUEST_RFLAGS, 0) & RFLAGS_VM)
    unrestricted = _unrestricted(f)
    ia32e = _ia32e(f)
    tr_sel, ldtr_sel, ldtr_ar = segs[_TR][0], segs[_LDTR][0], segs[_LDTR][3]
    if tr_sel & 4:
        raise _guest("selector-ti", "TR selector has TI set", C.VMCS_GUEST_TR)
    if not ldtr_ar & _AR_UNUSABLE and ldtr_sel & 4:
        raise _guest("selector-ti", "LDTR selector has TI set", C.VMCS_GUEST_LDTR)
    if not v8086 and not unrestricted and segs[_SS][0] & 3 != segs[_CS][0] & 3:
        raise _guest("ss-rpl", "SS.RPL must equal CS.RPL", C.VMCS_GUEST_SS)
    for i in range(6) if v8086 else ():
        sel, base, limit, ar = segs[i]
        name = _SEGMENTS[i]
        if base != sel << 4:
            raise _guest(
                "v8086-segment",
                f"{name}.base must be selector << 4 in virtual-8086 mode",
                C.VMCS_GUEST_ES_BASE + 2 * i,
            )
        if limit != 0xFFFF:
            raise _guest(
                "v8086-segment",
                f"{name}.limit must be 0xffff in virtual-8086 mode",
                C.VMCS_GUEST_ES_LIMIT + 2 * i,
            )
        if ar != 0xF3:
            raise _guest(
                "v8086-segment",
                f"{name} access rights must be 0xf3 in virtual-8086 mode",
                C.VMCS_GUEST_ES_AR + 2 * i,
            )
    for i in (_TR, _FS, _GS, _LDTR):
        if i == _LDTR and ldtr_ar & _AR_UNUSABLE:
            continue
        if not _canonical(segs[i][1], caps.linear_bits):
            raise _guest(
                "segment-base",
                f"{_SEGMENTS[i]}.base 0x{segs[i][1]:x} is not canonical",
                C.VMCS_GUEST_ES_BASE + 2 * i,
            )
    for i in (_CS, _SS, _DS, _ES):
        if (i == _CS or not segs[i][3] & _AR_UNUSABLE) and segs[i][1] >> 32:
            raise _guest(
                "segment-base",
                f"{_SEGMENTS[i]}.base bits 63:32 must be 0",
                C.VMCS_GUEST_ES_BASE + 2 * i,
            )
    if not v8086:
        for i in range(6):
            _check_code_data(f, segs, i, unrestricted, ia32e)
    _check_system_segments(segs, ia32e)


def _check_limit_granularity(name: str, limit: int, ar: int, field: int) -> None:
    granular = bool(ar & 1 << 15)
    if (limit & 0xFFF != 0xFFF and granular) or (limit >> 20 and not granular):
        raise _guest(
            "segment-granularity",
            f"{name}.limit 0x{limit:x} does not fit G="
            f"{int(granular)} (G=1 needs limit bits 11:0 set, a limit above 0xfffff "
            "needs G=1)",
            field,
        )


def _check_code_data(
    f: Fields, segs: list[tuple[int, int, int, int]], i: int, unrestricted: bool, ia32e: bool
) -> None:
    sel, _base, limit, ar = segs[i]
    name, field = _SEGMENTS[i], C.VMCS_GUEST_ES_AR + 2 * i
    usable = i == _CS or not ar & _AR_UNUSABLE
    if not usable:
        return
    kind, dpl = ar & 0xF, ar >> 5 & 3
    ss_dpl = segs[_SS][3] >> 5 & 3
    if i == _CS:
        if kind not in (9, 11, 13, 15) and not (kind == 3 and unrestricted):
            raise _guest(
                "segment-type",
                f"CS type {kind}: must be accessed code (9, 11, 13, 15)"
                " or, with unrestricted guest, 3",
                field,
            )
    elif i == _SS:
        if kind not in (3, 7):
            raise _guest("segment-type", f"SS type {kind}: must be 3 or 7", field)
    elif not kind & 1 or (kind & 8 and not kind & 2):
        raise _guest("segment-type", f"{name} type {kind}: must be accessed, code readable", field)
    if not ar & 1 << 4:
        raise _guest("segment-s", f"{name}.S must be 1", field)
    if i == _CS:
        if kind == 3 and dpl:
            raise _guest("segment-dpl", "CS as a data segment must have DPL 0", field)
        if kind in (9, 11) and dpl != ss_dpl:
            raise _guest("segment-dpl", f"CS.DPL {dpl} must equal SS.DPL {ss_dpl}", field)
        if kind in (13, 15) and dpl > ss_dpl:
            raise _guest("segment-dpl", f"conforming CS.DPL {dpl} above SS.DPL {ss_dpl}", field)
    elif i != _SS and not unrestricted and kind <= 11 and dpl < sel & 3:
        raise _guest("segment-dpl", f"{name}.DPL {dpl} below its RPL {sel & 3}", field)
    if not ar & 1 << 7:
        raise _guest("segment-present", f"{name} is not present", field)
    if ar & _AR_RESERVED:
        raise _guest("segment-reserved", f"{name} access rights 0x{ar:x}: reserved bits", field)
    if i == _CS and ia32e and ar & 1 << 13 and ar & 1 << 14:
        raise _guest("cs-long-db", "64-bit CS (L=1) must have D/B=0", field)
    _check_limit_granularity(name, limit, ar, field)


def _check_ss_dpl(f: Fields) -> None:
    """SS.DPL rules, usable or not (SDM: they are not conditioned on usability)."""
    ss_sel, ss_ar = f.get(C.VMCS_GUEST_SS, 0), f.get(C.VMCS_GUEST_SS_AR, 0)
    dpl = ss_ar >> 5 & 3
    if f.get(C.VMCS_GUEST_RFLAGS, 0) & RFLAGS_VM:
        return
    if not _unrestricted(f) and dpl != ss_sel & 3:
        raise _guest("segment-dpl", f"SS.DPL {dpl} must equal its RPL", C.VMCS_GUEST_SS_AR)
    cs_type = f.get(C.VMCS_GUEST_CS_AR, 0) & 0xF
    if dpl and (cs_type == 3 or not f.get(C.VMCS_GUEST_CR0, 0) & CR0_PE):
        raise _guest(
            "segment-dpl",
            "SS.DPL must be 0 in real mode or with a data-segment CS",
            C.VMCS_GUEST_SS_AR,
        )


def _check_system_segments(segs: list[tuple[int, int, int, int]], ia32e: bool) -> None:
    _sel, _base, limit, ar = segs[_TR]
    field = C.VMCS_GUEST_TR_AR
    kind = ar & 0xF
    if kind != 11 and (ia32e or kind != 3):
        raise _guest(
            "tr-type",
            f"TR type {kind}: must be a busy TSS (11"
            + ("" if ia32e else ", or 3 outside IA-32e mode")
            + ")",
            field,
        )
    if ar & 1 << 4:
        raise _guest("system-segment", "TR.S must be 0", field)
    if not ar & 1 << 7:
        raise _guest("segment-present", "TR is not present", field)
    if ar & _AR_UNUSABLE:
        raise _guest("tr-unusable", "TR must be usable", field)
    if ar & _AR_RESERVED:
        raise _guest("segment-reserved", f"TR access rights 0x{ar:x}: reserved bits", field)
    _check_limit_granularity("TR", limit, ar, field)
    _sel, _base, limit, ar = segs[_LDTR]
    field = C.VMCS_GUEST_LDTR_AR
    if ar & _AR_UNUSABLE:
        return
    if ar & 0xF != 2:
        raise _guest("ldtr-type", f"LDTR type {ar & 0xF}: must be 2 (LDT)", field)
    if ar & 1 << 4:
        raise _guest("system-segment", "LDTR.S must be 0", field)
    if not ar & 1 << 7:
        raise _guest("segment-present", "LDTR is not present", field)
    if ar & _AR_RESERVED:
        raise _guest("segment-reserved", f"LDTR access rights 0x{ar:x}: reserved bits", field)
    _check_limit_granularity("LDTR", limit, ar, field)


# --- 26.3.1.3 / 26.3.1.4: descriptor tables, RIP, RFLAGS ---------------------------------------


def _check_tables(f: Fields, caps: Capabilities) -> None:
    for name, base_field, limit_field in (
        ("GDTR", C.VMCS_GUEST_GDTR_BASE, C.VMCS_GUEST_GDTR_LIMIT),
        ("IDTR", C.VMCS_GUEST_IDTR_BASE, C.VMCS_GUEST_IDTR_LIMIT),
    ):
        if not _canonical(f.get(base_field, 0), caps.linear_bits):
            raise _guest("descriptor-table", f"{name}.base is not canonical", base_field)
        if f.get(limit_field, 0) >> 16:
            raise _guest("descriptor-table", f"{name}.limit bits 31:16 must be 0", limit_field)


def _check_rip_rflags(f: Fields, caps: Capabilities) -> None:
    rip, rflags = f.get(C.VMCS_GUEST_RIP, 0), f.get(C.VMCS_GUEST_RFLAGS, 0)
    long_cs = _ia32e(f) and f.get(C.VMCS_GUEST_CS_AR, 0) & 1 << 13
    if not long_cs and rip >> 32:
        raise _guest(
            "rip", f"RIP 0x{rip:x}: bits 63:32 must be 0 outside 64-bit mode", C.VMCS_GUEST_RIP
        )
    if long_cs and not _canonical(rip, caps.linear_bits):
        raise _guest("rip", f"RIP 0x{rip:x} is not canonical", C.VMCS_GUEST_RIP)
    if rflags & _RFLAGS_RESERVED or not rflags & 2:
        raise _guest(
            "rflags-reserved",
            f"RFLAGS 0x{rflags:x}: reserved bits 63:22, 15, 5, 3 must be 0 and bit 1 must be 1",
            C.VMCS_GUEST_RFLAGS,
        )
    if rflags & RFLAGS_VM and (_ia32e(f) or not f.get(C.VMCS_GUEST_CR0, 0) & CR0_PE):
        raise _guest(
            "rflags-vm", "RFLAGS.VM in IA-32e mode or with CR0.PE clear", C.VMCS_GUEST_RFLAGS
        )
    info = f.get(C.VMCS_CTRL_VMENTRY_IRQ_INFO, 0)
    if info & C.IRQ_INFO_VALID and info >> 8 & 7 == 0 and not rflags & RFLAGS_IF:
        raise _guest(
            "rflags-if", "injecting an external interrupt needs RFLAGS.IF", C.VMCS_GUEST_RFLAGS
        )


# --- 26.3.1.5 / 26.3.1.6: non-register state, PDPTEs --------------------------------------------

_EVENTS_ALLOWED: dict[int, Callable[[int, int], bool]] = {
    C.GUEST_ACTIVITY_HLT: lambda kind, vector: (
        kind in (0, 2) or (kind == 3 and vector in (1, 18)) or (kind == 7 and vector == 0)
    ),
    C.GUEST_ACTIVITY_SHUTDOWN: lambda kind, vector: kind == 2 or (kind == 3 and vector == 18),
    C.GUEST_ACTIVITY_WAIT_SIPI: lambda kind, vector: False,
}


def _check_non_register(f: Fields, caps: Capabilities) -> None:
    activity = f.get(C.VMCS_GUEST_ACTIVITY_STATE, 0)
    intr = f.get(C.VMCS_GUEST_INTERRUPTIBILITY, 0)
    info = f.get(C.VMCS_CTRL_VMENTRY_IRQ_INFO, 0)
    rflags = f.get(C.VMCS_GUEST_RFLAGS, 0)
    valid, kind, vector = bool(info & C.IRQ_INFO_VALID), info >> 8 & 7, info & 0xFF
    sti, movss = intr & C.GUEST_INTRBILITY_STI_BLOCKING, intr & C.GUEST_INTRBILITY_MOVSS_BLOCKING
    a_field, i_field = C.VMCS_GUEST_ACTIVITY_STATE, C.VMCS_GUEST_INTERRUPTIBILITY
    if activity not in caps.activity_states:
        raise _guest("activity-state", f"activity state {activity} is not supported", a_field)
    if activity == C.GUEST_ACTIVITY_HLT and f.get(C.VMCS_GUEST_SS_AR, 0) >> 5 & 3:
        raise _guest("activity-state", "HLT activity state with SS.DPL != 0", a_field)
    if activity != C.GUEST_ACTIVITY_ACTIVE and (sti or movss):
        raise _guest("activity-state", "STI/MOV-SS blocking needs the active state", a_field)
    allowed = _EVENTS_ALLOWED.get(activity)
    if valid and allowed is not None and not allowed(kind, vector):
        raise _guest(
            "activity-state",
            f"event type {kind} vector {vector} cannot be injected in activity state {activity}",
            a_field,
        )
    if intr >> 4:
        raise _guest("interruptibility", f"interruptibility 0x{intr:x}: reserved bits", i_field)
    if sti and movss:
        raise _guest("interruptibility", "blocking by both STI and MOV-SS", i_field)
    if sti and not rflags & RFLAGS_IF:
        raise _guest("interruptibility", "STI blocking with RFLAGS.IF clear", i_field)
    if valid and kind in (0, 2) and (sti or movss):
        qual = QUAL_NMI_STI if kind == 2 and sti else QUAL_DEFAULT
        what = "an NMI" if kind == 2 else "an external interrupt"
        raise _guest(
            "interruptibility", f"injecting {what} under STI/MOV-SS blocking", i_field, qual
        )
    if intr & C.GUEST_INTRBILITY_SMI_BLOCKING:
        raise _guest("interruptibility", "SMI blocking outside SMM", i_field)
    pin = f.get(C.VMCS_CTRL_PIN_BASED, 0)
    nmi_blocked = intr & C.GUEST_INTRBILITY_NMI_BLOCKING
    if valid and kind == 2 and pin & C.PIN_BASED_VIRTUAL_NMI and nmi_blocked:
        raise _guest("interruptibility", "injecting a virtual NMI under NMI blocking", i_field)
    pending = f.get(C.VMCS_GUEST_DEBUG_EXC, 0)
    p_field = C.VMCS_GUEST_DEBUG_EXC
    if pending & ~_PENDING_DBG_DEFINED:
        raise _guest(
            "pending-debug", f"pending debug exceptions 0x{pending:x}: reserved bits", p_field
        )
    if sti or movss or activity == C.GUEST_ACTIVITY_HLT:
        btf = f.get(C.VMCS_GUEST_IA32_DEBUGCTL, 0) & 2
        wants_bs = bool(rflags & RFLAGS_TF) and not btf
        if bool(pending & C.DR6_BS) != wants_bs:
            raise _guest(
                "pending-debug",
                "pending BS must be set exactly when RFLAGS.TF is set "
                "(and DEBUGCTL.BTF clear) under STI/MOV-SS blocking or in HLT",
                p_field,
            )
    link = f.get(C.VMCS_GUEST_LINK_POINTER, (1 << 64) - 1)
    if link != (1 << 64) - 1:
        raise _guest(
            "link-pointer",
            f"VMCS link pointer 0x{link:x}: no shadow VMCS can exist here",
            C.VMCS_GUEST_LINK_POINTER,
            QUAL_LINK_POINTER,
        )


def _check_pdptes(f: Fields, caps: Capabilities) -> None:
    cr0, cr4 = f.get(C.VMCS_GUEST_CR0, 0), f.get(C.VMCS_GUEST_CR4, 0)
    if not (cr0 & CR0_PG and cr4 & CR4_PAE) or _ia32e(f):
        return
    if not _secondary(f) & C.CPU_BASED2_EPT:
        return  # loaded from guest memory at CR3 by the processor: the framework always has EPT
    reserved = 0x1E6 | ~((1 << caps.phys_bits) - 1) & (1 << 64) - 1
    for i, field in enumerate(
        (C.VMCS_GUEST_PDPTE0, C.VMCS_GUEST_PDPTE1, C.VMCS_GUEST_PDPTE2, C.VMCS_GUEST_PDPTE3)
    ):
        entry = f.get(field, 0)
        if entry & 1 and entry & reserved:
            raise _guest("pdpte", f"PDPTE{i} 0x{entry:x}: reserved bits set", field, QUAL_PDPTE)


# --- entry points ------------------------------------------------------------------------------

_Check = Callable[[Fields, Capabilities], None]


def _guest_segments(f: Fields, caps: Capabilities) -> None:
    _check_segments(f, caps)
    _check_ss_dpl(f)


GROUPS: tuple[tuple[str, _Check], ...] = (
    ("controls", _check_controls),
    ("registers", _check_registers),
    ("segments", _guest_segments),
    ("tables", _check_tables),
    ("rip-rflags", _check_rip_rflags),
    ("non-register", _check_non_register),
    ("pdptes", _check_pdptes),
)
"""The checks in the SDM's order, by group (the unit :class:`EntryGate` re-runs)."""


def run_groups(f: Fields, caps: Capabilities, mask: int) -> EntryFailure | None:
    """Run the groups of :data:`GROUPS` whose bit is set in ``mask``: None or the first failure."""
    try:
        for bit, (_name, check) in enumerate(GROUPS):
            if mask >> bit & 1:
                check(f, caps)
    except _Fail as fail:
        return fail.failure
    return None


ALL_GROUPS = (1 << len(GROUPS)) - 1

_SEGMENT_FIELDS = frozenset(
    C.VMCS_GUEST_ES + off + 2 * i
    for i in range(8)
    for off in (
        0,
        C.VMCS_GUEST_ES_BASE - C.VMCS_GUEST_ES,
        C.VMCS_GUEST_ES_LIMIT - C.VMCS_GUEST_ES,
        C.VMCS_GUEST_ES_AR - C.VMCS_GUEST_ES,
    )
)
_CONTROL_WORDS = frozenset(CONTROL_RULES)
GROUP_FIELDS: tuple[frozenset[int], ...] = (
    _CONTROL_WORDS
    | {
        C.VMCS_CTRL_TPR_THRESHOLD,
        FIELD_VTPR,
        C.VMCS_CTRL_VMENTRY_IRQ_INFO,
        C.VMCS_CTRL_VMENTRY_EXC_ERROR,
        C.VMCS_CTRL_VMENTRY_INSTR_LEN,
        C.VMCS_GUEST_CR0,
    },
    frozenset(
        {
            C.VMCS_GUEST_CR0,
            C.VMCS_GUEST_CR3,
            C.VMCS_GUEST_CR4,
            C.VMCS_CTRL_CPU_BASED,
            C.VMCS_CTRL_CPU_BASED2,
            C.VMCS_CTRL_VMENTRY_CONTROLS,
            C.VMCS_GUEST_IA32_DEBUGCTL,
            C.VMCS_GUEST_DR7,
            C.VMCS_GUEST_SYSENTER_ESP,
            C.VMCS_GUEST_SYSENTER_EIP,
            C.VMCS_GUEST_IA32_PAT,
            C.VMCS_GUEST_IA32_EFER,
        }
    ),
    _SEGMENT_FIELDS
    | {
        C.VMCS_GUEST_RFLAGS,
        C.VMCS_CTRL_VMENTRY_CONTROLS,
        C.VMCS_CTRL_CPU_BASED,
        C.VMCS_CTRL_CPU_BASED2,
        C.VMCS_GUEST_CR0,
    },
    frozenset(
        {
            C.VMCS_GUEST_GDTR_BASE,
            C.VMCS_GUEST_GDTR_LIMIT,
            C.VMCS_GUEST_IDTR_BASE,
            C.VMCS_GUEST_IDTR_LIMIT,
        }
    ),
    frozenset(
        {
            C.VMCS_GUEST_RIP,
            C.VMCS_GUEST_RFLAGS,
            C.VMCS_GUEST_CS_AR,
            C.VMCS_CTRL_VMENTRY_CONTROLS,
            C.VMCS_GUEST_CR0,
            C.VMCS_CTRL_VMENTRY_IRQ_INFO,
        }
    ),
    frozenset(
        {
            C.VMCS_GUEST_ACTIVITY_STATE,
            C.VMCS_GUEST_INTERRUPTIBILITY,
            C.VMCS_GUEST_DEBUG_EXC,
            C.VMCS_GUEST_LINK_POINTER,
            C.VMCS_CTRL_VMENTRY_IRQ_INFO,
            C.VMCS_GUEST_RFLAGS,
            C.VMCS_GUEST_SS_AR,
            C.VMCS_GUEST_IA32_DEBUGCTL,
            C.VMCS_CTRL_PIN_BASED,
        }
    ),
    frozenset(
        {
            C.VMCS_GUEST_CR0,
            C.VMCS_GUEST_CR4,
            C.VMCS_CTRL_VMENTRY_CONTROLS,
            C.VMCS_CTRL_CPU_BASED,
            C.VMCS_CTRL_CPU_BASED2,
            C.VMCS_GUEST_PDPTE0,
            C.VMCS_GUEST_PDPTE1,
            C.VMCS_GUEST_PDPTE2,
            C.VMCS_GUEST_PDPTE3,
        }
    ),
)
"""Every field each group of :data:`GROUPS` reads (tests/test_vmx_rules.py checks it)."""

ENTRY_FIELDS: frozenset[int] = frozenset().union(*GROUP_FIELDS)
"""Every field the checks read: what a backend must be able to answer (absent ones read 0)."""

FIELD_GROUPS: dict[int, int] = {}
for _bit, _fields in enumerate(GROUP_FIELDS):
    for _field in _fields:
        FIELD_GROUPS[_field] = FIELD_GROUPS.get(_field, 0) | 1 << _bit
