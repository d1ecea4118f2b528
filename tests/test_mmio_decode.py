"""gdbstub.machine.mmio: decoding and emulating the instruction behind an MMIO exit.

Three kinds of checks:

* hand-written cases with the expected registers, flags, access sizes and values spelled out
  (APIC/IOAPIC-style accesses, 8-bit high registers, REX.W, moffs, rip-relative, extension);
* :func:`mmio.alu` against the host CPU: the same operation run natively (a few bytes of
  machine code called through ctypes), on edge values and random ones, comparing result and
  CF/PF/AF/ZF/SF/OF;
* every supported form, in 64-, 32- and 16-bit mode, against unicorn executing the very same
  instruction bytes on real memory: registers, flags, the bytes written and RIP + length.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from gdbstub.machine import mmio
from gdbstub.machine.mmio import AF, CF, DF, OF, PF, SF, STATUS_FLAGS, ZF
from tests.guestbuild import assemble_flat

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9, R10, R11, R12, R13, R14, R15 = range(8, 16)
M64 = (1 << 64) - 1


class FakeCpu:
    """Registers in x86 encoding order, RFLAGS and XMM registers."""

    def __init__(self, **regs: int) -> None:
        self.gpr = [0] * 16
        self.rflags = 0x2
        self.xmm = [bytes(16)] * 16
        names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
        for name, value in regs.items():
            if name == "rflags":
                self.rflags = value
            elif name in names:
                self.gpr[names.index(name)] = value
            else:
                self.gpr[int(name[1:])] = value

    def read_gpr(self, index: int) -> int:
        return self.gpr[index]

    def write_gpr(self, index: int, value: int) -> None:
        assert 0 <= value <= M64
        self.gpr[index] = value

    def read_rflags(self) -> int:
        return self.rflags

    def write_rflags(self, value: int) -> None:
        self.rflags = value

    def read_xmm(self, index: int) -> bytes:
        return self.xmm[index]

    def write_xmm(self, index: int, value: bytes) -> None:
        assert len(value) == 16
        self.xmm[index] = value


class NoSseCpu:
    """A cpu without XMM access."""

    def __init__(self) -> None:
        self.gpr = [0] * 16

    def read_gpr(self, index: int) -> int:
        return self.gpr[index]

    def write_gpr(self, index: int, value: int) -> None:
        self.gpr[index] = value

    def read_rflags(self) -> int:
        return 2

    def write_rflags(self, value: int) -> None:
        pass


class FakeDevice:
    """16 bytes of register space at the faulting address; logs every access."""

    def __init__(self, value: int = 0, data: bytes | None = None) -> None:
        self.data = bytearray(data if data is not None else value.to_bytes(16, "little"))
        self.log: list[tuple[str, int, int]] = []

    def read(self, size: int) -> int:
        value = int.from_bytes(self.data[:size], "little")
        self.log.append(("r", size, value))
        return value

    def write(self, size: int, value: int) -> None:
        assert 0 <= value < 1 << (8 * size)
        self.data[:size] = value.to_bytes(size, "little")
        self.log.append(("w", size, value))


def asm(source: str, bits: int = 64, org: int = 0x1000) -> bytes:
    return assemble_flat(source, bits=bits, org=org)


def run(source: str, cpu: FakeCpu, dev: FakeDevice, bits: int = 64) -> mmio.MmioInstruction:
    """Assemble one instruction, decode it (whole length consumed) and execute it."""
    code = asm(source, bits)
    insn = mmio.decode(code + b"\x90" * 8, bits, 0x1000, sse=True)
    assert insn is not None, mmio.describe(code, bits)
    assert insn.length == len(code)
    insn.execute(cpu, dev.read, dev.write)
    return insn


# --------------------------------------------------------------------------- hand-checked


def test_mov_load_32_zero_extends_in_64_bit_mode() -> None:
    cpu = FakeCpu(rax=M64)
    dev = FakeDevice(0x12345678)
    insn = run("mov eax, [rbx+0x20]", cpu, dev)
    assert (insn.size, insn.kind, insn.reads, insn.writes) == (4, "load", True, False)
    assert cpu.gpr[RAX] == 0x12345678
    assert dev.log == [("r", 4, 0x12345678)]
    assert cpu.rflags == 2


def test_mov_load_widths_merge_or_replace() -> None:
    cpu = FakeCpu(rax=0x1122334455667788, r13=0x1122334455667788, rcx=0x1122334455667788)
    run("mov ax, [rbx]", cpu, FakeDevice(0xBEEF))
    assert cpu.gpr[RAX] == 0x112233445566BEEF
    run("mov al, [rbx]", cpu, FakeDevice(0x5A))
    assert cpu.gpr[RAX] == 0x112233445566BE5A
    run("mov r13b, [rbx]", cpu, FakeDevice(0xA5))
    assert cpu.gpr[R13] == 0x11223344556677A5
    insn = run("mov rcx, [rbx]", cpu, FakeDevice(0xFEDCBA9876543210))  # REX.W
    assert insn.size == 8 and cpu.gpr[RCX] == 0xFEDCBA9876543210
    run("mov r13d, [r9]", cpu, FakeDevice(0x80000000))
    assert cpu.gpr[R13] == 0x80000000


def test_high_byte_registers_without_rex() -> None:
    cpu = FakeCpu(rax=0x1122334455667788, rdx=0xAABBCCDDEEFF0011, rsi=0x99)
    run("mov ah, [rbx]", cpu, FakeDevice(0xC3))
    assert cpu.gpr[RAX] == 0x112233445566C388
    dev = FakeDevice()
    run("mov [rbx], dh", cpu, dev)  # 88 33: reg 6 without REX is dh
    assert dev.log == [("w", 1, 0x00)]
    dev = FakeDevice()
    run("mov [rbx], sil", cpu, dev)  # 40 88 33: with REX the same encoding is sil
    assert dev.log == [("w", 1, 0x99)]
    cpu = FakeCpu(rbx=0x7E00)
    dev = FakeDevice()
    run("mov [rcx], bh", cpu, dev)
    assert dev.log == [("w", 1, 0x7E)]


def test_mov_store_register_and_immediates() -> None:
    cpu = FakeCpu(rax=0xFFFFFFFF_0000FEE0, r11=0x0123456789ABCDEF)
    cases = [
        ("mov [rbx], eax", 4, 0x0000FEE0),
        ("mov [rbx], r11", 8, 0x0123456789ABCDEF),
        ("mov [rbx], r11w", 2, 0xCDEF),
        ("mov byte [rbx], 0x81", 1, 0x81),
        ("mov word [rbx], 0x8001", 2, 0x8001),
        ("mov dword [rbx+0x300], 0xfee00000", 4, 0xFEE00000),
        ("mov qword [rbx], -2", 8, 0xFFFFFFFFFFFFFFFE),  # imm32 sign-extended by REX.W
        ("mov qword [rbx], 0x7fffffff", 8, 0x7FFFFFFF),
    ]
    for source, size, value in cases:
        dev = FakeDevice(0x5555)
        insn = run(source, cpu, dev)
        assert (insn.kind, insn.size, insn.reads, insn.writes) == ("store", size, False, True)
        assert dev.log == [("w", size, value)], source
    assert cpu.gpr[RAX] == 0xFFFFFFFF_0000FEE0 and cpu.rflags == 2


def test_movzx_movsx_movsxd() -> None:
    cases = [
        ("movzx eax, byte [rbx]", 0x80, 0x80),
        ("movzx eax, word [rbx]", 0xFFFF, 0xFFFF),
        ("movzx rax, byte [rbx]", 0xFF, 0xFF),
        ("movsx eax, byte [rbx]", 0x80, 0xFFFFFF80),  # 32-bit destination: upper half zero
        ("movsx eax, byte [rbx]", 0x7F, 0x7F),
        ("movsx rax, word [rbx]", 0x8000, 0xFFFFFFFFFFFF8000),
        ("movsx rax, byte [rbx]", 0xFE, 0xFFFFFFFFFFFFFFFE),
        ("movsxd rax, dword [rbx]", 0x80000001, 0xFFFFFFFF80000001),
        ("movsxd rax, dword [rbx]", 0x7FFFFFFF, 0x7FFFFFFF),
        ("movsx ax, byte [rbx]", 0x90, 0xDEADBEEF_CAFEFF90),  # 16-bit destination merges
        ("movzx ax, byte [rbx]", 0x90, 0xDEADBEEF_CAFE0090),
    ]
    for source, device, expected in cases:
        cpu = FakeCpu(rax=0xDEADBEEF_CAFEBABE)
        insn = run(source, cpu, FakeDevice(device))
        assert cpu.gpr[RAX] == expected, source
        assert insn.kind == "load"
    assert run("movzx eax, word [rbx]", FakeCpu(), FakeDevice()).size == 2


def test_moffs_forms_64_and_32_bit() -> None:
    cpu = FakeCpu(rax=0x1111111111111111)
    insn = run("mov eax, [qword 0xfee00030]", cpu, FakeDevice(0x50014))  # A1 moffs64
    assert (insn.length, insn.size, cpu.gpr[RAX]) == (9, 4, 0x50014)
    insn = run("mov rax, [qword 0xfee00030]", cpu, FakeDevice(0x0102030405060708))
    assert (insn.length, cpu.gpr[RAX]) == (10, 0x0102030405060708)
    insn = run("mov al, [qword 0xfee00030]", cpu, FakeDevice(0xEE))  # A0
    assert (insn.length, insn.size, cpu.gpr[RAX]) == (9, 1, 0x01020304050607EE)
    dev = FakeDevice()
    insn = run("mov [qword 0xfee000b0], eax", cpu, dev)  # A3: the EOI write
    assert (insn.length, insn.kind, dev.log) == (9, "store", [("w", 4, 0x050607EE)])
    dev = FakeDevice()
    run("mov [qword 0xfee000b0], al", cpu, dev)  # A2
    assert dev.log == [("w", 1, 0xEE)]
    cpu = FakeCpu(rax=0xABCD)
    insn = run("mov eax, [0xfec00010]", cpu, FakeDevice(0x00170011), bits=32)  # A1 moffs32
    assert (insn.length, insn.size, cpu.gpr[RAX]) == (5, 4, 0x00170011)
    dev = FakeDevice()
    insn = run("mov [0xfec00000], eax", cpu, dev, bits=32)
    assert (insn.length, dev.log) == (5, [("w", 4, 0x00170011)])


def test_rip_relative_and_segment_overrides() -> None:
    cpu = FakeCpu(rcx=0x42)
    insn = run("mov eax, [rel $+0x7f000020]", cpu, FakeDevice(0x14))
    assert (insn.length, cpu.gpr[RAX]) == (6, 0x14)
    dev = FakeDevice()
    insn = run("mov dword [rel $+0x7f0000b0], 0", cpu, dev)  # disp32 + imm32
    assert (insn.length, dev.log) == (10, [("w", 4, 0)])
    insn = run("mov eax, [fs:rbx]", cpu, FakeDevice(7))
    assert (insn.length, cpu.gpr[RAX]) == (3, 7)
    dev = FakeDevice()
    insn = run("mov [gs:0x30], ecx", cpu, dev)
    assert dev.log == [("w", 4, 0x42)]
    insn = run("mov eax, [es:ebx+esi*4+0x10]", cpu, FakeDevice(9), bits=32)
    assert (insn.length, cpu.gpr[RAX]) == (5, 9)


def test_xchg_with_memory() -> None:
    cpu = FakeCpu(rcx=0xFFFFFFFF_00000001, rax=0x1234)
    dev = FakeDevice(0xFEED)
    insn = run("xchg [rbx], ecx", cpu, dev)
    assert insn.kind == "rmw" and insn.reads and insn.writes
    assert dev.log == [("r", 4, 0xFEED), ("w", 4, 1)]
    assert cpu.gpr[RCX] == 0xFEED  # 32-bit register write: zero-extended
    dev = FakeDevice(0xAB)
    run("xchg ah, [rbx]", cpu, dev)
    assert dev.log == [("r", 1, 0xAB), ("w", 1, 0x12)] and cpu.gpr[RAX] == 0xAB34
    dev = FakeDevice(0x1122334455667788)
    run("lock xchg rcx, [rbx]", cpu, dev)
    assert dev.log[-1] == ("w", 8, 0xFEED) and cpu.gpr[RCX] == 0x1122334455667788


def test_rmw_or_and_apic_style() -> None:
    cpu = FakeCpu(rflags=0x2 | CF | OF | AF)
    dev = FakeDevice(0x000000FF)
    insn = run("or dword [rbx+0xf0], 0x100", cpu, dev)  # SVR |= APIC_SW_ENABLE
    assert (insn.kind, insn.size) == ("rmw", 4)
    assert dev.log == [("r", 4, 0xFF), ("w", 4, 0x1FF)]
    assert cpu.rflags == 0x2 | PF  # 0xff low byte: even parity; CF, OF, AF cleared
    dev = FakeDevice(0x000100F0)
    run("lock and dword [rbx], -0x10001", cpu, dev)  # 83? no: 81 /4 with imm32
    assert dev.log[-1] == ("w", 4, 0xF0) and cpu.rflags == 0x2 | PF
    dev = FakeDevice(0x80)
    run("and byte [rbx], 0x80", cpu, dev)
    assert dev.log[-1] == ("w", 1, 0x80) and cpu.rflags == 0x2 | SF
    dev = FakeDevice(0xF0)
    run("xor byte [rbx], 0xf0", cpu, dev)
    assert dev.log[-1] == ("w", 1, 0) and cpu.rflags == 0x2 | ZF | PF


def test_rmw_add_sub_carry_overflow() -> None:
    cpu = FakeCpu(rcx=1)
    dev = FakeDevice(0x7FFFFFFF)
    run("add [rbx], ecx", cpu, dev)
    assert dev.log[-1] == ("w", 4, 0x80000000)
    assert cpu.rflags == 0x2 | OF | SF | AF | PF  # 0x00 low byte: even parity
    dev = FakeDevice(0xFFFF)
    run("add word [rbx], 1", cpu, dev)
    assert dev.log[-1] == ("w", 2, 0) and cpu.rflags == 0x2 | CF | ZF | AF | PF
    dev = FakeDevice(0)
    run("sub qword [rbx], 1", cpu, dev)
    assert dev.log[-1] == ("w", 8, M64) and cpu.rflags == 0x2 | CF | SF | AF | PF
    cpu.rflags = 0x2 | CF
    dev = FakeDevice(0x10)
    run("sbb byte [rbx], 0", cpu, dev)  # 0x10 - 0 - CF
    assert dev.log[-1] == ("w", 1, 0x0F) and cpu.rflags == 0x2 | AF | PF
    cpu.rflags = 0x2 | CF
    dev = FakeDevice(0xFE)
    run("adc byte [rbx], cl", cpu, dev)  # 0xfe + 1 + CF
    assert dev.log[-1] == ("w", 1, 0) and cpu.rflags == 0x2 | CF | ZF | AF | PF


def test_alu_with_register_destination() -> None:
    cpu = FakeCpu(rax=0xFFFFFFFF_00000003)
    insn = run("add eax, [rbx]", cpu, FakeDevice(0xFFFFFFFF))
    assert insn.kind == "load" and not insn.writes
    assert cpu.gpr[RAX] == 2 and cpu.rflags == 0x2 | CF | AF
    cpu = FakeCpu(rdx=0x1200)
    run("or dh, [rbx]", cpu, FakeDevice(0x21))
    assert cpu.gpr[RDX] == 0x3300 and cpu.rflags == 0x2 | PF


def test_cmp_and_test_change_only_flags() -> None:
    cpu = FakeCpu(rax=5, rflags=0x2 | CF)
    dev = FakeDevice(5)
    insn = run("cmp [rbx], eax", cpu, dev)
    assert (insn.kind, insn.reads, insn.writes) == ("compare", True, False)
    assert dev.log == [("r", 4, 5)] and cpu.rflags == 0x2 | ZF | PF and cpu.gpr[RAX] == 5
    run("cmp eax, [rbx]", cpu, FakeDevice(6))  # 5 - 6
    assert cpu.rflags == 0x2 | CF | SF | AF | PF
    run("cmp dword [rbx], 6", cpu, FakeDevice(5))
    assert cpu.rflags == 0x2 | CF | SF | AF | PF
    run("cmp byte [rbx], 0x80", cpu, FakeDevice(0x7F))  # 127 - (-128) = 0xff: overflow
    assert cpu.rflags == 0x2 | OF | SF | CF | PF
    dev = FakeDevice(0x1000)
    run("test dword [rbx+0x300], 0x1000", cpu, dev)  # ICR delivery-status poll
    assert dev.log == [("r", 4, 0x1000)] and cpu.rflags == 0x2 | PF
    run("test [rbx], cl", FakeCpu(rcx=0x0F), dev := FakeDevice(0xF0))
    assert dev.log == [("r", 1, 0xF0)]


def test_unary_inc_dec_neg_not() -> None:
    cpu = FakeCpu(rflags=0x2 | CF)
    dev = FakeDevice(0x7F)
    run("inc byte [rbx]", cpu, dev)
    assert dev.log[-1] == ("w", 1, 0x80) and cpu.rflags == 0x2 | CF | OF | SF | AF
    cpu.rflags = 0x2
    dev = FakeDevice(0)
    run("dec dword [rbx]", cpu, dev)
    assert dev.log[-1] == ("w", 4, 0xFFFFFFFF) and cpu.rflags == 0x2 | SF | AF | PF
    dev = FakeDevice(0x80)
    run("neg byte [rbx]", cpu, dev)
    assert dev.log[-1] == ("w", 1, 0x80) and cpu.rflags == 0x2 | CF | OF | SF
    dev = FakeDevice(0)
    run("neg word [rbx]", cpu, dev)
    assert dev.log[-1] == ("w", 2, 0) and cpu.rflags == 0x2 | ZF | PF
    cpu.rflags = 0x2 | OF
    dev = FakeDevice(0x00FF00FF)
    run("not dword [rbx]", cpu, dev)
    assert dev.log[-1] == ("w", 4, 0xFF00FF00) and cpu.rflags == 0x2 | OF


def test_xadd_and_cmpxchg() -> None:
    cpu = FakeCpu(rdx=3)
    dev = FakeDevice(0xFFFFFFFE)
    run("lock xadd [rbx], edx", cpu, dev)
    assert dev.log == [("r", 4, 0xFFFFFFFE), ("w", 4, 1)]
    assert cpu.gpr[RDX] == 0xFFFFFFFE and cpu.rflags & STATUS_FLAGS == CF | AF
    cpu = FakeCpu(rax=0xAAAAAAAA_00000005, rdx=7)
    dev = FakeDevice(5)
    run("lock cmpxchg [rbx], edx", cpu, dev)  # equal: store edx, rax untouched
    assert dev.log == [("r", 4, 5), ("w", 4, 7)]
    assert cpu.gpr[RAX] == 0xAAAAAAAA_00000005 and cpu.rflags & ZF
    dev = FakeDevice(9)
    run("cmpxchg [rbx], edx", cpu, dev)  # unequal: eax <- memory, memory rewritten as is
    assert dev.log == [("r", 4, 9), ("w", 4, 9)]
    assert cpu.gpr[RAX] == 9 and not cpu.rflags & ZF and cpu.rflags & CF


def test_bit_test_family() -> None:
    cpu = FakeCpu(rflags=0x2 | ZF | SF, rcx=36)
    dev = FakeDevice(0x20)
    insn = run("bt dword [rbx], 5", cpu, dev)
    assert insn.kind == "compare" and dev.log == [("r", 4, 0x20)]
    assert cpu.rflags == 0x2 | ZF | SF | CF  # only CF changes
    run("bt dword [rbx], ecx", cpu, FakeDevice(0x20))  # 36 mod 32 = 4: the exit's dword
    assert cpu.rflags == 0x2 | ZF | SF
    dev = FakeDevice(0)
    run("lock bts qword [rbx], 63", cpu, dev)
    assert dev.log[-1] == ("w", 8, 1 << 63) and not cpu.rflags & CF
    dev = FakeDevice(0xFFFF)
    run("btr word [rbx], cx", cpu, dev)  # 36 mod 16 = 4
    assert dev.log[-1] == ("w", 2, 0xFFEF) and cpu.rflags & CF
    dev = FakeDevice(0x01)
    run("btc dword [rbx], 0", cpu, dev)
    assert dev.log[-1] == ("w", 4, 0) and cpu.rflags & CF


def test_stos_and_lods_without_rep() -> None:
    cpu = FakeCpu(rax=0x11223344_55667788, rdi=0x1000, rsi=0x2000)
    dev = FakeDevice()
    insn = run("stosd", cpu, dev)
    assert (insn.kind, insn.length, dev.log) == ("store", 1, [("w", 4, 0x55667788)])
    assert cpu.gpr[RDI] == 0x1004
    cpu.rflags = 0x2 | DF
    run("stosq", cpu, dev := FakeDevice())
    assert dev.log == [("w", 8, 0x1122334455667788)] and cpu.gpr[RDI] == 0xFFC
    cpu = FakeCpu(rax=0x99, rdi=0xFFFF_FFFF_FFFF_FFFF)
    run("a32 stosb", cpu, dev := FakeDevice())  # edi wraps at 4 GiB, upper half cleared
    assert dev.log == [("w", 1, 0x99)] and cpu.gpr[RDI] == 0
    cpu = FakeCpu(rax=M64, rsi=0x2000)
    insn = run("lodsw", cpu, FakeDevice(0xBEEF))
    assert insn.kind == "load" and cpu.gpr[RAX] == 0xFFFFFFFFFFFFBEEF and cpu.gpr[RSI] == 0x2002
    cpu = FakeCpu(rsi=0x10, rflags=0x2 | DF)
    run("lodsd", cpu, FakeDevice(0xFEE00900), bits=32)
    assert cpu.gpr[RAX] == 0xFEE00900 and cpu.gpr[RSI] == 0xC


def test_sse_moves() -> None:
    cpu = FakeCpu()
    cpu.xmm[1] = bytes(range(16))
    run("movd xmm1, [rbx]", cpu, FakeDevice(0xAABBCCDD))
    assert cpu.xmm[1] == bytes.fromhex("ddccbbaa") + bytes(12)
    data = bytes(range(0x40, 0x50))
    insn = run("movdqu xmm9, [rbx]", cpu, FakeDevice(data=data))
    assert insn.size == 16 and cpu.xmm[9] == data
    dev = FakeDevice()
    insn = run("movq [rbx], xmm9", cpu, dev)
    assert (insn.kind, dev.log) == ("store", [("w", 8, int.from_bytes(data[:8], "little"))])
    dev = FakeDevice()
    run("movdqa [rbx], xmm9", cpu, dev)
    assert dev.data == data
    with pytest.raises(TypeError, match="read_xmm"):
        insn.execute(NoSseCpu(), FakeDevice().read, FakeDevice().write)
    code = asm("movdqu xmm9, [rbx]")
    assert mmio.decode(code, 64) is None  # SSE only when the machine asks for it
    assert mmio.decode(code, 64, sse=True) is not None
    assert mmio.decode(asm("mov eax, [rbx]"), 64) is not None


def test_16_bit_mode() -> None:
    cpu = FakeCpu(rax=0xFFFF_1234)
    insn = run("mov ax, [bx+si+4]", cpu, FakeDevice(0xABCD), bits=16)
    assert (insn.length, insn.size, cpu.gpr[RAX]) == (3, 2, 0xFFFF_ABCD)
    insn = run("mov eax, [bx]", cpu, FakeDevice(0x01020304), bits=16)  # 66 prefix
    assert (insn.size, cpu.gpr[RAX]) == (4, 0x01020304)
    dev = FakeDevice(0xFFFF)
    run("and word [di], 0xfff0", cpu, dev, bits=16)
    assert dev.log[-1] == ("w", 2, 0xFFF0)
    cpu = FakeCpu(rdi=0xFFFF_FFFF, rax=0x77)
    run("stosb", cpu, FakeDevice(), bits=16)  # di wraps, the upper half of edi stays
    assert cpu.gpr[RDI] == 0xFFFF_0000


def test_unsupported_forms_return_none_and_describe_them() -> None:
    cases = [
        ("shl dword [rbx], 1", 64, "shl dword ptr [rbx], 1"),
        ("rep stosd", 64, "rep stosd dword ptr [rdi], eax"),
        ("movsd", 64, "movsd dword ptr [rdi], dword ptr [rsi]"),
        ("mov eax, ebx", 64, "mov eax, ebx"),
        ("mov ds, [rbx]", 64, "mov ds, word ptr [rbx]"),
        ("mov [rbx], ds", 64, "mov word ptr [rbx], ds"),
        ("vmovdqu xmm0, [rbx]", 64, "vmovdqu xmm0, xmmword ptr [rbx]"),
        ("movq mm0, [rbx]", 64, "movq mm0, qword ptr [rbx]"),
        ("push qword [rbx]", 64, "push qword ptr [rbx]"),
        ("cmove eax, [ebx]", 32, "cmove eax, dword ptr [ebx]"),
    ]
    for source, bits, text in cases:
        code = asm(source, bits)
        assert mmio.decode(code, bits, 0x1000) is None, source
        assert mmio.describe(code, bits, 0x1000) == text
    assert mmio.decode(bytes.fromhex("f08b03"), 64) is None  # lock mov: #UD
    assert mmio.decode(bytes.fromhex("f0833b01"), 64) is None  # lock cmp: #UD
    assert mmio.decode(b"", 64) is None
    assert mmio.decode(bytes.fromhex("c7 83 00 03"), 64) is None  # cut short
    assert mmio.describe(bytes.fromhex("c7 83"), 64) == "(bad) c7 83"
    with pytest.raises(ValueError):
        mmio.decode(bytes.fromhex("8b03"), 8)


def test_decode_is_cached_by_bytes_and_mode() -> None:
    code = bytes.fromhex("8b03 90 90")
    first = mmio.decode(code, 64, 0x1000)
    assert first is not None
    assert mmio.decode(bytearray(code), 64, 0xFFFF0000) is first
    other = mmio.decode(code, 16, 0x1000)
    assert other is not None and other is not first and other.size == 2


# --------------------------------------------------------------------------- ALU flags


def test_alu_hand_vectors() -> None:
    vectors = [
        ("add", 8, 0x7F, 0x01, 0, 0x80, OF | SF | AF),
        ("add", 8, 0xFF, 0x01, 0, 0x00, CF | ZF | AF | PF),
        ("add", 64, 1 << 63, 1 << 63, 0, 0, CF | OF | ZF | PF),
        ("add", 32, 0x0F, 0x01, 0, 0x10, AF),
        ("sub", 32, 0, 1, 0, 0xFFFFFFFF, CF | SF | AF | PF),
        ("sub", 8, 0x80, 0x01, 0, 0x7F, OF | AF),
        ("sub", 16, 0x8000, 0x8000, 0, 0, ZF | PF),
        ("adc", 16, 0xFFFF, 0, CF, 0, CF | ZF | AF | PF),
        ("sbb", 8, 0, 0, CF, 0xFF, CF | SF | AF | PF),
        ("inc", 8, 0x7F, 0, CF, 0x80, CF | OF | SF | AF),
        ("inc", 8, 0xFF, 0, 0, 0x00, ZF | AF | PF),  # no CF from inc
        ("dec", 32, 0, 0, 0, 0xFFFFFFFF, SF | AF | PF),
        ("dec", 32, 0x80000000, 0, CF, 0x7FFFFFFF, CF | OF | AF | PF),
        ("neg", 8, 0x80, 0, 0, 0x80, CF | OF | SF),
        ("neg", 64, 0, 0, CF, 0, ZF | PF),
        ("and", 32, 0xF0F0, 0x0FF0, CF | OF | AF, 0x00F0, PF),
        ("xor", 64, M64, M64, 0, 0, ZF | PF),
        ("or", 8, 0x01, 0x02, 0, 0x03, PF),
        ("not", 16, 0x00FF, 0, CF | ZF, 0xFF00, CF | ZF),
    ]
    for op, bits, a, b, flags_in, res, flags_out in vectors:
        got = mmio.alu(op, a, b, bits, 0x202 | flags_in)
        assert got == (res, 0x202 | flags_out), (op, bits, hex(a), hex(b))


_HOST_OPS = ("add", "adc", "sub", "sbb", "cmp", "and", "or", "xor", "test")
_HOST_UNARY = ("inc", "dec", "neg", "not")
_WIDTHS = {8: ("al", "sil"), 16: ("ax", "si"), 32: ("eax", "esi"), 64: ("rax", "rsi")}
_STUB = 64


_PAGES: list[mmap.mmap] = []  # executable host mappings, kept alive for the session


def _host_code(code: bytes) -> int:
    """Copy 64-bit machine code into executable host memory; its address (skip if impossible)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86-64 host")
    try:
        page = mmap.mmap(-1, len(code), prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as exc:  # pragma: no cover - hardened kernels refuse W+X
        pytest.skip(f"no executable memory: {exc}")
    page.write(code)
    _PAGES.append(page)
    return ctypes.addressof(ctypes.c_char.from_buffer(page))


@pytest.fixture(scope="module")
def host_alu() -> Callable[[str, int, int, int, int], tuple[int, int]]:
    """``(op, bits, a, b, rflags) -> (result, rflags)`` computed by the host CPU."""
    stubs = []
    for op in _HOST_OPS + _HOST_UNARY:
        for dst, src in _WIDTHS.values():
            body = f"{op} {dst}" if op in _HOST_UNARY else f"{op} {dst}, {src}"
            # SysV: rdi = a, rsi = b, rdx = rflags in, rcx = &rflags out; rax = result
            stubs.append(
                f"push rdx\npopfq\nmov rax, rdi\n{body}\npushfq\npop qword [rcx]\nret\n"
                f"align {_STUB}, db 0xcc"
            )
    base = _host_code(asm("\n".join(stubs), bits=64, org=0))
    proto = ctypes.CFUNCTYPE(
        ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p
    )
    fns = {}
    for i, (op, bits) in enumerate((o, w) for o in _HOST_OPS + _HOST_UNARY for w in _WIDTHS):
        fns[op, bits] = proto(base + i * _STUB)
    out = ctypes.c_uint64()

    def call(op: str, bits: int, a: int, b: int, rflags: int) -> tuple[int, int]:
        res = fns[op, bits](a, b, rflags, ctypes.byref(out))
        return res & ((1 << bits) - 1), out.value

    return call


def _edge_values(bits: int) -> list[int]:
    top = 1 << (bits - 1)
    mask = (1 << bits) - 1
    return sorted({0, 1, 2, 0x0F, 0x10, top - 1, top, top + 1, mask - 1, mask})


def test_alu_matches_the_host_cpu(
    host_alu: Callable[[str, int, int, int, int], tuple[int, int]],
) -> None:
    rng = random.Random(4242)
    checked = 0
    for op in _HOST_OPS + _HOST_UNARY:
        for bits in _WIDTHS:
            mask = (1 << bits) - 1
            values = _edge_values(bits)
            pairs = [(a, b) for a in values for b in values]
            pairs += [(rng.getrandbits(bits), rng.getrandbits(bits)) for _ in range(60)]
            for a, b in pairs:
                for flags_in in (0x2, 0x2 | STATUS_FLAGS, 0x2 | CF, 0x2 | ZF | AF):
                    want_res, want_flags = host_alu(op, bits, a, b, flags_in)
                    res, flags = mmio.alu(op, a, b, bits, flags_in)
                    where = (op, bits, hex(a), hex(b), hex(flags_in))
                    if op not in ("cmp", "test"):  # those discard the result
                        assert res == want_res, where
                    assert flags & STATUS_FLAGS == want_flags & STATUS_FLAGS, where
                    assert res <= mask
                    checked += 1
    assert checked > 20000


def test_cmpxchg_accumulator_matches_the_host_cpu() -> None:
    """A 32-bit cmpxchg writes EAX (zero-extending RAX) only when the comparison fails."""
    # SysV: rdi = &memory, rsi = rax in, rdx = new value; returns rax
    base = _host_code(asm("mov rax, rsi\ncmpxchg [rdi], edx\nret", bits=64, org=0))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)(base)
    for memory in (5, 9):
        cell = ctypes.c_uint64(memory | 0x77 << 32)
        want_rax = fn(ctypes.addressof(cell), 0xAAAAAAAA_00000005, 7)
        cpu = FakeCpu(rax=0xAAAAAAAA_00000005, rdx=7)
        dev = FakeDevice(memory | 0x77 << 32)
        run("cmpxchg [rbx], edx", cpu, dev)
        assert cpu.gpr[RAX] == want_rax
        assert int.from_bytes(dev.data[:8], "little") == cell.value


