"""Instructions this host's KVM cannot emulate in guest kernel code, completed in software.

On kvm_pvm, CPL0 code runs in KVM's instruction emulator, which lacks IRET in protected
mode, POPCNT, CRC32, FWAIT and x87 arithmetic, SSE arithmetic, XSAVE/XRSTOR, CMPXCHG16B and
RDTSCP. The KVM backend completes them (gdbstub/hv/kvm_complete.py, kvm_softcpu.py). Each
test runs a tiny CPL0 guest that executes such instructions and checks the architectural
result, on kvm and on emu (the same guests as a cross-check of what a CPU does).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hvguest import (
    CODE,
    GDT,
    IDT,
    STACK,
    Vm,
    asm,
    kvm_backend,
    new_vm,
    pte_address,
    reg,
    run_to_exit,
    set_reg,
    set_vmcs,
    tear_down,
    vmcs,
)

from gdbstub import hv
from gdbstub.hv import kvm_softcpu, kvm_xsave

BACKENDS = [name for name in ("kvm", "emu") if name in hv.available_backends()]
PVM = os.path.exists("/sys/module/kvm_pvm")
DATA = 0x20000  # scratch data (RAM is 256 KiB at GPA 0)
XMM, MXCSR = 160, 24  # offsets in the XSAVE image
HANDLER = CODE + 0x100


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


def run_to_hlt(vcpu: int) -> None:
    reason = run_to_exit(vcpu)
    rip = reg(vcpu, hv.HV_X86_RIP)
    assert reason == hv.VMX_REASON_HLT, f"exit {reason:#x} at rip {rip:#x}"


def gate32(vm: Vm, vector: int, handler: int) -> None:
    """A 32-bit interrupt gate (CS 0x08, DPL 0) in the IDT of the protected-mode setup."""
    low = (handler & 0xFFFF) | 0x08 << 16 | 0x8E00 << 32 | (handler >> 16) << 48
    vm.mem.put64(IDT + 8 * vector, low)


def gate64(vm: Vm, vector: int, handler: int) -> None:
    """A 64-bit interrupt gate (CS 0x18, DPL 0) in the IDT of the long-mode setup."""
    low = (handler & 0xFFFF) | 0x18 << 16 | 0x8E00 << 32 | ((handler >> 16) & 0xFFFF) << 48
    vm.mem.write(IDT + 16 * vector, struct.pack("<QQ", low, handler >> 32))


def check_completed_in_software(vcpu: int) -> None:
    """On kvm_pvm, the KVM backend's software CPU must have run an instruction for this vCPU
    (the test would prove nothing otherwise); elsewhere there is nothing to check."""
    if hv.backend_name() == "kvm" and PVM:
        assert kvm_backend()._vcpus[vcpu].soft is not None


# --- IRET -----------------------------------------------------------------------------------


def test_iret_in_protected_mode_returns_from_an_injected_interrupt(vm: Vm) -> None:
    """The VMM injects an external interrupt; the handler returns with IRETD (what failed in
    the PC test kernel): EIP, EFLAGS (IF) and ESP come back from the frame."""
    main = asm("mov edx, 7\nhlt", bits=32)
    vcpu = vm.vcpu("protected", code=main)
    handler = "inc ebx\nmov esi, [esp]\nmov edi, [esp + 8]\niretd"
    vm.mem.write(HANDLER, asm(handler, bits=32, org=HANDLER))
    gate32(vm, 0x30, HANDLER)
    set_reg(vcpu, hv.HV_X86_RFLAGS, 0x202)
    set_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_EXT_IRQ | 0x30)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RBX) == 1
    assert reg(vcpu, hv.HV_X86_RSI) == CODE  # the interrupted instruction
    assert reg(vcpu, hv.HV_X86_RDI) & 0x200  # IF as it was
    assert reg(vcpu, hv.HV_X86_RDX) == 7
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5
    assert reg(vcpu, hv.HV_X86_RSP) == STACK
    assert reg(vcpu, hv.HV_X86_RFLAGS) & 0x200
    check_completed_in_software(vcpu)


def test_iret_in_protected_mode_restores_flags_from_a_built_frame(vm: Vm) -> None:
    """IRETD through a frame built by hand: CF, ZF, DF, OF and IOPL come from the frame."""
    code = asm(
        """
        push 0x3ed3         ; IOPL 3, OF, DF, ZF, CF (and bit 1, AF, TF off)
        push 0x08
        push target
        iretd
        hlt
    target:
        pushfd
        pop ecx
        cld
        hlt
        """,
        bits=32,
    )
    vcpu = vm.vcpu("protected", code=code)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RCX) & 0xFFFF == 0x3ED3 & ~0x100 | 0x2  # TF was clear
    assert reg(vcpu, hv.HV_X86_RSP) == STACK
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + code.index(b"\xfc\xf4") + 1


def test_iret_in_protected_mode_to_ring_3_pops_ss_esp(vm: Vm) -> None:
    """IRETD to CPL3: CS, EIP, EFLAGS, then ESP and SS from the frame; DS and ES (DPL0 data)
    become null, as the CPU does on a return to an outer level."""
    code = asm(
        """
        push 0x2b           ; SS: user data, RPL 3
        push 0x7000         ; ESP
        push 0x3002         ; EFLAGS: IOPL 3, so ring 3 may use OUT
        push 0x3b           ; CS: 32-bit user code, RPL 3
        push user
        iretd
    user:
        mov ecx, esp
        out 0x10, al
        """,
        bits=32,
    )
    vcpu = vm.vcpu("protected", code=code)
    vm.mem.put64(GDT + 0x38, 0x00CFFB000000FFFF)  # 32-bit code, DPL 3
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_LIMIT, 0x3F)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_RCX) == 0x7000
    assert reg(vcpu, hv.HV_X86_CS) == 0x3B and reg(vcpu, hv.HV_X86_SS) == 0x2B
    assert vmcs(vcpu, hv.VMCS_GUEST_SS_AR) >> 5 & 3 == 3  # CPL 3
    assert reg(vcpu, hv.HV_X86_DS) == 0 and reg(vcpu, hv.HV_X86_ES) == 0
    assert reg(vcpu, hv.HV_X86_RFLAGS) & 0x3000 == 0x3000


def test_iretq_in_long_mode(vm: Vm) -> None:
    """IRETQ at the same level pops SS:RSP too (64-bit mode always does)."""
    code = asm(
        """
        mov rax, 0x7000
        push 0x10
        push rax
        push 0x203          ; IF, CF
        push 0x18
        lea rax, [rel target]
        push rax
        iretq
        hlt
    target:
        pushfq
        pop rcx
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RCX) & 0xFFF == 0x203
    assert reg(vcpu, hv.HV_X86_RSP) == 0x7000


