"""Every ``gdbstub.hv`` call on real KVM, with tiny guests assembled by nasm.

Each test would fail if the call it exercises did nothing. Guest code at CPL0 is emulated on
this host (~1-2 M instructions/s), so guests are a handful of instructions; code that needs
instructions the emulator lacks (AVX) runs at CPL3, which is native.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

import pytest
from hvguest import (
    CODE,
    PML4,
    RAM_SIZE,
    RWX,
    GuestMemory,
    Vm,
    asm,
    backend_kind,
    exit_reason,
    hv_vm,
    kvm_backend,
    pte_address,
    reg,
    run,
    run_to_exit,
    set_reg,
    set_vmcs,
    skip_instruction,
    vmcs,
)

from gdbstub import hv

__all__ = ["hv_vm"]  # the fixture, re-exported for pytest

# every test runs on each backend this machine offers (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("hv_backend")

MS = 1_000_000


def io_exit(vcpu: int) -> tuple[int, int, bool]:
    """(port, size, is_in) of the current I/O exit."""
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    return qual >> 16, (qual & 7) + 1, bool(qual & hv.EXIT_QUAL_IO_IN)


def al_of_out(vm: Vm, vcpu: int, timeout_ns: int = 5_000_000_000) -> int:
    """Run to the next exit, which must be an OUT; return AL and complete the OUT."""
    assert run_to_exit(vcpu, timeout_ns) == hv.VMX_REASON_IO
    value = reg(vcpu, hv.HV_X86_RAX) & 0xFF
    skip_instruction(vcpu)
    return value


# --- capabilities, VM lifecycle --------------------------------------------------------------


def test_capability() -> None:
    assert hv.hv_capability(hv.HV_CAP_VCPUMAX) >= 2
    assert hv.hv_capability(hv.HV_CAP_ADDRSPACEMAX) >= 2


def test_vm_create_twice_is_busy(hv_vm: Vm) -> None:
    with pytest.raises(hv.HvError) as err:
        hv.hv_vm_create(hv.HV_VM_DEFAULT)
    assert err.value.code == hv.HV_BUSY


def test_vm_destroy_then_create_again() -> None:
    hv.hv_vm_create(hv.HV_VM_DEFAULT)
    hv.hv_vm_destroy()
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)  # no VM any more
    assert err.value.code == hv.HV_ERROR
    hv.hv_vm_create(hv.HV_VM_DEFAULT)
    vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
    with pytest.raises(hv.HvError) as err:
        hv.hv_vm_destroy()  # a vCPU still exists
    assert err.value.code == hv.HV_BUSY
    hv.hv_vcpu_destroy(vcpu)
    hv.hv_vm_destroy()


def test_vcpu_destroy(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    assert reg(vcpu, hv.HV_X86_RIP) == CODE
    hv_vm.destroy(vcpu)
    with pytest.raises(hv.HvError) as err:
        reg(vcpu, hv.HV_X86_RIP)
    assert err.value.code == hv.HV_BAD_ARGUMENT
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    assert err.value.code == hv.HV_BAD_ARGUMENT


# --- I/O, HLT -----------------------------------------------------------------------------------

COUNTER_PORT = 0x60
ECHO_PORT = 0x61


def test_io_loop_emulates_a_port(hv_vm: Vm) -> None:
    """The guest reads a counter port and writes each value + 1 back; the VMM is the device."""
    code = asm(
        f"""
        mov cx, 5
    again:
        in al, {COUNTER_PORT}
        inc al
        out {ECHO_PORT}, al
        dec cx
        jnz again
        mov dx, 0x1234
        in ax, dx
        out dx, ax
        hlt
        """
    )
    vcpu = hv_vm.vcpu(code=code)
    counter = 10
    echoed: list[int] = []
    words: list[int] = []
    while True:
        reason = run_to_exit(vcpu)
        if reason == hv.VMX_REASON_HLT:
            break
        assert reason == hv.VMX_REASON_IO
        port, size, is_in = io_exit(vcpu)
        rip = reg(vcpu, hv.HV_X86_RIP)
        length = vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN)
        # RIP is at the IN/OUT itself, as on the framework
        assert hv_vm.mem.read(rip, length) in (
            bytes([0xE4, COUNTER_PORT]),
            bytes([0xE6, ECHO_PORT]),
            b"\xed",
            b"\xef",
        )
        rax = reg(vcpu, hv.HV_X86_RAX)
        if port == COUNTER_PORT:
            assert (size, is_in, length) == (1, True, 2)
            set_reg(vcpu, hv.HV_X86_RAX, (rax & ~0xFF) | counter)
            counter += 1
        elif port == ECHO_PORT:
            assert (size, is_in, length) == (1, False, 2)
            echoed.append(rax & 0xFF)
        else:
            assert port == 0x1234 and size == 2 and length == 1
            assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & hv.EXIT_QUAL_IO_STRING == 0
            if is_in:
                set_reg(vcpu, hv.HV_X86_RAX, (rax & ~0xFFFF) | 0xBEEF)
            else:
                words.append(rax & 0xFFFF)
        assert vmcs(vcpu, hv.VMCS_RO_IO_RIP) == rip
        set_reg(vcpu, hv.HV_X86_RIP, rip + length)
    assert echoed == [11, 12, 13, 14, 15]
    assert words == [0xBEEF]


def test_what_the_vmm_does_after_an_out_exit_is_what_the_guest_sees(hv_vm: Vm) -> None:
    """RIP left at the OUT runs it again; an advanced RIP goes on; a register written with the
    advance reaches the guest; a flush between exit and advance does not undo the advance."""
    code = asm(
        """
        mov bx, 1
    again:
        mov al, bl
        out 0x10, al
        inc bx
        jmp again
        """
    )
    vcpu = hv_vm.vcpu(code=code)

    def next_out() -> tuple[int, int]:
        assert run_to_exit(vcpu) == hv.VMX_REASON_IO
        return reg(vcpu, hv.HV_X86_RIP), reg(vcpu, hv.HV_X86_RAX) & 0xFF

    out_rip, al = next_out()
    assert al == 1
    assert next_out() == (out_rip, 1)  # RIP not advanced: the same OUT again
    skip_instruction(vcpu)
    assert next_out() == (out_rip, 2)
    set_reg(vcpu, hv.HV_X86_RBX, 0x40)
    skip_instruction(vcpu)
    assert next_out() == (out_rip, 0x41)
    hv.hv_vcpu_flush(vcpu)
    skip_instruction(vcpu)
    assert next_out() == (out_rip, 0x42)


def test_io_exits_without_sync_regs(hv_vm: Vm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where KVM lacks KVM_CAP_SYNC_REGS the registers travel by ioctl: the same contract."""
    backend = kvm_backend()
    monkeypatch.setattr(backend, "use_sync_regs", False)
    code = asm(
        f"""
    again:
        in al, {COUNTER_PORT}
        inc al
        out {ECHO_PORT}, al
        jmp again
        """
    )
    vcpu = hv_vm.vcpu(code=code)
    if backend_kind() == "kvm":
        assert not backend._vcpus[vcpu].sync
    for value in (7, 8, 9):
        assert run_to_exit(vcpu) == hv.VMX_REASON_IO
        assert io_exit(vcpu) == (COUNTER_PORT, 1, True)
        assert hv_vm.mem.read(reg(vcpu, hv.HV_X86_RIP), 2) == bytes([0xE4, COUNTER_PORT])
        set_reg(vcpu, hv.HV_X86_RAX, value)
        skip_instruction(vcpu)
        assert run_to_exit(vcpu) == hv.VMX_REASON_IO
        assert io_exit(vcpu) == (ECHO_PORT, 1, False)
        assert hv_vm.mem.read(reg(vcpu, hv.HV_X86_RIP), 2) == bytes([0xE6, ECHO_PORT])
        assert reg(vcpu, hv.HV_X86_RAX) & 0xFF == value + 1
        skip_instruction(vcpu)