# --------------------------------------------------------------------------- vs unicorn

CODE = 0x1000
DATA = 0x4000  # the device's 16 bytes are at DATA + OFF
OFF = 0x100


@dataclass
class Case:
    """One instruction run on unicorn and through mmio; ``flags`` are the compared ones."""

    source: str
    flags: int = STATUS_FLAGS
    setup: Callable[[random.Random, list[int], bytearray], None] | None = None


def _small_rcx(limit: int) -> Callable[[random.Random, list[int], bytearray], None]:
    def setup(rng: random.Random, regs: list[int], dev: bytearray) -> None:
        regs[RCX] = rng.randrange(limit)

    return setup


def _acc_equal(size: int) -> Callable[[random.Random, list[int], bytearray], None]:
    def setup(rng: random.Random, regs: list[int], dev: bytearray) -> None:
        if rng.random() < 0.5:
            mask = (1 << (8 * size)) - 1
            regs[RAX] = regs[RAX] & ~mask | int.from_bytes(dev[:size], "little")
            if size == 4:
                # A successful 32-bit cmpxchg leaves RAX alone on the hardware (checked on the
                # host below); unicorn's QEMU zero-extends it. Compare where both agree.
                regs[RAX] &= 0xFFFFFFFF

    return setup


def _alu_cases(
    regs: tuple[str, ...], sizes: tuple[str, ...], base: str = "rbx", imm: bool = True
) -> list[Case]:
    cases = []
    for op in ("add", "or", "adc", "sbb", "and", "sub", "xor", "cmp"):
        for reg, size in zip(regs, sizes, strict=True):
            cases.append(Case(f"{op} {size} [{base}], {reg}"))
            cases.append(Case(f"{op} {reg}, {size} [{base}]"))
            if imm:
                cases.append(Case(f"{op} {size} [{base}], 0x7e"))
                cases.append(Case(f"{op} {size} [{base}], -3"))
        if imm and "dword" in sizes:
            cases.append(Case(f"{op} dword [{base}], 0x80001234"))
    return cases


