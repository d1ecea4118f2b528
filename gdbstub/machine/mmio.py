"""Decode and emulate the instruction behind an MMIO exit (EPT violation, exit 48).

Theory of operation
-------------------
On Hypervisor.framework (and on the emu backend) a guest access to guest-physical memory that
is not RAM ends in an EPT-violation exit that carries only the guest-physical address and the
qualification (read/write/fetch).  RIP still points at the instruction and nothing of it has
executed.  The VMM reads the instruction bytes at RIP and calls :func:`decode`; it returns an
:class:`MmioInstruction` (or None for an instruction this module does not emulate).  The VMM
then calls :meth:`MmioInstruction.execute` with

* a ``cpu`` (:class:`MmioCpu`): general-purpose registers in x86 encoding order (0 = rax,
  1 = rcx, 2 = rdx, 3 = rbx, 4 = rsp, 5 = rbp, 6 = rsi, 7 = rdi, 8..15 = r8..r15) as full
  64-bit values, and RFLAGS; :class:`MmioSseCpu` adds the XMM registers for movd/movq/movdqu;
* ``read(size) -> value`` and ``write(size, value)``: the device access at the exit's
  guest-physical address (values are little-endian integers of ``size`` bytes).

``execute`` performs the instruction's whole architectural effect on registers and flags, and
the machine then advances RIP by :attr:`MmioInstruction.length` (wrapping at the code size).
The linear address of the memory operand is never computed: segment overrides, the base,
index and displacement (and RIP-relative addressing) only decide where the access goes, and
the exit already says that.  Capstone decodes; each supported form is turned once into a small
object holding the register/immediate operands, and :func:`decode` caches that by
``(code bytes, mode)``, so the common case (the same ``mov`` to an APIC register again) is a
dictionary lookup.

Register writes follow the CPU: 8- and 16-bit destinations merge into the register (ah, ch,
dh, bh are bits 15:8 of registers 0..3 and exist only without a REX prefix), 32-bit
destinations zero-extend to 64 bits (as KVM's emulator, in every mode).  Flags come from
:func:`alu`, which computes CF, PF, AF, ZF, SF and OF as the hardware does (logic ops clear
CF, OF and AF; inc/dec keep CF; bt* change only CF).

Supported (memory operand at the MMIO address): mov/movabs load and store (register and
immediate), movnti, movzx, movsx, movsxd, xchg, add/or/adc/sbb/and/sub/xor with memory as
destination (read-modify-write) or as source (register destination), cmp and test,
inc/dec/neg/not, xadd, cmpxchg, bt/bts/btr/btc, stos and lods without rep, and, when the
caller asks for them (``decode(..., sse=True)`` with a cpu that has XMM access), the SSE moves
movd/movq/movss/movsd/movdqa/movdqu/movaps/movups/movapd/movupd/movntdq/movntps/movntpd/
movntdqa/lddqu (16-byte ones reach ``read``/``write`` as one 16-byte access).  ``lock`` is
accepted where the CPU accepts it.  Not supported (decode returns None; :func:`describe` names
the instruction for the stop message): rep string ops, movs/cmps/scas (two memory operands),
VEX/EVEX forms, MMX, shifts and rotates, cmov/setcc, push/pop and branches through memory,
moves to or from segment registers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol, cast

import capstone
from capstone import x86_const as X

Read = Callable[[int], int]
"""``read(size) -> value``: a device read of ``size`` bytes at the faulting address."""
Write = Callable[[int, int], None]
"""``write(size, value)``: a device write of ``size`` bytes at the faulting address."""

CF = 0x1
PF = 0x4
AF = 0x10
ZF = 0x40
SF = 0x80
DF = 0x400
OF = 0x800
STATUS_FLAGS = CF | PF | AF | ZF | SF | OF
"""The six arithmetic status flags :func:`alu` computes."""

_PF = bytes(PF if bin(i).count("1") % 2 == 0 else 0 for i in range(256))


class MmioCpu(Protocol):
    """The vCPU state the decoder touches, supplied by the machine."""

    def read_gpr(self, index: int) -> int:
        """Full 64-bit value of GPR ``index`` (0 = rax .. 15 = r15, x86 encoding order)."""
        ...

    def write_gpr(self, index: int, value: int) -> None:
        """Set GPR ``index`` to the 64-bit ``value``."""
        ...

    def read_rflags(self) -> int:
        """RFLAGS."""
        ...

    def write_rflags(self, value: int) -> None:
        """Set RFLAGS."""
        ...


class MmioSseCpu(MmioCpu, Protocol):
    """A vCPU that also exposes XMM registers (needed only by the SSE moves)."""

    def read_xmm(self, index: int) -> bytes:
        """The 16 bytes of xmm``index`` (little-endian)."""
        ...

    def write_xmm(self, index: int, value: bytes) -> None:
        """Set xmm``index`` to 16 bytes."""
        ...


# --------------------------------------------------------------------------- the ALU


def _szp(res: int, bits: int) -> int:
    f = _PF[res & 0xFF]
    if res == 0:
        f |= ZF
    if res >> (bits - 1):
        f |= SF
    return f


def _add(a: int, b: int, carry: int, bits: int) -> tuple[int, int]:
    r = a + b + carry
    res = r & ((1 << bits) - 1)
    f = _szp(res, bits) | ((a ^ b ^ res) & AF)
    if r >> bits:
        f |= CF
    if ((a ^ res) & (b ^ res)) >> (bits - 1) & 1:
        f |= OF
    return res, f


def _sub(a: int, b: int, borrow: int, bits: int) -> tuple[int, int]:
    r = a - b - borrow
    res = r & ((1 << bits) - 1)
    f = _szp(res, bits) | ((a ^ b ^ res) & AF)
    if r < 0:
        f |= CF
    if ((a ^ b) & (a ^ res)) >> (bits - 1) & 1:
        f |= OF
    return res, f


_AluFn = Callable[[int, int, int, int], tuple[int, int]]  # (a, b, bits, rflags) -> (res, rflags)
_KEEP = ~STATUS_FLAGS
_KEEP_CF = ~(STATUS_FLAGS & ~CF)


def _op_add(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res, f = _add(a, b, 0, bits)
    return res, fl & _KEEP | f


def _op_adc(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res, f = _add(a, b, fl & CF, bits)
    return res, fl & _KEEP | f


def _op_sub(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res, f = _sub(a, b, 0, bits)
    return res, fl & _KEEP | f


def _op_sbb(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res, f = _sub(a, b, fl & CF, bits)
    return res, fl & _KEEP | f


def _op_and(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res = a & b
    return res, fl & _KEEP | _szp(res, bits)


def _op_or(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res = a | b
    return res, fl & _KEEP | _szp(res, bits)


def _op_xor(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res = a ^ b
    return res, fl & _KEEP | _szp(res, bits)


def _op_inc(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res, f = _add(a, 1, 0, bits)
    return res, fl & _KEEP_CF | f & ~CF


def _op_dec(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res, f = _sub(a, 1, 0, bits)
    return res, fl & _KEEP_CF | f & ~CF


def _op_neg(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    res, f = _sub(0, a, 0, bits)
    return res, fl & _KEEP | f


def _op_not(a: int, b: int, bits: int, fl: int) -> tuple[int, int]:
    return ~a & ((1 << bits) - 1), fl


_ALU: dict[str, _AluFn] = {
    "add": _op_add,
    "adc": _op_adc,
    "sub": _op_sub,
    "sbb": _op_sbb,
    "cmp": _op_sub,
    "and": _op_and,
    "test": _op_and,
    "or": _op_or,
    "xor": _op_xor,
    "inc": _op_inc,
    "dec": _op_dec,
    "neg": _op_neg,
    "not": _op_not,
}
ALU_OPS = frozenset(_ALU)
"""The operation names :func:`alu` accepts."""


def alu(op: str, a: int, b: int, bits: int, rflags: int) -> tuple[int, int]:
    """``(result, new rflags)`` of ``op`` (see :data:`ALU_OPS`) on ``bits``-bit operands.

    ``a`` is the destination operand, ``b`` the source (ignored by inc, dec, neg and not);
    both are taken modulo ``2**bits``.  ``cmp`` and ``test`` return the result the CPU
    discards.  Bits of ``rflags`` the operation does not define are kept.
    """
    if bits not in (8, 16, 32, 64):
        raise ValueError(f"bad operand width {bits}")
    mask = (1 << bits) - 1
    return _ALU[op](a & mask, b & mask, bits, rflags)


# --------------------------------------------------------------------------- operands


class _Gpr:
    """A general-purpose register operand: ``bits`` wide at bit ``shift`` of GPR ``index``."""

    __slots__ = ("bits", "index", "mask", "shift")

    def __init__(self, index: int, bits: int, shift: int = 0) -> None:
        self.index = index
        self.bits = bits
        self.shift = shift
        self.mask = (1 << bits) - 1

    def get(self, cpu: MmioCpu) -> int:
        return (cpu.read_gpr(self.index) >> self.shift) & self.mask

    def put(self, cpu: MmioCpu, value: int) -> None:
        value &= self.mask
        if self.bits < 32:
            old = cpu.read_gpr(self.index)
            value = old & ~(self.mask << self.shift) | value << self.shift
        cpu.write_gpr(self.index, value)


class _Imm:
    """An immediate operand (already cut to the operand width)."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def get(self, cpu: MmioCpu) -> int:
        return self.value