def test_hlt_exit_fields(hv_vm: Vm) -> None:
    code = asm("nop\nnop\nhlt\nmov al, 7\nout 0x10, al")
    vcpu = hv_vm.vcpu(code=code)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 2
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 1
    skip_instruction(vcpu)
    assert al_of_out(hv_vm, vcpu) == 7


# --- memory ------------------------------------------------------------------------------------
#
# Exit 48 is the same everywhere (GPA, access bits, RIP at the instruction); what differs is who
# completes the instruction. KVM decodes the access (GDBSTUB_VMCS_MMIO_DECODED = 1, size, data)
# and completes it on re-entry with the value the VMM wrote to GDBSTUB_VMCS_MMIO_DATA. The
# framework (hvf) and emu decode nothing (the extension fields read 0): the VMM emulates the
# instruction and advances RIP itself.


def mmio_exit_at(vcpu: int, rip: int) -> None:
    """Exit 48 with RIP at the faulting instruction, which has not executed."""
    assert reg(vcpu, hv.HV_X86_RIP) == rip


def vmm_completes_read(vcpu: int, length: int, value: int, size: int = 1) -> None:
    """The VMM's answer to an exit-48 read of ``size`` bytes into AL/AX (an instruction of
    ``length`` bytes at RIP): ``value`` is what the device returns."""
    kind = backend_kind()
    if kind == "kvm":
        assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DECODED) == 1
        assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_SIZE) == size
        set_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA, value)
        return
    assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DECODED) == 0  # hvf, emu: not decoded
    assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_SIZE) == 0
    mask = (1 << (8 * size)) - 1
    set_reg(vcpu, hv.HV_X86_RAX, reg(vcpu, hv.HV_X86_RAX) & ~mask | value)
    set_reg(vcpu, hv.HV_X86_RIP, reg(vcpu, hv.HV_X86_RIP) + length)
    if kind == "hvf-shim":
        # Behind the shim the access went to KVM, which decoded it and completes the instruction
        # itself on re-entry (a real framework leaves that to the VMM, as done above): hand the
        # shim's KVM the value the VMM emulated, so that the guest ends as on the framework.
        kvm_backend().hv_vmx_vcpu_write_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA, value)


def vmm_completes_write(vcpu: int, rip: int, length: int, size: int, data: int) -> None:
    """The VMM's answer to an exit-48 write of ``data`` (``size`` bytes) by the instruction of
    ``length`` bytes at ``rip``: drop it, go on."""
    kind = backend_kind()
    if kind == "kvm":
        assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DECODED) == 1
        assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_SIZE) == size
        assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA) == data
    else:
        assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DECODED) == 0  # hvf, emu: the VMM decodes
        assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA) == 0
    if kind in ("kvm", "hvf-shim"):
        # KVM emulates a decoded write completely before it exits: RIP is already past the
        # instruction (behind the shim too, whose exits are KVM's; a real framework stops at
        # the instruction, as emu does)
        assert reg(vcpu, hv.HV_X86_RIP) == rip + length
        return
    mmio_exit_at(vcpu, rip)
    set_reg(vcpu, hv.HV_X86_RIP, rip + length)


def test_write_to_read_only_page_exits_48(hv_vm: Vm) -> None:
    code = asm("mov word [0x3010], 0xabcd\nmov al, [0x3010]\nout 0x10, al\nhlt")
    vcpu = hv_vm.vcpu(code=code)
    hv_vm.mem.write(0x3010, b"\x11\x22")
    hv.hv_vm_protect(0x3000, 0x1000, hv.HV_MEMORY_READ | hv.HV_MEMORY_EXEC)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert qual & hv.EPT_VIOLATION_DATA_WRITE
    assert qual & hv.EPT_VIOLATION_GPA_READABLE
    assert not qual & hv.EPT_VIOLATION_GPA_WRITEABLE
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x3010
    assert hv_vm.mem.read(0x3010, 2) == b"\x11\x22"  # the write did not happen
    vmm_completes_write(vcpu, CODE, 6, 2, 0xABCD)  # c7 06 10 30 cd ab
    # the guest goes on and reads the old byte
    assert al_of_out(hv_vm, vcpu) == 0x11
    hv.hv_vm_protect(0x3000, 0x1000, RWX)


def test_unmapped_access_exits_48_and_vmm_supplies_the_value(hv_vm: Vm) -> None:
    code = asm("mov ax, 0x5000\nmov ds, ax\nmov al, [0x10]\nout 0x10, al\nhlt")  # GPA 0x50010
    vcpu = hv_vm.vcpu(code=code)
    assert RAM_SIZE <= 0x50010
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert qual & hv.EPT_VIOLATION_DATA_READ and not qual & hv.EPT_VIOLATION_DATA_WRITE
    assert not qual & (hv.EPT_VIOLATION_GPA_READABLE | hv.EPT_VIOLATION_GPA_WRITEABLE)
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x50010
    mmio_exit_at(vcpu, CODE + 5)
    vmm_completes_read(vcpu, 3, 0x5A)  # a0 10 00
    assert al_of_out(hv_vm, vcpu) == 0x5A