# --- general-purpose instructions -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_popcnt(vm: Vm, mode: str) -> None:
    """POPCNT counts bits and sets ZF only for a zero source (CF, OF... cleared)."""
    pushf, dx, si = ("pushfd", "edx", "esi") if mode == "protected" else ("pushfq", "rdx", "rsi")
    code = asm(
        f"""
        mov eax, 0xf0f1
        stc
        popcnt ebx, eax
        {pushf}
        pop {dx}
        xor eax, eax
        popcnt ecx, eax
        {pushf}
        pop {si}
        hlt
        """,
        bits=32 if mode == "protected" else 64,
    )
    vcpu = vm.vcpu(mode, code=code)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RBX) == 9
    assert reg(vcpu, hv.HV_X86_RDX) & 0x8D5 == 0  # CF, PF, AF, ZF, SF, OF clear
    assert reg(vcpu, hv.HV_X86_RCX) == 0
    assert reg(vcpu, hv.HV_X86_RSI) & 0x8D5 == 0x40  # only ZF
    check_completed_in_software(vcpu)


def test_popcnt_64_bit_and_memory_operand(vm: Vm) -> None:
    vm.mem.put64(DATA, 0xFFFF_0000_0000_0F0F)
    code = asm(f"popcnt rax, [{DATA}]\nhlt", bits=64)
    vcpu = vm.vcpu("long", code=code)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RAX) == 24


