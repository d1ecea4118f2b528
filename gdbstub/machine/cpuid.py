"""The CPUID model of the ``gdbstub run`` machine (answers the framework's CPUID exit, reason 10).

Theory of operation
===================

The guest sees one virtual CPU: vendor "GenuineIntel" (the framework runs on Intel Macs),
family 6 model 0x3a stepping 9, 40 physical / 48 linear address bits, brand string
"gdbstub virtual CPU", the hypervisor bit, and hypervisor leaf 0x40000000 with the signature
"gdbstubVCPU\\0".  Only features that a VMX guest can use without help from the VMM are
advertised, plus the local APIC (bit 9 of leaf 1 EDX) when the machine emulates one
(``apic=True``); no x2APIC or TSC-deadline timer yet, no MTRRs, no RDTSCP and no
XSAVEOPT/XSAVEC/XSAVES. Leaf 7 offers IA32_ARCH_CAPABILITIES only (the machine answers it:
not vulnerable to the speculation bugs Linux would otherwise mitigate by patching itself);
leaves 0x15/0x16 give the TSC rate the machine measured, with a 1 GHz crystal that is also the
local APIC timer's input, so Linux neither calibrates the TSC nor the APIC timer.

Two answers depend on guest state, which the caller passes in:

* leaf 1 ECX.OSXSAVE (bit 27) mirrors CR4.OSXSAVE;
* leaf 0xD subleaf 0 EBX is the XSAVE area size for the features enabled in XCR0
  (576 bytes for x87|SSE, 832 with AVX, whose state sits at offset 576).

Leaves above the maximum of their range (0xD, 0x40000000, 0x80000008) and unlisted subleaves
answer all zeros, as AMD CPUs do (Intel would repeat the highest basic leaf).
"""

from __future__ import annotations

VENDOR = b"GenuineIntel"
HYPERVISOR_SIGNATURE = b"gdbstubVCPU\0"
BRAND = b"gdbstub virtual CPU"
MAX_BASIC_LEAF = 0x16
MAX_HYPERVISOR_LEAF = 0x40000000
MAX_EXTENDED_LEAF = 0x80000008
PHYS_ADDR_BITS = 40
VIRT_ADDR_BITS = 48
SIGNATURE_EAX = 0x000306A9  # family 6, model 0x3a, stepping 9

XCR0_X87 = 1 << 0
XCR0_SSE = 1 << 1
XCR0_AVX = 1 << 2
XSAVE_LEGACY_SIZE = 512 + 64  # legacy area + XSAVE header
XSAVE_AVX_OFFSET = 576
XSAVE_AVX_SIZE = 256

# leaf 1 EDX
FPU, PSE, TSC, MSR, PAE, CX8, APIC, SEP = 0, 3, 4, 5, 6, 8, 9, 11
PGE, CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2 = 13, 15, 16, 17, 19, 23, 24, 25, 26
# leaf 1 ECX
SSE3, SSSE3, CX16, SSE41, SSE42, POPCNT = 0, 9, 13, 19, 20, 23
XSAVE, OSXSAVE, AVX, HYPERVISOR = 26, 27, 28, 31
# leaf 0x80000001
LAHF_LM = 0  # ECX
SYSCALL, NX, PAGE1GB, LM = 11, 20, 26, 29  # EDX


def _bits(*bits: int) -> int:
    value = 0
    for b in bits:
        value |= 1 << b
    return value


def _regs(text: bytes) -> tuple[int, ...]:
    """Little-endian dwords of ``text`` (a multiple of 4 bytes)."""
    return tuple(int.from_bytes(text[i : i + 4], "little") for i in range(0, len(text), 4))


# leaf 7 EDX
ARCH_CAPABILITIES = 29
APIC_BUS_HZ = 1_000_000_000  # the local APIC timer's input, as QEMU's (leaf 0x15's crystal)

LEAF1_EDX = _bits(FPU, PSE, TSC, MSR, PAE, CX8, SEP, PGE, CMOV, PAT, PSE36, CLFSH, MMX, FXSR,
                  SSE, SSE2)  # fmt: skip
LEAF1_ECX = _bits(SSE3, SSSE3, CX16, SSE41, SSE42, POPCNT, XSAVE, HYPERVISOR)
EXT1_ECX = _bits(LAHF_LM)
EXT1_EDX = _bits(SYSCALL, NX, PAGE1GB, LM)


def supported_xcr0(*, avx: bool = True) -> int:
    """The XCR0 bits the model supports (x87|SSE, plus AVX unless ``avx`` is False)."""
    return XCR0_X87 | XCR0_SSE | (XCR0_AVX if avx else 0)


def xsave_size(xcr0: int) -> int:
    """Bytes of XSAVE area for the state components enabled in ``xcr0``."""
    return XSAVE_AVX_OFFSET + XSAVE_AVX_SIZE if xcr0 & XCR0_AVX else XSAVE_LEGACY_SIZE