def test_map_unmap_and_protect_none(hv_vm: Vm) -> None:
    code = asm("again:\nmov ax, 0x5000\nmov ds, ax\nmov al, [0x10]\nout 0x10, al\njmp again")
    vcpu = hv_vm.vcpu(code=code)
    extra = GuestMemory(0x1000, base=0x50000)
    extra.write(0x50010, b"\x77")
    hv.hv_vm_map(extra.buf, 0x50000, 0x1000, RWX)
    assert al_of_out(hv_vm, vcpu) == 0x77
    hv.hv_vm_protect(0x50000, 0x1000, 0)  # no access at all
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x50010
    mmio_exit_at(vcpu, CODE + 5)
    vmm_completes_read(vcpu, 3, 0x01)
    assert al_of_out(hv_vm, vcpu) == 0x01
    hv.hv_vm_protect(0x50000, 0x1000, RWX)
    assert al_of_out(hv_vm, vcpu) == 0x77
    hv.hv_vm_unmap(0x50000, 0x1000)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x50010
    mmio_exit_at(vcpu, CODE + 5)
    vmm_completes_read(vcpu, 3, 0x02)
    assert al_of_out(hv_vm, vcpu) == 0x02


def test_address_spaces(hv_vm: Vm) -> None:
    """Space 1 holds the same RAM except the page at 0x3000: the vCPU sees the other page."""
    code = asm("again:\nmov al, [0x3000]\nout 0x10, al\njmp again")
    vcpu = hv_vm.vcpu(code=code)
    hv_vm.mem.write(0x3000, b"\xaa")
    other = GuestMemory(0x1000, base=0x3000)
    other.write(0x3000, b"\xbb")
    asid = hv.hv_vm_space_create()
    assert asid != hv.HV_VM_SPACE_DEFAULT
    ram = memoryview(hv_vm.mem.buf)
    hv.hv_vm_map_space(asid, ram[:0x3000], 0, 0x3000, RWX)
    hv.hv_vm_map_space(asid, other.buf, 0x3000, 0x1000, RWX)
    hv.hv_vm_map_space(asid, ram[0x4000:], 0x4000, RAM_SIZE - 0x4000, RWX)
    assert al_of_out(hv_vm, vcpu) == 0xAA
    set_reg(vcpu, hv.HV_X86_RBX, 0x1234_5678)
    hv.hv_vcpu_set_space(vcpu, asid)
    assert reg(vcpu, hv.HV_X86_RBX) == 0x1234_5678  # state moved along
    assert al_of_out(hv_vm, vcpu) == 0xBB
    with pytest.raises(hv.HvError) as err:
        hv.hv_vm_space_destroy(asid)
    assert err.value.code == hv.HV_BUSY
    # protect and unmap in the other space
    hv.hv_vm_protect_space(asid, 0x3000, 0x1000, 0)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x3000
    mmio_exit_at(vcpu, CODE)
    vmm_completes_read(vcpu, 3, 0xCC)  # a0 00 30
    assert al_of_out(hv_vm, vcpu) == 0xCC
    hv.hv_vm_unmap_space(asid, 0x3000, 0x1000)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    mmio_exit_at(vcpu, CODE)
    vmm_completes_read(vcpu, 3, 0xCD)
    assert al_of_out(hv_vm, vcpu) == 0xCD
    hv.hv_vcpu_set_space(vcpu, hv.HV_VM_SPACE_DEFAULT)
    assert al_of_out(hv_vm, vcpu) == 0xAA
    hv.hv_vm_space_destroy(asid)
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_set_space(vcpu, asid)
    assert err.value.code == hv.HV_BAD_ARGUMENT


# --- running: deadlines, kicks, threads ---------------------------------------------------------

SPIN = "spin: jmp spin"


def test_run_until_deadline(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm(SPIN))
    for wait_ms in (20, 60):
        start = time.monotonic_ns()
        hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(wait_ms * MS))
        elapsed = time.monotonic_ns() - start
        assert exit_reason(vcpu) == hv.VMX_REASON_VMX_TIMER_EXPIRED
        # returns at the deadline; the slack covers a loaded 2-CPU host scheduling the thread
        assert wait_ms * MS <= elapsed < (wait_ms + 250) * MS
    # a deadline already in the past returns at once
    hv.hv_vcpu_run_until(vcpu, hv.mach_absolute_time() - 1)
    assert exit_reason(vcpu) == hv.VMX_REASON_VMX_TIMER_EXPIRED
    numer, denom = hv.mach_timebase_info()
    assert numer > 0 and denom > 0


def test_run_until_forever_returns_only_for_real_exits(hv_vm: Vm) -> None:
    # ~30k iterations of an emulated loop: tens of ms, many host interrupts in between
    code = asm("mov ecx, 30000\nl: dec ecx\njnz l\nmov al, 3\nout 0x10, al\nhlt")
    vcpu = hv_vm.vcpu(code=code)
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    assert exit_reason(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_RCX) & 0xFFFF_FFFF == 0
    skip_instruction(vcpu)
    hv.hv_vcpu_run(vcpu)  # hv_vcpu_run returns on any exit, here the HLT
    assert exit_reason(vcpu) in (hv.VMX_REASON_HLT, hv.VMX_REASON_IRQ)


def test_interrupt_from_another_thread(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm(SPIN))
    timer = threading.Timer(0.05, hv.hv_vcpu_interrupt, args=([vcpu],))
    start = time.monotonic()
    timer.start()
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    elapsed = time.monotonic() - start
    timer.join()
    assert exit_reason(vcpu) == hv.VMX_REASON_IRQ
    assert 0.04 < elapsed < 2.0
    # the kick was consumed: the next run goes on until its deadline
    assert run(vcpu, 20 * MS) == hv.VMX_REASON_VMX_TIMER_EXPIRED


def test_interrupt_before_entry_is_not_lost(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm(SPIN))
    hv.hv_vcpu_interrupt(vcpu)
    start = time.monotonic()
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    assert exit_reason(vcpu) == hv.VMX_REASON_IRQ
    assert time.monotonic() - start < 0.5
    # from another thread, before entry
    thread = threading.Thread(target=hv.hv_vcpu_interrupt, args=([vcpu],))
    thread.start()
    thread.join()
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    assert exit_reason(vcpu) == hv.VMX_REASON_IRQ
    assert run(vcpu, 20 * MS) == hv.VMX_REASON_VMX_TIMER_EXPIRED