def test_lock_cmpxchg16b(vm: Vm) -> None:
    """Equal: the memory takes RCX:RBX and ZF is set. Different: RDX:RAX takes the memory."""
    vm.mem.write(DATA, struct.pack("<QQ", 0x1111, 0x2222))
    vm.mem.write(DATA + 16, struct.pack("<QQ", 0x5555, 0x6666))
    code = asm(
        f"""
        mov rsi, {DATA}
        mov rax, 0x1111
        mov rdx, 0x2222
        mov rbx, 0x3333
        mov rcx, 0x4444
        lock cmpxchg16b [rsi]
        setz r8b
        lock cmpxchg16b [rsi + 16]
        setz r9b
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    run_to_hlt(vcpu)
    assert struct.unpack("<QQ", vm.mem.read(DATA, 16)) == (0x3333, 0x4444)
    assert reg(vcpu, hv.HV_X86_R8) & 0xFF == 1
    assert struct.unpack("<QQ", vm.mem.read(DATA + 16, 16)) == (0x5555, 0x6666)
    assert reg(vcpu, hv.HV_X86_R9) & 0xFF == 0
    assert (reg(vcpu, hv.HV_X86_RAX), reg(vcpu, hv.HV_X86_RDX)) == (0x5555, 0x6666)


def test_crc32(vm: Vm) -> None:
    """CRC32C of the bytes "123456789" is 0xe3069283."""
    vm.mem.write(DATA, b"123456789")
    code = asm(
        f"""
        mov eax, 0xffffffff
        mov rsi, {DATA}
        mov ecx, 9
    next:
        crc32 eax, byte [rsi]
        inc rsi
        dec ecx
        jnz next
        not eax
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RAX) == 0xE3069283


def test_rdtscp_reads_the_guest_tsc_and_tsc_aux(vm: Vm) -> None:
    code = asm("rdtsc\nmov r8, rax\nmov r9, rdx\nrdtscp\nhlt", bits=64)
    vcpu = vm.vcpu("long", code=code)
    hv.hv_vcpu_write_msr(vcpu, 0xC0000103, 0x1234)  # IA32_TSC_AUX
    run_to_hlt(vcpu)
    before = reg(vcpu, hv.HV_X86_R9) << 32 | reg(vcpu, hv.HV_X86_R8)
    after = reg(vcpu, hv.HV_X86_RDX) << 32 | reg(vcpu, hv.HV_X86_RAX)
    assert before <= after < before + (1 << 40)
    assert reg(vcpu, hv.HV_X86_RCX) == 0x1234


# --- x87, SSE, XSAVE ------------------------------------------------------------------------


def test_x87_and_fwait(vm: Vm) -> None:
    """fld1; fld1; faddp; fistp: 2 in memory, FWAIT in between with nothing pending."""
    code = asm(f"fninit\nfld1\nfld1\nfaddp\nfwait\nfistp dword [{DATA}]\nfwait\nhlt", bits=64)
    vcpu = vm.vcpu("long", code=code)
    vm.mem.put32(DATA, 0)
    run_to_hlt(vcpu)
    assert vm.mem.u32(DATA) == 2
    image = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, image)
    fcw, fsw = struct.unpack_from("<HH", image, 0)
    assert fcw == 0x37F and fsw >> 11 & 7 == 0  # the stack is empty again


def test_fwait_raises_the_pending_x87_exception(vm: Vm) -> None:
    """1/0 with the zero-divide exception unmasked: the next FWAIT raises #MF (16), delivered
    to the guest's handler with RIP at the FWAIT (CR0.NE is set)."""
    code = asm(
        f"""
        fninit
        mov word [{DATA}], 0x37b    ; unmask ZM
        fldcw [{DATA}]
        fld1
        fldz
        fdivp st1, st0
        fwait
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    handler = "fnstsw ax\nmov rcx, [rsp]\nfnclex\nmov rdx, 16\nhlt"
    vm.mem.write(HANDLER, asm(handler, bits=64, org=HANDLER))
    gate64(vm, 16, HANDLER)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RDX) == 16
    assert reg(vcpu, hv.HV_X86_RCX) == CODE + code.index(b"\x9b\xf4")  # the FWAIT
    assert reg(vcpu, hv.HV_X86_RAX) & 0x84 == 0x84  # ES and ZE in the status word


def test_sse_arithmetic(vm: Vm) -> None:
    """cvtsi2sd, mulsd, cvttsd2si, pxor, paddd, pshufd, movq: results in registers."""
    code = asm(
        """
        mov rax, 21
        cvtsi2sd xmm0, rax
        addsd xmm0, xmm0
        cvttsd2si rbx, xmm0
        pxor xmm1, xmm1
        mov eax, 5
        movd xmm2, eax
        pshufd xmm2, xmm2, 0
        paddd xmm1, xmm2
        paddd xmm1, xmm2
        movq rcx, xmm1
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RBX) == 42
    assert reg(vcpu, hv.HV_X86_RCX) == 10 << 32 | 10
    image = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, image)
    assert image[XMM + 16 : XMM + 32] == struct.pack("<4I", 10, 10, 10, 10)


