"""gdb registers from and into XSAVE images: layout, init states, tag word, round trips."""

from __future__ import annotations

import struct

import pytest
from hvguest import Vm, asm, backend_kind, hv_vm, run_to_exit
from hypothesis import given
from hypothesis import strategies as st

from gdbstub import hv, xsave

__all__ = ["hv_vm"]  # the fixture, re-exported for pytest

ONE = 0x3FFF_8000_0000_0000_0000  # 1.0 as an 80-bit extended value
ZERO = 0
INF = 0x7FFF_8000_0000_0000_0000
DENORMAL = 0x0000_0000_0000_0000_0001
UNNORMAL = 0x3FFF_4000_0000_0000_0000  # integer bit clear, exponent non-zero
SIZE = 576 + 256


def image(xstate_bv: int = 0, fill: int = 0) -> bytearray:
    img = bytearray([fill]) * SIZE
    img[512:576] = bytes(64)
    struct.pack_into("<Q", img, 512, xstate_bv)
    struct.pack_into("<I", img, 28, 0xFFFF)  # MXCSR_MASK
    return img


def put_x87(img: bytearray, fsw: int, ftw: int, st_values: list[int]) -> None:
    struct.pack_into("<HHB", img, 0, 0x037F, fsw, ftw)
    for i, v in enumerate(st_values):
        img[32 + 16 * i : 32 + 16 * i + 10] = v.to_bytes(10, "little")


def test_st_tag() -> None:
    assert xsave.st_tag(ONE) == 0
    assert xsave.st_tag(ZERO) == 1
    assert xsave.st_tag(1 << 79) == 1  # -0.0
    assert xsave.st_tag(INF) == 2
    assert xsave.st_tag(DENORMAL) == 2
    assert xsave.st_tag(UNNORMAL) == 2


def test_tag_word_follows_top() -> None:
    # fninit; fld1; fldz: TOP = 6, ST(0) = 0.0 in R6, ST(1) = 1.0 in R7
    img = image(xsave.XSTATE_X87)
    put_x87(img, fsw=6 << 11, ftw=0xC0, st_values=[ZERO, ONE])
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert regs["ftag"] == 0x1FFF  # R7 valid (00), R6 zero (01), R0..R5 empty (11)
    assert regs["st0"] == ZERO and regs["st1"] == ONE
    assert regs["fstat"] == 0x3000
    # TOP = 0: ST(i) is R(i)
    put_x87(img, fsw=0, ftw=0x07, st_values=[ONE, INF, ZERO])
    assert xsave.fp_registers_from_xsave(bytes(img))["ftag"] == 0xFFC0 | 0b01_10_00
    assert xsave.abridged_to_full_tag(0, 0, [0] * 8) == 0xFFFF
    assert xsave.full_to_abridged_tag(0x1FFF) == 0xC0
    assert xsave.full_to_abridged_tag(0xFFFF) == 0
    assert xsave.full_to_abridged_tag(0) == 0xFF


def test_legacy_fields() -> None:
    img = image(xsave.XSTATE_X87 | xsave.XSTATE_SSE | xsave.XSTATE_AVX)
    struct.pack_into("<HHBxHQQII", img, 0, 0x027F, 0x3800, 0x80, 0xFFFF, 0x1122334455667788,
                     0x99AABBCCDDEEFF00, 0x1FA0, 0xFFFF)  # fmt: skip
    img[32:42] = ONE.to_bytes(10, "little")
    img[160 + 16 * 15 : 160 + 16 * 16] = bytes(range(16))
    img[576 + 16 * 3 : 576 + 16 * 4] = b"\xab" * 16
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert regs["fctrl"] == 0x027F
    assert regs["fstat"] == 0x3800
    assert regs["ftag"] == 0x3FFF
    assert regs["fop"] == 0x7FF
    assert (regs["fiseg"], regs["fioff"]) == (0x11223344, 0x55667788)
    assert (regs["foseg"], regs["fooff"]) == (0x99AABBCC, 0xDDEEFF00)
    assert regs["mxcsr"] == 0x1FA0
    assert regs["st0"] == ONE
    assert regs["xmm15"] == int.from_bytes(bytes(range(16)), "little")
    assert regs["ymm3h"] == int("ab" * 16, 16)
    assert set(regs) == xsave.FP_REGISTER_NAMES