def test_interrupt_several_vcpus_in_one_call(hv_vm: Vm) -> None:
    hv_vm.mem.write(CODE, asm(SPIN))
    ids: list[int] = []
    reasons: dict[int, int] = {}
    errors: list[BaseException] = []
    ready = threading.Barrier(3)

    def vcpu_thread() -> None:
        try:
            vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
            from hvguest import setup_real_mode

            setup_real_mode(vcpu)
            ids.append(vcpu)
            ready.wait()
            hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(10_000 * MS))
            reasons[vcpu] = exit_reason(vcpu)
            hv.hv_vcpu_destroy(vcpu)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=vcpu_thread) for _ in range(2)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.05)  # both are inside the guest by now
    hv.hv_vcpu_interrupt(list(ids))
    for t in threads:
        t.join(5)
    assert not errors
    assert sorted(reasons) == sorted(ids) and len(ids) == 2
    assert set(reasons.values()) == {hv.VMX_REASON_IRQ}


def test_owner_thread_refusal(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm(SPIN))
    codes: dict[str, int] = {}

    def foreign() -> None:
        calls: dict[str, Callable[[], object]] = {
            "read_register": lambda: hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP),
            "write_register": lambda: hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, 1),
            "run_until": lambda: hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER),
            "read_vmcs": lambda: hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_RIP),
            "read_msr": lambda: hv.hv_vcpu_read_msr(vcpu, hv.MSR_IA32_SYSENTER_CS),
            "destroy": lambda: hv.hv_vcpu_destroy(vcpu),
        }
        for name, call in calls.items():
            try:
                call()
                codes[name] = 0
            except hv.HvError as exc:
                codes[name] = exc.code
        hv.hv_vcpu_interrupt([vcpu])  # the one call any thread may make

    thread = threading.Thread(target=foreign)
    thread.start()
    thread.join()
    assert codes and set(codes.values()) == {hv.HV_BAD_ARGUMENT}
    assert reg(vcpu, hv.HV_X86_RIP) == CODE  # still alive and ours
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    assert exit_reason(vcpu) == hv.VMX_REASON_IRQ


def test_exec_time_grows_while_the_guest_spins(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm(SPIN))
    before = hv.hv_vcpu_get_exec_time(vcpu)
    assert run(vcpu, 200 * MS) == hv.VMX_REASON_VMX_TIMER_EXPIRED
    after = hv.hv_vcpu_get_exec_time(vcpu)
    # time in the guest: up to the 200 ms (less on emu, which counts CPU time, on a loaded host)
    assert 1 * MS < after - before < 1000 * MS


# --- TLB, flush -----------------------------------------------------------------------------------


# 32-bit (non-PAE) paging is not in the list: on this host (kvm_pvm) a guest with CR0.PG and
# CR4.PAE clear triple-faults on its first instruction fetch.
@pytest.mark.parametrize("mode", ["long"])
def test_invalidate_tlb(hv_vm: Vm, mode: str) -> None:
    bits = 64 if mode == "long" else 32
    code = asm("again:\nmov al, [0x30000]\nout 0x10, al\njmp again", bits=bits)
    vcpu = hv_vm.vcpu(mode, code=code)
    hv_vm.mem.write(0x30000, b"\x01")
    hv_vm.mem.write(0x31000, b"\x02")
    assert al_of_out(hv_vm, vcpu) == 1
    # repoint the PTE of linear 0x30000 at physical 0x31000, behind the guest's back
    if mode == "long":
        hv_vm.mem.put64(pte_address(0x30000), 0x31000 | 0x7)
    else:
        hv_vm.mem.put32(PML4 + 0x1000 + 4 * 0x30, 0x31000 | 0x3)
    hv.hv_vcpu_invalidate_tlb(vcpu)
    assert al_of_out(hv_vm, vcpu) == 2


def test_flush_commits_cached_registers(hv_vm: Vm) -> None:
    from gdbstub.hv import kvm_abi
    from gdbstub.hv.posix import ioctl

    vcpu = hv_vm.vcpu()
    set_reg(vcpu, hv.HV_X86_RBX, 0xFEED_F00D)
    fd = kvm_backend()._vcpus[vcpu].fd  # skips on emu: no KVM vCPU, no cache
    regs = kvm_abi.KvmRegs()
    ioctl(fd, kvm_abi.KVM_GET_REGS, regs)
    assert regs.rbx != 0xFEED_F00D  # still only in the cache
    hv.hv_vcpu_flush(vcpu)  # hvf: through the shim's hv_vcpu_flush to its KVM
    ioctl(fd, kvm_abi.KVM_GET_REGS, regs)
    assert regs.rbx == 0xFEED_F00D


# --- TSC, MSRs ------------------------------------------------------------------------------------

RDTSC_OUT = "again:\nrdtsc\nout 0x10, al\njmp again"


def guest_tsc(vcpu: int) -> int:
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    value = (reg(vcpu, hv.HV_X86_RDX) & 0xFFFFFFFF) << 32 | reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF
    skip_instruction(vcpu)
    return value


def test_sync_tsc(hv_vm: Vm) -> None:
    code = asm(RDTSC_OUT)
    a = hv_vm.vcpu(code=code)
    b = hv_vm.vcpu(code=code)
    base = 1 << 50  # far beyond what a fresh vCPU's TSC reads
    for target in (base, base * 2):
        try:
            hv.hv_vm_sync_tsc(target)
        except hv.HvError as exc:
            # kvm_pvm runs the guest on the host TSC and ignores every way of offsetting it
            assert exc.code == hv.HV_UNSUPPORTED
            pytest.skip(f"this host's KVM cannot set the guest TSC ({backend_kind()})")
        tsc_a = guest_tsc(a)
        tsc_b = guest_tsc(b)
        # within a second of TSC ticks (< 10 GHz) of the value, and of each other
        assert target <= tsc_a < target + 10**10
        assert target <= tsc_b < target + 10**10
        assert abs(tsc_b - tsc_a) < 10**9
    assert hv.hv_vcpu_read_msr(a, hv.MSR_TSC) >= base * 2


