"""Linux KVM ABI for x86-64: ioctl numbers, ctypes structures and ``kvm_run`` offsets.

Only the KVM backend imports this module. Numbers and layouts are those of
``linux/kvm.h`` and ``asm/kvm.h``; ``tests/test_kvm_abi.py`` checks every structure size.
"""

from __future__ import annotations

import ctypes
import functools

c_u8 = ctypes.c_uint8
c_u16 = ctypes.c_uint16
c_u32 = ctypes.c_uint32
c_u64 = ctypes.c_uint64

# --- ioctl numbers (system fd, VM fd, vCPU fd) ------------------------------------------------
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_MSR_INDEX_LIST = 0xC004AE02
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_SET_IDENTITY_MAP_ADDR = 0x4008AE48
KVM_TRANSLATE = 0xC018AE85
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_INTERRUPT = 0x4004AE86
KVM_GET_MSRS = 0xC008AE88
KVM_SET_MSRS = 0x4008AE89
KVM_SET_SIGNAL_MASK = 0x4004AE8B
KVM_SET_CPUID2 = 0x4008AE90
KVM_SET_GUEST_DEBUG = 0x4048AE9B
KVM_NMI = 0xAE9A
KVM_GET_VCPU_EVENTS = 0x8040AE9F
KVM_SET_VCPU_EVENTS = 0x4040AEA0
KVM_GET_DEBUGREGS = 0x8080AEA1
KVM_SET_DEBUGREGS = 0x4080AEA2
KVM_ENABLE_CAP = 0x4068AEA3
KVM_GET_TSC_KHZ = 0xAEA3
KVM_GET_XSAVE = 0x9000AEA4
KVM_SET_XSAVE = 0x5000AEA5
KVM_GET_XCRS = 0x8188AEA6
KVM_SET_XCRS = 0x4188AEA7
KVM_X86_SET_MSR_FILTER = 0x4188AEC6

# --- capabilities ---------------------------------------------------------------------------------
KVM_CAP_NR_VCPUS = 9
KVM_CAP_SET_GUEST_DEBUG = 0x17
KVM_CAP_MAX_VCPUS = 0x42
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_XSAVE2 = 208
KVM_CAP_READONLY_MEM = 81
KVM_CAP_SYNC_REGS = 74

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

# --- exits ----------------------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_MAX_RANGES = 16

KVM_MEM_READONLY = 1 << 1

KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000
KVM_GUESTDBG_INJECT_DB = 0x40000
KVM_GUESTDBG_INJECT_BP = 0x80000

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4

KVM_X86_SHADOW_INT_MOV_SS = 0x01
KVM_X86_SHADOW_INT_STI = 0x02