def test_xsave_then_xrstor(vm: Vm) -> None:
    """XSAVE with XCR0 = x87|SSE stores XMM0 and XSTATE_BV; after XMM0 is cleared, XRSTOR
    brings it back; LDMXCSR/STMXCSR round-trip."""
    vm.mem.write(DATA + 0x800, bytes(range(16)))
    vm.mem.put32(DATA + 0x810, 0x1F80 | 0x6000)  # MXCSR with RC = toward zero
    code = asm(
        f"""
        ldmxcsr [{DATA + 0x810}]
        movdqu xmm0, [{DATA + 0x800}]
        xor edx, edx
        mov eax, 3
        xsave [{DATA}]
        pxor xmm0, xmm0
        ldmxcsr [{DATA + 0x814}]
        xrstor [{DATA}]
        movdqu [{DATA + 0x900}], xmm0
        stmxcsr [{DATA + 0x910}]
        hlt
        """,
        bits=64,
    )
    vm.mem.write(DATA, bytes(0x800))
    vm.mem.put32(DATA + 0x814, 0x1F80)
    vcpu = vm.vcpu("long", code=code)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 3)
    run_to_hlt(vcpu)
    assert vm.mem.read(DATA + XMM, 16) == bytes(range(16))
    assert vm.mem.u32(DATA + MXCSR) == 0x7F80
    assert vm.mem.u64(DATA + 512) & 2  # XSTATE_BV: SSE
    assert vm.mem.read(DATA + 0x900, 16) == bytes(range(16))
    assert vm.mem.u32(DATA + 0x910) == 0x7F80


# --- faults, MMIO, stepping -----------------------------------------------------------------


def test_page_fault_in_a_completed_instruction(vm: Vm) -> None:
    """POPCNT from a page that is not present: #PF with CR2 and the error code, RIP at the
    instruction (the handler sees it)."""
    code = asm("popcnt rax, [0x300000]\nhlt", bits=64)  # only 2 MiB are mapped
    vcpu = vm.vcpu("long", code=code)
    handler = "mov rcx, cr2\npop rdx\nmov rbx, [rsp]\nhlt"
    vm.mem.write(HANDLER, asm(handler, bits=64, org=HANDLER))
    gate64(vm, 14, HANDLER)
    run_to_hlt(vcpu)
    assert HANDLER < reg(vcpu, hv.HV_X86_RIP) < HANDLER + 0x20
    assert reg(vcpu, hv.HV_X86_RCX) == 0x300000
    assert reg(vcpu, hv.HV_X86_RDX) == 0  # not present, read, supervisor
    assert reg(vcpu, hv.HV_X86_RBX) == CODE


def test_access_outside_ram_is_an_ept_violation_exit(vm: Vm) -> None:
    """An access to guest-physical memory that is not RAM: exit 48 with the GPA and the
    access, RIP at the instruction, nothing executed, as VMX reports it."""
    code = asm("mov eax, 0x80000000\npopcnt ebx, [eax]\nhlt", bits=32)
    vcpu = vm.vcpu("protected", code=code)
    set_reg(vcpu, hv.HV_X86_RBX, 0x77)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x80000000
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert qual & hv.EPT_VIOLATION_DATA_READ and not qual & hv.EPT_VIOLATION_DATA_WRITE
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5
    assert reg(vcpu, hv.HV_X86_RBX) == 0x77