def test_read_write_msr(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    for msr, value in (
        (hv.MSR_IA32_SYSENTER_CS, 0x10),
        (hv.MSR_IA32_SYSENTER_ESP, 0xFFFF_8000_1234_0000),
        (hv.MSR_KGSBASE, 0x7FFF_0000_1000),
        (hv.MSR_FSBASE, 0x1234_5000),
        (hv.MSR_LSTAR, 0xFFFF_8000_0000_1000),  # PAT is a VMCS field, no framework MSR
    ):
        hv.hv_vcpu_write_msr(vcpu, msr, value)
        assert hv.hv_vcpu_read_msr(vcpu, msr) == value


MSR_GUEST = """
    mov ecx, 0x174
    rdmsr
    mov [0x3000], eax
    mov [0x3004], edx
    mov eax, 0x2468
    xor edx, edx
    wrmsr
    hlt
"""


def test_msr_default_exits_31_32(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm(MSR_GUEST))
    hv.hv_vcpu_write_msr(vcpu, hv.MSR_IA32_SYSENTER_CS, 0x99)
    assert run_to_exit(vcpu) == hv.VMX_REASON_RDMSR
    rip = reg(vcpu, hv.HV_X86_RIP)
    assert hv_vm.mem.read(rip, 2) == b"\x0f\x32"  # RIP at the RDMSR
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2
    assert reg(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF == hv.MSR_IA32_SYSENTER_CS
    set_reg(vcpu, hv.HV_X86_RAX, 0xCAFE)
    set_reg(vcpu, hv.HV_X86_RDX, 0xBEEF)
    set_reg(vcpu, hv.HV_X86_RIP, rip + 2)
    assert run_to_exit(vcpu) == hv.VMX_REASON_WRMSR
    wrip = reg(vcpu, hv.HV_X86_RIP)
    assert hv_vm.mem.read(wrip, 2) == b"\x0f\x30"
    assert reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF == 0x2468
    set_reg(vcpu, hv.HV_X86_RIP, wrip + 2)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_RIP) == wrip + 2  # RIP advanced exactly once per instruction
    assert hv_vm.mem.u32(0x3000) == 0xCAFE and hv_vm.mem.u32(0x3004) == 0xBEEF
    assert hv.hv_vcpu_read_msr(vcpu, hv.MSR_IA32_SYSENTER_CS) == 0x99  # the WRMSR was not done


def test_msr_native(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm(MSR_GUEST))
    hv.hv_vcpu_write_msr(vcpu, hv.MSR_IA32_SYSENTER_CS, 0x77)
    hv.hv_vcpu_enable_native_msr(vcpu, hv.MSR_IA32_SYSENTER_CS, True)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert hv_vm.mem.u32(0x3000) == 0x77
    assert hv.hv_vcpu_read_msr(vcpu, hv.MSR_IA32_SYSENTER_CS) == 0x2468
    # and taken back
    hv.hv_vcpu_enable_native_msr(vcpu, hv.MSR_IA32_SYSENTER_CS, False)
    set_reg(vcpu, hv.HV_X86_RIP, CODE)
    assert run_to_exit(vcpu) == hv.VMX_REASON_RDMSR


def test_msr_managed_read_only(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm(MSR_GUEST))
    hv.hv_vcpu_write_msr(vcpu, hv.MSR_IA32_SYSENTER_CS, 0x55)
    hv.hv_vcpu_enable_managed_msr(vcpu, hv.MSR_IA32_SYSENTER_CS, True)
    hv.hv_vcpu_set_msr_access(vcpu, hv.MSR_IA32_SYSENTER_CS, hv.HV_MSR_READ)
    assert run_to_exit(vcpu) == hv.VMX_REASON_WRMSR  # the read went through natively
    assert hv_vm.mem.u32(0x3000) == 0x55
    skip_instruction(vcpu)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert hv.hv_vcpu_read_msr(vcpu, hv.MSR_IA32_SYSENTER_CS) == 0x55


# --- fpstate --------------------------------------------------------------------------------------

XMM = 160
YMM_HI = 576


def vex() -> bool:
    """Whether the guest can execute VEX-encoded (AVX) instructions: not on emu, whose
    unicorn 2 (QEMU 5.0's TCG) has none; its YMM state is reached through the XSAVE image."""
    return backend_kind() != "emu"


def test_fpstate_guest_to_host(hv_vm: Vm) -> None:
    ymm5 = "vmovdqu ymm5, [rel d2]" if vex() else "movdqu xmm5, [rel d2]"
    code = asm(
        f"""
        movdqu xmm3, [rel d1]
        {ymm5}
        out 0x10, al
        align 32
    d1: db 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    d2: times 16 db 0x22
        times 16 db 0x33
        """,
        bits=64,
    )
    vcpu = hv_vm.vcpu("user64", code=code)  # CPL3: native on kvm, AVX available
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 0x7)
    image = bytearray(4096)
    if not vex():
        # the upper half of YMM5 from the host; a legacy-SSE write to XMM5 keeps it
        hv.hv_vcpu_read_fpstate(vcpu, image)
        image[YMM_HI + 16 * 5 : YMM_HI + 16 * 6] = b"\x33" * 16
        image[512] |= 0x6
        hv.hv_vcpu_write_fpstate(vcpu, image)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    hv.hv_vcpu_read_fpstate(vcpu, image)
    assert image[XMM + 16 * 3 : XMM + 16 * 4] == bytes(range(16))
    assert image[XMM + 16 * 5 : XMM + 16 * 6] == b"\x22" * 16
    assert image[YMM_HI + 16 * 5 : YMM_HI + 16 * 6] == b"\x33" * 16


def test_fpstate_host_to_guest(hv_vm: Vm) -> None:
    ymm2 = "vmovdqu [abs 0x3020], ymm2" if vex() else "movdqu [abs 0x3020], xmm2"
    code = asm(f"movdqu [abs 0x3000], xmm7\n{ymm2}\nout 0x10, al", bits=64)
    vcpu = hv_vm.vcpu("user64", code=code)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 0x7)
    image = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, image)
    image[XMM + 16 * 7 : XMM + 16 * 8] = bytes(range(0x40, 0x50))
    image[XMM + 16 * 2 : XMM + 16 * 3] = b"\x5a" * 16
    image[YMM_HI + 16 * 2 : YMM_HI + 16 * 3] = b"\xa5" * 16
    image[512] |= 0x6  # XSTATE_BV: SSE and AVX state present in the image
    hv.hv_vcpu_write_fpstate(vcpu, image)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert hv_vm.mem.read(0x3000, 16) == bytes(range(0x40, 0x50))
    if vex():
        assert hv_vm.mem.read(0x3020, 32) == b"\x5a" * 16 + b"\xa5" * 16
    else:  # the guest stores XMM2; the upper half is still in the vCPU's state
        assert hv_vm.mem.read(0x3020, 16) == b"\x5a" * 16
        again = bytearray(4096)
        hv.hv_vcpu_read_fpstate(vcpu, again)
        assert again[YMM_HI + 16 * 2 : YMM_HI + 16 * 3] == b"\xa5" * 16


