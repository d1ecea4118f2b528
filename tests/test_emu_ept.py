"""emu's EPT violations as hardware reports them: the guest-linear address of every access.

A 64-bit guest (identity paging of the first 2 MiB, ``tests/hvguest``) whose page tables map
one linear page to guest-physical memory with no RAM (or to RAM the VMM protected) touches it
in the ways tests/test_framework_rules.py does not: an instruction fetch, a push, a string
instruction's source and destination, a read of a write-only... The VMM sees exit 48 with the
access and permission bits, bits 7/8 (linear address valid, access to its translation),
VMCS_RO_GUEST_LIN_ADDR and VMCS_GUEST_PHYSICAL_ADDRESS; nothing of the instruction done.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hvguest import CODE, Vm, asm, new_vm, pte_address, reg, run_to_exit, tear_down, vmcs

from gdbstub import hv

pytestmark = pytest.mark.skipif(
    "emu" not in hv.available_backends(), reason="unicorn is not installed"
)

MMIO_GPA = 0x8000_0000  # no RAM there
WINDOW = 0x1F0000  # a linear page the tests map to MMIO_GPA (or to protected RAM)
RAM_PAGE = 0x30000
GLA_BITS = hv.EPT_VIOLATION_GLA_VALID | hv.EPT_VIOLATION_XLAT_VALID


@pytest.fixture
def vm() -> Iterator[Vm]:
    hv._reset_for_tests()
    hv.select_backend("emu")
    machine = new_vm()
    try:
        yield machine
    finally:
        tear_down(machine, hv._reset_for_tests)
        hv._reset_for_tests()


def window_vcpu(vm: Vm, source: str, gpa: int = MMIO_GPA) -> int:
    vcpu = vm.vcpu("long", asm(source + "\nhlt\n", bits=64))
    vm.mem.put64(pte_address(WINDOW), gpa | 3)
    return vcpu


def exit_48(vcpu: int) -> tuple[int, int, int]:
    """(qualification bits 0-8, linear address, guest-physical address) of an EPT exit."""
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    return (
        vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & 0x1FF,
        vmcs(vcpu, hv.VMCS_RO_GUEST_LIN_ADDR),
        vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS),
    )


@pytest.mark.parametrize(
    ("source", "offset", "access"),
    [
        (f"mov rsp, {WINDOW + 0x100}\npush rax", 0xF8, hv.EPT_VIOLATION_DATA_WRITE),
        (f"mov rsp, {WINDOW + 0x100}\npop rax", 0x100, hv.EPT_VIOLATION_DATA_READ),
        (f"mov rsi, {WINDOW + 0x30}\nmov rdi, 0x3000\nmovsb", 0x30, hv.EPT_VIOLATION_DATA_READ),
        (f"mov rdi, {WINDOW + 0x40}\nstosq", 0x40, hv.EPT_VIOLATION_DATA_WRITE),
        (f"mov rax, {WINDOW + 0x10}\njmp rax", 0x10, hv.EPT_VIOLATION_INST_FETCH),
        (f"mov eax, {WINDOW - 2}\nmov ecx, [rax]", 0, hv.EPT_VIOLATION_DATA_READ),
    ],
    ids=["push", "pop", "movsb-source", "stosq", "fetch", "crossing-into-the-page"],
)
def test_every_access_reports_its_linear_address(
    vm: Vm, source: str, offset: int, access: int
) -> None:
    vcpu = window_vcpu(vm, source)
    vm.mem.put64(pte_address(WINDOW - 0x1000), RAM_PAGE | 3)  # RAM just below the window
    qual, linear, gpa = exit_48(vcpu)
    assert qual == access | GLA_BITS, hex(qual)
    assert linear == WINDOW + offset
    assert gpa == MMIO_GPA + offset


def test_protected_ram_reports_what_the_mapping_allows(vm: Vm) -> None:
    """A write to RAM the VMM made read/execute-only: bit 1 with bits 3 and 5 (readable,
    executable); RIP at the store, the RAM unchanged."""
    ram = RAM_PAGE
    vcpu = window_vcpu(vm, f"mov ebx, {WINDOW + 8}\nmov qword [rbx], 7", gpa=ram)
    hv.hv_vm_protect(ram, 0x1000, hv.HV_MEMORY_READ | hv.HV_MEMORY_EXEC)
    qual, linear, gpa = exit_48(vcpu)
    readable_executable = hv.EPT_VIOLATION_GPA_READABLE | hv.EPT_VIOLATION_GPA_EXECUTABLE
    assert qual == hv.EPT_VIOLATION_DATA_WRITE | readable_executable | GLA_BITS, hex(qual)
    assert (linear, gpa) == (WINDOW + 8, ram + 8)
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5  # at the store
    assert vm.mem.u64(ram + 8) == 0