def test_write_to_a_read_only_page_exits_then_completes_once_writable(vm: Vm) -> None:
    """CMPXCHG16B into a write-protected page (how the debugger watches memory on this
    host): exit 48 with the write bit and RIP at the instruction; once the VMM opens the
    page, the instruction completes."""
    vm.mem.write(DATA, struct.pack("<QQ", 1, 2))
    code = asm(
        f"mov rsi, {DATA}\nmov rax, 1\nmov rdx, 2\nmov rbx, 3\nxor ecx, ecx\n"
        "lock cmpxchg16b [rsi]\nhlt",
        bits=64,
    )
    if hv.backend_name() == "emu":
        pytest.skip("the emu backend drops a CMPXCHG16B write to a read-only page, no exit")
    vcpu = vm.vcpu("long", code=code)
    hv.hv_vm_protect(DATA, 0x1000, hv.HV_MEMORY_READ | hv.HV_MEMORY_EXEC)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) & ~0xF == DATA
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & hv.EPT_VIOLATION_DATA_WRITE
    insn = CODE + code.index(b"\xf0\x48\x0f\xc7")
    assert reg(vcpu, hv.HV_X86_RIP) == insn
    hv.hv_vm_protect(DATA, 0x1000, hv.HV_MEMORY_READ | hv.HV_MEMORY_WRITE | hv.HV_MEMORY_EXEC)
    run_to_hlt(vcpu)
    assert struct.unpack("<QQ", vm.mem.read(DATA, 16)) == (3, 0)


def test_single_step_over_a_completed_instruction(vm: Vm) -> None:
    """With MTF on, a completed instruction ends in an MTF exit right after it."""
    code = asm("mov eax, 0xff\npopcnt ebx, eax\nhlt", bits=64)
    vcpu = vm.vcpu("long", code=code)
    cpu_based = vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    set_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, cpu_based | hv.CPU_BASED_MTF)
    assert run_to_exit(vcpu) == hv.VMX_REASON_MTF
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 5
    assert run_to_exit(vcpu) == hv.VMX_REASON_MTF
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 9
    assert reg(vcpu, hv.HV_X86_RBX) == 8
    set_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, cpu_based)
    run_to_hlt(vcpu)


# --- without unicorn ------------------------------------------------------------------------


@pytest.mark.skipif(not PVM, reason="needs a KVM that cannot emulate POPCNT (kvm_pvm)")
def test_without_unicorn_the_run_stops_naming_the_instruction(
    vm: Vm, monkeypatch: pytest.MonkeyPatch
) -> None:
    if hv.backend_name() != "kvm":
        pytest.skip("the kvm backend's fallback")
    monkeypatch.setattr(kvm_softcpu, "available", lambda: False)
    vcpu = vm.vcpu("long", code=asm("popcnt rbx, rax\nhlt", bits=64))
    with pytest.raises(hv.HvError) as info:
        run_to_exit(vcpu)
    message = str(info.value)
    assert "\n" not in message
    assert "popcnt rbx, rax" in message and "pip install gdbstub[emu]" in message
    assert info.value.code == hv.HV_UNSUPPORTED
    assert reg(vcpu, hv.HV_X86_RIP) == CODE  # nothing executed


def test_decode_names_and_needs() -> None:
    iret = kvm_softcpu.decode(b"\xcf", 32)
    assert iret is not None and iret.text == "iretd" and not iret.fpu and not iret.vmm
    xrstor = kvm_softcpu.decode(b"\x0f\xae\x2c\x24", 64)
    assert xrstor is not None and xrstor.fpu and xrstor.xcr0 and xrstor.length == 4
    fwait = kvm_softcpu.decode(b"\x9b\xf4", 64)
    assert fwait is not None and fwait.fpu and fwait.length == 1
    cx16 = kvm_softcpu.decode(b"\xf0\x48\x0f\xc7\x0e", 64)
    assert cx16 is not None and cx16.text.startswith("lock cmpxchg16b") and not cx16.fpu
    out = kvm_softcpu.decode(b"\xe6\x80", 32)
    assert out is not None and out.vmm
    assert kvm_softcpu.decode(b"\x0f\x01", 64) is None