def test_fpstate_size(hv_vm: Vm) -> None:
    """The image is as large as the XSAVE area of the enabled features: kvm sizes it from the
    host's CPUID (512 + 64 header, + 256 for AVX when the host shows AVX to guests), emu has
    x87, SSE and AVX (832); a smaller buffer is refused, a larger one accepted."""
    vcpu = hv_vm.vcpu()
    if backend_kind() == "emu":
        from gdbstub.hv import emu

        size = emu._XSAVE_SIZE
        assert size == 832
    else:  # kvm, and the KVM behind the hvf shim
        size = kvm_backend()._xsave_size
        assert size in (576, 832) or size > 832
    for length in (4096, size):
        hv.hv_vcpu_read_fpstate(vcpu, bytearray(length))
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_read_fpstate(vcpu, bytearray(size - 64))
    assert err.value.code == hv.HV_BAD_ARGUMENT


# --- VMCS: exceptions, MTF, triple fault, injection -----------------------------------------------


def test_hardware_breakpoint_exit_0_vector_1(hv_vm: Vm) -> None:
    code = asm("nop\nnop\ntarget: mov al, 1\nout 0x10, al\nhlt")
    vcpu = hv_vm.vcpu(code=code)
    target = CODE + 2
    set_reg(vcpu, hv.HV_X86_DR0, target)
    set_reg(vcpu, hv.HV_X86_DR7, 0x1)  # L0, execute, length 1
    set_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_DB)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EXC_NMI
    info = vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO)
    assert info & hv.IRQ_INFO_VALID and info & 0xFF == hv.IDT_DB
    assert info & hv.IRQ_INFO_TYPE_MASK == hv.IRQ_INFO_HARD_EXC
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & hv.DR6_B0
    assert reg(vcpu, hv.HV_X86_RIP) == target
    set_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 0)
    set_reg(vcpu, hv.HV_X86_DR7, 0)
    assert al_of_out(hv_vm, vcpu) == 1


def test_mtf_single_step(hv_vm: Vm) -> None:
    code = asm("inc ax\ninc ax\nmov bx, 5\ninc ax\nhlt")
    vcpu = hv_vm.vcpu(code=code)
    set_reg(vcpu, hv.HV_X86_RAX, 0)
    cpu = vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    set_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, cpu | hv.CPU_BASED_MTF)
    rips = []
    for _ in range(3):
        assert run_to_exit(vcpu) == hv.VMX_REASON_MTF
        rips.append(reg(vcpu, hv.HV_X86_RIP))
    assert rips == [CODE + 1, CODE + 2, CODE + 5]
    assert reg(vcpu, hv.HV_X86_RAX) == 2 and reg(vcpu, hv.HV_X86_RBX) & 0xFFFF == 5
    set_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, cpu)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_RAX) == 3


def test_triple_fault(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu("protected", code=asm("ud2", bits=32))
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_LIMIT, 0)  # no IDT: #UD -> #GP -> #DF -> shutdown
    assert run_to_exit(vcpu) == hv.VMX_REASON_TRIPLE_FAULT


def test_inject_exception_real_mode(hv_vm: Vm) -> None:
    """Entry interruption info: a #UD delivered through the real-mode IVT runs the handler."""
    code = asm(f"{SPIN}\nalign 16\nhandler: mov al, 0x66\nout 0x10, al\nhlt")
    vcpu = hv_vm.vcpu(code=code)
    handler = CODE + 16
    hv_vm.mem.write(4 * hv.IDT_UD, struct.pack("<HH", handler, 0))
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_HARD_EXC | 6)
    assert al_of_out(hv_vm, vcpu) == 0x66
    # the IRET frame points at the spin loop
    sp = reg(vcpu, hv.HV_X86_RSP) & 0xFFFF
    assert hv_vm.mem.u16(sp) == CODE


def test_inject_software_interrupt_protected_mode(hv_vm: Vm) -> None:
    code = asm(f"{SPIN}\nalign 16\nhandler: mov al, 0x40\nout 0x10, al\nhlt", bits=32)
    vcpu = hv_vm.vcpu("protected", code=code)
    handler = CODE + 16
    from hvguest import IDT

    gate = (handler & 0xFFFF) | 0x08 << 16 | (0x8E00 << 32) | ((handler >> 16) << 48)
    hv_vm.mem.put64(IDT + 8 * 0x20, gate)
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_SOFT_IRQ | 0x20)
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_INSTR_LEN, 2)
    assert al_of_out(hv_vm, vcpu) == 0x40
    assert hv_vm.mem.u32(reg(vcpu, hv.HV_X86_RSP)) == CODE + 2  # return after an INT n


# --- #BP: INT3 intercepted, delivered to the guest, re-injected ---------------------------------

BP_INFO = hv.IRQ_INFO_VALID | hv.IRQ_INFO_SOFT_EXC | hv.IDT_BP


def idt64_gate(vm: Vm, vector: int, handler: int) -> None:
    """A 64-bit interrupt gate (CS 0x18, DPL 0) for ``vector`` in the IDT of setup_long_mode."""
    from hvguest import IDT

    low = (handler & 0xFFFF) | 0x18 << 16 | 0x8E00 << 32 | ((handler >> 16) & 0xFFFF) << 48
    vm.mem.write(IDT + 16 * vector, struct.pack("<QQ", low, handler >> 32))


# The handler counts its runs in RBX and keeps the return address it found on its stack in RCX.
BP_HANDLER = "align 16\nhandler: mov rcx, [rsp]\ninc rbx\niretq"


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_int3_with_bp_in_the_exception_bitmap_exits_0_vector_3(hv_vm: Vm, mode: str) -> None:
    """As VMX reports an intercepted #BP: exit 0, soft exception 3, length 1, RIP at the INT3."""
    vcpu = hv_vm.vcpu(mode, code=asm("nop\nint3\nhlt", bits=32 if mode == "protected" else 64))
    set_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EXC_NMI
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO) == BP_INFO
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 1
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 1
    # a debugger steps over its breakpoint by moving RIP: the vCPU goes on
    skip_instruction(vcpu)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 2


def test_guest_int3_runs_its_idt_handler(hv_vm: Vm) -> None:
    """Without #BP in the bitmap the guest's own INT3 goes through its IDT (64-bit, CPL0,
    interrupt gate) and the handler returns to the instruction after the INT3."""
    vcpu = hv_vm.vcpu("long", code=asm(f"int3\nmov rdx, 7\nhlt\n{BP_HANDLER}", bits=64))
    handler = CODE + 16
    idt64_gate(hv_vm, hv.IDT_BP, handler)
    set_reg(vcpu, hv.HV_X86_RBX, 0)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_RBX) == 1
    assert reg(vcpu, hv.HV_X86_RCX) == CODE + 1  # the pushed return address
    assert reg(vcpu, hv.HV_X86_RDX) == 7
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 6  # at the HLT (int3; mov edx, 7)