COMMON = [
    "mov eax, [rbx]", "mov ax, [rbx]", "mov al, [rbx]", "mov ah, [rbx]", "mov bh, [rbx]",
    "mov dh, [rbx]", "mov [rbx], eax", "mov [rbx], ax", "mov [rbx], ch", "mov [rbx], dl",
    "mov byte [rbx], 0x81", "mov word [rbx], 0x8001", "mov dword [rbx], 0xfee00000",
    "mov eax, [fs:rbx]", "mov [gs:rbx], ecx", "mov ecx, [es:rbx]",
    "movzx eax, byte [rbx]", "movzx eax, word [rbx]", "movzx cx, byte [rbx]",
    "movsx eax, byte [rbx]", "movsx edx, word [rbx]", "movsx cx, byte [rbx]",
    "xchg [rbx], eax", "xchg [rbx], ah", "xchg cx, [rbx]", "lock xchg [rbx], dl",
    "test [rbx], ecx", "test dword [rbx], 0x80000000", "test byte [rbx], 1", "test [rbx], dh",
    "inc byte [rbx]", "inc dword [rbx]", "dec word [rbx]", "lock dec dword [rbx]",
    "neg byte [rbx]", "neg dword [rbx]", "not word [rbx]", "not dword [rbx]",
    "lock xadd [rbx], edx", "xadd [rbx], ah", "lock or dword [rbx], 1", "lock and word [rbx], cx",
    "stosb", "stosw", "stosd", "lodsb", "lodsw", "lodsd",
    "movd xmm1, [rbx]", "movq xmm2, [rbx]", "movdqu xmm3, [rbx]", "movaps xmm4, [rbx]",
    "movd [rbx], xmm5", "movq [rbx], xmm6", "movdqa [rbx], xmm7", "movups [rbx], xmm0",
    "movss xmm1, [rbx]", "movsd xmm2, [rbx]", "movss [rbx], xmm3", "movnti [rbx], eax",
    "movntdq [rbx], xmm1", "movapd xmm5, [rbx]", "movupd [rbx], xmm6",
]  # fmt: skip

