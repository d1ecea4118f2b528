"""emu's EPT violations as hardware reports them: the guest-linear address of every access.

A 64-bit guest (identity paging of the first 2 MiB, ``tests/hvguest``) whose page tables map
one linear page to guest-physical memory with no RAM (or to RAM the VMM protected) touches it
in the ways tests/test_framework_rules.py does not: an instruction fetch, a push, a string
instruction's source and destination, a read of a write-only... The VMM sees exit 48 with the
access and permission bits, bits 7/8 (linear address valid, access to its translation),
VMCS_RO_GUEST_LIN_ADDR and VMCS_GUEST_PHYSICAL_ADDRESS; nothing of the instruction done.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import pytest
from hvguest import (
    CODE,
    IDT,
    RWX,
    Vm,
    asm,
    emu_vm,
    pte_address,
    reg,
    run_to_exit,
    set_reg,
    set_vmcs,
    vmcs,
)

from gdbstub import hv, vmxsetup

pytestmark = pytest.mark.skipif(
    "emu" not in hv.available_backends(), reason="unicorn is not installed"
)

MMIO_GPA = 0x8000_0000  # no RAM there
WINDOW = 0x1F0000  # a linear page the tests map to MMIO_GPA (or to protected RAM)
RAM_PAGE = 0x30000
GLA_BITS = hv.EPT_VIOLATION_GLA_VALID | hv.EPT_VIOLATION_XLAT_VALID


@pytest.fixture
def vm() -> Iterator[Vm]:
    yield from emu_vm()


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


# --- IDT-vectoring information: an exit in the middle of an event's delivery ------------------

HANDLER = CODE + 0x80  # every vector's handler: count in R15, then HLT
STACK_TOP = WINDOW + 0x100  # the guest's stack: in the window
FRAME = STACK_TOP - 40  # where a 64-bit frame without error code lands (SS, RSP, RFLAGS, CS, RIP)


def delivery_vcpu(vm: Vm, source: str, gpa: int = MMIO_GPA) -> int:
    """A 64-bit guest whose stack is in the window and whose IDT sends every vector used here
    to HANDLER (a 64-bit interrupt gate)."""
    code = asm(f"mov rsp, {STACK_TOP}\n{source}\ntimes {HANDLER - CODE} - ($ - $$) nop\n"
               "inc r15\nhlt\n", bits=64)  # fmt: skip
    vcpu = vm.vcpu("long", code)
    vm.mem.put64(pte_address(WINDOW), gpa | 3)
    for vector in (0x06, 0x0D, 0x21, 0x40):
        gate = HANDLER & 0xFFFF | 0x18 << 16 | 0x8E << 40 | (HANDLER >> 16 & 0xFFFF) << 48
        vm.mem.put64(IDT + 16 * vector, gate)
        vm.mem.put64(IDT + 16 * vector + 8, HANDLER >> 32)
    return vcpu


def map_window() -> mmap.mmap:
    """What the VMM does about the violation: RAM where the guest's stack is."""
    ram = mmap.mmap(-1, 0x1000)
    hv.hv_vm_map(ram, MMIO_GPA, 0x1000, RWX)
    return ram


def idt_vectoring(vcpu: int) -> tuple[int, int]:
    return vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO), vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_ERROR)


def handler_ran_once(vm: Vm, vcpu: int, ram: mmap.mmap, return_rip: int) -> None:
    """Re-inject as QEMU's hvf does; the handler runs once, its frame in the new RAM."""
    assert vmxsetup.reinject_event(vcpu)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_R15) == 1
    assert int.from_bytes(ram[FRAME & 0xFFF : (FRAME & 0xFFF) + 8], "little") == return_rip
    assert vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO) & hv.IRQ_INFO_VALID == 0


def test_exception_frame_on_mmio_reports_the_exception(vm: Vm) -> None:
    vcpu = delivery_vcpu(vm, "ud2")
    ud2 = CODE + 5
    qual, linear, gpa = exit_48(vcpu)
    assert qual == hv.EPT_VIOLATION_DATA_WRITE | GLA_BITS, hex(qual)
    assert (linear, gpa) == (FRAME, MMIO_GPA + (FRAME & 0xFFF))
    info, _ = idt_vectoring(vcpu)
    assert info == hv.IRQ_INFO_VALID | hv.IRQ_INFO_HARD_EXC | hv.IDT_UD
    assert reg(vcpu, hv.HV_X86_RIP) == ud2 and reg(vcpu, hv.HV_X86_RSP) == STACK_TOP
    handler_ran_once(vm, vcpu, map_window(), ud2)