_Source = _Gpr | _Imm

_GPR_NAMES = (
    ("rax", "eax", "ax", "al"),
    ("rcx", "ecx", "cx", "cl"),
    ("rdx", "edx", "dx", "dl"),
    ("rbx", "ebx", "bx", "bl"),
    ("rsp", "esp", "sp", "spl"),
    ("rbp", "ebp", "bp", "bpl"),
    ("rsi", "esi", "si", "sil"),
    ("rdi", "edi", "di", "dil"),
    *((f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b") for n in range(8, 16)),
)


def _gpr_table() -> dict[int, _Gpr]:
    table: dict[int, _Gpr] = {}
    for index, names in enumerate(_GPR_NAMES):
        for name, bits in zip(names, (64, 32, 16, 8), strict=True):
            table[getattr(X, f"X86_REG_{name.upper()}")] = _Gpr(index, bits)
    for index, name in enumerate(("ah", "ch", "dh", "bh")):
        table[getattr(X, f"X86_REG_{name.upper()}")] = _Gpr(index, 8, 8)
    return table


_GPRS = _gpr_table()
_XMMS = {getattr(X, f"X86_REG_XMM{i}"): i for i in range(16)}


# --------------------------------------------------------------------------- instructions


class MmioInstruction:
    """One decoded instruction whose memory operand is the MMIO access.

    ``length`` is the instruction's length in bytes (the machine advances RIP by it), ``size``
    the access size in bytes (1, 2, 4, 8 or 16), ``kind`` one of ``"load"`` (device read,
    register written), ``"store"`` (device write), ``"rmw"`` (device read then write) and
    ``"compare"`` (device read, only flags change), and ``text`` the disassembly.
    """

    __slots__ = ("kind", "length", "size", "text")

    def __init__(self, length: int, size: int, kind: str, text: str) -> None:
        self.length = length
        self.size = size
        self.kind = kind
        self.text = text

    @property
    def reads(self) -> bool:
        """Whether :meth:`execute` calls ``read`` (everything but a plain store)."""
        return self.kind != "store"

    @property
    def writes(self) -> bool:
        """Whether :meth:`execute` calls ``write`` (stores and read-modify-writes)."""
        return self.kind in ("store", "rmw")

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        """Perform the instruction: the device access and its effect on registers and flags.

        RIP is left alone: the caller adds :attr:`length`.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.text!r} len={self.length} size={self.size}>"


class _Load(MmioInstruction):
    """mov/movabs/movzx/movsx/movsxd/lods: register <- device (zero- or sign-extended)."""

    __slots__ = ("dst", "signed", "step")

    def __init__(
        self, length: int, size: int, text: str, dst: _Gpr, signed: bool, step: _Gpr | None
    ) -> None:
        super().__init__(length, size, "load", text)
        self.dst = dst
        self.signed = signed
        self.step = step

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        value = read(self.size)
        if self.signed and value >> (8 * self.size - 1) & 1:
            value -= 1 << (8 * self.size)
        self.dst.put(cpu, value)
        if self.step is not None:
            _advance_index(cpu, self.step, self.size)


class _Store(MmioInstruction):
    """mov/movabs/movnti/stos: device <- register or immediate."""

    __slots__ = ("src", "step")

    def __init__(self, length: int, size: int, text: str, src: _Source, step: _Gpr | None) -> None:
        super().__init__(length, size, "store", text)
        self.src = src
        self.step = step

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        write(self.size, self.src.get(cpu))
        if self.step is not None:
            _advance_index(cpu, self.step, self.size)


def _advance_index(cpu: MmioCpu, index: _Gpr, size: int) -> None:
    """rsi/rdi (at the address size) += size, or -= size when RFLAGS.DF is set."""
    delta = -size if cpu.read_rflags() & DF else size
    index.put(cpu, index.get(cpu) + delta)


class _Xchg(MmioInstruction):
    """xchg: device <-> register."""

    __slots__ = ("reg",)

    def __init__(self, length: int, size: int, text: str, reg: _Gpr) -> None:
        super().__init__(length, size, "rmw", text)
        self.reg = reg

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        old = read(self.size)
        write(self.size, self.reg.get(cpu))
        self.reg.put(cpu, old)


class _AluMem(MmioInstruction):
    """ALU op with the device as destination: rmw, or flags only for cmp/test."""

    __slots__ = ("fn", "src")

    def __init__(
        self, length: int, size: int, text: str, op: str, src: _Source | None, store: bool
    ) -> None:
        super().__init__(length, size, "rmw" if store else "compare", text)
        self.fn = _ALU[op]
        self.src = src

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        a = read(self.size)
        b = 0 if self.src is None else self.src.get(cpu)
        res, flags = self.fn(a, b, 8 * self.size, cpu.read_rflags())
        if self.kind == "rmw":
            write(self.size, res)
        cpu.write_rflags(flags)


class _AluReg(MmioInstruction):
    """ALU op with a register destination and the device as source (cmp: flags only)."""

    __slots__ = ("dst", "fn", "store")

    def __init__(self, length: int, size: int, text: str, op: str, dst: _Gpr, store: bool) -> None:
        super().__init__(length, size, "load" if store else "compare", text)
        self.fn = _ALU[op]
        self.dst = dst
        self.store = store

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        b = read(self.size)
        res, flags = self.fn(self.dst.get(cpu), b, 8 * self.size, cpu.read_rflags())
        if self.store:
            self.dst.put(cpu, res)
        cpu.write_rflags(flags)


class _Xadd(MmioInstruction):
    """xadd: device <- device + reg, reg <- old device value; add's flags."""

    __slots__ = ("reg",)

    def __init__(self, length: int, size: int, text: str, reg: _Gpr) -> None:
        super().__init__(length, size, "rmw", text)
        self.reg = reg

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        old = read(self.size)
        res, flags = _op_add(old, self.reg.get(cpu), 8 * self.size, cpu.read_rflags())
        write(self.size, res)
        self.reg.put(cpu, old)
        cpu.write_rflags(flags)


class _Cmpxchg(MmioInstruction):
    """cmpxchg: compare the accumulator with the device; store reg if equal, else load it."""

    __slots__ = ("acc", "reg")

    def __init__(self, length: int, size: int, text: str, reg: _Gpr) -> None:
        super().__init__(length, size, "rmw", text)
        self.reg = reg
        self.acc = _Gpr(0, 8 * size)

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        old = read(self.size)
        acc = self.acc.get(cpu)
        _, flags = _op_sub(acc, old, 8 * self.size, cpu.read_rflags())
        if acc == old:
            write(self.size, self.reg.get(cpu))
        else:
            write(self.size, old)  # the CPU always writes (a locked cycle): the old value
            self.acc.put(cpu, old)
        cpu.write_rflags(flags)


class _BitTest(MmioInstruction):
    """bt/bts/btr/btc: CF <- the selected bit; bts/btr/btc then set/clear/flip it."""

    __slots__ = ("offset", "op")

    def __init__(self, length: int, size: int, text: str, op: str, offset: _Source) -> None:
        super().__init__(length, size, "compare" if op == "bt" else "rmw", text)
        self.op = op
        self.offset = offset

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        value = read(self.size)
        # A register offset past the operand selects another unit of the bit string; the exit's
        # address is already that unit, so only the offset within it matters.
        bit = self.offset.get(cpu) & (8 * self.size - 1)
        carry = value >> bit & 1
        if self.op != "bt":
            if self.op == "bts":
                value |= 1 << bit
            elif self.op == "btr":
                value &= ~(1 << bit)
            else:
                value ^= 1 << bit
            write(self.size, value)
        cpu.write_rflags(cpu.read_rflags() & ~CF | carry)


class _XmmLoad(MmioInstruction):
    """movd/movq/movss/movsd/movdqu...: xmm <- device, zero-extended to 128 bits."""

    __slots__ = ("xmm",)

    def __init__(self, length: int, size: int, text: str, xmm: int) -> None:
        super().__init__(length, size, "load", text)
        self.xmm = xmm

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        _sse(cpu, self).write_xmm(self.xmm, read(self.size).to_bytes(16, "little"))


class _XmmStore(MmioInstruction):
    """movd/movq/movss/movsd/movdqu...: device <- the low ``size`` bytes of an xmm."""

    __slots__ = ("xmm",)

    def __init__(self, length: int, size: int, text: str, xmm: int) -> None:
        super().__init__(length, size, "store", text)
        self.xmm = xmm

    def execute(self, cpu: MmioCpu, read: Read, write: Write) -> None:
        data = _sse(cpu, self).read_xmm(self.xmm)
        write(self.size, int.from_bytes(data[: self.size], "little"))


def _sse(cpu: MmioCpu, insn: MmioInstruction) -> MmioSseCpu:
    if not hasattr(cpu, "read_xmm") or not hasattr(cpu, "write_xmm"):
        raise TypeError(f"{insn.text}: the cpu has no read_xmm/write_xmm")
    return cast(MmioSseCpu, cpu)


# --------------------------------------------------------------------------- decoding

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_LOCK = threading.Lock()  # a capstone handle is not safe to share between threads
_DETAIL: dict[int, Any] = {}
_PLAIN: dict[int, Any] = {}


def _capstone(mode: int, detail: bool) -> Any:
    cache = _DETAIL if detail else _PLAIN
    cs = cache.get(mode)
    if cs is None:
        if mode not in _MODES:
            raise ValueError(f"mode must be 16, 32 or 64, not {mode!r}")
        cs = capstone.Cs(capstone.CS_ARCH_X86, _MODES[mode])
        cs.detail = detail
        cache[mode] = cs
    return cs


def _ins(*names: str) -> dict[int, str]:
    """Capstone instruction ids of ``names`` (a name this capstone lacks is left out)."""
    ids = ((getattr(X, f"X86_INS_{name.upper()}", None), name) for name in names)
    return {iid: name for iid, name in ids if iid is not None}


_MOVES = _ins("mov", "movabs", "movnti")
_EXTENDS = _ins("movzx", "movsx", "movsxd")
_BINARY = _ins("add", "or", "adc", "sbb", "and", "sub", "xor", "cmp")
_UNARY = _ins("inc", "dec", "neg", "not")
_BITS = _ins("bt", "bts", "btr", "btc")
_STOS = _ins("stosb", "stosw", "stosd", "stosq")
_LODS = _ins("lodsb", "lodsw", "lodsd", "lodsq")
_SSE_MOVES = _ins(
    "movd", "movq", "movss", "movsd", "movdqa", "movdqu", "movaps", "movups", "movapd",
    "movupd", "movntdq", "movntps", "movntpd", "movntdqa", "lddqu",
)  # fmt: skip
_LOCKABLE = {
    *_BINARY, *_UNARY, *_ins("bts", "btr", "btc", "xchg", "xadd", "cmpxchg")
} - set(_ins("cmp"))  # fmt: skip
_ID_XCHG = X.X86_INS_XCHG
_ID_TEST = X.X86_INS_TEST
_ID_XADD = X.X86_INS_XADD
_ID_CMPXCHG = X.X86_INS_CMPXCHG
_ID_MOVZX = X.X86_INS_MOVZX
_OP_REG = X.X86_OP_REG
_OP_IMM = X.X86_OP_IMM
_OP_MEM = X.X86_OP_MEM


def _source(op: Any, size: int) -> _Source | None:
    """A register or immediate source operand; immediates are cut to ``size`` bytes."""
    if op.type == _OP_IMM:
        return _Imm(op.imm & ((1 << (8 * size)) - 1))
    if op.type == _OP_REG:
        return _GPRS.get(op.reg)
    return None


def _build(insn: Any, sse: bool) -> MmioInstruction | None:
    """The emulation object for one capstone instruction, or None if unsupported."""
    ops = list(insn.operands)
    mems = [i for i, op in enumerate(ops) if op.type == _OP_MEM]
    if len(mems) != 1:
        return None
    at = mems[0]
    mem = ops[at]
    other = ops[1 - at] if len(ops) == 2 else None
    size = mem.size
    iid = insn.id
    length = insn.size
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    prefix = insn.prefix[0]
    if prefix == X.X86_PREFIX_LOCK and (iid not in _LOCKABLE or (at != 0 and iid != _ID_XCHG)):
        return None  # #UD on the CPU; never reaches an EPT violation
    if iid in _MOVES or iid in _EXTENDS:
        if other is None or (iid in _EXTENDS and at == 0):
            return None
        if at == 0:
            src = _source(other, size)
            return None if src is None else _Store(length, size, text, src, None)
        dst = _GPRS.get(other.reg) if other.type == _OP_REG else None
        if dst is None:
            return None
        return _Load(length, size, text, dst, iid in _EXTENDS and iid != _ID_MOVZX, None)
    if iid in _BINARY or iid == _ID_TEST:
        if other is None:
            return None
        op = _BINARY.get(iid, "test")
        store = op not in ("cmp", "test")
        if at == 0 or op == "test":
            src = _source(other, size)
            return None if src is None else _AluMem(length, size, text, op, src, store)
        dst = _GPRS.get(other.reg) if other.type == _OP_REG else None
        return None if dst is None else _AluReg(length, size, text, op, dst, store)
    if iid in _UNARY:
        return _AluMem(length, size, text, _UNARY[iid], None, True) if other is None else None
    if iid in _BITS:
        if other is None or at != 0:
            return None
        offset = _source(other, 1) if other.type == _OP_IMM else _source(other, size)
        return None if offset is None else _BitTest(length, size, text, _BITS[iid], offset)
    if iid in (_ID_XCHG, _ID_XADD, _ID_CMPXCHG):
        reg = _GPRS.get(other.reg) if other is not None and other.type == _OP_REG else None
        if reg is None or (iid != _ID_XCHG and at != 0):
            return None
        if iid == _ID_XCHG:
            return _Xchg(length, size, text, reg)
        if iid == _ID_XADD:
            return _Xadd(length, size, text, reg)
        return _Cmpxchg(length, size, text, reg)
    if iid in _STOS or iid in _LODS:
        if prefix in (X.X86_PREFIX_REP, X.X86_PREFIX_REPNE) or other is None:
            return None
        acc = _GPRS.get(other.reg)
        index = _GPRS.get(mem.mem.base)
        if acc is None or index is None:
            return None
        if iid in _STOS:
            return _Store(length, size, text, acc, index)
        return _Load(length, size, text, acc, False, index)
    if iid in _SSE_MOVES and sse:
        xmm = _XMMS.get(other.reg) if other is not None and other.type == _OP_REG else None
        if xmm is None:
            return None
        if at == 0:
            return _XmmStore(length, size, text, xmm)
        return _XmmLoad(length, size, text, xmm)
    return None


@lru_cache(maxsize=4096)
def _decode(code: bytes, mode: int, sse: bool) -> MmioInstruction | None:
    with _LOCK:
        cs = _capstone(mode, True)
        for insn in cs.disasm(code, 0, 1):
            return _build(insn, sse)
    return None


def decode(
    code: bytes | bytearray | memoryview, mode: int, address: int = 0, *, sse: bool = False
) -> MmioInstruction | None:
    """Decode the instruction at the start of ``code`` for MMIO emulation.

    ``mode`` is the code segment's mode (16, 32 or 64); ``address`` is RIP (accepted for
    symmetry with :func:`describe`; the emulation never needs it).  ``code`` should hold the
    15 bytes at RIP, or fewer where the page ends.  ``sse=True`` also accepts the SSE moves,
    whose ``execute`` needs an :class:`MmioSseCpu`.  Returns None when the bytes are not a
    complete instruction or the instruction is not one this module emulates.  Results are
    cached by ``(code, mode, sse)``.
    """
    return _decode(bytes(code[:15]), mode, sse)


def describe(code: bytes | bytearray | memoryview, mode: int, address: int = 0) -> str:
    """``"mnemonic operands"`` of the instruction at the start of ``code`` (for messages)."""
    data = bytes(code[:15])
    with _LOCK:
        for insn in _capstone(mode, False).disasm(data, address, 1):
            return f"{insn.mnemonic} {insn.op_str}".strip()
    return "(bad) " + (data.hex(" ") if data else "(no bytes)")
