"""emu's task switches: exit 9 with the SDM's qualification, nothing of the switch done.

A 32-bit protected-mode guest (flat segments, ``tests/hvguest``; paging off, where code is
scanned by chunk, and 32-bit paging, where it is scanned block by block) whose GDT also holds a
32-bit TSS (selector 0x38) and a task gate to it (0x40) switches tasks the ways x86 offers: far
JMP/CALL to the TSS or the gate (with a pointer or through memory), IRET with NT, a software
interrupt or an injected interrupt through a task gate in the IDT. The VMM sees exit 9: the TSS
selector in bits 15:0, the source in bits 31:30 (0 CALL, 1 IRET, 2 JMP, 3 IDT task gate), RIP
at the instruction with its length, the event in the IDT-vectoring information for a gate in
the IDT, and TR unchanged. A far JMP to a code segment is no task switch: the guest runs on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hvguest import (
    CODE,
    GDT,
    IDT,
    Vm,
    asm,
    emu_vm,
    reg,
    run_to_exit,
    set_reg,
    set_vmcs,
    vmcs,
)

from gdbstub import hv

pytestmark = pytest.mark.skipif(
    "emu" not in hv.available_backends(), reason="unicorn is not installed"
)

TSS, GATE = 0x38, 0x40  # selectors: a 32-bit TSS at TSS_BASE, a task gate to it
TSS_BASE = 0x3000
POINTER = 0x2000  # a far pointer in memory: offset 0, selector
CALL, IRET, JMP, IDT_GATE = 0, 1, 2, 3
MODES = ["protected", "paged32"]


@pytest.fixture
def vm() -> Iterator[Vm]:
    yield from emu_vm()


def task_vcpu(vm: Vm, mode: str, source: str) -> int:
    vcpu = vm.vcpu(mode, asm(source + "\nhlt\n", bits=32))
    vm.mem.put64(GDT + TSS, 0x67 | TSS_BASE << 16 | 0x89 << 40)  # present, type 9
    vm.mem.put64(GDT + GATE, TSS << 16 | 0x85 << 40)  # present task gate, DPL 0
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_LIMIT, GATE + 7)
    vm.mem.put32(POINTER, 0)
    vm.mem.write(POINTER + 4, TSS.to_bytes(2, "little"))
    vm.mem.put64(IDT + 8 * 0x21, TSS << 16 | 0x85 << 40)  # IDT vectors 0x21, 0x40: task gates
    vm.mem.put64(IDT + 8 * 0x40, TSS << 16 | 0x85 << 40)
    return vcpu


def task_exit(vcpu: int) -> tuple[int, int]:
    """(TSS selector, source) of a task-switch exit; TR is unchanged."""
    assert run_to_exit(vcpu) == hv.VMX_REASON_TASK
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_TR) == 0x20
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    return qual & 0xFFFF, qual >> 30


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("source", "selector", "kind", "length"),
    [
        (f"jmp {TSS}:0", TSS, JMP, 7),
        (f"call {TSS}:0", TSS, CALL, 7),
        (f"jmp {GATE}:0", TSS, JMP, 7),
        (f"jmp far [{POINTER}]", TSS, JMP, 6),
        (f"call far [{POINTER}]", TSS, CALL, 6),
    ],
    ids=["jmp-tss", "call-tss", "jmp-gate", "jmp-mem", "call-mem"],
)
def test_far_transfer_to_a_task_exits_9(
    vm: Vm, mode: str, source: str, selector: int, kind: int, length: int
) -> None:
    vcpu = task_vcpu(vm, mode, "nop\n" + source)
    assert task_exit(vcpu) == (selector, kind)
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 1  # at the instruction
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == length
    assert vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO) & hv.IRQ_INFO_VALID == 0


@pytest.mark.parametrize("mode", MODES)
def test_far_jump_to_code_is_no_task_switch(vm: Vm, mode: str) -> None:
    vcpu = task_vcpu(vm, mode, "jmp 0x08:next\nnext: mov eax, 7")
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_RAX) == 7


def test_iret_with_nt_returns_to_the_back_link(vm: Vm) -> None:
    """To the busy TSS the current one links back to; an available one is #TS instead."""
    vm.mem.write(0, TSS.to_bytes(2, "little"))  # the back link of the current TSS (base 0)
    vcpu = task_vcpu(vm, "paged32", "pushfd\nor dword [esp], 0x4000\npopfd\niretd")
    vm.mem.put64(GDT + TSS, 0x67 | TSS_BASE << 16 | 0x8B << 40)  # busy
    assert task_exit(vcpu) == (TSS, IRET)
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 9
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("descriptor", "vector"),
    [
        (0x67 | TSS_BASE << 16 | 0x8B << 40, hv.IDT_GP),  # busy
        (0x67 | TSS_BASE << 16 | 0x09 << 40, hv.IDT_NP),  # not present
        (0x20 | TSS_BASE << 16 | 0x89 << 40, hv.IDT_TS),  # too short
        (0x67 | TSS_BASE << 16 | 0x82 << 40, hv.IDT_GP),  # an LDT: no TSS
    ],
    ids=["busy", "not-present", "short", "ldt"],
)
def test_a_tss_that_fails_the_checks_faults_instead(
    vm: Vm, mode: str, descriptor: int, vector: int
) -> None:
    """VMX checks the new TSS before the exit; the fault comes first (SDM 25.4.2)."""
    vcpu = task_vcpu(vm, mode, f"jmp {TSS}:0")
    vm.mem.put64(GDT + TSS, descriptor)
    set_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << vector)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EXC_NMI
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO) & 0xFF == vector
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_ERROR) == TSS


@pytest.mark.parametrize("mode", MODES)
def test_software_interrupt_through_a_task_gate(vm: Vm, mode: str) -> None:
    vcpu = task_vcpu(vm, mode, "int 0x21")
    assert task_exit(vcpu) == (TSS, IDT_GATE)
    info = hv.IRQ_INFO_VALID | hv.IRQ_INFO_SOFT_IRQ | 0x21
    assert vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO) == info
    assert reg(vcpu, hv.HV_X86_RIP) == CODE
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2


def test_task_gate_in_the_idt_to_a_bad_tss_faults(vm: Vm) -> None:
    """The gate names a selector beyond the GDT: #GP (EXT set for an external event), which
    this guest's IDT cannot deliver either: a triple fault, as on hardware."""
    vcpu = task_vcpu(vm, "protected", "ud2")
    vm.mem.put64(IDT + 8 * hv.IDT_UD, 0xA5A5 << 16 | 0x85 << 40)
    vm.mem.put64(IDT + 8 * hv.IDT_GP, 0xA5A5 << 16 | 0x85 << 40)
    vm.mem.put64(IDT + 8 * hv.IDT_DF, 0xA5A5 << 16 | 0x85 << 40)
    assert run_to_exit(vcpu) == hv.VMX_REASON_TRIPLE_FAULT


def test_injected_interrupt_through_a_task_gate(vm: Vm) -> None:
    vcpu = task_vcpu(vm, "protected", "nop")
    set_reg(vcpu, hv.HV_X86_RFLAGS, 0x202)
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_EXT_IRQ | 0x40)
    assert task_exit(vcpu) == (TSS, IDT_GATE)
    assert vmcs(vcpu, hv.VMCS_RO_IDT_VECTOR_INFO) == hv.IRQ_INFO_VALID | 0x40
    assert reg(vcpu, hv.HV_X86_RIP) == CODE
