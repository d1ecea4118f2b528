"""gdb's floating-point and vector registers from and into an XSAVE image.

Theory of operation
-------------------
``hv_vcpu_read_fpstate`` (and KVM_GET_XSAVE on the KVM backend) returns the vCPU's extended
state as an XSAVE image in the standard (non-compacted) format:

* bytes 0..511, the legacy region (the 64-bit FXSAVE layout): FCW@0, FSW@2, abridged FTW@4 (one
  byte), FOP@6, FIP@8 (64 bits), FDP@16 (64 bits), MXCSR@24, MXCSR_MASK@28, ST0..ST7@32 (16-byte
  slots holding 80-bit values) and XMM0..XMM15@160 (16 bytes each);
* bytes 512..575, the XSAVE header, whose first quadword is XSTATE_BV: bit 0 x87, bit 1 SSE,
  bit 2 AVX.  A clear bit means that component is in its initial state and its bytes in the
  image are meaningless (XSAVE does not write them);
* the AVX component (YMM_Hi128, the upper halves of YMM0..15, 16 bytes each) at the offset
  CPUID.(EAX=0Dh,ECX=2).EBX reports: 576 on every Intel and AMD part, the default here.

gdb's conventions, which this module follows (they are what gdb itself does for an FXSAVE or
XSAVE area, so values match what gdb shows for a native process):

* ``st0``..``st7`` are ST(0)..ST(7), the registers relative to the stack top, which is also the
  order of FXSAVE's ST slots.  The tag word, however, is indexed by *physical* register: tag
  bits 2i+1..2i describe physical register R(i), which is ST((i - TOP) mod 8), TOP being
  FSW bits 13..11.
* ``ftag`` is the full 16-bit tag word (2 bits per register: 0 valid, 1 zero, 2 special,
  3 empty).  FXSAVE keeps only one "not empty" bit per physical register, so the full tag is
  rebuilt by classifying the ST contents; writing ``ftag`` keeps only empty / not empty.
* ``fioff``/``fiseg`` are the low and high 32 bits of the 64-bit FIP (bytes 8..11 and 12..15),
  ``fooff``/``foseg`` the same for FDP (16..19, 20..23), as gdb does for 64-bit FXSAVE.
  ``fop`` keeps its 11 significant bits.
* A component whose XSTATE_BV bit is clear reads as its initial state: FCW 0x037F, empty tag
  word and zeros for x87; zeros for the XMM and YMM halves.  MXCSR reads 0x1F80 only when
  both the SSE and AVX bits are clear (XSAVE stores MXCSR whenever either is requested).

Writing (``apply_fp_registers``) is the inverse.  Before it sets a component's XSTATE_BV bit it
first writes that component's initial state into the image, so bytes XSAVE never wrote cannot
reach the vCPU.  MXCSR is written with the SSE component.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

__all__ = [
    "AVX_OFFSET",
    "AVX_REGISTER_NAMES",
    "FP_REGISTER_NAMES",
    "XSTATE_AVX",
    "XSTATE_SSE",
    "XSTATE_X87",
    "abridged_to_full_tag",
    "apply_fp_registers",
    "fp_registers_from_xsave",
    "full_to_abridged_tag",
    "st_tag",
]

XSTATE_X87 = 1 << 0
XSTATE_SSE = 1 << 1
XSTATE_AVX = 1 << 2

AVX_OFFSET = 576
"""Default offset of the YMM_Hi128 component (CPUID.(0Dh,2).EBX on Intel and AMD)."""

LEGACY_SIZE = 512
HEADER_OFFSET = 512
HEADER_SIZE = 64
MIN_IMAGE_SIZE = HEADER_OFFSET + HEADER_SIZE

_FCW, _FSW, _FTW, _FOP, _FIP, _FDP, _MXCSR, _MXCSR_MASK = 0, 2, 4, 6, 8, 16, 24, 28
_ST0 = 32
_XMM0 = 160
_XCOMP_BV = HEADER_OFFSET + 8

FCW_INIT = 0x037F
MXCSR_INIT = 0x1F80
MXCSR_MASK_DEFAULT = 0xFFBF
"""The MXCSR mask to assume when the image's MXCSR_MASK field is zero (Intel SDM 11.6.6)."""