BIT_CASES = [
    Case("bt dword [rbx], 5", CF), Case("bt word [rbx], 15", CF), Case("bts dword [rbx], 31", CF),
    Case("lock btr dword [rbx], 7", CF), Case("btc word [rbx], 3", CF),
    Case("bt dword [rbx], ecx", CF, _small_rcx(32)), Case("bts word [rbx], cx", CF, _small_rcx(16)),
    Case("lock btc dword [rbx], ecx", CF, _small_rcx(32)),
    Case("cmpxchg [rbx], edx", STATUS_FLAGS, _acc_equal(4)),
    Case("lock cmpxchg [rbx], cl", STATUS_FLAGS, _acc_equal(1)),
    Case("cmpxchg [rbx], cx", STATUS_FLAGS, _acc_equal(2)),
]  # fmt: skip

CASES_64 = [
    *(Case(s) for s in COMMON),
    *(Case(s.replace("[rbx]", "[r9]")) for s in ("mov r13d, [rbx]", "mov [rbx], r10w")),
    *(Case(s) for s in (
        "mov rax, [rbx]", "mov r13d, [rbx]", "mov r13w, [rbx]", "mov r13b, [rbx]",
        "mov sil, [rbx]", "mov [rbx], sil", "mov [rbx], r11", "mov [rbx], r10w", "mov [rbx], dil",
        "mov qword [rbx], -2", "mov qword [rbx], 0x7fffffff", "mov qword [rbx+r12*2-16], 9",
        f"mov eax, [rel {DATA + OFF}]", f"mov dword [rel {DATA + OFF}], 0x12345678",
        f"mov al, [qword {DATA + OFF}]", f"mov ax, [qword {DATA + OFF}]",
        f"mov eax, [qword {DATA + OFF}]", f"mov rax, [qword {DATA + OFF}]",
        f"mov [qword {DATA + OFF}], al", f"mov [qword {DATA + OFF}], rax",
        "movzx rax, byte [rbx]", "movzx r12, word [rbx]", "movsx rax, word [rbx]",
        "movsx r12, byte [rbx]", "movsxd rax, dword [rbx]", "movsxd r14, dword [rbx]",
        "xchg rcx, [rbx]", "xchg [rbx], r9w", "xadd [rbx], r15", "not qword [rbx]",
        "neg qword [rbx]", "inc qword [rbx]", "dec byte [rbx]", "test qword [rbx], -1",
        "stosq", "lodsq", "a32 stosd", "a32 lodsb", "movq xmm9, [rbx]", "movdqu [rbx], xmm14",
        "movnti [rbx], rax", "movq [rbx], xmm15",
        "lock cmpxchg [rbx], r8",
    )),
    *_alu_cases(("al", "cx", "edx", "rsi", "r10b", "ah"),
                ("byte", "word", "dword", "qword", "byte", "byte")),
    Case("bt qword [rbx], 0x3f", CF), Case("lock bts qword [rbx], rcx", CF, _small_rcx(64)),
    *BIT_CASES,
]  # fmt: skip

