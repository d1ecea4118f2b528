"""The emu backend's system instructions: the exits VMX raises for them, and the CR masks.

Theory of operation
-------------------
In VMX non-root operation some instructions always exit (XSETBV, INVD, GETSEC with CR4.SMXE,
VMCALL and the other VMX instructions), others when a control asks (HLT, INVLPG, MWAIT, RDPMC,
RDTSC/RDTSCP, MOV to/from CR3 and CR8, MOV DR, MONITOR, PAUSE in the primary controls, WBINVD
in the secondary ones), and MOV to CR0/CR4, CLTS and LMSW exit when they would give a bit the
VMM owns (set in the CR0/CR4 guest/host mask) a value other than its read shadow. Reads of CR0
and CR4 (MOV from CR, SMSW) see the read shadow in the masked bits. unicorn does none of that:
these instructions are instruction sites (``emu_code``) whose code hook runs before the
instruction and decides, from the controls, whether it

* exits: the exit is recorded with RIP at the instruction, its length, and the qualification
  (MOV CR: CR, access type, GPR, LMSW source; MOV DR: DR, direction, GPR; INVLPG: the linear
  address), nothing of the instruction done;
* is emulated here (a masked MOV to CR0/CR4, CLTS, LMSW, a masked read of CR0/CR4, SMSW, a
  write of CR8 below the TPR threshold): the run stops before it, ``Vcpu.emulate`` gives it its
  effect after the stop and RIP moves past it (a TPR-threshold exit 43 follows, trap-like);
* or runs in unicorn as it is (nothing of VMX is involved, or the instruction faults first:
  the privileged ones above CPL0 raise #GP, as their privilege check comes before the exit).

HV_X86_TPR is the TPR: with the TPR shadow the virtual TPR (CR8 reads and writes it), which
unicorn keeps in its CR8. Not done: the VMX-instruction information field and the
displacement qualification of VMX instructions (both read 0), LMSW/SMSW with a memory operand
outside 64-bit addressing of flat segments (their address is computed as in long mode),
PAUSE-loop exiting. Task switches (exit 9) are ``emu_task``'s.
"""

from __future__ import annotations

from typing import Any

import capstone

from . import common, vmx_rules
from . import constants as C
from .emu_regs import Registers
from .emu_state import M64, Vcpu, X
from .vmx_caps import CR0_PE, CR0_PG

# x86 encoding order (ModRM.reg/rm with REX): the GPRs as unicorn names them
_GPRS = (
    X.UC_X86_REG_RAX,
    X.UC_X86_REG_RCX,
    X.UC_X86_REG_RDX,
    X.UC_X86_REG_RBX,
    X.UC_X86_REG_RSP,
    X.UC_X86_REG_RBP,
    X.UC_X86_REG_RSI,
    X.UC_X86_REG_RDI,
    *(getattr(X, f"UC_X86_REG_R{i}") for i in range(8, 16)),
)
_LEGACY = frozenset({0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0xF0})
_PRIVILEGED = frozenset({"movcr", "movdr", "clts", "lmsw", "invd", "wbinvd", "invlpg", "xsetbv"})
# kinds that exit whatever the controls, and the exit of each
_ALWAYS = {"xsetbv": C.VMX_REASON_XSETBV, "invd": C.VMX_REASON_INVD}
# kinds whose exit a primary control asks for
_PRIMARY = {
    "rdtsc": (C.CPU_BASED_RDTSC, C.VMX_REASON_RDTSC),
    "rdpmc": (C.CPU_BASED_RDPMC, C.VMX_REASON_RDPMC),
    "pause": (C.CPU_BASED_PAUSE, C.VMX_REASON_PAUSE),
    "mwait": (C.CPU_BASED_MWAIT, C.VMX_REASON_MWAIT),
    "monitor": (C.CPU_BASED_MONITOR, C.VMX_REASON_MONITOR),
    "invlpg": (C.CPU_BASED_INVLPG, C.VMX_REASON_INVLPG),
}
# VMX instructions: (opcode bytes after 0F, ModRM.reg or None, mandatory prefix) -> exit
_VMX_0F01 = {
    0xC1: C.VMX_REASON_VMCALL,
    0xC2: C.VMX_REASON_VMLAUNCH,
    0xC3: C.VMX_REASON_VMRESUME,
    0xC4: C.VMX_REASON_VMOFF,
    0xD4: C.VMX_REASON_VMFUNC,
}
_CR4_SMXE = 1 << 14
_DETAILED: dict[int, Any] = {}  # capstone with operand details, by mode
_CR4_TSD = 1 << 2
_CR4_PCE = 1 << 8


