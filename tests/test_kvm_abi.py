"""The KVM ABI in ``gdbstub.hv.kvm_abi``: structure sizes, ioctl numbers, kvm_run offsets."""

from __future__ import annotations

import ctypes
import os

import pytest

from gdbstub.hv import kvm_abi as K

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | KVMIO << 8 | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


@pytest.mark.parametrize("struct_, size", list(K.STRUCT_SIZES.items()))
def test_struct_sizes(struct_: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct_) == size


def test_ioctl_numbers_follow_the_ioc_encoding() -> None:
    s = ctypes.sizeof
    assert _io(0x00) == K.KVM_GET_API_VERSION
    assert _io(0x01) == K.KVM_CREATE_VM
    assert _io(0x03) == K.KVM_CHECK_EXTENSION
    assert _io(0x04) == K.KVM_GET_VCPU_MMAP_SIZE
    assert _iowr(0x05, 8) == K.KVM_GET_SUPPORTED_CPUID
    assert _iowr(0x02, 4) == K.KVM_GET_MSR_INDEX_LIST
    assert _io(0x41) == K.KVM_CREATE_VCPU
    assert _iow(0x46, s(K.KvmUserspaceMemoryRegion)) == K.KVM_SET_USER_MEMORY_REGION
    assert _io(0x47) == K.KVM_SET_TSS_ADDR
    assert _io(0x80) == K.KVM_RUN
    assert _ior(0x81, s(K.KvmRegs)) == K.KVM_GET_REGS
    assert _iow(0x82, s(K.KvmRegs)) == K.KVM_SET_REGS
    assert _ior(0x83, s(K.KvmSregs)) == K.KVM_GET_SREGS
    assert _iow(0x84, s(K.KvmSregs)) == K.KVM_SET_SREGS
    assert _iow(0x86, 4) == K.KVM_INTERRUPT
    assert _iowr(0x88, 8) == K.KVM_GET_MSRS
    assert _iow(0x89, 8) == K.KVM_SET_MSRS
    assert _iow(0x8B, 4) == K.KVM_SET_SIGNAL_MASK
    assert _iow(0x90, 8) == K.KVM_SET_CPUID2
    assert _iow(0x9B, s(K.KvmGuestDebug)) == K.KVM_SET_GUEST_DEBUG
    assert _io(0x9A) == K.KVM_NMI
    assert _ior(0x9F, s(K.KvmVcpuEvents)) == K.KVM_GET_VCPU_EVENTS
    assert _iow(0xA0, s(K.KvmVcpuEvents)) == K.KVM_SET_VCPU_EVENTS
    assert _ior(0xA1, s(K.KvmDebugregs)) == K.KVM_GET_DEBUGREGS
    assert _iow(0xA2, s(K.KvmDebugregs)) == K.KVM_SET_DEBUGREGS
    assert _iow(0xA3, s(K.KvmEnableCap)) == K.KVM_ENABLE_CAP
    assert _io(0xA3) == K.KVM_GET_TSC_KHZ
    assert _ior(0xA4, s(K.KvmXsave)) == K.KVM_GET_XSAVE
    assert _iow(0xA5, s(K.KvmXsave)) == K.KVM_SET_XSAVE
    assert _ior(0xA6, s(K.KvmXcrs)) == K.KVM_GET_XCRS
    assert _iow(0xA7, s(K.KvmXcrs)) == K.KVM_SET_XCRS
    assert _iow(0xC6, s(K.KvmMsrFilter)) == K.KVM_X86_SET_MSR_FILTER


def test_struct_field_offsets() -> None:
    assert K.KvmSregs.cr0.offset == 224
    assert K.KvmSregs.efer.offset == 264
    assert K.KvmSregs.apic_base.offset == 272
    assert K.KvmSregs.gdt.offset == 192
    assert K.KvmRegs.rip.offset == 128
    assert K.KvmDebugregs.dr6.offset == 32 and K.KvmDebugregs.dr7.offset == 40
    assert K.KvmVcpuEvents.flags.offset == 20
    assert K.KvmVcpuEvents.exception_payload.offset == 56
    assert K.KvmMsrFilterRange.bitmap.offset == 16


def test_kvm_run_offsets() -> None:
    assert (K.RUN_IMMEDIATE_EXIT, K.RUN_EXIT_REASON, K.RUN_UNION) == (1, 8, 32)
    assert (K.RUN_IO_DIRECTION, K.RUN_IO_SIZE, K.RUN_IO_PORT) == (32, 33, 34)
    assert (K.RUN_IO_COUNT, K.RUN_IO_DATA_OFFSET) == (36, 40)
    assert (K.RUN_MMIO_PHYS_ADDR, K.RUN_MMIO_DATA, K.RUN_MMIO_LEN) == (32, 40, 48)
    assert K.RUN_MMIO_IS_WRITE == 52
    assert (K.RUN_MSR_ERROR, K.RUN_MSR_REASON, K.RUN_MSR_INDEX, K.RUN_MSR_DATA) == (32, 40, 44, 48)
    assert (K.RUN_DEBUG_EXCEPTION, K.RUN_DEBUG_PC, K.RUN_DEBUG_DR6) == (32, 40, 48)


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")
def test_against_the_running_kernel() -> None:
    from gdbstub.hv.posix import ioctl

    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert ioctl(fd, K.KVM_GET_API_VERSION) == 12
        assert ioctl(fd, K.KVM_GET_VCPU_MMAP_SIZE) >= 2352
        assert ioctl(fd, K.KVM_CHECK_EXTENSION, K.KVM_CAP_IMMEDIATE_EXIT)
        vm = ioctl(fd, K.KVM_CREATE_VM, 0)
        try:
            vcpu = ioctl(vm, K.KVM_CREATE_VCPU, 0)
            regs, sregs = K.KvmRegs(), K.KvmSregs()
            ioctl(vcpu, K.KVM_GET_REGS, regs)
            ioctl(vcpu, K.KVM_GET_SREGS, sregs)
            assert regs.rip == 0xFFF0 and sregs.cs.selector == 0xF000  # reset state
            assert sregs.cs.base == 0xFFFF0000
            os.close(vcpu)
        finally:
            os.close(vm)
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")
def test_probed_habits() -> None:
    from gdbstub.hv.kvm_probes import probe_habits as _probe_habits

    habits = _probe_habits()
    assert set(habits) == {"out", "in", "hlt", "msr", "tsc"}