CASES_32 = [
    *(Case(s.replace("[rbx]", "[ebx]").replace("[fs:rbx]", "[fs:ebx]")
           .replace("[gs:rbx]", "[gs:ebx]").replace("[es:rbx]", "[es:ebx]")) for s in COMMON),
    *(Case(s) for s in (
        f"mov eax, [{DATA + OFF}]", f"mov al, [{DATA + OFF}]", f"mov [{DATA + OFF}], eax",
        f"mov [{DATA + OFF}], ax", "mov dword [ebx+esi-0x4100], 0xfee00000", "a16 mov eax, [bx]",
        "a16 mov [di], cl",
    )),
    *_alu_cases(("al", "cx", "edx", "bh"), ("byte", "word", "dword", "byte"), "ebx"),
    *(Case(c.source.replace("[rbx]", "[ebx]"), c.flags, c.setup) for c in BIT_CASES),
]  # fmt: skip

CASES_16 = [
    Case(s) for s in (
        "mov ax, [bx]", "mov eax, [bx]", "mov al, [bx]", "mov ah, [bx]", "mov [bx], ax",
        "mov [bx], eax", "mov [bx], dh", "mov word [bx], 0x1234", "mov dword [di], 0xfee00000",
        f"mov ax, [{DATA + OFF}]", f"mov [{DATA + OFF}], al", "movzx ax, byte [bx]",
        "movsx eax, word [bx]", "xchg [bx], cx", "and word [bx], 0xfff0", "or byte [bx], 0x81",
        "add [bx], eax", "sub cx, [bx]", "cmp word [bx], 5", "test byte [bx], 0x40",
        "inc word [bx]", "neg byte [bx]", "stosb", "stosw", "stosd", "lodsw", "lodsb",
        "mov eax, [ebx]", "a32 stosb",
    )
]  # fmt: skip