def test_iretq_to_ring_3(vm: Vm) -> None:
    """IRETQ to 64-bit user code: CS 0x33, SS 0x2b, RSP and RFLAGS (IOPL 3) from the frame."""
    code = asm(
        """
        push 0x2b
        push 0x7000
        push 0x3002
        push 0x33
        lea rax, [rel user]
        push rax
        iretq
    user:
        mov rcx, rsp
        out 0x10, al
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_RCX) == 0x7000
    assert reg(vcpu, hv.HV_X86_CS) == 0x33 and reg(vcpu, hv.HV_X86_SS) == 0x2B
    assert vmcs(vcpu, hv.VMCS_GUEST_CS_AR) & 0x2000  # L: 64-bit code


def test_access_through_a_page_that_maps_no_ram(vm: Vm) -> None:
    """Paging maps a linear page to guest-physical memory that is not RAM: the exit names
    the guest-physical address, not the linear one."""
    code = asm("popcnt rax, [0x100008]\nhlt", bits=64)
    vcpu = vm.vcpu("long", code=code)
    vm.mem.put64(pte_address(0x100000), 0x80000000 | 0x7)
    assert run_to_exit(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x80000008
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & hv.EPT_VIOLATION_DATA_READ
    assert reg(vcpu, hv.HV_X86_RIP) == CODE


def test_single_step_trap_after_a_completed_instruction(vm: Vm) -> None:
    """With RFLAGS.TF set by the guest, the completed instruction is followed by #DB (a
    trap: the handler sees RIP after it and DR6.BS)."""
    code = asm(
        """
        mov eax, 0x7
        pushfq
        or qword [rsp], 0x100
        popfq
        popcnt rbx, rax
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    handler = "mov rcx, [rsp]\nmov rdx, dr6\nhlt"
    vm.mem.write(HANDLER, asm(handler, bits=64, org=HANDLER))
    gate64(vm, hv.IDT_DB, HANDLER)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RBX) == 3
    assert reg(vcpu, hv.HV_X86_RCX) == CODE + code.index(b"\xf4")  # after the POPCNT
    assert reg(vcpu, hv.HV_X86_RDX) & hv.DR6_BS


