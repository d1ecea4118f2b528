"""A ring-3 program and its kernel (tests/guests/emu_ring3.asm; emu_ring3_32.asm for a 32-bit
kernel with SS0:ESP0 and a HLT in ring 3 that must #GP) on the emu backend, and on kvm
as a cross-check of what hardware does (on this host KVM emulates the CPL0 part and runs the
CPL3 part natively): SYSCALL/SYSRETQ with swapgs, an external interrupt injected in ring 3
(stack switch to RSP0, SS null), a #PF in ring 3 on the IST1 stack, IRETQ back to ring 3."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from guestbuild import GUESTS_DIR, assemble_flat
from hvguest import (
    CODE,
    Vm,
    new_vm,
    reg,
    run_to_port,
    set_vmcs,
    tear_down,
    vmcs,
)

from gdbstub import hv

BACKENDS = [name for name in ("emu", "kvm") if name in hv.available_backends()]
RSP0_TOP, IST1_TOP, SYSCALL_STACK, USER_STACK = 0x9800, 0xA800, 0xB800, 0xC000
KERNEL_CS, KERNEL_DS, USER32_CS, USER_DS, USER_CS = 0x10, 0x18, 0x23, 0x2B, 0x33
SYSENTER_STACK = 0xB000
FMASK = 0x47700
IF, RF = 1 << 9, 1 << 16


def program() -> bytes:
    return assemble_flat((GUESTS_DIR / "emu_ring3.asm").read_text(), bits=64, org=CODE)


@pytest.fixture(params=BACKENDS)
def vm(request: pytest.FixtureRequest) -> Iterator[Vm]:
    hv._reset_for_tests()
    hv.select_backend(request.param)
    machine = new_vm()
    try:
        yield machine
    finally:
        tear_down(machine, hv._reset_for_tests)
        hv._reset_for_tests()


def u64(vm: Vm, address: int) -> int:
    return vm.mem.u64(address)


def test_ring3_program(vm: Vm) -> None:
    if hv.backend_name() == "kvm" and os.path.exists("/sys/module/kvm_pvm"):
        pytest.skip("kvm_pvm takes ring-3 events through PVM's own entry, not the guest's")
    code = program()
    vcpu = vm.vcpu("long", code)
    syscall_next = CODE + code.index(b"\x0f\x05") + 2
    fault_insn = CODE + code.index(b"\x89\x04\x25\x00\x00\x40\x00")
    waiting = CODE + code.index(b"\xe6\x52") + 2  # after `out 0x52, al`
    for n in (3, 2, 1):
        assert run_to_port(vcpu) == 0x50  # in the syscall handler
        assert reg(vcpu, hv.HV_X86_R8) == KERNEL_CS and reg(vcpu, hv.HV_X86_R9) == KERNEL_DS
        assert reg(vcpu, hv.HV_X86_CS) == KERNEL_CS
        assert reg(vcpu, hv.HV_X86_RCX) == syscall_next
        user_flags = reg(vcpu, hv.HV_X86_R11)
        assert user_flags & 0x3202 == 0x3202  # IOPL 3, IF of ring 3
        assert reg(vcpu, hv.HV_X86_R10) == user_flags & ~(FMASK | RF)
        assert reg(vcpu, hv.HV_X86_RBX) == SYSCALL_STACK - 16  # swapgs found the per-CPU area
        assert reg(vcpu, hv.HV_X86_RDI) == n << 8
        assert run_to_port(vcpu) == 0x51  # back in ring 3
        assert reg(vcpu, hv.HV_X86_RAX) == (n << 8) + 1
        assert reg(vcpu, hv.HV_X86_R8) == USER_CS and reg(vcpu, hv.HV_X86_R9) == USER_DS
        assert reg(vcpu, hv.HV_X86_CS) == USER_CS and reg(vcpu, hv.HV_X86_SS) == USER_DS
        assert reg(vcpu, hv.HV_X86_RSP) == USER_STACK
        assert reg(vcpu, hv.HV_X86_RFLAGS) & 0x3202 == 0x3202
    assert run_to_port(vcpu) == 0x52
    assert reg(vcpu, hv.HV_X86_RIP) == waiting
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_EXT_IRQ | 0x20)
    assert run_to_port(vcpu) == 0x53  # the interrupt handler, on the RSP0 stack
    frame = reg(vcpu, hv.HV_X86_RBX)
    assert frame == RSP0_TOP - 40
    assert u64(vm, frame) == waiting
    assert u64(vm, frame + 8) == USER_CS
    assert u64(vm, frame + 16) & 0x3202 == 0x3202
    assert u64(vm, frame + 24) == USER_STACK
    assert u64(vm, frame + 32) == USER_DS
    assert reg(vcpu, hv.HV_X86_R8) == KERNEL_CS
    assert reg(vcpu, hv.HV_X86_R9) == 0  # SS: the null selector, RPL 0
    assert run_to_port(vcpu) == 0x54  # #PF in ring 3, on the IST1 stack
    frame = reg(vcpu, hv.HV_X86_RBX)
    assert frame == IST1_TOP - 48
    assert u64(vm, frame) == 6  # error code: user write to a page not present
    assert u64(vm, frame + 8) == fault_insn
    assert u64(vm, frame + 16) == USER_CS
    assert u64(vm, frame + 32) == USER_STACK
    assert u64(vm, frame + 40) == USER_DS
    assert reg(vcpu, hv.HV_X86_RCX) == 0x400000  # CR2
    assert reg(vcpu, hv.HV_X86_CR2) == 0x400000
    assert reg(vcpu, hv.HV_X86_R8) == KERNEL_CS and reg(vcpu, hv.HV_X86_R9) == 0
    assert run_to_port(vcpu) == 0x55  # ring 3 after the store
    assert reg(vcpu, hv.HV_X86_R8) == USER_CS and reg(vcpu, hv.HV_X86_R9) == USER_DS
    assert reg(vcpu, hv.HV_X86_RSP) == USER_STACK
    # 32-bit compatibility mode, as Linux's 32-bit programs enter the kernel
    int80_next = CODE + code.index(b"\xcd\x80") + 2
    assert run_to_port(vcpu) == 0x56  # int 0x80 through a DPL3 gate, onto RSP0
    frame = reg(vcpu, hv.HV_X86_RBX)
    assert frame == RSP0_TOP - 40
    assert u64(vm, frame) == int80_next
    assert u64(vm, frame + 8) == USER32_CS
    assert u64(vm, frame + 24) == USER_STACK
    assert u64(vm, frame + 32) == USER_DS
    assert reg(vcpu, hv.HV_X86_RAX) == 7
    assert run_to_port(vcpu) == 0x57  # iretq back to compatibility mode
    assert reg(vcpu, hv.HV_X86_RAX) == 8
    assert reg(vcpu, hv.HV_X86_RBX) & 0xFFFF == USER32_CS
    assert vmcs(vcpu, hv.VMCS_GUEST_CS_AR) & 0x6000 == 0x4000  # D, not L
    assert run_to_port(vcpu) == 0x58  # sysenter
    assert reg(vcpu, hv.HV_X86_R8) == KERNEL_CS and reg(vcpu, hv.HV_X86_R9) == KERNEL_DS
    assert reg(vcpu, hv.HV_X86_RBX) == SYSENTER_STACK
    assert not reg(vcpu, hv.HV_X86_R10) & (IF | RF)
    assert vmcs(vcpu, hv.VMCS_GUEST_CS_AR) & 0x2000  # L: 64-bit kernel code
    assert run_to_port(vcpu) == 0x59  # sysretl
    assert reg(vcpu, hv.HV_X86_RBX) & 0xFFFF == USER32_CS
    assert reg(vcpu, hv.HV_X86_RCX) & 0xFFFF == USER_DS
    assert reg(vcpu, hv.HV_X86_RSP) == USER_STACK


def test_ring3_under_a_32bit_kernel(vm: Vm) -> None:
    if hv.backend_name() == "kvm" and os.path.exists("/sys/module/kvm_pvm"):
        pytest.skip("kvm_pvm takes ring-3 events through PVM's own entry, not the guest's")
    code = assemble_flat((GUESTS_DIR / "emu_ring3_32.asm").read_text(), bits=32, org=CODE)
    vcpu = vm.vcpu("protected", code)
    waiting = CODE + code.index(b"\xe6\x52") + 2
    halt = CODE + code.index(b"\x90\xf4") + 1
    assert run_to_port(vcpu) == 0x52
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_EXT_IRQ | 0x20)
    assert run_to_port(vcpu) == 0x53  # on SS0:ESP0 from the TSS
    frame = reg(vcpu, hv.HV_X86_RBX)
    assert frame == 0x9800 - 20
    assert reg(vcpu, hv.HV_X86_RCX) & 0xFFFF == 0x10
    eip, cs, eflags, esp, ss = struct.unpack("<5I", vm.mem.read(frame, 20))
    assert (eip, cs, esp, ss) == (waiting, 0x1B, 0xC000, 0x23)
    assert eflags & 0x3202 == 0x3202
    assert run_to_port(vcpu) == 0x54  # HLT in ring 3: #GP(0), not a HLT exit
    frame = reg(vcpu, hv.HV_X86_RBX)
    error, eip, cs, _, esp, ss = struct.unpack("<6I", vm.mem.read(frame, 24))
    assert (error, eip, cs, esp, ss) == (0, halt, 0x1B, 0xC000, 0x23)
    assert run_to_port(vcpu) == 0x55
    assert reg(vcpu, hv.HV_X86_RBX) & 0xFFFF == 0x1B and reg(vcpu, hv.HV_X86_RCX) & 0xFFFF == 0x23
