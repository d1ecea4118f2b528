"""Completing in software one instruction that this host's KVM cannot emulate.

Theory of operation
-------------------
On kvm_pvm, guest kernel code (CPL0) runs in KVM's instruction emulator, which lacks some
instructions (IRET in protected mode, POPCNT, CRC32, FWAIT and the x87, SSE arithmetic,
XSAVE/XRSTOR, CMPXCHG16B, RDTSCP...). KVM then exits with an emulation failure, RIP at the
instruction and the vCPU intact. The KVM backend hands such an instruction to a
:class:`SoftCpu`: a unicorn CPU (QEMU's, x86-64 build; real, protected and long mode follow
CR0, EFER and the segment caches) owned by the vCPU's thread, which

* maps every region of the vCPU's address space that KVM has a memory slot for, from the same
  host buffers (``mem_map_ptr``; read-only slots are read-only here), so the instruction's own
  accesses, its page walks and the accessed/dirty bits it sets hit guest RAM itself; an
  execute-only region (no KVM slot: every access exits) is mapped for fetches only, so its code
  runs here and its data accesses are reported one by one;
* loads the vCPU's state into a saved unicorn context (GPRs, RIP, RFLAGS, the segment caches
  with their hidden parts, GDTR/IDTR, CR0/CR3/CR4, EFER, QEMU's ``hflags`` recomputed from them
  as in ``emu_state``), plus the x87/SSE state (from the XSAVE image) and XCR0 when the
  instruction uses them;
* runs exactly that instruction (``emu_start(rip, 0, count=1)``; the end address is never
  used: exits are enabled with an empty list, as in the emu backend);
* reports what happened as an :class:`Outcome`: done (the new state is written into the KVM
  structures given, only what changed), a fault the guest must see (vector, error code, CR2),
  or an access outside RAM / to a read-only page (the VMM's business: an EPT-violation exit).

Guest code changes under unicorn's translation cache: the translation of the instruction's
address is dropped before each run (``ctl_remove_cache`` on an address KVM just fetched from,
so the lookup cannot fault). unicorn's TLB is flushed before each run (page tables live in
guest RAM). Nothing here runs on the hot exit path: only on an emulation failure.

Instructions that belong to the VMM or depend on state only KVM has (I/O, CPUID, MSRs, HLT,
XSETBV, the TSC, SWAPGS, SYSCALL/SYSENTER...) are never run here (:attr:`Instruction.vmm`).
An instruction unicorn rejects (#UD, as it does for XSAVES) is not completed either: the
backend stops with a message naming it. ``lock cmpxchg16b`` is not atomic against other vCPUs
here (unicorn is one CPU).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import struct
from dataclasses import dataclass
from typing import Any

from . import common
from . import constants as C
from . import kvm_abi as K
from .errors import HvError

_M64 = (1 << 64) - 1

# struct kvm_regs field names in QEMU's order of env->regs (RAX, RCX, RDX, RBX, RSP, RBP, RSI,
# RDI, R8-R15).
_QEMU_GPRS = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
_ENV_RIP = 128
# struct kvm_regs (rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8-r15, rip, rflags) and env->regs
_KVM_REGS = struct.Struct("<18Q")
_QEMU_REGS = struct.Struct("<16Q")
_KVM_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")
_TO_QEMU = tuple(_KVM_ORDER.index(n) if n in _KVM_ORDER else int(n[1:]) for n in _QEMU_GPRS)
_FROM_QEMU = tuple(_QEMU_GPRS.index(n) for n in (*_KVM_ORDER, *(f"r{i}" for i in range(8, 16))))
_SREGS_USED = 8 * 24 + 2 * 16 + 6 * 8  # kvm_sregs up to apic_base (not the interrupt bitmap)
# Segment caches in QEMU's order (ES, CS, SS, DS, FS, GS, LDTR, TR) by kvm_sregs name.
_SEGS = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")
_SEG_ENTRY = struct.Struct("<I4xQII")  # selector, base, limit, flags
_DTABLE = struct.Struct("<I4xQII")
_DESC_ATTRS = 0x00F0FF00  # type, S, DPL, P, AVL, L, D/B, G in QEMU's descriptor flags
_HF_INHIBIT_IRQ = 1 << 3
_HF_SMAP = 1 << 23
_HF_VM = 1 << 17
_CR4_SMAP = 1 << 21
_CR4_OSXSAVE = 1 << 18
_EFLAGS_VM = 1 << 17

# Vectors that push an error code.
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})
# Vectors that are traps: raised after the instruction completed (RIP past it).
_TRAP_VECTORS = frozenset({1, 3, 4})

# Mnemonics (last word, capstone spelling) the software CPU must not execute: the VMM's exits,
# state only KVM holds (MSRs, the TSC, the APIC), or events.
_VMM_MNEMONICS = frozenset(
    {
        "in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd", "hlt", "cpuid", "rdmsr",
        "wrmsr", "xsetbv", "xgetbv", "rdpmc", "rdtsc", "rdtscp", "invd", "wbinvd", "wbnoinvd",
        "vmcall", "vmmcall", "vmfunc", "monitor", "mwait", "monitorx", "mwaitx", "swapgs",
        "syscall", "sysret", "sysretq", "sysenter", "sysexit", "int", "int1", "int3", "into",
        "rdpkru", "wrpkru", "getsec", "rsm", "tpause", "umonitor", "umwait", "enqcmd", "enqcmds",
        "senduipi", "uiret", "encls", "enclu", "enclv",
    }
)  # fmt: skip
# Mnemonics after which KVM's TLB must be flushed (it never sees them).
_TLB_MNEMONICS = frozenset({"invlpg", "invpcid", "invlpga"})
# Second opcode bytes (after 0F) of instructions that use x87/SSE state; plus 9B and D8-DF.
_FPU_0F = frozenset(
    {0x0E, 0x38, 0x3A, 0xAE, 0x77, *range(0x10, 0x18), *range(0x28, 0x30), *range(0x50, 0x80)}
    | {*range(0xC2, 0xC7), *range(0xD0, 0x100)}
)


def available() -> bool:
    """Whether unicorn (``pip install gdbstub[emu]``) is installed."""
    return _find_unicorn()


@functools.cache
def _find_unicorn() -> bool:
    return importlib.util.find_spec("unicorn") is not None


@dataclass(frozen=True, slots=True)
class Instruction:
    """One decoded instruction: its text (for messages), its length, and what it needs."""

    text: str
    length: int
    mnemonic: str  # the last word of the mnemonic (without lock/rep prefixes)
    fpu: bool  # uses x87/SSE state (or may: 9B, D8-DF and most 0F escapes)
    xcr0: bool  # depends on XCR0 (the XSAVE family)
    vmm: bool  # must not be executed here (see _VMM_MNEMONICS)
    flush_tlb: bool  # KVM's TLB must be flushed after it


@functools.cache
def _disassembler(bits: int) -> Any:
    capstone = importlib.import_module("capstone")
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    return capstone.Cs(capstone.CS_ARCH_X86, mode)


@functools.lru_cache(maxsize=512)
def decode(code: bytes, bits: int) -> Instruction | None:
    """The instruction at the start of ``code`` in ``bits``-bit code, None if it does not
    decode (results are cached by code bytes)."""
    for insn in _disassembler(bits).disasm(code, 0, 1):
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        mnemonic = insn.mnemonic.split()[-1]
        raw = bytes(insn.bytes)
        i = 0
        while i < len(raw) - 1 and (
            raw[i] in common.PREFIXES or raw[i] == 0xF0 or (bits == 64 and 0x40 <= raw[i] <= 0x4F)
        ):
            i += 1
        op = raw[i]
        second = raw[i + 1] if i + 1 < len(raw) else -1
        xcr0 = mnemonic.startswith(("xsave", "xrstor"))
        fpu = op == 0x9B or 0xD8 <= op <= 0xDF or (op == 0x0F and second in _FPU_0F) or xcr0
        return Instruction(
            text=text,
            length=int(insn.size),
            mnemonic=mnemonic,
            fpu=fpu,
            xcr0=xcr0,
            vmm=mnemonic in _VMM_MNEMONICS,
            flush_tlb=mnemonic in _TLB_MNEMONICS,
        )
    return None


@dataclass(slots=True)
class Outcome:
    """What running one instruction did.

    ``kind``: "done" (the KVM structures hold the new state), "fault" (nothing changed; the
    guest must see exception ``vector`` with ``error`` (None: no error code) and, for #PF,
    ``cr2``), "trap" (the new state is written and exception ``vector`` follows the
    instruction), "access" (nothing changed; the instruction touches guest-linear ``address``,
    ``size`` bytes, which is not RAM or not writable: ``write``/``fetch`` say how), or "invalid"
    (unicorn does not know the instruction: #UD).
    """

    kind: str
    vector: int = 0
    error: int | None = None
    cr2: int = 0
    address: int = 0
    size: int = 0
    write: bool = False
    fetch: bool = False
    sregs_changed: bool = False
    fpu_changed: bool = False


@functools.cache
def _unicorn() -> tuple[Any, Any, Any]:
    """unicorn, its x86 constants and the emu backend's CPU-state module (QEMU's layout)."""
    uc = importlib.import_module("unicorn")
    x86 = importlib.import_module("unicorn.x86_const")
    state = importlib.import_module("gdbstub.hv.emu_state")
    return uc, x86, state


@functools.cache
def _layout() -> Any:
    return _unicorn()[2].probe_layout()


def _seg_flags(seg: K.KvmSegment) -> int:
    """QEMU's descriptor flags for a kvm_segment (0 for an unusable one)."""
    if seg.unusable or not seg.present:
        return 0
    return int(
        seg.type << 8
        | seg.s << 12
        | seg.dpl << 13
        | 1 << 15
        | seg.avl << 20
        | seg.l << 21
        | seg.db << 22
        | seg.g << 23
    )