def test_the_instruction_sees_the_flags_it_is_given(vm: Vm) -> None:
    """FCMOVB reads CF: the software CPU starts from the vCPU's RFLAGS."""
    code = asm(
        f"""
        fninit
        fld1
        fldz
        stc
        fcmovb st0, st1
        fistp dword [{DATA}]
        fldz
        clc
        fcmovb st0, st1
        fistp dword [{DATA + 4}]
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    vm.mem.write(DATA, b"\xff" * 8)
    run_to_hlt(vcpu)
    assert vm.mem.u32(DATA) == 1  # CF set: moved
    assert vm.mem.u32(DATA + 4) == 0  # CF clear: not moved


# --- the XSAVE family with the host's state components (kvm: done on KVM's XSAVE image) -----

YMM_HI = 576  # AVX upper halves in the standard format
OPMASK = 5  # AVX-512 opmask state component


def kvm_only() -> None:
    if hv.backend_name() != "kvm":
        pytest.skip("unicorn (the emu backend's CPU) has no AVX state to save")


def test_xsaveopt_and_xrstor_carry_the_avx_upper_halves(vm: Vm) -> None:
    """XCR0 = x87|SSE|AVX: XSAVEOPT stores YMM_H (set by the host) at offset 576 with
    XSTATE_BV bit 2; XRSTOR of changed memory changes the vCPU's YMM_H."""
    kvm_only()
    code = asm(
        f"""
        xor edx, edx
        mov eax, 7
        xsaveopt [{DATA}]
        mov byte [{DATA + YMM_HI}], 0x5a
        xrstor [{DATA}]
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 7)
    image = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, image)
    image[YMM_HI : YMM_HI + 256] = bytes(range(256))
    image[512] |= 7
    hv.hv_vcpu_write_fpstate(vcpu, image)
    vm.mem.write(DATA, bytes(0x1000))
    run_to_hlt(vcpu)
    assert vm.mem.u64(DATA + 512) & 4  # XSTATE_BV: AVX in use
    assert vm.mem.read(DATA + YMM_HI + 1, 255) == bytes(range(1, 256))
    hv.hv_vcpu_read_fpstate(vcpu, image)
    assert image[YMM_HI] == 0x5A and image[YMM_HI + 1 : YMM_HI + 256] == bytes(range(1, 256))


def test_xsavec_compacts_and_xrstor_reads_the_compacted_form(vm: Vm) -> None:
    """XSAVEC with RFBM = x87|opmask puts the opmask state right after the header (576, not
    its standard offset) and sets XCOMP_BV bit 63; XRSTOR loads it back from there."""
    kvm_only()
    comps = kvm_softcpu_components()
    if OPMASK not in comps:
        pytest.skip("the host has no AVX-512")
    standard = comps[OPMASK].offset
    code = asm(
        f"""
        xor edx, edx
        mov eax, 0x21
        xsavec [{DATA}]
        mov byte [{DATA + 576}], 0x77
        xrstor [{DATA}]
        hlt
        """,
        bits=64,
    )
    vcpu = vm.vcpu("long", code=code)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 0xE7)
    image = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, image)
    image[standard : standard + 64] = bytes(range(64, 128))
    image[512] |= 1 << OPMASK
    hv.hv_vcpu_write_fpstate(vcpu, image)
    vm.mem.write(DATA, bytes(0x1000))
    run_to_hlt(vcpu)
    xstate_bv, xcomp_bv = struct.unpack("<QQ", vm.mem.read(DATA + 512, 16))
    assert xcomp_bv == 1 << 63 | 0x21
    assert xstate_bv & 1 << OPMASK
    assert vm.mem.read(DATA + 577, 63) == bytes(range(65, 128))
    hv.hv_vcpu_read_fpstate(vcpu, image)
    assert image[standard] == 0x77 and image[standard + 1 : standard + 64] == bytes(range(65, 128))


def test_xrstor_with_a_bad_header_raises_gp(vm: Vm) -> None:
    """XSTATE_BV names a component XCR0 does not enable: #GP(0), RIP at the XRSTOR."""
    code = asm(f"xor edx, edx\nmov eax, 3\nxrstor [{DATA}]\nhlt", bits=64)
    vcpu = vm.vcpu("long", code=code)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 3)
    vm.mem.write(DATA, bytes(0x1000))
    vm.mem.write(DATA + 512, b"\x04")  # AVX, with XCR0 = x87|SSE
    handler = "pop rdx\nmov rcx, [rsp]\nhlt"
    vm.mem.write(HANDLER, asm(handler, bits=64, org=HANDLER))
    gate64(vm, hv.IDT_GP, HANDLER)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RCX) == CODE + 7  # the XRSTOR
    assert reg(vcpu, hv.HV_X86_RDX) == 0


def test_xsave_to_a_misaligned_address_raises_gp(vm: Vm) -> None:
    code = asm(f"xor edx, edx\nmov eax, 3\nxsave [{DATA + 8}]\nhlt", bits=64)
    vcpu = vm.vcpu("long", code=code)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 3)
    vm.mem.write(DATA, b"\xcc" * 0x400)
    handler = "pop rdx\nmov rcx, [rsp]\nhlt"
    vm.mem.write(HANDLER, asm(handler, bits=64, org=HANDLER))
    gate64(vm, hv.IDT_GP, HANDLER)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RCX) == CODE + 7
    assert vm.mem.read(DATA, 0x400) == b"\xcc" * 0x400  # nothing written


def kvm_softcpu_components() -> dict[int, kvm_xsave.Component]:
    return kvm_xsave.components(kvm_backend()._kvm)


def test_stac_and_clac(vm: Vm) -> None:
    """STAC sets RFLAGS.AC, CLAC clears it (CPL0, as a kernel with SMAP brackets user
    accesses)."""
    if hv.backend_name() == "emu":
        pytest.skip("the emu backend's CPU model has no SMAP (STAC is #UD there)")
    code = asm("stac\npushfq\npop rbx\nclac\npushfq\npop rcx\nhlt", bits=64)
    vcpu = vm.vcpu("long", code=code)
    run_to_hlt(vcpu)
    assert reg(vcpu, hv.HV_X86_RBX) & 1 << 18
    assert not reg(vcpu, hv.HV_X86_RCX) & 1 << 18