# --- kvm_run offsets ------------------------------------------------------------------------------
RUN_REQUEST_INTERRUPT_WINDOW = 0
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_READY_FOR_INTERRUPT_INJECTION = 12
RUN_IF_FLAG = 13
RUN_CR8 = 16
RUN_UNION = 32
# io
RUN_IO_DIRECTION = 32
RUN_IO_SIZE = 33
RUN_IO_PORT = 34
RUN_IO_COUNT = 36
RUN_IO_DATA_OFFSET = 40
# mmio
RUN_MMIO_PHYS_ADDR = 32
RUN_MMIO_DATA = 40
RUN_MMIO_LEN = 48
RUN_MMIO_IS_WRITE = 52
# debug.arch
RUN_DEBUG_EXCEPTION = 32
RUN_DEBUG_PC = 40
RUN_DEBUG_DR6 = 48
RUN_DEBUG_DR7 = 56
# fail_entry
RUN_FAIL_ENTRY_REASON = 32
# internal
RUN_INTERNAL_SUBERROR = 32
KVM_INTERNAL_ERROR_EMULATION = 1  # suberror: KVM's emulator failed on an instruction
# msr
RUN_MSR_ERROR = 32
RUN_MSR_REASON = 40
RUN_MSR_INDEX = 44
RUN_MSR_DATA = 48
# register synchronisation (KVM_CAP_SYNC_REGS): kvm_valid_regs, kvm_dirty_regs, s.regs
RUN_VALID_REGS = 288
RUN_DIRTY_REGS = 296
RUN_SYNC_REGS = 304  # struct kvm_regs
RUN_SYNC_SREGS = 304 + 144  # struct kvm_sregs
RUN_SYNC_EVENTS = 304 + 144 + 312  # struct kvm_vcpu_events


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (144 bytes)."""

    _fields_ = [
        (name, c_u64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment`` (24 bytes)."""

    _fields_ = [
        ("base", c_u64),
        ("limit", c_u32),
        ("selector", c_u16),
        ("type", c_u8),
        ("present", c_u8),
        ("dpl", c_u8),
        ("db", c_u8),
        ("s", c_u8),
        ("l", c_u8),
        ("g", c_u8),
        ("avl", c_u8),
        ("unusable", c_u8),
        ("padding", c_u8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable`` (16 bytes)."""

    _fields_ = [("base", c_u64), ("limit", c_u16), ("padding", c_u16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (312 bytes)."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", c_u64),
        ("cr2", c_u64),
        ("cr3", c_u64),
        ("cr4", c_u64),
        ("cr8", c_u64),
        ("efer", c_u64),
        ("apic_base", c_u64),
        ("interrupt_bitmap", c_u64 * 4),
    ]


class KvmDebugregs(ctypes.Structure):
    """``struct kvm_debugregs`` (128 bytes)."""

    _fields_ = [
        ("db", c_u64 * 4),
        ("dr6", c_u64),
        ("dr7", c_u64),
        ("flags", c_u64),
        ("reserved", c_u64 * 9),
    ]


class KvmXcr(ctypes.Structure):
    """``struct kvm_xcr``."""

    _fields_ = [("xcr", c_u32), ("reserved", c_u32), ("value", c_u64)]


class KvmXcrs(ctypes.Structure):
    """``struct kvm_xcrs`` (392 bytes)."""

    _fields_ = [
        ("nr_xcrs", c_u32),
        ("flags", c_u32),
        ("xcrs", KvmXcr * 16),
        ("padding", c_u64 * 16),
    ]


class KvmXsave(ctypes.Structure):
    """``struct kvm_xsave`` (4096 bytes): the XSAVE image, standard format."""

    _fields_ = [("region", c_u8 * 4096)]


class KvmMsrEntry(ctypes.Structure):
    """``struct kvm_msr_entry`` (16 bytes)."""

    _fields_ = [("index", c_u32), ("reserved", c_u32), ("data", c_u64)]


@functools.cache
def _kvm_msrs_type(count: int) -> type[ctypes.Structure]:
    # one class per size: making a ctypes class costs tens of microseconds
    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_u32), ("pad", c_u32), ("entries", KvmMsrEntry * count)]

    return KvmMsrs


def kvm_msrs(count: int) -> ctypes.Structure:
    """A ``struct kvm_msrs`` with room for ``count`` entries."""
    msrs = _kvm_msrs_type(count)()
    msrs.nmsrs = count  # type: ignore[attr-defined]
    return msrs


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2`` (40 bytes)."""

    _fields_ = [
        ("function", c_u32),
        ("index", c_u32),
        ("flags", c_u32),
        ("eax", c_u32),
        ("ebx", c_u32),
        ("ecx", c_u32),
        ("edx", c_u32),
        ("padding", c_u32 * 3),
    ]


CPUID_MAX_ENTRIES = 256


class KvmCpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` with room for CPUID_MAX_ENTRIES entries."""

    _fields_ = [
        ("nent", c_u32),
        ("padding", c_u32),
        ("entries", KvmCpuidEntry2 * CPUID_MAX_ENTRIES),
    ]


class KvmTranslation(ctypes.Structure):
    """``struct kvm_translation`` (24 bytes)."""

    _fields_ = [
        ("linear_address", c_u64),
        ("physical_address", c_u64),
        ("valid", c_u8),
        ("writeable", c_u8),
        ("usermode", c_u8),
        ("pad", c_u8 * 5),
    ]


class KvmGuestDebug(ctypes.Structure):
    """``struct kvm_guest_debug`` (72 bytes)."""

    _fields_ = [("control", c_u32), ("pad", c_u32), ("debugreg", c_u64 * 8)]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (32 bytes)."""

    _fields_ = [
        ("slot", c_u32),
        ("flags", c_u32),
        ("guest_phys_addr", c_u64),
        ("memory_size", c_u64),
        ("userspace_addr", c_u64),
    ]


class KvmMsrFilterRange(ctypes.Structure):
    """``struct kvm_msr_filter_range`` (24 bytes)."""

    _fields_ = [("flags", c_u32), ("nmsrs", c_u32), ("base", c_u32), ("bitmap", ctypes.c_void_p)]


class KvmMsrFilter(ctypes.Structure):
    """``struct kvm_msr_filter`` (392 bytes)."""

    _fields_ = [
        ("flags", c_u32),
        ("ranges", KvmMsrFilterRange * KVM_MSR_FILTER_MAX_RANGES),
    ]


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap`` (104 bytes)."""

    _fields_ = [("cap", c_u32), ("flags", c_u32), ("args", c_u64 * 4), ("pad", c_u8 * 64)]


class KvmExceptionEvent(ctypes.Structure):
    """The ``exception`` part of ``struct kvm_vcpu_events``."""

    _fields_ = [
        ("injected", c_u8),
        ("nr", c_u8),
        ("has_error_code", c_u8),
        ("pending", c_u8),
        ("error_code", c_u32),
    ]


class KvmInterruptEvent(ctypes.Structure):
    """The ``interrupt`` part of ``struct kvm_vcpu_events``."""

    _fields_ = [("injected", c_u8), ("nr", c_u8), ("soft", c_u8), ("shadow", c_u8)]


class KvmNmiEvent(ctypes.Structure):
    """The ``nmi`` part of ``struct kvm_vcpu_events``."""

    _fields_ = [("injected", c_u8), ("pending", c_u8), ("masked", c_u8), ("pad", c_u8)]


class KvmVcpuEvents(ctypes.Structure):
    """``struct kvm_vcpu_events`` (64 bytes)."""

    _fields_ = [
        ("exception", KvmExceptionEvent),
        ("interrupt", KvmInterruptEvent),
        ("nmi", KvmNmiEvent),
        ("sipi_vector", c_u32),
        ("flags", c_u32),
        ("smi", c_u8 * 4),
        ("triple_fault", c_u8),
        ("reserved", c_u8 * 26),
        ("exception_has_payload", c_u8),
        ("exception_payload", c_u64),
    ]


STRUCT_SIZES: dict[type[ctypes.Structure], int] = {
    KvmRegs: 144,
    KvmSegment: 24,
    KvmDtable: 16,
    KvmSregs: 312,
    KvmDebugregs: 128,
    KvmXcrs: 392,
    KvmXsave: 4096,
    KvmMsrEntry: 16,
    KvmCpuidEntry2: 40,
    KvmTranslation: 24,
    KvmGuestDebug: 72,
    KvmUserspaceMemoryRegion: 32,
    KvmMsrFilterRange: 24,
    KvmMsrFilter: 392,
    KvmEnableCap: 104,
    KvmVcpuEvents: 64,
}
"""Sizes from ``linux/kvm.h`` (x86-64), checked by the tests."""