def _set_seg(seg: K.KvmSegment, selector: int, base: int, limit: int, flags: int) -> None:
    """Store a QEMU segment cache entry into a kvm_segment."""
    seg.selector = selector & 0xFFFF
    seg.base = base & _M64
    seg.limit = limit & 0xFFFFFFFF
    seg.type = flags >> 8 & 0xF
    seg.s = flags >> 12 & 1
    seg.dpl = flags >> 13 & 3
    seg.present = flags >> 15 & 1
    seg.avl = flags >> 20 & 1
    seg.l = flags >> 21 & 1
    seg.db = flags >> 22 & 1
    seg.g = flags >> 23 & 1
    seg.unusable = 0 if flags & 1 << 15 else 1


@dataclass(frozen=True, slots=True)
class FpuLayout:
    """Offsets in a saved unicorn context of QEMU's x87/SSE state (CPUX86State: fpstt, fpus,
    fpuc, fptags[8], fpregs[8] of 16 bytes, mxcsr, xmm_regs of ``xmm_stride`` bytes with the
    upper YMM half at +16)."""

    fpstt: int
    fpregs: int
    mxcsr: int
    xmm: int
    xmm_stride: int


@functools.cache
def fpu_layout() -> FpuLayout | None:
    """Find the x87/SSE state in a saved context by writing registers and looking at what
    changed; None if it is not laid out as expected."""
    unicorn, x86, _ = _unicorn()
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    env = _layout().env

    def changed(reg: int, value: Any) -> tuple[bytes, list[int]]:
        old = bytes(uc.context_save())
        uc.reg_write(reg, value)
        new = bytes(uc.context_save())
        return new, [i for i in range(env, len(old)) if old[i] != new[i]]

    uc.reg_write(x86.UC_X86_REG_MXCSR, 0x1F80)
    uc.reg_write(x86.UC_X86_REG_FPCW, 0x37F)
    _, fp0 = changed(x86.UC_X86_REG_FP0, (0x8877665544332211, 0x7FFF))
    _, fp1 = changed(x86.UC_X86_REG_FP1, (0x8877665544332211, 0x7FFF))
    _, xmm0 = changed(x86.UC_X86_REG_XMM0, int.from_bytes(range(1, 17), "little"))
    _, xmm1 = changed(x86.UC_X86_REG_XMM1, int.from_bytes(range(1, 17), "little"))
    blob, sw = changed(x86.UC_X86_REG_FPSW, 5 << 11 | 0x41)
    if not (fp0 and fp1 and xmm0 and xmm1 and len(sw) == 2):
        return None
    fpregs, xmm, fpstt = fp0[0], xmm0[0], sw[0]
    blob, mx = changed(x86.UC_X86_REG_MXCSR, 0x7F80)
    mxcsr = next((i for i in range(xmm - 64, xmm, 4) if blob[i : i + 4] == b"\x80\x7f\0\0"), -1)
    layout = FpuLayout(fpstt, fpregs, mxcsr, xmm, xmm1[0] - xmm)
    ok = (
        fp0 == list(range(fpregs, fpregs + 10))
        and fp1 == list(range(fpregs + 16, fpregs + 26))
        and xmm0 == list(range(xmm, xmm + 16))
        and layout.xmm_stride >= 32
        and struct.unpack_from("<IHH", blob, fpstt) == (5, 0x41, 0x37F)
        and fpregs >= fpstt + 16
        and mxcsr > fpregs + 128
        and mxcsr + 1 in mx
    )
    return layout if ok else None