def _unicorn_run(
    bits: int, code: bytes, regs: list[int], rflags: int, dev: bytes, xmm: list[bytes]
) -> tuple[list[int], int, bytes, list[bytes], int]:
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as U

    mode = {16: unicorn.UC_MODE_16, 32: unicorn.UC_MODE_32, 64: unicorn.UC_MODE_64}[bits]
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
    uc.mem_map(CODE, 0x1000)
    uc.mem_map(DATA, 0x1000)
    uc.mem_write(CODE, code)
    uc.mem_write(DATA + OFF, dev)
    names = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI")
    if bits == 64:
        ids = [getattr(U, f"UC_X86_REG_{n}") for n in names]
        ids += [getattr(U, f"UC_X86_REG_R{i}") for i in range(8, 16)]
    else:
        ids = [getattr(U, f"UC_X86_REG_E{n[1:]}") for n in names]
    for reg, value in zip(ids, regs, strict=False):
        uc.reg_write(reg, value)
    uc.reg_write(U.UC_X86_REG_EFLAGS, rflags)
    for i, value in enumerate(xmm[: 16 if bits == 64 else 8]):
        uc.reg_write(getattr(U, f"UC_X86_REG_XMM{i}"), int.from_bytes(value, "little"))
    uc.emu_start(CODE, CODE + len(code), count=1)
    out = [uc.reg_read(reg) for reg in ids]
    out_xmm = [
        uc.reg_read(getattr(U, f"UC_X86_REG_XMM{i}")).to_bytes(16, "little")
        for i in range(16 if bits == 64 else 8)
    ]
    rip = uc.reg_read(U.UC_X86_REG_RIP if bits == 64 else U.UC_X86_REG_EIP)
    return out, uc.reg_read(U.UC_X86_REG_EFLAGS), bytes(uc.mem_read(DATA + OFF, 16)), out_xmm, rip