def test_exception_with_error_code_reports_it(vm: Vm) -> None:
    """#GP(0x40): DS loaded with a selector beyond the GDT; the error code is reported too."""
    vcpu = delivery_vcpu(vm, "mov ax, 0x40\nmov ds, ax")
    assert exit_48(vcpu)[1] == FRAME - 8  # the error code is pushed too
    info, error = idt_vectoring(vcpu)
    assert info == hv.IRQ_INFO_VALID | hv.IRQ_INFO_ERROR_VALID | hv.IRQ_INFO_HARD_EXC | hv.IDT_GP
    assert error == 0x40
    ram = map_window()
    assert vmxsetup.reinject_event(vcpu)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_R15) == 1
    assert int.from_bytes(ram[(FRAME - 8) & 0xFFF :][:8], "little") == 0x40


def test_injected_interrupt_reports_itself(vm: Vm) -> None:
    vcpu = delivery_vcpu(vm, "hlt")
    set_reg(vcpu, hv.HV_X86_RSP, STACK_TOP)
    set_reg(vcpu, hv.HV_X86_RIP, CODE + 5)
    set_reg(vcpu, hv.HV_X86_RFLAGS, 0x202)
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_EXT_IRQ | 0x40)
    assert exit_48(vcpu)[1] == FRAME
    assert idt_vectoring(vcpu)[0] == hv.IRQ_INFO_VALID | hv.IRQ_INFO_EXT_IRQ | 0x40
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5  # not delivered: nothing moved
    handler_ran_once(vm, vcpu, map_window(), CODE + 5)


def test_software_interrupt_reports_its_instruction(vm: Vm) -> None:
    vcpu = delivery_vcpu(vm, "int 0x21")
    assert exit_48(vcpu)[1] == FRAME
    assert idt_vectoring(vcpu)[0] == hv.IRQ_INFO_VALID | hv.IRQ_INFO_SOFT_IRQ | 0x21
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5  # at the INT
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2
    handler_ran_once(vm, vcpu, map_window(), CODE + 7)  # returns after the INT


def test_protected_stack_page(vm: Vm) -> None:
    vcpu = delivery_vcpu(vm, "ud2", gpa=RAM_PAGE)
    hv.hv_vm_protect(RAM_PAGE, 0x1000, hv.HV_MEMORY_READ)
    qual, linear, gpa = exit_48(vcpu)
    assert qual == hv.EPT_VIOLATION_DATA_WRITE | hv.EPT_VIOLATION_GPA_READABLE | GLA_BITS
    assert (linear, gpa) == (FRAME, RAM_PAGE + (FRAME & 0xFFF))
    assert idt_vectoring(vcpu)[0] == hv.IRQ_INFO_VALID | hv.IRQ_INFO_HARD_EXC | hv.IDT_UD
    hv.hv_vm_protect(RAM_PAGE, 0x1000, RWX)
    assert vmxsetup.reinject_event(vcpu)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_R15) == 1
    assert vm.mem.u64(RAM_PAGE + (FRAME & 0xFFF)) == CODE + 5


def test_intercepted_fault_of_the_delivery_reports_the_event(vm: Vm) -> None:
    """The stack's page is not present and #PF is intercepted: exit 0 with #PF (error code W,
    the linear address in the qualification), the #UD in the IDT-vectoring information."""
    vcpu = delivery_vcpu(vm, "ud2")
    vm.mem.put64(pte_address(WINDOW), 0)
    set_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_PF)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EXC_NMI
    info = hv.IRQ_INFO_VALID | hv.IRQ_INFO_ERROR_VALID | hv.IRQ_INFO_HARD_EXC | hv.IDT_PF
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO) == info
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_ERROR) & 2  # a write
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) == FRAME
    assert idt_vectoring(vcpu)[0] == hv.IRQ_INFO_VALID | hv.IRQ_INFO_HARD_EXC | hv.IDT_UD
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5


def test_exits_outside_a_delivery_have_no_idt_vectoring_information(vm: Vm) -> None:
    vcpu = window_vcpu(vm, f"mov rax, [{WINDOW}]")
    exit_48(vcpu)
    assert vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO) & hv.IRQ_INFO_VALID == 0