_X87_CONTROL_NAMES = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_ST_NAMES = tuple(f"st{i}" for i in range(8))
_XMM_NAMES = tuple(f"xmm{i}" for i in range(16))
_X87_NAMES = frozenset(_ST_NAMES + _X87_CONTROL_NAMES)
_SSE_NAMES = frozenset((*_XMM_NAMES, "mxcsr"))
AVX_REGISTER_NAMES: tuple[str, ...] = tuple(f"ymm{i}h" for i in range(16))
FP_REGISTER_NAMES: frozenset[str] = _X87_NAMES | _SSE_NAMES | frozenset(AVX_REGISTER_NAMES)
"""Every register name this module reads and writes."""

_U80 = (1 << 80) - 1
_U128 = (1 << 128) - 1


def st_tag(value: int) -> int:
    """The x87 tag (0 valid, 1 zero, 2 special) of a non-empty 80-bit register value."""
    exponent = (value >> 64) & 0x7FFF
    integer_bit = (value >> 63) & 1
    fraction = value & ((1 << 63) - 1)
    if exponent == 0x7FFF:
        return 2  # infinity, NaN
    if exponent == 0:
        return 1 if not integer_bit and not fraction else 2  # zero, or denormal
    return 0 if integer_bit else 2  # normal, or unnormal


def abridged_to_full_tag(ftw: int, fsw: int, st: list[int] | tuple[int, ...]) -> int:
    """Rebuild the full tag word from FXSAVE's abridged one.

    ``st`` holds ST(0)..ST(7) (stack order); bit i of ``ftw`` is physical register R(i).
    """
    top = (fsw >> 11) & 7
    full = 0
    for phys in range(8):
        tag = st_tag(st[(phys - top) & 7]) if ftw & (1 << phys) else 3
        full |= tag << (2 * phys)
    return full


def full_to_abridged_tag(ftag: int) -> int:
    """The abridged tag byte: bit i set when physical register R(i) is not empty."""
    return sum(1 << phys for phys in range(8) if (ftag >> (2 * phys)) & 3 != 3)


def _check_image(image: bytes | bytearray) -> None:
    if len(image) < MIN_IMAGE_SIZE:
        raise ValueError(f"XSAVE image is {len(image)} bytes, need at least {MIN_IMAGE_SIZE}")
    (xcomp_bv,) = struct.unpack_from("<Q", image, _XCOMP_BV)
    if xcomp_bv >> 63:
        raise ValueError("compacted XSAVE images are not supported")


def _has_avx_area(image: bytes | bytearray, avx_offset: int) -> bool:
    return len(image) >= avx_offset + 16 * 16


def fp_registers_from_xsave(image: bytes, *, avx_offset: int = AVX_OFFSET) -> dict[str, int]:
    """gdb's values of st0-7, fctrl..fop, xmm0-15, mxcsr and ymm0h-15h from an XSAVE image.

    The ymm*h registers are present only when the image is long enough to hold the AVX
    component (``avx_offset + 256`` bytes).
    """
    _check_image(image)
    (xstate_bv,) = struct.unpack_from("<Q", image, HEADER_OFFSET)
    out: dict[str, int] = {}

    if xstate_bv & XSTATE_X87:
        fcw, fsw, ftw, fop, fip, fdp = struct.unpack_from("<HHBxHQQ", image, 0)
        st = [int.from_bytes(image[_ST0 + 16 * i : _ST0 + 16 * i + 10], "little") for i in range(8)]
        ftag = abridged_to_full_tag(ftw, fsw, st)
    else:
        fcw, fsw, ftag, fop, fip, fdp = FCW_INIT, 0, 0xFFFF, 0, 0, 0
        st = [0] * 8
    out.update(zip(_ST_NAMES, st, strict=True))
    out["fctrl"] = fcw
    out["fstat"] = fsw
    out["ftag"] = ftag
    out["fiseg"] = fip >> 32
    out["fioff"] = fip & 0xFFFFFFFF
    out["foseg"] = fdp >> 32
    out["fooff"] = fdp & 0xFFFFFFFF
    out["fop"] = fop & 0x7FF

    for i, name in enumerate(_XMM_NAMES):
        out[name] = (
            int.from_bytes(image[_XMM0 + 16 * i : _XMM0 + 16 * i + 16], "little")
            if xstate_bv & XSTATE_SSE
            else 0
        )
    if xstate_bv & (XSTATE_SSE | XSTATE_AVX):
        (out["mxcsr"],) = struct.unpack_from("<I", image, _MXCSR)
    else:
        out["mxcsr"] = MXCSR_INIT

    if _has_avx_area(image, avx_offset):
        for i, name in enumerate(AVX_REGISTER_NAMES):
            base = avx_offset + 16 * i
            out[name] = (
                int.from_bytes(image[base : base + 16], "little") if xstate_bv & XSTATE_AVX else 0
            )
    return out