def test_int3_reinjected_by_the_vmm_runs_the_guest_handler(hv_vm: Vm) -> None:
    """The VMM's answer to an intercepted #BP that is the guest's own: entry interruption
    info soft exception 3, instruction length 1, RIP left at the INT3."""
    vcpu = hv_vm.vcpu("long", code=asm(f"int3\nmov rdx, 7\nhlt\n{BP_HANDLER}", bits=64))
    idt64_gate(hv_vm, hv.IDT_BP, CODE + 16)
    set_reg(vcpu, hv.HV_X86_RBX, 0)
    set_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EXC_NMI
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO) == BP_INFO
    assert reg(vcpu, hv.HV_X86_RIP) == CODE
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, BP_INFO)
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_INSTR_LEN, 1)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT  # injected events are not intercepted
    assert reg(vcpu, hv.HV_X86_RBX) == 1
    assert reg(vcpu, hv.HV_X86_RCX) == CODE + 1
    assert reg(vcpu, hv.HV_X86_RDX) == 7


@pytest.mark.parametrize("vector", [3, 0x20])
def test_guest_int_n_is_a_software_interrupt(hv_vm: Vm, vector: int) -> None:
    """INT n (also INT 3, CD 03) goes to the guest's handler even with #BP in the bitmap:
    the exception bitmap applies to exceptions, INT n is a software interrupt."""
    code = asm(f"int {vector}\nmov rdx, 7\nhlt\n{BP_HANDLER}", bits=64)
    vcpu = hv_vm.vcpu("long", code=code)
    idt64_gate(hv_vm, vector, CODE + 16)
    set_reg(vcpu, hv.HV_X86_RBX, 0)
    set_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_RBX) == 1
    assert reg(vcpu, hv.HV_X86_RCX) == CODE + 2
    assert reg(vcpu, hv.HV_X86_RDX) == 7


def test_xgetbv_reads_xcr0(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu("long", code=asm("xor ecx, ecx\nxgetbv\nhlt", bits=64))
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 3)
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF == 3 and reg(vcpu, hv.HV_X86_RDX) == 0
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5


# --- VMCS: guest-state read-back ------------------------------------------------------------------


def refetch(vcpu: int) -> None:
    """Commit the register cache and forget it, so the next read comes from the vCPU itself:
    from KVM on kvm and behind the hvf shim (the shim's KvmBackend keeps the cache there); on
    emu every register lives in the unicorn CPU state, there is no cache to forget."""
    hv.hv_vcpu_flush(vcpu)
    if backend_kind() == "emu":
        return
    kvm = kvm_backend()
    kvm._invalidate(kvm._vcpus[vcpu])


def test_vmcs_guest_fields_read_back(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu("long")
    values = {
        hv.VMCS_GUEST_FS: 0x2B,
        hv.VMCS_GUEST_FS_BASE: 0x7FFF_1234_0000,
        hv.VMCS_GUEST_FS_LIMIT: 0xFFFF,
        hv.VMCS_GUEST_FS_AR: 0xC0F3,
        hv.VMCS_GUEST_GS_BASE: 0xFFFF_8000_0000_1000,
        hv.VMCS_GUEST_ES: 0x10,
        hv.VMCS_GUEST_DS_LIMIT: 0xFFFFF,
        hv.VMCS_GUEST_LDTR_AR: 0x10082,
        hv.VMCS_GUEST_TR_BASE: 0x9000,
        hv.VMCS_GUEST_TR_LIMIT: 0x67,
        hv.VMCS_GUEST_GDTR_BASE: 0x500,
        hv.VMCS_GUEST_GDTR_LIMIT: 0x37,
        hv.VMCS_GUEST_IDTR_BASE: 0x600,
        hv.VMCS_GUEST_IDTR_LIMIT: 0x1FF,
        hv.VMCS_GUEST_CR3: 0x11000,
        hv.VMCS_GUEST_CR4: 0x20 | 0x200 | 0x400,
        hv.VMCS_GUEST_CR0: 0x80000031,
        hv.VMCS_GUEST_IA32_EFER: hv.EFER_LME | hv.EFER_LMA | hv.EFER_SCE,
        hv.VMCS_GUEST_IA32_PAT: 0x0007_0406_0007_0406,
        hv.VMCS_GUEST_IA32_SYSENTER_CS: 0x18,
        hv.VMCS_GUEST_SYSENTER_ESP: 0x8000,
        hv.VMCS_GUEST_SYSENTER_EIP: 0x1234,
        hv.VMCS_GUEST_RIP: 0x1008,
        hv.VMCS_GUEST_RSP: 0x7FF0,
        hv.VMCS_GUEST_RFLAGS: 0x202,
        hv.VMCS_GUEST_DR7: 0x401,
        hv.VMCS_GUEST_INTERRUPTIBILITY: hv.GUEST_INTRBILITY_STI_BLOCKING,
        hv.VMCS_GUEST_ACTIVITY_STATE: hv.GUEST_ACTIVITY_ACTIVE,
    }
    for fld, value in values.items():
        set_vmcs(vcpu, fld, value)
    refetch(vcpu)
    got = {fld: vmcs(vcpu, fld) for fld in values}
    assert got == values
    set_vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY, 0)
    refetch(vcpu)
    assert vmcs(vcpu, hv.VMCS_GUEST_INTERRUPTIBILITY) == 0
    # the register view agrees
    assert reg(vcpu, hv.HV_X86_FS) == 0x2B and reg(vcpu, hv.HV_X86_CR3) == 0x11000
    assert hv.hv_vcpu_read_msr(vcpu, hv.MSR_FSBASE) == 0x7FFF_1234_0000