def cpuid(
    leaf: int,
    subleaf: int,
    *,
    xcr0: int,
    cr4_osxsave: bool,
    apic_id: int = 0,
    avx: bool = True,
    apic: bool = False,
    tsc_hz: int = 0,
) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID ``leaf``/``subleaf`` for a vCPU in the given state.

    ``xcr0`` is the guest's XCR0 and ``cr4_osxsave`` its CR4.OSXSAVE bit.  ``apic_id`` goes into
    leaf 1 EBX[31:24]; ``avx=False`` hides AVX (for backends whose CPU lacks it); ``apic``
    offers the local APIC (the machine emulates it). ``tsc_hz`` is the guest TSC's rate: leaf
    0x15 gives it as the 1 GHz crystal (the APIC timer's input) times a ratio, and leaf 0x16 in
    MHz, so kernels need not calibrate the TSC against the PIT (0: both leaves read zero).
    """
    leaf &= 0xFFFFFFFF
    subleaf &= 0xFFFFFFFF
    if leaf == 0:
        b, d, c = _regs(VENDOR)
        return MAX_BASIC_LEAF, b, c, d
    if leaf == 1:
        ebx = (8 << 8) | (1 << 16) | ((apic_id & 0xFF) << 24)  # clflush 64 B, 1 logical CPU
        ecx = LEAF1_ECX | (1 << AVX if avx else 0) | (1 << OSXSAVE if cr4_osxsave else 0)
        return SIGNATURE_EAX, ebx, ecx, LEAF1_EDX | (1 << APIC if apic else 0)
    if leaf == 7:
        # no structured extended features, but IA32_ARCH_CAPABILITIES, which says what this
        # virtual CPU is not vulnerable to (guestmsr.py)
        return (0, 0, 0, 1 << ARCH_CAPABILITIES) if subleaf == 0 else (0, 0, 0, 0)
    if leaf == 0xD:
        return _leaf_xsave(subleaf, xcr0, avx)
    if leaf == 0x15 and tsc_hz:
        return 1000, round(tsc_hz / 1_000_000), APIC_BUS_HZ, 0
    if leaf == 0x16 and tsc_hz:
        mhz = round(tsc_hz / 1_000_000)
        return mhz, mhz, APIC_BUS_HZ // 1_000_000, 0
    if leaf == 0x40000000:
        b, c, d = _regs(HYPERVISOR_SIGNATURE)
        return MAX_HYPERVISOR_LEAF, b, c, d
    if leaf == 0x80000000:
        return MAX_EXTENDED_LEAF, 0, 0, 0
    if leaf == 0x80000001:
        return 0, 0, EXT1_ECX, EXT1_EDX
    if 0x80000002 <= leaf <= 0x80000004:
        brand = BRAND.ljust(48, b"\0")
        off = (leaf - 0x80000002) * 16
        a, b, c, d = _regs(brand[off : off + 16])
        return a, b, c, d
    if leaf == 0x80000008:
        return PHYS_ADDR_BITS | (VIRT_ADDR_BITS << 8), 0, 0, 0
    return 0, 0, 0, 0


def _leaf_xsave(subleaf: int, xcr0: int, avx: bool) -> tuple[int, int, int, int]:
    supported = supported_xcr0(avx=avx)
    if subleaf == 0:
        return supported, xsave_size(xcr0 & supported), xsave_size(supported), 0
    if subleaf == 2 and avx:
        return XSAVE_AVX_SIZE, XSAVE_AVX_OFFSET, 0, 0
    return 0, 0, 0, 0  # subleaf 1: no XSAVEOPT/XSAVEC/XSAVES; other components unsupported


def table(
    *, avx: bool = True, apic: bool = True, tsc_hz: int = 0
) -> list[tuple[int, int, int, int, int, int]]:
    """The whole model as ``(leaf, subleaf, eax, ebx, ecx, edx)`` rows, for a backend that
    answers CPUID itself instead of exiting (KVM's ``KVM_SET_CPUID2``).

    The rows are the answers for XCR0 = x87|SSE (AVX too when ``avx``) and CR4.OSXSAVE clear;
    such a backend keeps OSXSAVE and the XSAVE area size up to date on its own, as KVM does.
    """
    xcr0 = supported_xcr0(avx=avx)
    leaves = [(leaf, 0) for leaf in range(MAX_BASIC_LEAF + 1) if leaf != 0xD]
    leaves += [(0xD, sub) for sub in range(3)]
    leaves += [(MAX_HYPERVISOR_LEAF, 0)]
    leaves += [(leaf, 0) for leaf in range(0x80000000, MAX_EXTENDED_LEAF + 1)]
    rows = []
    for leaf, sub in leaves:
        values = cpuid(
            leaf, sub, xcr0=xcr0, cr4_osxsave=False, avx=avx, apic=apic, tsc_hz=tsc_hz
        )
        rows.append((leaf, sub, *values))
    return rows