def _init_x87(image: bytearray) -> None:
    struct.pack_into("<HHBxHQQ", image, 0, FCW_INIT, 0, 0, 0, 0, 0)
    image[_ST0 : _ST0 + 128] = bytes(128)


def apply_fp_registers(
    image: bytearray, values: Mapping[str, int], *, avx_offset: int = AVX_OFFSET
) -> None:
    """Write gdb register values into an XSAVE image, for ``hv_vcpu_write_fpstate``.

    Names that are not floating-point registers (see ``FP_REGISTER_NAMES``) are ignored, so a
    whole register mapping may be passed.  The XSTATE_BV bit of each component written is set
    (after the component's initial state is materialised if the bit was clear).  Writing ymm*h
    sets the AVX bit: only do it when the guest's XCR0 enables AVX.  Raises ValueError for an
    MXCSR value with reserved bits set (restoring it would fault) or an image too short.
    """
    _check_image(image)
    names = FP_REGISTER_NAMES.intersection(values)
    if not names:
        return
    (xstate_bv,) = struct.unpack_from("<Q", image, HEADER_OFFSET)

    if "mxcsr" in names:
        (mask,) = struct.unpack_from("<I", image, _MXCSR_MASK)
        mask = mask or MXCSR_MASK_DEFAULT
        if values["mxcsr"] & ~mask & 0xFFFFFFFF or values["mxcsr"] >> 32:
            raise ValueError(f"mxcsr {values['mxcsr']:#x} sets reserved bits (mask {mask:#x})")
    avx_names = names.intersection(AVX_REGISTER_NAMES)
    if avx_names and not _has_avx_area(image, avx_offset):
        raise ValueError("XSAVE image too short for the AVX component")

    if names & _X87_NAMES:
        if not xstate_bv & XSTATE_X87:
            _init_x87(image)
            xstate_bv |= XSTATE_X87
        for i, name in enumerate(_ST_NAMES):
            if name in names:
                base = _ST0 + 16 * i
                image[base : base + 10] = (values[name] & _U80).to_bytes(10, "little")
        if "fctrl" in names:
            struct.pack_into("<H", image, _FCW, values["fctrl"] & 0xFFFF)
        if "fstat" in names:
            struct.pack_into("<H", image, _FSW, values["fstat"] & 0xFFFF)
        if "ftag" in names:
            image[_FTW] = full_to_abridged_tag(values["ftag"])
        if "fop" in names:
            struct.pack_into("<H", image, _FOP, values["fop"] & 0x7FF)
        for off, lo_name, hi_name in ((_FIP, "fioff", "fiseg"), (_FDP, "fooff", "foseg")):
            if lo_name in names:
                struct.pack_into("<I", image, off, values[lo_name] & 0xFFFFFFFF)
            if hi_name in names:
                struct.pack_into("<I", image, off + 4, values[hi_name] & 0xFFFFFFFF)

    if names & _SSE_NAMES:
        if not xstate_bv & XSTATE_SSE:
            image[_XMM0 : _XMM0 + 256] = bytes(256)
            if not xstate_bv & XSTATE_AVX:
                struct.pack_into("<I", image, _MXCSR, MXCSR_INIT)
            xstate_bv |= XSTATE_SSE
        for i, name in enumerate(_XMM_NAMES):
            if name in names:
                base = _XMM0 + 16 * i
                image[base : base + 16] = (values[name] & _U128).to_bytes(16, "little")
        if "mxcsr" in names:
            struct.pack_into("<I", image, _MXCSR, values["mxcsr"])

    if avx_names:
        if not xstate_bv & XSTATE_AVX:
            image[avx_offset : avx_offset + 256] = bytes(256)
            xstate_bv |= XSTATE_AVX
        for i, name in enumerate(AVX_REGISTER_NAMES):
            if name in avx_names:
                base = avx_offset + 16 * i
                image[base : base + 16] = (values[name] & _U128).to_bytes(16, "little")

    struct.pack_into("<Q", image, HEADER_OFFSET, xstate_bv)