def test_init_state_components_read_as_init_values() -> None:
    img = image(0, fill=0x5A)  # garbage everywhere XSAVE did not write
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert regs["fctrl"] == 0x037F
    assert regs["ftag"] == 0xFFFF
    assert regs["fstat"] == regs["fop"] == regs["fioff"] == regs["fooff"] == 0
    assert all(regs[f"st{i}"] == 0 for i in range(8))
    assert all(regs[f"xmm{i}"] == 0 for i in range(16))
    assert all(regs[f"ymm{i}h"] == 0 for i in range(16))
    assert regs["mxcsr"] == 0x1F80
    # AVX in use, SSE in init state: MXCSR is in the image
    struct.pack_into("<Q", img, 512, xsave.XSTATE_AVX)
    struct.pack_into("<I", img, 24, 0x1F81)
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert regs["mxcsr"] == 0x1F81
    assert regs["xmm0"] == 0
    assert regs["ymm0h"] == int("5a" * 16, 16)


def test_short_image_has_no_avx() -> None:
    img = image(xsave.XSTATE_SSE)[:576]
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert "ymm0h" not in regs and "xmm0" in regs
    with pytest.raises(ValueError):
        xsave.apply_fp_registers(img, {"ymm0h": 1})
    with pytest.raises(ValueError):
        xsave.fp_registers_from_xsave(bytes(100))


def test_custom_avx_offset() -> None:
    img = image(xsave.XSTATE_AVX) + bytearray(512)
    img[1024 : 1024 + 16] = b"\x01" * 16
    assert xsave.fp_registers_from_xsave(bytes(img), avx_offset=1024)["ymm0h"] == int("01" * 16, 16)


def test_compacted_rejected() -> None:
    img = image(3)
    struct.pack_into("<Q", img, 520, 1 << 63 | 3)
    with pytest.raises(ValueError):
        xsave.fp_registers_from_xsave(bytes(img))


def test_apply_materialises_init_state() -> None:
    img = image(0, fill=0x5A)
    xsave.apply_fp_registers(img, {"xmm1": 5, "rax": 7})
    (bv,) = struct.unpack_from("<Q", img, 512)
    assert bv == xsave.XSTATE_SSE
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert regs["xmm1"] == 5
    assert regs["xmm0"] == 0 and regs["xmm15"] == 0
    assert regs["mxcsr"] == 0x1F80
    assert regs["fctrl"] == 0x037F  # x87 still in init state
    xsave.apply_fp_registers(img, {"st0": ONE})
    (bv,) = struct.unpack_from("<Q", img, 512)
    assert bv == xsave.XSTATE_SSE | xsave.XSTATE_X87
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert regs["st0"] == ONE and regs["st1"] == 0 and regs["fctrl"] == 0x037F
    xsave.apply_fp_registers(img, {"ymm7h": 1 << 127})
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert regs["ymm7h"] == 1 << 127 and regs["ymm6h"] == 0
    before = bytes(img)
    xsave.apply_fp_registers(img, {"rip": 1})
    assert bytes(img) == before


def test_apply_rejects_reserved_mxcsr() -> None:
    img = image(xsave.XSTATE_SSE)
    struct.pack_into("<I", img, 28, 0)  # MXCSR_MASK 0 means the default mask 0xFFBF
    with pytest.raises(ValueError):
        xsave.apply_fp_registers(img, {"mxcsr": 0x40})  # DAZ not in 0xFFBF
    with pytest.raises(ValueError):
        xsave.apply_fp_registers(img, {"mxcsr": 1 << 16})
    xsave.apply_fp_registers(img, {"mxcsr": 0x1F80 | 0x8000})
    assert xsave.fp_registers_from_xsave(bytes(img))["mxcsr"] == 0x9F80


u32 = st.integers(0, 0xFFFFFFFF)
u128 = st.integers(0, (1 << 128) - 1)
f80 = st.one_of(
    st.integers(0, (1 << 80) - 1), st.sampled_from([ONE, ZERO, INF, DENORMAL, UNNORMAL])
)


@st.composite
def fp_values(draw: st.DrawFn) -> dict[str, int]:
    values = {f"st{i}": draw(f80) for i in range(8)}
    values |= {f"xmm{i}": draw(u128) for i in range(16)}
    values |= {f"ymm{i}h": draw(u128) for i in range(16)}
    values |= {n: draw(u32) for n in ("fiseg", "fioff", "foseg", "fooff")}
    values["fctrl"] = draw(st.integers(0, 0xFFFF))
    values["fstat"] = draw(st.integers(0, 0xFFFF))
    values["ftag"] = draw(st.integers(0, 0xFFFF))
    values["fop"] = draw(st.integers(0, 0x7FF))
    values["mxcsr"] = draw(st.integers(0, 0xFFFF)) & 0xFFBF
    return values