class Decoded:
    """The parts of a system instruction the exits need (see :func:`decode`)."""

    __slots__ = ("length", "modrm", "opcode", "prefixes", "rex")

    def __init__(self, prefixes: bytes, rex: int, opcode: bytes, modrm: int, length: int) -> None:
        self.prefixes = prefixes
        self.rex = rex
        self.opcode = opcode
        self.modrm = modrm
        self.length = length

    @property
    def reg(self) -> int:
        """ModRM.reg with REX.R."""
        return (self.modrm >> 3 & 7) | (self.rex >> 2 & 1) << 3

    @property
    def rm(self) -> int:
        """ModRM.rm with REX.B."""
        return (self.modrm & 7) | (self.rex & 1) << 3


def decode(code: bytes, bits: int) -> Decoded | None:
    """Prefixes, REX (64-bit mode only), the 0F opcode and ModRM of the instruction in ``code``;
    the length is right for register forms (memory forms are measured by capstone)."""
    i = 0
    while i < min(len(code), 14) and code[i] in _LEGACY:
        i += 1
    prefixes = code[:i]
    rex = 0
    if bits == 64 and i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex = code[i]
        i += 1
    if code[i : i + 2] == b"\x0f\x38" and len(code) > i + 3:
        return Decoded(prefixes, rex, code[i : i + 3], code[i + 3], i + 4)
    if code[i : i + 1] == b"\x90":
        return Decoded(prefixes, rex, b"\x90", 0, i + 1)
    if code[i : i + 1] != b"\x0f" or len(code) < i + 2:
        return None
    opcode = code[i : i + 2]
    modrm = code[i + 2] if len(code) > i + 2 else 0
    with_modrm = opcode[1] in (0x01, 0x20, 0x21, 0x22, 0x23, 0x78, 0x79, 0xC7)
    return Decoded(prefixes, rex, opcode, modrm, i + (3 if with_modrm else 2))


def kind_of(d: Decoded) -> str | None:
    """The site kind of a decoded instruction (None: not one of this module's)."""
    op = d.opcode[1] if len(d.opcode) > 1 else d.opcode[0]
    if d.opcode == b"\x90":
        return "pause" if 0xF3 in d.prefixes else None
    if len(d.opcode) == 3:
        return "vmx" if d.opcode[2] in (0x80, 0x81) and 0x66 in d.prefixes else None
    simple = {
        0x20: "movcr",
        0x22: "movcr",
        0x21: "movdr",
        0x23: "movdr",
        0x06: "clts",
        0x08: "invd",
        0x09: "wbinvd",
        0x31: "rdtsc",
        0x33: "rdpmc",
        0x37: "getsec",
        0x78: "vmx",
        0x79: "vmx",
    }
    if op in simple:
        return simple[op]
    if op == 0xC7:
        return "vmx" if d.modrm >> 6 != 3 and d.modrm >> 3 & 7 in (6, 7) else None
    if op != 0x01:
        return None
    named = {0xD1: "xsetbv", 0xC8: "monitor", 0xC9: "mwait", 0xF9: "rdtscp"}
    if d.modrm in named:
        return named[d.modrm]
    if d.modrm in _VMX_0F01:
        return "vmx"
    if d.modrm >> 6 == 3 and d.modrm >> 3 & 7 not in (4, 6):
        return None
    return {4: "smsw", 6: "lmsw", 7: "invlpg"}.get(d.modrm >> 3 & 7)


