"""Bad input to ``gdbstub.hv`` (issue 2 item 5): HvError with the framework's code, no crash."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from hvguest import RAM_SIZE, RWX, GuestMemory, Vm, hv_vm

from gdbstub import hv

__all__ = ["hv_vm"]

# every test runs on each backend this machine offers (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("hv_backend")

BAD = hv.HV_BAD_ARGUMENT


def code_of(call: Callable[[], Any]) -> int:
    with pytest.raises(hv.HvError) as err:
        call()
    assert err.value.call and err.value.name in str(err.value)
    return err.value.code


def test_hv_error_shape() -> None:
    err = hv.HvError(hv.HV_BAD_ARGUMENT, "hv_vcpu_run", "no vCPU 7")
    assert err.code == hv.HV_BAD_ARGUMENT and err.name == "HV_BAD_ARGUMENT"
    assert str(err) == "hv_vcpu_run: HV_BAD_ARGUMENT (no vCPU 7)"
    assert hv.HvError(-85377023, "x").code == hv.HV_ERROR  # signed form from logs


def test_unknown_capability() -> None:
    assert code_of(lambda: hv.hv_capability(99)) == BAD


def test_calls_without_a_vm() -> None:
    assert code_of(lambda: hv.hv_vm_destroy()) == hv.HV_ERROR
    assert code_of(lambda: hv.hv_vm_space_create()) == hv.HV_ERROR
    assert code_of(lambda: hv.hv_vm_sync_tsc(0)) == hv.HV_ERROR


def test_bad_vm_flags() -> None:
    assert code_of(lambda: hv.hv_vm_create(1 << 40)) == BAD


@pytest.mark.parametrize("vcpu", [7, -1, 1 << 40])
def test_unknown_vcpu(hv_vm: Vm, vcpu: int) -> None:
    for call in (
        lambda: hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX),
        lambda: hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, 0),
        lambda: hv.hv_vcpu_run(vcpu),
        lambda: hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER),
        lambda: hv.hv_vcpu_interrupt([vcpu]),
        lambda: hv.hv_vcpu_destroy(vcpu),
        lambda: hv.hv_vcpu_flush(vcpu),
        lambda: hv.hv_vcpu_invalidate_tlb(vcpu),
        lambda: hv.hv_vcpu_get_exec_time(vcpu),
        lambda: hv.hv_vcpu_read_msr(vcpu, hv.MSR_EFER),
        lambda: hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_RIP),
        lambda: hv.hv_vcpu_set_space(vcpu, 0),
        lambda: hv.hv_vcpu_read_fpstate(vcpu, bytearray(4096)),
    ):
        assert code_of(call) == BAD


def test_destroyed_vcpu(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    hv_vm.destroy(vcpu)
    assert code_of(lambda: hv.hv_vcpu_destroy(vcpu)) == BAD
    assert code_of(lambda: hv.hv_vcpu_interrupt([vcpu])) == BAD
    assert code_of(lambda: hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_RIP, 0)) == BAD


def test_interrupt_list_with_one_bad_id_kicks_nobody(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=b"\xeb\xfe")  # jmp $
    assert code_of(lambda: hv.hv_vcpu_interrupt([vcpu, 99])) == BAD
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(10_000_000))
    assert hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == 52


def test_bad_maps(hv_vm: Vm) -> None:
    page = hv.hv_vm_allocate(0x2000)
    # unaligned gpa, size, host address; zero, negative and oversized sizes
    assert code_of(lambda: hv.hv_vm_map(page, 0x80001, 0x1000, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_map(page, 0x80000, 0x800, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_map(memoryview(page)[1:], 0x80000, 0x1000, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_map(page, 0x80000, 0, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_map(page, 0x80000, -0x1000, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_map(page, 0x80000, 0x3000, RWX)) == BAD  # > buffer
    assert code_of(lambda: hv.hv_vm_map(page, 1 << 60, 0x1000, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_map(page, -0x1000, 0x1000, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_map(page, 0x80000, 0x1000, 1 << 20)) == BAD  # flags
    assert code_of(lambda: hv.hv_vm_map(bytes(0x1000), 0x80000, 0x1000, RWX)) == BAD  # read-only
    assert code_of(lambda: hv.hv_vm_map(0x1001, 0x80000, 0x1000, RWX)) == BAD
    # overlapping an existing mapping (RAM is at 0..RAM_SIZE)
    assert code_of(lambda: hv.hv_vm_map(page, RAM_SIZE - 0x1000, 0x2000, RWX)) == BAD
    hv.hv_vm_map(page, 0x80000, 0x2000, RWX)
    assert code_of(lambda: hv.hv_vm_map(page, 0x81000, 0x1000, RWX)) == BAD
    hv.hv_vm_unmap(0x80000, 0x2000)
    with pytest.raises(hv.HvError):
        hv.hv_vm_allocate(100)


def test_bad_unmap_and_protect(hv_vm: Vm) -> None:
    assert code_of(lambda: hv.hv_vm_unmap(0x80000, 0x1000)) == BAD  # not mapped
    assert code_of(lambda: hv.hv_vm_unmap(RAM_SIZE - 0x1000, 0x2000)) == BAD  # partly mapped
    assert code_of(lambda: hv.hv_vm_unmap(0x1000, 0x10)) == BAD
    assert code_of(lambda: hv.hv_vm_protect(0x80000, 0x1000, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_protect(0x1000, -1, RWX)) == BAD
    # a failed unmap changed nothing: the RAM is still there and whole
    hv.hv_vm_unmap(0, RAM_SIZE)
    assert code_of(lambda: hv.hv_vm_unmap(0, 0x1000)) == BAD


def test_bad_spaces(hv_vm: Vm) -> None:
    assert code_of(lambda: hv.hv_vm_space_destroy(hv.HV_VM_SPACE_DEFAULT)) == BAD
    assert code_of(lambda: hv.hv_vm_space_destroy(42)) == BAD
    assert code_of(lambda: hv.hv_vm_map_space(42, GuestMemory(0x1000).buf, 0, 0x1000, RWX)) == BAD
    assert code_of(lambda: hv.hv_vm_unmap_space(42, 0, 0x1000)) == BAD
    vcpu = hv_vm.vcpu()
    assert code_of(lambda: hv.hv_vcpu_set_space(vcpu, 42)) == BAD
    spaces = []
    with pytest.raises(hv.HvError) as err:
        for _ in range(64):
            spaces.append(hv.hv_vm_space_create())
    assert err.value.code == hv.HV_NO_RESOURCES
    for asid in spaces:
        hv.hv_vm_space_destroy(asid)


def test_bad_registers(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    for r in (hv.HV_X86_REGISTERS_MAX, -1, 1000):
        assert code_of(partial(hv.hv_vcpu_read_register, vcpu, r)) == BAD
        assert code_of(partial(hv.hv_vcpu_write_register, vcpu, r, 0)) == BAD
    assert code_of(lambda: hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, -1)) == BAD
    assert code_of(lambda: hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, 1 << 64)) == BAD
    assert code_of(lambda: hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 0)) == BAD  # x87 off


def test_bad_vmcs_fields(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    for fld in (0x1234, -1, 1 << 40):
        assert code_of(partial(hv.hv_vmx_vcpu_read_vmcs, vcpu, fld)) == BAD
        assert code_of(partial(hv.hv_vmx_vcpu_write_vmcs, vcpu, fld, 0)) == BAD
    assert code_of(lambda: hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_EPTP)) == hv.HV_UNSUPPORTED
    assert code_of(lambda: hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_RIP, -5)) == BAD
    assert code_of(lambda: hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ACTIVITY_STATE, 9)) == BAD
    assert code_of(lambda: hv.hv_vmx_read_capability(999)) == hv.HV_UNSUPPORTED


def test_bad_fpstate_buffers(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    assert code_of(lambda: hv.hv_vcpu_read_fpstate(vcpu, bytearray(256))) == BAD
    assert code_of(lambda: hv.hv_vcpu_write_fpstate(vcpu, bytearray(256))) == BAD
    assert code_of(lambda: hv.hv_vcpu_read_fpstate(vcpu, bytearray(4096), 100)) == BAD
    assert code_of(lambda: hv.hv_vcpu_read_fpstate(vcpu, bytearray(4096), 8192)) == BAD
    assert code_of(lambda: hv.hv_vcpu_read_fpstate(vcpu, bytearray(4096), -1)) == BAD
    assert code_of(lambda: hv.hv_vcpu_read_fpstate(vcpu, bytes(4096))) == BAD  # read-only
    garbage = bytearray(4096)
    garbage[512:520] = b"\xff" * 8  # XSTATE_BV with bits the host does not have
    garbage[520:528] = b"\xff" * 8
    assert code_of(lambda: hv.hv_vcpu_write_fpstate(vcpu, garbage)) == BAD


def test_bad_msrs(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    assert code_of(lambda: hv.hv_vcpu_read_msr(vcpu, 0x4000_1234)) == BAD  # no such MSR
    assert code_of(lambda: hv.hv_vcpu_read_msr(vcpu, -1)) == BAD
    assert code_of(lambda: hv.hv_vcpu_read_msr(vcpu, 1 << 32)) == BAD
    assert code_of(lambda: hv.hv_vcpu_write_msr(vcpu, hv.MSR_IA32_SYSENTER_CS, -1)) == BAD
    assert code_of(lambda: hv.hv_vcpu_enable_native_msr(vcpu, -1, True)) == BAD
    assert code_of(lambda: hv.hv_vcpu_enable_managed_msr(vcpu, 1 << 33, True)) == BAD
    # set_msr_access needs a managed MSR and known flags
    assert code_of(lambda: hv.hv_vcpu_set_msr_access(vcpu, 0x174, hv.HV_MSR_READ)) == BAD
    hv.hv_vcpu_enable_managed_msr(vcpu, 0x174, True)
    assert code_of(lambda: hv.hv_vcpu_set_msr_access(vcpu, 0x174, 1 << 5)) == BAD


def test_bad_run_arguments(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    assert code_of(lambda: hv.hv_vcpu_run_until(vcpu, -1)) == BAD
    assert code_of(lambda: hv.hv_vcpu_run_until(vcpu, 1 << 64)) == BAD
    assert code_of(lambda: hv.hv_vm_sync_tsc(-1)) == BAD
    assert code_of(lambda: hv.hv_vcpu_create(1 << 10)) == BAD


def test_owner_only_calls_from_another_thread(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(code_of(lambda: hv.hv_vcpu_set_space(vcpu, 0)))
    )
    thread.start()
    thread.join()
    assert codes == [BAD]


def test_select_backend_rejects_unknown_names() -> None:
    assert code_of(lambda: hv.select_backend("nope")) == BAD