def test_vmcs_unsupported_and_unknown_fields(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu()
    with pytest.raises(hv.HvError) as err:
        vmcs(vcpu, hv.VMCS_CTRL_EPTP)
    assert err.value.code == hv.HV_UNSUPPORTED and "VMCS_CTRL_EPTP" in str(err.value)
    with pytest.raises(hv.HvError) as err:
        set_vmcs(vcpu, hv.VMCS_CTRL_TSC_OFFSET, 0)
    assert err.value.code == hv.HV_UNSUPPORTED and "VMCS_CTRL_TSC_OFFSET" in str(err.value)
    for fld in (0x1234, 0xFFFF_FFFF):
        with pytest.raises(hv.HvError) as err:
            vmcs(vcpu, fld)
        assert err.value.code == hv.HV_BAD_ARGUMENT


def test_vmx_capabilities_and_cap2ctrl() -> None:
    proc = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_PROCBASED)
    must, may = proc & 0xFFFFFFFF, proc >> 32
    assert must & ~may == 0
    for bit in (hv.CPU_BASED_HLT, hv.CPU_BASED_MTF, hv.CPU_BASED_IRQ_WND):
        assert may & bit
    ctrl = hv.cap2ctrl(proc, hv.CPU_BASED_HLT | hv.CPU_BASED_MTF)
    assert ctrl & must == must and ctrl & hv.CPU_BASED_HLT and ctrl & hv.CPU_BASED_MTF
    assert hv.cap2ctrl(proc, 1 << 63 | ~may & 0xFFFFFFFF) & ~may == 0
    for cap in (hv.HV_VMX_CAP_PINBASED, hv.HV_VMX_CAP_PROCBASED2, hv.HV_VMX_CAP_ENTRY,
                hv.HV_VMX_CAP_EXIT):  # fmt: skip
        value = hv.hv_vmx_read_capability(cap)
        assert value & 0xFFFFFFFF & ~(value >> 32) == 0
    assert hv.hv_vmx_read_capability(hv.HV_VMX_CAP_CR0_FIXED0) & 0x21


def test_interrupt_window_exit(hv_vm: Vm) -> None:
    code = asm("cli\nnop\nsti\nspin: jmp spin")
    vcpu = hv_vm.vcpu(code=code)
    cpu = vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    set_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, cpu | hv.CPU_BASED_IRQ_WND)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IRQ_WND
    assert reg(vcpu, hv.HV_X86_RFLAGS) & 0x200
    set_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, cpu)


def test_guest_memory_helper_is_shared_with_the_guest(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu(code=asm("mov byte [0x3000], 0x42\nhlt"))
    assert run_to_exit(vcpu) == hv.VMX_REASON_HLT
    assert hv_vm.mem.u8(0x3000) == 0x42


# --- registers: hypothesis round trips through KVM ------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

U64 = st.integers(0, (1 << 64) - 1)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
CANONICAL = st.one_of(
    st.integers(0, (1 << 47) - 1), st.integers((1 << 64) - (1 << 47), (1 << 64) - 1)
)
SEG_AR = st.builds(
    lambda t, s, dpl, p, avl, lng, db, g: t | s << 4 | dpl << 5 | p << 7 | avl << 12 | lng << 13
    | db << 14 | g << 15,
    st.integers(0, 15), st.integers(0, 1), st.integers(0, 3), st.just(1), st.integers(0, 1),
    st.just(0), st.integers(0, 1), st.integers(0, 1),
)  # fmt: skip

REGISTER_VALUES: dict[int, st.SearchStrategy[int]] = {
    **{r: U64 for r in range(hv.HV_X86_RAX, hv.HV_X86_R15 + 1)},
    hv.HV_X86_RIP: U64,
    hv.HV_X86_RFLAGS: st.integers(0, 0x3F_FFFF).map(lambda f: (f & 0x254FD7) | 2),
    **{r: U16 for r in range(hv.HV_X86_CS, hv.HV_X86_GS + 1)},
    hv.HV_X86_LDTR: U16,
    hv.HV_X86_TR: U16,
    hv.HV_X86_IDT_BASE: CANONICAL,
    hv.HV_X86_IDT_LIMIT: U16,
    hv.HV_X86_GDT_BASE: CANONICAL,
    hv.HV_X86_GDT_LIMIT: U16,
    hv.HV_X86_LDT_BASE: CANONICAL,
    hv.HV_X86_LDT_LIMIT: U32,
    hv.HV_X86_LDT_AR: st.integers(0, 1).map(lambda u: 0x82 | u << 16),
    hv.HV_X86_TSS_BASE: CANONICAL,
    hv.HV_X86_TSS_LIMIT: U32,
    hv.HV_X86_TSS_AR: SEG_AR.map(lambda ar: (ar & ~0x1F) | 0x8B),
    hv.HV_X86_CR0: st.sampled_from([0x10, 0x30, 0x11, 0x31, 0x60000030, 0x80000031, 0x80050033]),
    hv.HV_X86_CR2: U64,
    hv.HV_X86_CR3: st.integers(0, (1 << 40) - 1).map(lambda v: v & ~0xFFF),
    hv.HV_X86_CR4: st.sampled_from([0, 0x20, 0x620, 0x40620, 0x6A0]),
    **{r: CANONICAL for r in range(hv.HV_X86_DR0, hv.HV_X86_DR3 + 1)},
    hv.HV_X86_DR6: st.sampled_from([0xFFFF0FF0, 0xFFFF4FF1, 0xFFFF0FFF]),
    hv.HV_X86_DR7: st.integers(0, 0xFFFF_FFFF).map(lambda v: (v & 0xFFFF23FF) | 0x400),
    hv.HV_X86_TPR: st.integers(0, 15).map(lambda v: v << 4),
    hv.HV_X86_XCR0: st.sampled_from([0x1, 0x3, 0x7]),
}


def test_every_register_has_a_strategy() -> None:
    listed = set(REGISTER_VALUES) | {hv.HV_X86_CR1, hv.HV_X86_DR4, hv.HV_X86_DR5}
    assert listed == set(range(hv.HV_X86_REGISTERS_MAX))


@settings(
    max_examples=25,
    deadline=None,
    # hv_backend only selects the backend: examples may share it
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(values=st.fixed_dictionaries(REGISTER_VALUES))
def test_register_round_trip(values: dict[int, int]) -> None:
    """Write every hv_x86_reg_t, commit to KVM, forget the cache, read back from KVM."""
    hv.hv_vm_create(hv.HV_VM_DEFAULT)
    vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
    try:
        # CR4/EFER first so that CR0.PG values are consistent (long mode needs PAE and LME)
        cr0, cr4 = values[hv.HV_X86_CR0], values[hv.HV_X86_CR4]
        if cr0 & 0x8000_0000:
            cr4 |= 0x20
            hv.hv_vcpu_write_msr(vcpu, hv.MSR_EFER, hv.EFER_LME | hv.EFER_LMA)
        expected = dict(values)
        expected[hv.HV_X86_CR4] = cr4
        for r, value in expected.items():
            hv.hv_vcpu_write_register(vcpu, r, value)
        refetch(vcpu)
        got = {r: hv.hv_vcpu_read_register(vcpu, r) for r in expected}
        assert got == expected
        # DR4/DR5 alias DR6/DR7; CR1 reads as 0
        assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_DR4) == expected[hv.HV_X86_DR6]
        assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_DR5) == expected[hv.HV_X86_DR7]
        assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_CR1) == 0
    finally:
        hv.hv_vcpu_destroy(vcpu)
        hv.hv_vm_destroy()