class SystemExits(Registers):
    """System-instruction sites (see the module docstring)."""

    def _sys_site(self, vcpu: Vcpu, address: int, kind: str) -> None:
        """The code hook of a system-instruction site (RIP at it, nothing of it done)."""
        controls = vcpu.controls
        proc = controls[C.VMCS_CTRL_CPU_BASED]
        if kind in ("rdtsc", "pause", "rdpmc") and not proc & _PRIMARY[kind][0]:
            return  # the frequent ones: nothing to do unless their exiting is on
        code = self._read_linear(vcpu, address, 15)
        d = decode(code, self._cpu_bits(vcpu))
        if d is None:
            return  # rewritten since it was scanned
        kind = kind_of(d) or ""
        if not kind:
            return
        uc = vcpu.uc
        cpl0 = not uc.reg_read(X.UC_X86_REG_CS) & 3 or not self._snapshot(vcpu).cpl
        if kind in _PRIVILEGED and not cpl0:
            return  # #GP first (unicorn raises it)
        cr4 = int(self._read_register(vcpu, C.HV_X86_CR4))
        if kind in ("rdtsc", "rdtscp") and cr4 & _CR4_TSD and not cpl0:
            return
        if kind == "rdpmc" and not cr4 & _CR4_PCE and not cpl0:
            return
        if kind in _ALWAYS:
            self._stop(vcpu, _ALWAYS[kind], length=d.length)
        elif kind == "getsec":
            if cr4 & _CR4_SMXE:
                self._stop(vcpu, C.VMX_REASON_GETSEC, length=d.length)
        elif kind == "vmx":
            self._vmx_exit(vcpu, d, code)
        elif kind in _PRIMARY:
            control, reason = _PRIMARY[kind]
            if proc & control:
                if kind == "invlpg":
                    insn = self._capstone(vcpu, code, address)
                    target = 0 if insn is None else self._operand_address(vcpu, insn)
                    length = d.length if insn is None else insn.size
                    self._stop(vcpu, reason, length=length, qual=target)
                else:
                    self._stop(vcpu, reason, length=d.length)
        elif kind == "rdtscp":
            secondary = controls[C.VMCS_CTRL_CPU_BASED2] if proc & C.CPU_BASED_SECONDARY_CTLS else 0
            if proc & C.CPU_BASED_RDTSC and secondary & C.CPU_BASED2_RDTSCP:
                self._stop(vcpu, C.VMX_REASON_RDTSCP, length=d.length)
        elif kind == "wbinvd":
            secondary = controls[C.VMCS_CTRL_CPU_BASED2] if proc & C.CPU_BASED_SECONDARY_CTLS else 0
            if secondary & C.CPU_BASED2_WBINVD:
                self._stop(vcpu, C.VMX_REASON_WBINVD, length=d.length)
        elif kind == "movdr":
            if proc & C.CPU_BASED_MOV_DR:
                qual = (d.reg & 7) | (0x10 if d.opcode[1] == 0x21 else 0) | d.rm << 8
                self._stop(vcpu, C.VMX_REASON_MOV_DR, length=d.length, qual=qual)
        elif kind == "movcr":
            self._mov_cr(vcpu, d)
        else:  # clts, lmsw, smsw
            self._msw(vcpu, kind, d, code, address)

    # --- helpers ---------------------------------------------------------------------------------

    def _capstone(self, vcpu: Vcpu, code: bytes, address: int) -> Any:
        """The instruction at ``address`` decoded with operand details."""
        bits = self._cpu_bits(vcpu)
        md = _DETAILED.get(bits)
        if md is None:
            mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
            md = _DETAILED[bits] = capstone.Cs(capstone.CS_ARCH_X86, mode[bits])
            md.detail = True
        return next(iter(md.disasm(code, address, 1)), None)

    def _operand_address(self, vcpu: Vcpu, insn: Any) -> int:
        """The linear address of ``insn``'s memory operand (segment base, base, index, disp)."""
        uc = vcpu.uc
        for op in insn.operands:
            if op.type != 3:  # X86_OP_MEM
                continue
            mem = op.mem
            address = mem.disp
            for reg, scale in ((mem.base, 1), (mem.index, mem.scale)):
                if reg:
                    name = insn.reg_name(reg).upper()
                    if name == "RIP":
                        address += insn.address + insn.size
                    else:
                        address += int(uc.reg_read(getattr(X, f"UC_X86_REG_{name}"))) * scale
            segment = insn.reg_name(mem.segment).upper() if mem.segment else ""
            if segment in ("FS", "GS"):
                index = 4 if segment == "FS" else 5
                address += self._seg(vcpu, index)[1]
            mask = M64 if self._cpu_bits(vcpu) == 64 else 0xFFFFFFFF
            return int(address) & mask
        return 0

    def _gpr(self, vcpu: Vcpu, index: int) -> int:
        value = int(vcpu.uc.reg_read(_GPRS[index]))
        return value if self._cpu_bits(vcpu) == 64 else value & 0xFFFFFFFF

    def _mask_shadow(self, vcpu: Vcpu, cr: int) -> tuple[int, int]:
        if cr == 0:
            return vcpu.controls[C.VMCS_CTRL_CR0_MASK], vcpu.controls[C.VMCS_CTRL_CR0_SHADOW]
        return vcpu.controls[C.VMCS_CTRL_CR4_MASK], vcpu.controls[C.VMCS_CTRL_CR4_SHADOW]

    def _unrestricted(self, vcpu: Vcpu) -> bool:
        controls = vcpu.controls
        return bool(
            controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_SECONDARY_CTLS
            and controls[C.VMCS_CTRL_CPU_BASED2] & C.CPU_BASED2_UNRESTRICTED
        )

    def _cr_exit(self, vcpu: Vcpu, d: Decoded, qual: int) -> None:
        self._stop(vcpu, C.VMX_REASON_MOV_CR, length=d.length, qual=qual)

    def _emulate_at(self, vcpu: Vcpu, length: int, action: Any) -> None:
        """Stop before the instruction; after the stop ``action()`` gives it its effect and RIP
        moves past it."""

        def run() -> None:
            uc = vcpu.uc
            rip = int(uc.reg_read(X.UC_X86_REG_RIP))
            action()
            if vcpu.pending_event is None:
                uc.reg_write(X.UC_X86_REG_RIP, (rip + length) & M64)

        vcpu.emulate = run
        vcpu.uc.emu_stop()

    def _load_cr(self, vcpu: Vcpu, cr: int, value: int) -> None:
        """Load CR0/CR4 as the guest's instruction does (the VMM-owned bits are in ``value``)."""
        if cr == 0 and value & CR0_PG and not value & CR0_PE:
            vcpu.pending_event = (C.IDT_GP, C.IRQ_INFO_HARD_EXC, 0)
            return
        self._write_register(vcpu, C.HV_X86_CR0 if cr == 0 else C.HV_X86_CR4, value)
        self._paging_changed(vcpu)

    def _paging_changed(self, vcpu: Vcpu) -> None:
        """CR0/CR3/CR4 changed inside a run (emu.py forgets code scanned in the old mode)."""
        raise NotImplementedError

    # --- MOV CR, CLTS, LMSW, SMSW ----------------------------------------------------------------

    def _mov_cr(self, vcpu: Vcpu, d: Decoded) -> None:
        cr, gpr = d.reg, d.rm
        to_cr = d.opcode[1] == 0x22
        proc = vcpu.controls[C.VMCS_CTRL_CPU_BASED]
        access = vmx_rules.CR_ACCESS_MOV_TO if to_cr else vmx_rules.CR_ACCESS_MOV_FROM
        qual = vmx_rules.cr_access_qualification(cr, access, gpr)
        if cr == 3:
            count = min(vcpu.controls.get(C.VMCS_CTRL_CR3_COUNT, 0), 4)
            targets = tuple(vcpu.controls.get(0x6008 + 2 * i, 0) for i in range(count))
            if vmx_rules.mov_cr3_exits(proc, to_cr, self._gpr(vcpu, gpr), targets):
                self._cr_exit(vcpu, d, qual)
            return
        if cr == 8:
            if vmx_rules.mov_cr8_exits(proc, to_cr):
                self._cr_exit(vcpu, d, qual)
            elif to_cr and proc & C.CPU_BASED_TPR_SHADOW:
                value = self._gpr(vcpu, gpr)
                threshold = vcpu.controls[C.VMCS_CTRL_TPR_THRESHOLD]
                if not value & ~0xF and vmx_rules.tpr_below_threshold(value << 4, threshold):

                    def write_tpr() -> None:
                        vcpu.uc.reg_write(X.UC_X86_REG_CR8, value)
                        vcpu.after_emulate = C.VMX_REASON_TPR_THRESHOLD

                    self._emulate_at(vcpu, d.length, write_tpr)
            return
        if cr not in (0, 4):
            return  # CR2 (and undefined ones: unicorn's #UD)
        mask, shadow = self._mask_shadow(vcpu, cr)
        current = self._read_register(vcpu, C.HV_X86_CR0 if cr == 0 else C.HV_X86_CR4)
        if not to_cr:
            if mask:
                view = vmx_rules.cr_guest_view(current, mask, shadow)
                bits = self._cpu_bits(vcpu)

                def store() -> None:
                    vcpu.uc.reg_write(_GPRS[gpr], view if bits == 64 else view & 0xFFFFFFFF)

                self._emulate_at(vcpu, d.length, store)
            return
        new = self._gpr(vcpu, gpr)
        result = vmx_rules.mov_to_cr(
            cr, new, current, mask, shadow, vcpu.gate.caps, self._unrestricted(vcpu)
        )
        if result.action == "exit":
            self._cr_exit(vcpu, d, qual)
        elif result.action == "fault":
            if common.entry_checks_enabled():  # else lenient, as entries are (issue 12)
                vcpu.pending_event = (C.IDT_GP, C.IRQ_INFO_HARD_EXC, 0)
                vcpu.uc.emu_stop()
        elif mask or result.value != new:
            self._emulate_at(vcpu, d.length, lambda: self._load_cr(vcpu, cr, result.value))

    def _msw(self, vcpu: Vcpu, kind: str, d: Decoded, code: bytes, address: int) -> None:
        mask, shadow = self._mask_shadow(vcpu, 0)
        current = self._read_register(vcpu, C.HV_X86_CR0)
        if kind == "clts":
            result = vmx_rules.clts(current, mask, shadow)
            if result.action == "exit":
                qual = vmx_rules.cr_access_qualification(0, vmx_rules.CR_ACCESS_CLTS)
                self._cr_exit(vcpu, d, qual)
            elif mask:
                self._emulate_at(vcpu, d.length, lambda: self._load_cr(vcpu, 0, result.value))
            return
        if not mask:
            return  # unicorn's own LMSW/SMSW see the real CR0, which the guest may read
        memory = d.modrm >> 6 != 3
        insn = self._capstone(vcpu, code, address) if memory else None
        length = d.length if insn is None else insn.size
        target = 0 if insn is None else self._operand_address(vcpu, insn)
        if kind == "smsw":
            view = vmx_rules.cr_guest_view(current, mask, shadow)

            def store() -> None:
                if memory:
                    self._write_linear(vcpu, target, (view & 0xFFFF).to_bytes(2, "little"))
                else:
                    wide = 0x66 not in d.prefixes
                    vcpu.uc.reg_write(_GPRS[d.rm], view & 0xFFFFFFFF if wide else view & 0xFFFF)

            self._emulate_at(vcpu, length, store)
            return
        if memory:
            source = int.from_bytes(self._read_linear(vcpu, target, 2).ljust(2, b"\0"), "little")
        else:
            source = self._gpr(vcpu, d.rm) & 0xFFFF
        result = vmx_rules.lmsw(source, current, mask, shadow)
        if result.action == "exit":
            qual = vmx_rules.cr_access_qualification(0, vmx_rules.CR_ACCESS_LMSW, 0, source, memory)
            self._stop(vcpu, C.VMX_REASON_MOV_CR, length=length, qual=qual)
            if memory:
                vcpu.exit[C.VMCS_RO_GUEST_LIN_ADDR] = target
        else:
            self._emulate_at(vcpu, length, lambda: self._load_cr(vcpu, 0, result.value))

    # --- VMX instructions ------------------------------------------------------------------------

    def _vmx_exit(self, vcpu: Vcpu, d: Decoded, code: bytes) -> None:
        op = d.opcode
        if len(op) == 3:
            reason = C.VMX_REASON_EPT_INVEPT if op[2] == 0x80 else C.VMX_REASON_INVVPID
        elif op[1] == 0x01:
            reason = _VMX_0F01[d.modrm]
        elif op[1] == 0x78:
            reason = C.VMX_REASON_VMREAD
        elif op[1] == 0x79:
            reason = C.VMX_REASON_VMWRITE
        elif d.modrm >> 3 & 7 == 7:
            reason = C.VMX_REASON_VMPTRST
        elif 0x66 in d.prefixes:
            reason = C.VMX_REASON_VMCLEAR
        elif 0xF3 in d.prefixes:
            reason = C.VMX_REASON_VMON
        else:
            reason = C.VMX_REASON_VMPTRLD
        length = d.length
        if d.modrm >> 6 != 3 and (op[1] != 0x01):
            insn = self._capstone(vcpu, code, self._linear_rip(vcpu))
            if insn is not None:
                length = insn.size
        self._stop(vcpu, reason, length=length)