@given(fp_values(), st.integers(0, 7), st.sampled_from([0x00, 0x5A]))
def test_round_trip(values: dict[str, int], initial_bv: int, fill: int) -> None:
    img = image(initial_bv, fill=fill)
    xsave.apply_fp_registers(img, values)
    (bv,) = struct.unpack_from("<Q", img, 512)
    assert bv == 7
    back = xsave.fp_registers_from_xsave(bytes(img))
    assert {k: v for k, v in back.items() if k != "ftag"} == {
        k: v for k, v in values.items() if k != "ftag"
    }
    # the tag word keeps empty / not empty; non-empty tags are recomputed from the contents
    top = (values["fstat"] >> 11) & 7
    for phys in range(8):
        written = (values["ftag"] >> (2 * phys)) & 3
        read = (back["ftag"] >> (2 * phys)) & 3
        if written == 3:
            assert read == 3
        else:
            assert read == xsave.st_tag(values[f"st{(phys - top) & 7}"])
    # a second write of what was read changes nothing
    again = bytearray(img)
    xsave.apply_fp_registers(again, back)
    assert again == img


def test_real_vcpu_fpstate(hv_vm: Vm) -> None:
    """Cross-check against a real vCPU's XSAVE image (hv_vcpu_read_fpstate)."""
    # emu (unicorn 2) has no VEX instructions: there the host sets YMM5's upper half
    vex = backend_kind() != "emu"
    ymm5 = "vmovdqu ymm5, [rel d2]" if vex else "movdqu xmm5, [rel d2]"
    code = asm(
        f"""
        fninit
        fld1
        fldz
        movdqu xmm3, [rel d1]
        {ymm5}
        fstp tword [abs 0x3000]
        out 0x10, al
        align 32
    d1: db 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    d2: times 16 db 0x22
        times 16 db 0x33
        """,
        bits=64,
    )
    vcpu = hv_vm.vcpu("user64", code=code)  # CPL3: native on this host, AVX available
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 0x7)
    img = bytearray(4096)
    if not vex:
        hv.hv_vcpu_read_fpstate(vcpu, img)
        xsave.apply_fp_registers(img, {"ymm5h": int("33" * 16, 16)})
        hv.hv_vcpu_write_fpstate(vcpu, img)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    hv.hv_vcpu_read_fpstate(vcpu, img)
    regs = xsave.fp_registers_from_xsave(bytes(img))
    assert hv_vm.mem.read(0x3000, 10) == bytes(10)  # popped ST(0) = 0.0
    assert regs["st0"] == ONE  # fld1 is the top of the stack again
    assert (regs["fstat"] >> 11) & 7 == 7
    assert regs["ftag"] == 0x3FFF
    assert regs["fctrl"] == 0x037F
    assert regs["xmm3"] == int.from_bytes(bytes(range(16)), "little")
    assert regs["xmm5"] == int("22" * 16, 16)
    assert regs["ymm5h"] == int("33" * 16, 16)


def test_real_vcpu_fpstate_write(hv_vm: Vm) -> None:
    """Registers written through apply_fp_registers reach the guest."""
    vex = backend_kind() != "emu"  # emu (unicorn 2) has no VEX instructions
    ymm2 = "vmovdqu [abs 0x3020], ymm2" if vex else "movdqu [abs 0x3020], xmm2"
    code = asm(
        f"fstp tword [abs 0x3000]\nmovdqu [abs 0x3010], xmm7\n{ymm2}\n"
        "stmxcsr [abs 0x3040]\nout 0x10, al",
        bits=64,
    )
    vcpu = hv_vm.vcpu("user64", code=code)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 0x7)
    img = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, img)
    xsave.apply_fp_registers(
        img,
        {"st0": ONE, "ftag": 0x3FFF, "fstat": 7 << 11, "xmm7": 0x1234, "xmm2": 5,
         "ymm2h": 6 << 64, "mxcsr": 0x1F80 | 0x8000},
    )  # fmt: skip
    hv.hv_vcpu_write_fpstate(vcpu, img)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert hv_vm.mem.read(0x3000, 10) == ONE.to_bytes(10, "little")
    assert hv_vm.mem.read(0x3010, 16) == (0x1234).to_bytes(16, "little")
    if vex:
        assert hv_vm.mem.read(0x3020, 32) == (5 | 6 << 192).to_bytes(32, "little")
    else:
        assert hv_vm.mem.read(0x3020, 16) == (5).to_bytes(16, "little")
        hv.hv_vcpu_read_fpstate(vcpu, img)
        assert xsave.fp_registers_from_xsave(bytes(img))["ymm2h"] == 6 << 64
    assert hv_vm.mem.read(0x3040, 4) == (0x9F80).to_bytes(4, "little")