_TCG_BUFFER = 4 << 20  # unicorn's translated-code buffer of a SoftCpu (see SoftCpu.__init__)


def _no_op(*_args: Any) -> None:
    """A memory hook that only keeps unicorn on its permission-checking path."""


class SoftCpu:
    """A unicorn CPU that executes single instructions on a KVM vCPU's state (one per vCPU,
    used by the vCPU's owner thread only)."""

    def __init__(self) -> None:
        unicorn, x86, state = _unicorn()
        self._unicorn, self._x86, self._state = unicorn, x86, state
        self._layout = _layout()
        fpu = fpu_layout()
        if fpu is None:
            raise HvError(C.HV_UNSUPPORTED, "hv_vcpu_run", "unknown unicorn x87/SSE state layout")
        self._fpu = fpu
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        # Every step drops the translation at RIP, so every step translates again, into the
        # next free part of unicorn's code buffer (~20-40 KiB a time), which is recycled only
        # when it is full: with the default buffer (1 GiB) the process grew by that much a
        # step, to 840 MiB after 20,000 steps. A small buffer is flushed when full instead
        # (a step costs the same, ~0.5 ms, almost all of it translation).
        if hasattr(uc, "ctl_set_tcg_buffer_size"):  # not in every unicorn 2 release
            uc.ctl_set_tcg_buffer_size(_TCG_BUFFER)
        # a recent CPU model: QEMU checks CPUID features before it decodes (SMAP's CLAC/STAC,
        # ADX, CLFLUSHOPT, CLWB...); the guest's CPUID is the host's on kvm_pvm
        model = getattr(x86, "UC_CPU_X86_EPYC_ROME", None)
        if model is not None:
            uc.ctl_set_cpu_model(model)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._uc = uc
        self._ctx = uc.context_save()
        address = ctypes.cast(self._ctx.context, ctypes.c_void_p).value or 0
        self._mem = (ctypes.c_char * self._ctx.size).from_address(address)
        env = self._layout.env
        self._env = env
        # the hidden state in one span: segment caches, GDTR, IDTR, CR0-CR4
        self._segs_at = env + state.ENV_SEGS
        self._segs_end = env + state.ENV_CR + 40
        managed = (state.HF_CPL | state.HF_CS32 | state.HF_SS32 | state.HF_ADDSEG | state.HF_PE) | (
            state.HF_MP_EM_TS | state.HF_LMA | state.HF_CS64 | state.HF_OSFXSR
        )
        managed |= _HF_INHIBIT_IRQ | _HF_SMAP | _HF_VM
        self._hflags_base = struct.unpack_from("<I", self._mem, env + state.ENV_HFLAGS)[0]
        self._hflags_base &= ~managed
        self._hidden: tuple[bytes, bytes, int] = (b"", b"", 0)  # (sregs, span, hflags)
        self._mapped: tuple[tuple[int, int, int, int], ...] = ()
        self._guard_hooks: list[Any] = []  # on the watched pages (see _map)
        self._xcr0 = 1
        # set by the hooks during a run
        self._event: tuple[int, ...] | None = None
        self._access: tuple[int, int, int] | None = None
        self._invalid = False
        uc.hook_add(unicorn.UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(unicorn.UC_HOOK_MEM_INVALID, self._on_bad_access)
        uc.hook_add(unicorn.UC_HOOK_INSN_INVALID, self._on_invalid)

    # --- hooks ----------------------------------------------------------------------------------

    def _on_interrupt(self, uc: Any, intno: int, _data: Any) -> None:
        self._uc.context_update(self._ctx)
        error = struct.unpack_from("<i", self._mem, self._layout.error_code)[0]
        rip = struct.unpack_from("<Q", self._mem, self._env + _ENV_RIP)[0]
        cr2 = int(uc.reg_read(self._x86.UC_X86_REG_CR2))
        self._event = (intno, error, cr2, rip)
        uc.emu_stop()

    def _on_bad_access(
        self, uc: Any, access: int, address: int, size: int, _value: int, _data: Any
    ) -> bool:
        self._access = (access, address, size)
        return False

    def _on_invalid(self, uc: Any, _data: Any) -> bool:
        self._invalid = True
        return False

    def _flush_tlb(self) -> None:
        self._uc.ctl(self._unicorn.UC_CTL_TLB_FLUSH, self._unicorn.UC_CTL_IO_WRITE)

    # --- memory ---------------------------------------------------------------------------------

    def _map(self, regions: list[common.Region]) -> None:
        """Map what KVM has slots for (readable regions), from the same host memory, and the
        execute-only regions (a debugger's read watchpoint: KVM has no slot for them, so their
        code comes here) for instruction fetches only: a data access to them is reported."""
        unicorn = self._unicorn
        wanted = tuple(
            (r.gpa, r.size, r.uva, r.flags)
            for r in regions
            if r.flags & (C.HV_MEMORY_READ | C.HV_MEMORY_EXEC)
        )
        if wanted == self._mapped:
            return
        self._load_synthetic_real_mode(0)  # unmapping looks addresses up: no paging then
        for gpa, size, _uva, _flags in self._mapped:
            self._uc.mem_unmap(gpa, size)
        for hook in self._guard_hooks:
            self._uc.hook_del(hook)
        self._mapped, self._guard_hooks = (), []
        for gpa, size, uva, flags in wanted:
            perms = unicorn.UC_PROT_READ | unicorn.UC_PROT_EXEC
            if not flags & C.HV_MEMORY_READ:
                perms = unicorn.UC_PROT_EXEC
            elif flags & C.HV_MEMORY_WRITE:
                perms |= unicorn.UC_PROT_WRITE
            self._uc.mem_map_ptr(gpa, size, perms, uva)
            # unicorn checks a region's permissions only off its TLB's fast path, which the
            # instruction's own fetch opens for its page: a hook on the range keeps every data
            # access to a watched (read-only or execute-only) page on the checked path
            for kind, missing in (
                (unicorn.UC_HOOK_MEM_WRITE, C.HV_MEMORY_WRITE),
                (unicorn.UC_HOOK_MEM_READ, C.HV_MEMORY_READ),
            ):
                if not flags & missing:
                    hook = self._uc.hook_add(kind, _no_op, None, gpa, gpa + size - 1)
                    self._guard_hooks.append(hook)
        self._mapped = wanted

    def _set_xcr0(self, xcr0: int) -> bool:
        """Give unicorn's CPU the guest's XCR0 by running XSETBV in real mode from a scratch
        page (env->xcr0 is not part of a saved context). False if unicorn refuses the value."""
        if xcr0 == self._xcr0:
            return True
        unicorn, x86 = self._unicorn, self._x86
        scratch = self._scratch_page()
        uc = self._uc
        uc.mem_map(scratch, 0x1000)
        try:
            uc.mem_write(scratch, b"\x0f\x01\xd1")  # xsetbv
            self._load_synthetic_real_mode(scratch)
            uc.reg_write(x86.UC_X86_REG_RAX, xcr0 & 0xFFFFFFFF)
            uc.reg_write(x86.UC_X86_REG_RDX, xcr0 >> 32)
            uc.reg_write(x86.UC_X86_REG_RCX, 0)
            self._event = None
            self._flush_tlb()
            uc.emu_start(0, 0, count=1)
            ok = self._event is None and int(uc.reg_read(x86.UC_X86_REG_RIP)) == 3
        except unicorn.UcError:
            ok = False
        finally:
            uc.mem_unmap(scratch, 0x1000)  # paging is off: no lookup can fault
        if ok:
            self._xcr0 = xcr0
        return ok

    def _scratch_page(self) -> int:
        """A guest-physical page below 4 GiB that no region uses (the highest one)."""
        page = 0xFFFFF000
        taken = sorted((gpa, gpa + size) for gpa, size, _u, _f in self._mapped)
        while any(lo <= page < hi for lo, hi in taken):
            page -= 0x1000
        return page

    def _load_synthetic_real_mode(self, cs_base: int) -> None:
        """Real mode, CS base ``cs_base``, IP 0, CR4.OSXSAVE (for XSETBV)."""
        state, mem, env = self._state, self._mem, self._env
        self._uc.context_update(self._ctx)
        for i in range(8):
            base = cs_base if i == 1 else 0
            flags = 0x9B00 if i == 1 else 0x9300
            off = env + state.ENV_SEGS + 24 * i
            _SEG_ENTRY.pack_into(mem, off, 0, base, 0xFFFF, flags | 1 << 15)
        struct.pack_into("<QQQQQ", mem, env + state.ENV_CR, 0x10, 0, 0, 0, _CR4_OSXSAVE)
        struct.pack_into("<Q", mem, env + state.ENV_EFER, 0)
        struct.pack_into("<Q", mem, env + _ENV_RIP, 0)
        struct.pack_into("<Q", mem, env + state.ENV_EFLAGS, 2)
        struct.pack_into("<i", mem, self._layout.old_exception, -1)
        hflags = self._hflags_base | state.HF_ADDSEG
        struct.pack_into("<I", mem, env + state.ENV_HFLAGS, hflags)
        self._uc.context_restore(self._ctx)
        self._hidden = (b"", b"", 0)

    # --- state ----------------------------------------------------------------------------------

    def _load(self, regs: K.KvmRegs, sregs: K.KvmSregs, fpu: bytes | None) -> None:
        """Write the vCPU's state into the saved context and restore it into the CPU."""
        state, mem, env = self._state, self._mem, self._env
        self._uc.context_update(self._ctx)
        q = _KVM_REGS.unpack_from(regs)
        _QEMU_REGS.pack_into(mem, env, *(q[i] for i in _TO_QEMU))
        struct.pack_into("<QQ", mem, env + _ENV_RIP, q[16], q[17])  # RIP, RFLAGS (all of it)
        key = bytes(sregs)[:_SREGS_USED] + bytes((regs.rflags >> 17 & 1,))
        if key != self._hidden[0]:
            self._hidden = (key, *self._hidden_state(regs, sregs))
        mem[self._segs_at : self._segs_end] = self._hidden[1]
        struct.pack_into("<Q", mem, env + state.ENV_EFER, sregs.efer)
        struct.pack_into("<I", mem, env + state.ENV_HFLAGS, self._hidden[2])
        struct.pack_into("<i", mem, self._layout.old_exception, -1)
        struct.pack_into("<Q", mem, self._layout.tsc_offset, 0)
        if fpu is not None:
            self._patch_fpu(fpu)
        self._uc.context_restore(self._ctx)
        if fpu is not None:
            self._load_fpu_controls(fpu)

    def _hidden_state(self, regs: K.KvmRegs, sregs: K.KvmSregs) -> tuple[bytes, int]:
        """The context bytes from the segment caches to CR4, and hflags, for this state."""
        span = bytearray(self._segs_end - self._segs_at)
        state, at = self._state, self._segs_at - self._env
        for i, name in enumerate(_SEGS):
            seg = getattr(sregs, name)
            flags = _seg_flags(seg)
            _SEG_ENTRY.pack_into(
                span, state.ENV_SEGS - at + 24 * i, seg.selector, seg.base, seg.limit, flags
            )
        _DTABLE.pack_into(span, state.ENV_GDT - at, 0, sregs.gdt.base, sregs.gdt.limit, 0)
        _DTABLE.pack_into(span, state.ENV_IDT - at, 0, sregs.idt.base, sregs.idt.limit, 0)
        crs = (sregs.cr0, 0, sregs.cr2, sregs.cr3, sregs.cr4)
        struct.pack_into("<5Q", span, state.ENV_CR - at, *crs)
        return bytes(span), self._hflags(regs, sregs)

    def _hflags(self, regs: K.KvmRegs, sregs: K.KvmSregs) -> int:
        """QEMU's hflags for this state (as emu_state recomputes them; CPL is SS.DPL, as KVM
        has it)."""
        state = self._state
        hflags = self._hflags_base
        cr0, cr4, efer = sregs.cr0, sregs.cr4, sregs.efer
        cs, ss = sregs.cs, sregs.ss
        if cr0 & 1:
            hflags |= state.HF_PE | (3 if regs.rflags & _EFLAGS_VM else ss.dpl & 3)
        if regs.rflags & _EFLAGS_VM:
            hflags |= _HF_VM
        hflags |= (cr0 << 8) & state.HF_MP_EM_TS
        if cr4 & 1 << 9:
            hflags |= state.HF_OSFXSR
        if cr4 & _CR4_SMAP:
            hflags |= _HF_SMAP
        if efer & C.EFER_LMA:
            hflags |= state.HF_LMA
        if efer & C.EFER_LMA and cs.l and not cs.unusable:
            hflags |= state.HF_CS32 | state.HF_CS64
        elif cs.db:
            hflags |= state.HF_CS32
        if ss.db and not ss.unusable:
            hflags |= state.HF_SS32
        if not hflags & state.HF_CS64:
            flat = not (sregs.es.base | sregs.ds.base | sregs.ss.base)
            if not cr0 & 1 or regs.rflags & _EFLAGS_VM or not hflags & state.HF_CS32 or not flat:
                hflags |= state.HF_ADDSEG
        return int(hflags)

    def _store(self, regs: K.KvmRegs, sregs: K.KvmSregs, before: bytes, after: bytes) -> bool:
        """Copy what the instruction changed into the KVM structures (``before``: the context
        as loaded, ``after``: as the instruction left it). True if sregs changed."""
        state, env = self._state, self._env
        q = _QEMU_REGS.unpack_from(after, env)
        rip, rflags = struct.unpack_from("<QQ", after, env + _ENV_RIP)
        _KVM_REGS.pack_into(regs, 0, *(q[i] for i in _FROM_QEMU), rip, rflags | 2)
        at, end = self._segs_at, self._segs_end
        efer_at = env + state.ENV_EFER
        if (
            after[at:end] == before[at:end]
            and after[efer_at : efer_at + 8] == before[efer_at : efer_at + 8]
        ):
            return False
        changed = False
        for i, name in enumerate(_SEGS):
            off = env + state.ENV_SEGS + 24 * i
            selector, base, limit, flags = _SEG_ENTRY.unpack_from(after, off)
            old = _SEG_ENTRY.unpack_from(before, off)
            # QEMU keeps the descriptor's whole second word: only the attribute bits count
            if (selector, base, limit, flags & _DESC_ATTRS) != (*old[:3], old[3] & _DESC_ATTRS):
                _set_seg(getattr(sregs, name), selector, base, limit, flags)
                changed = True
        for name, off in (("gdt", state.ENV_GDT), ("idt", state.ENV_IDT)):
            entry = _DTABLE.unpack_from(after, env + off)
            if entry != _DTABLE.unpack_from(before, env + off):
                table = getattr(sregs, name)
                table.base, table.limit = entry[1], entry[2] & 0xFFFF
                changed = True
        cr0, _, _, cr3, cr4 = struct.unpack_from("<5Q", after, env + state.ENV_CR)
        efer = struct.unpack_from("<Q", after, efer_at)[0]
        if (cr0, cr3, cr4, efer) != (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer):
            sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = cr0, cr3, cr4, efer
            changed = True
        return changed

    # --- x87 / SSE ------------------------------------------------------------------------------

    def _patch_fpu(self, image: bytes) -> None:
        """The x87 registers, tags, status and XMM/YMM registers of an XSAVE image, into the
        context (the control words go through the register API: QEMU derives state from
        them)."""
        layout, mem = self._fpu, self._mem
        fsw, ftw = struct.unpack_from("<HB", image, 2)
        top = fsw >> 11 & 7
        struct.pack_into("<IH", mem, layout.fpstt, top, fsw & ~0x3800)
        tags = bytes(0 if ftw >> i & 1 else 1 for i in range(8))
        mem[layout.fpstt + 8 : layout.fpstt + 16] = tags
        for i in range(8):
            at = layout.fpregs + 16 * ((top + i) & 7)
            mem[at : at + 10] = image[32 + 16 * i : 42 + 16 * i]
        ymm = struct.unpack_from("<Q", image, 512)[0] & 4
        for i in range(16):
            at = layout.xmm + layout.xmm_stride * i
            mem[at : at + 16] = image[160 + 16 * i : 176 + 16 * i]
            mem[at + 16 : at + 32] = image[576 + 16 * i : 592 + 16 * i] if ymm else bytes(16)

    def _load_fpu_controls(self, image: bytes) -> None:
        """FCW and MXCSR through the register API (QEMU derives its rounding state from them)."""
        x86, uc = self._x86, self._uc
        uc.reg_write(x86.UC_X86_REG_FPCW, struct.unpack_from("<H", image, 0)[0])
        uc.reg_write(x86.UC_X86_REG_MXCSR, struct.unpack_from("<I", image, 24)[0])

    def _store_fpu(self, image: bytearray, after: bytes) -> bool:
        """Write the x87/SSE state of context ``after`` into ``image``; True if it changed."""
        layout, new = self._fpu, bytearray(image)
        top, fsw, fcw = struct.unpack_from("<IHH", after, layout.fpstt)
        tags = after[layout.fpstt + 8 : layout.fpstt + 16]
        ftw = sum(1 << i for i in range(8) if not tags[i])
        struct.pack_into("<HHB", new, 0, fcw, (fsw & ~0x3800) | (top & 7) << 11, ftw)
        struct.pack_into("<I", new, 24, struct.unpack_from("<I", after, layout.mxcsr)[0])
        for i in range(8):
            at = layout.fpregs + 16 * ((top + i) & 7)
            new[32 + 16 * i : 42 + 16 * i] = after[at : at + 10]
        ymm = struct.unpack_from("<Q", image, 512)[0] & 4
        for i in range(16):
            at = layout.xmm + layout.xmm_stride * i
            new[160 + 16 * i : 176 + 16 * i] = after[at : at + 16]
            if ymm:
                new[576 + 16 * i : 592 + 16 * i] = after[at + 16 : at + 32]
        if new == image:
            return False
        xstate_bv = struct.unpack_from("<Q", new, 512)[0] | 3  # x87 and SSE are in use now
        struct.pack_into("<Q", new, 512, xstate_bv)
        image[:] = new
        return True

    # --- one instruction ------------------------------------------------------------------------

    def step(
        self,
        regs: K.KvmRegs,
        sregs: K.KvmSregs,
        regions: list[common.Region],
        insn: Instruction,
        linear_rip: int,
        fpu: bytearray | None = None,
        xcr0: int = 1,
    ) -> Outcome:
        """Execute the instruction at RIP once on this state (see the module docstring).

        ``linear_rip`` is where KVM fetched it (its translation is dropped first); ``fpu`` the
        vCPU's XSAVE image when ``insn.fpu`` (updated in place when the instruction changed
        it); ``xcr0`` the guest's XCR0 when ``insn.xcr0``."""
        unicorn, uc, env = self._unicorn, self._uc, self._env
        self._map(regions)
        if insn.xcr0 and not self._set_xcr0(xcr0):
            return Outcome("invalid")
        self._load(regs, sregs, None if fpu is None else bytes(fpu))
        before = bytes(self._mem)
        self._flush_tlb()
        uc.ctl_remove_cache(linear_rip, linear_rip + insn.length)
        self._event = self._access = None
        self._invalid = False
        start = regs.rip
        try:
            uc.emu_start(start, 0, count=1)
        except unicorn.UcError:
            pass
        uc.context_update(self._ctx)
        after = bytes(self._mem)
        rip = struct.unpack_from("<Q", after, env + _ENV_RIP)[0]
        # progress: RIP moved, or a GPR changed (one iteration of a REP string instruction)
        done = rip != start or after[env : env + 128] != before[env : env + 128]
        if self._invalid:
            return Outcome("invalid")
        if self._access is not None:
            access, address, size = self._access
            fetch = access in (unicorn.UC_MEM_FETCH_UNMAPPED, unicorn.UC_MEM_FETCH_PROT)
            if not (fetch and rip != start):  # else: the fetch of the next instruction
                write = access in (unicorn.UC_MEM_WRITE_UNMAPPED, unicorn.UC_MEM_WRITE_PROT)
                return Outcome("access", address=address, size=size, write=write, fetch=fetch)
        outcome = Outcome("done")
        if self._event is not None:
            vector, error, cr2, event_rip = self._event
            if vector == C.IDT_UD:
                return Outcome("invalid")
            completed = event_rip != start
            if vector in _TRAP_VECTORS and completed:
                outcome = Outcome("trap", vector=vector)
            elif not completed:
                code = error & 0xFFFFFFFF if vector in _ERROR_CODE_VECTORS else None
                return Outcome("fault", vector=vector, error=code, cr2=cr2)
            # else: a fault of the next instruction's fetch; the instruction itself is done
        elif not done:
            return Outcome("invalid")  # unicorn dropped a #UD (it does with code hooks)
        outcome.sregs_changed = self._store(regs, sregs, before, after)
        if fpu is not None:
            outcome.fpu_changed = self._store_fpu(fpu, after)
        return outcome
