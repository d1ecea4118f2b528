"""Tests for gdbstub.machine.cpuid: the virtual CPU's CPUID answers."""

from __future__ import annotations

import struct

from gdbstub.machine import cpuid as model
from gdbstub.machine.cpuid import cpuid


def ask(leaf: int, subleaf: int = 0, **kw: object) -> tuple[int, int, int, int]:
    args: dict[str, object] = {"xcr0": 1, "cr4_osxsave": False}
    args.update(kw)
    return cpuid(leaf, subleaf, **args)  # type: ignore[arg-type]


def text(*regs: int) -> bytes:
    return struct.pack(f"<{len(regs)}I", *regs)


def test_vendor_and_max_leaf() -> None:
    eax, ebx, ecx, edx = ask(0)
    assert eax == 0x16
    assert text(ebx, edx, ecx) == b"GenuineIntel"


def test_leaf1_features() -> None:
    eax, ebx, ecx, edx = ask(1)
    assert (eax >> 8) & 0xF == 6
    assert (ebx >> 8) & 0xFF == 8  # 64-byte clflush line
    for bit in (0, 3, 4, 5, 6, 8, 11, 13, 15, 16, 17, 19, 23, 24, 25, 26):
        assert edx >> bit & 1, bit
    assert not edx >> 9 & 1  # no local APIC
    for bit in (0, 9, 19, 20, 23, 26, 28, 31):  # sse3 ssse3 sse4.1/2 popcnt xsave avx hv
        assert ecx >> bit & 1, bit
    assert not ecx >> 27 & 1
    assert ask(1, cr4_osxsave=True)[2] >> 27 & 1
    assert ask(1, apic_id=3)[1] >> 24 == 3


def test_xsave_leaf() -> None:
    assert ask(0xD, 0, xcr0=0x3) == (0x7, 576, 832, 0)
    assert ask(0xD, 0, xcr0=0x7) == (0x7, 832, 832, 0)
    assert ask(0xD, 2, xcr0=0x7) == (256, 576, 0, 0)
    assert ask(0xD, 1) == (0, 0, 0, 0)
    assert ask(0xD, 3) == (0, 0, 0, 0)


def test_without_avx() -> None:
    assert not ask(1, avx=False)[2] >> 28 & 1
    assert ask(0xD, 0, xcr0=0x7, avx=False) == (0x3, 576, 576, 0)
    assert ask(0xD, 2, avx=False) == (0, 0, 0, 0)


def test_hypervisor_leaf() -> None:
    eax, ebx, ecx, edx = ask(0x40000000)
    assert eax == 0x40000000
    assert text(ebx, ecx, edx) == b"gdbstubVCPU\0"


def test_extended_leaves() -> None:
    assert ask(0x80000000)[0] == 0x80000008
    _, _, ecx, edx = ask(0x80000001)
    for bit in (11, 20, 26, 29):  # syscall nx 1gb-pages lm
        assert edx >> bit & 1, bit
    assert ecx & 1  # lahf/sahf in 64-bit mode
    brand = b"".join(text(*ask(leaf)) for leaf in (0x80000002, 0x80000003, 0x80000004))
    assert brand.rstrip(b"\0") == b"gdbstub virtual CPU" and len(brand) == 48
    eax = ask(0x80000008)[0]
    assert eax & 0xFF == 40 and (eax >> 8) & 0xFF == 48


def test_out_of_range_is_zero() -> None:
    for leaf in (0xE, 0x17, 0x40000001, 0x80000009, 0x12345678, 2, 4, 0x15, 0x16):
        assert ask(leaf) == (0, 0, 0, 0)


def test_arch_capabilities_and_the_tsc_rate() -> None:
    """Leaf 7 offers IA32_ARCH_CAPABILITIES only; 0x15/0x16 give a measured TSC rate the way
    Linux's native_calibrate_tsc reads it: crystal Hz * EBX / EAX, the crystal being the APIC
    timer's 1 GHz input."""
    assert ask(7) == (0, 0, 0, 1 << model.ARCH_CAPABILITIES)
    assert ask(7, 1) == (0, 0, 0, 0)
    eax, ebx, ecx, _edx = cpuid(0x15, 0, xcr0=3, cr4_osxsave=False, tsc_hz=2_596_123_456)
    assert ecx == 1_000_000_000 and ecx * ebx // eax == 2_596_000_000
    assert cpuid(0x16, 0, xcr0=3, cr4_osxsave=False, tsc_hz=2_596_123_456)[0] == 2596


def test_table_is_the_model_row_by_row() -> None:
    """The rows a backend that answers CPUID itself loads are exactly the model's answers."""
    rows = model.table(avx=False)
    keys = [(leaf, sub) for leaf, sub, *_ in rows]
    assert len(keys) == len(set(keys))
    assert (0, 0) in keys and (0xD, 1) in keys and (0x40000000, 0) in keys
    assert (0x80000008, 0) in keys
    for leaf, sub, *values in rows:
        assert tuple(values) == cpuid(
            leaf, sub, xcr0=3, cr4_osxsave=False, avx=False, apic=True
        )
    leaf1 = next(r for r in rows if r[0] == 1)
    assert leaf1[5] & (1 << model.APIC) and not leaf1[4] & (1 << model.AVX)