def _check_against_unicorn(bits: int, case: Case, rounds: int) -> None:
    code = asm(case.source, bits, org=CODE)
    insn = mmio.decode(code + bytes(15), bits, CODE, sse=True)
    assert insn is not None, case.source
    nregs = 16 if bits == 64 else 8
    rng = random.Random(f"{bits}:{case.source}")
    for _ in range(rounds):
        width = 64 if bits == 64 else 32
        regs = [rng.getrandbits(width) for _ in range(nregs)]
        for addr_reg in (RBX, RSI, RDI, R9, R12) if bits == 64 else (RBX, RSI, RDI):
            regs[addr_reg] = 8 if addr_reg == R12 else DATA + OFF
        dev = bytearray(rng.getrandbits(8) for _ in range(16))
        if rng.random() < 0.3:
            dev[:8] = rng.choice(
                [0, M64, 1 << 63, 0x7F7F7F7F7F7F7F7F, 0x8080808080808080]
            ).to_bytes(8, "little")
        if case.setup is not None:
            case.setup(rng, regs, dev)
        rflags = 0x2 | (rng.getrandbits(12) & STATUS_FLAGS) | (DF if rng.random() < 0.3 else 0)
        xmm = [rng.randbytes(16) for _ in range(16)]
        want_regs, want_flags, want_dev, want_xmm, rip = _unicorn_run(
            bits, code, regs, rflags, bytes(dev), xmm
        )
        cpu = FakeCpu()
        cpu.gpr[:nregs] = regs
        cpu.rflags = rflags
        cpu.xmm = list(xmm)
        device = FakeDevice(data=bytes(dev))
        insn.execute(cpu, device.read, device.write)
        where = f"{bits}-bit {case.source!r} regs={[hex(r) for r in regs]} dev={dev.hex()}"
        assert rip == CODE + insn.length, where
        assert [r & ((1 << width) - 1) for r in cpu.gpr[:nregs]] == want_regs, where
        if bits != 64:
            assert all(r < 1 << 32 for r in cpu.gpr), where
        mask = case.flags | DF | 0x2
        assert cpu.rflags & mask == want_flags & mask, where
        assert bytes(device.data) == want_dev, where
        assert cpu.xmm[: len(want_xmm)] == want_xmm, where
        assert sum(1 for k, _, _ in device.log if k == "r") == (1 if insn.reads else 0), where
        assert sum(1 for k, _, _ in device.log if k == "w") == (1 if insn.writes else 0), where
        assert all(size == insn.size for _, size, _ in device.log), where


@pytest.mark.parametrize(
    ("bits", "case"),
    [(64, c) for c in CASES_64] + [(32, c) for c in CASES_32] + [(16, c) for c in CASES_16],
    ids=lambda v: v.source if isinstance(v, Case) else str(v),
)
def test_matches_unicorn(bits: int, case: Case) -> None:
    _check_against_unicorn(bits, case, rounds=4)
