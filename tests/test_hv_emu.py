"""The gdbstub.hv API on the emu (unicorn) backend: the framework's paths KVM cannot take here."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("unicorn")

from gdbstub import hv, vmxsetup

try:
    from guestbuild import assemble_flat  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - another engineer's helper
    from tests.guestbuild import assemble_flat  # type: ignore[import-not-found,no-redef]

ORG = 0x1000
RAM = 0x200000
RWX = hv.HV_MEMORY_READ | hv.HV_MEMORY_WRITE | hv.HV_MEMORY_EXEC


@pytest.fixture
def vm() -> Iterator[dict[str, object]]:
    hv._reset_for_tests()
    hv.select_backend("emu")
    hv.hv_vm_create(hv.HV_VM_DEFAULT)
    ram = hv.hv_vm_allocate(RAM)
    hv.hv_vm_map(ram, 0, RAM, RWX)
    state: dict[str, object] = {"ram": ram, "vcpus": []}
    try:
        yield state
    finally:
        for vcpu in state["vcpus"]:  # type: ignore[attr-defined]
            try:
                hv.hv_vcpu_destroy(vcpu)
            except hv.HvError:
                pass
        hv.hv_vm_destroy()
        hv._reset_for_tests()


def vmcs(vcpu: int, field: int) -> int:
    return hv.hv_vmx_vcpu_read_vmcs(vcpu, field)


def set_seg(vcpu: int, index: int, selector: int, base: int, limit: int, ar: int) -> None:
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES + 2 * index, selector)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_BASE + 2 * index, base)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_LIMIT + 2 * index, limit)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_AR + 2 * index, ar)


def new_vcpu(state: dict[str, object], mode: int, code: bytes, org: int = ORG) -> int:
    """A vCPU at ``org`` in real mode (16), flat 32-bit protected mode (32) or long mode (64)."""
    ram = state["ram"]
    ram[org : org + len(code)] = code  # type: ignore[index]
    vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
    state["vcpus"].append(vcpu)  # type: ignore[attr-defined]
    set_seg(vcpu, 7, 0, 0, 0xFFFF, 0x8B)
    if mode == 16:
        for i in range(6):
            set_seg(vcpu, i, 0, 0, 0xFFFF, 0x9B if i == 1 else 0x93)
        vmxsetup.setup_vcpu(vcpu, cr0=0x10, hlt_exiting=False)
    elif mode == 32:
        for i in range(6):
            set_seg(vcpu, i, 0x8 if i == 1 else 0x10, 0, 0xFFFFFFFF, 0xC09B if i == 1 else 0xC093)
        vmxsetup.setup_vcpu(vcpu, cr0=0x11, hlt_exiting=False)
    else:
        build_long_mode_tables(ram)  # type: ignore[arg-type]
        for i in range(6):
            set_seg(vcpu, i, 0x8 if i == 1 else 0x10, 0, 0xFFFFFFFF, 0xA09B if i == 1 else 0xC093)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_GDT_BASE, 0x9000)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_GDT_LIMIT, 0x17)
        vmxsetup.setup_vcpu(
            vcpu,
            cr0=0x80050033,
            cr4=0x20 | 0x200 | 0x40000,
            efer=hv.EFER_LME,
            cr3=0x10000,
            hlt_exiting=False,
        )
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, org)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RFLAGS, 2)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RSP, 0x8000)
    return vcpu


def set_primary_controls(vcpu: int, wanted: int) -> None:
    """The framework's primary controls (vmxsetup: TPR shadow, secondary controls, the
    must-be-one bits) plus ``wanted`` (HLT, MTF...)."""
    base = vmxsetup.control_words(hlt_exiting=False)[hv.VMCS_CTRL_CPU_BASED]
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, base | wanted)


def build_long_mode_tables(ram: bytearray) -> None:
    """Identity map of the first 1 GiB (2 MiB pages) and a GDT with a 64-bit code segment."""
    struct.pack_into("<Q", ram, 0x10000, 0x11000 | 3)
    struct.pack_into("<Q", ram, 0x11000, 0x12000 | 3)
    for i in range(512):
        struct.pack_into("<Q", ram, 0x12000 + 8 * i, (i << 21) | 0x83)
    struct.pack_into("<QQQ", ram, 0x9000, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)


def run(vcpu: int) -> int:
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    return vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)


def skip_instruction(vcpu: int) -> None:
    rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    length = vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, rip + length)


def test_backend_is_emu(vm: dict[str, object]) -> None:
    assert hv.backend_name() == "emu"
    with pytest.raises(hv.HvError) as info:
        hv.hv_vm_create(hv.HV_VM_DEFAULT)
    assert info.value.code == hv.HV_BUSY


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_io_loop_rip_at_instruction(vm: dict[str, object], mode: int) -> None:
    code = assemble_flat(
        "mov al, 'A'\nout 0x80, al\nmov dx, 0x3f8\nin al, dx\nout dx, al\nhlt\n", mode, ORG
    )
    vcpu = new_vcpu(vm, mode, code)
    set_primary_controls(vcpu, hv.CPU_BASED_HLT)
    assert run(vcpu) == hv.VMX_REASON_IO
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert qual >> 16 == 0x80 and not qual & hv.EXIT_QUAL_IO_IN and qual & 7 == 0
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 2  # at the OUT
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFF == ord("A")
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_IO
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert qual >> 16 == 0x3F8 and qual & hv.EXIT_QUAL_IO_IN
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 1
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RAX, ord("z"))
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_IO
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFF == ord("z")
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_HLT
    hlt = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    assert vm["ram"][hlt] == 0xF4  # type: ignore[index]
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 1
    assert hv.hv_vcpu_get_exec_time(vcpu) > 0


def test_deadline_and_kicks(vm: dict[str, object]) -> None:
    vcpu = new_vcpu(vm, 64, assemble_flat("spin: inc rax\njmp spin\n", 64, ORG))
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(30_000_000))
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_VMX_TIMER_EXPIRED
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) > 0
    # kick from another thread while running
    timer = threading.Timer(0.05, hv.hv_vcpu_interrupt, args=([vcpu],))
    timer.start()
    started = time.monotonic()
    assert run(vcpu) == hv.VMX_REASON_IRQ
    assert time.monotonic() - started < 2
    timer.join()
    # kick before entry: the next run returns at once
    hv.hv_vcpu_interrupt([vcpu])
    assert run(vcpu) == hv.VMX_REASON_IRQ
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(5_000_000))
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_VMX_TIMER_EXPIRED


def test_owner_thread_only(vm: dict[str, object]) -> None:
    vcpu = new_vcpu(vm, 64, assemble_flat("hlt\n", 64, ORG))
    errors: list[int] = []

    def other() -> None:
        try:
            hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
        except hv.HvError as exc:
            errors.append(exc.code)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors == [hv.HV_BAD_ARGUMENT]


def test_int3_through_exception_bitmap(vm: dict[str, object]) -> None:
    code = assemble_flat("nop\nint3\nmov eax, 7\nout 0x80, al\n", 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)
    assert run(vcpu) == hv.VMX_REASON_EXC_NMI
    info = vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO)
    assert info & 0xFF == hv.IDT_BP
    assert info & hv.IRQ_INFO_TYPE_MASK == hv.IRQ_INFO_SOFT_EXC
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 1  # at the int3
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 1
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_IO
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) == 7


def test_int3_reinjected_through_guest_idt(vm: dict[str, object]) -> None:
    code = assemble_flat(
        "int3\nafter: out 0x81, al\nalign 16\nhandler: mov eax, 0x33\nout 0x80, al\n", 64, ORG
    )
    vcpu = new_vcpu(vm, 64, code)
    handler = ORG + code.index(bytes([0xB8, 0x33]))
    ram = vm["ram"]
    gate = struct.pack("<HHBBHIi", handler & 0xFFFF, 8, 0, 0x8E, handler >> 16, 0, 0)
    ram[0xA000 + 16 * 3 : 0xA000 + 16 * 4] = gate  # type: ignore[index]
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_IDT_BASE, 0xA000)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_IDT_LIMIT, 0xFFF)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)
    assert run(vcpu) == hv.VMX_REASON_EXC_NMI
    # not ours: re-inject as the framework's VMMs do
    hv.hv_vmx_vcpu_write_vmcs(
        vcpu,
        hv.VMCS_CTRL_VMENTRY_IRQ_INFO,
        hv.IRQ_INFO_VALID | hv.IRQ_INFO_SOFT_EXC | hv.IDT_BP,
    )
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_INSTR_LEN, 1)
    assert run(vcpu) == hv.VMX_REASON_IO
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16 == 0x80
    rsp = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RSP)
    assert struct.unpack_from("<Q", ram, rsp)[0] == ORG + 1  # type: ignore[arg-type]


def test_undefined_instruction(vm: dict[str, object]) -> None:
    vcpu = new_vcpu(vm, 64, assemble_flat("ud2\n", 64, ORG))
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_UD)
    assert run(vcpu) == hv.VMX_REASON_EXC_NMI
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO) & 0x7FF == hv.IRQ_INFO_HARD_EXC | hv.IDT_UD
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG
    # not intercepted and no IDT: triple fault
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 0)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_IDT_LIMIT, 0)
    assert run(vcpu) == hv.VMX_REASON_TRIPLE_FAULT


def test_dr7_data_write_watchpoint(vm: dict[str, object]) -> None:
    code = assemble_flat(
        "mov dword [0x5000], 1\nmov dword [0x5100], 2\nnop\n"
        "mov dword [0x5104], 3\nnext: nop\nhlt\n",
        64,
        ORG,
    )
    vcpu = new_vcpu(vm, 64, code)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_DB)
    set_primary_controls(vcpu, hv.CPU_BASED_HLT)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR0, 0x5104)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR7, 0x400 | 1 | (1 << 16) | (3 << 18))
    assert run(vcpu) == hv.VMX_REASON_EXC_NMI
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO) & 0xFF == hv.IDT_DB
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & 0xF == hv.DR6_B0
    # trap-like: the store is done and RIP is after it
    assert struct.unpack_from("<I", vm["ram"], 0x5104)[0] == 3  # type: ignore[arg-type]
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + code.index(b"\x90\xf4")
    assert run(vcpu) == hv.VMX_REASON_HLT


def test_dr_execution_breakpoint(vm: dict[str, object]) -> None:
    code = assemble_flat("nop\nnop\ntarget: inc eax\nhlt\n", 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_DB)
    set_primary_controls(vcpu, hv.CPU_BASED_HLT)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR1, ORG + 2)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR7, 0x400 | 4)
    assert run(vcpu) == hv.VMX_REASON_EXC_NMI
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & 0xF == hv.DR6_B1
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 2
    rflags = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RFLAGS)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RFLAGS, rflags | 1 << 16)  # RF
    assert run(vcpu) == hv.VMX_REASON_HLT
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) == 1


def test_mtf_single_steps(vm: dict[str, object]) -> None:
    code = assemble_flat("inc eax\ninc eax\nmov ecx, 5\nhlt\n", 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    set_primary_controls(vcpu, hv.CPU_BASED_MTF)
    rips = []
    for _ in range(3):
        assert run(vcpu) == hv.VMX_REASON_MTF
        rips.append(hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP))
    assert rips == [ORG + 2, ORG + 4, ORG + 9]
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) == 5


def test_mtf_after_free_running(vm: dict[str, object]) -> None:
    code = assemble_flat("out 0x80, al\ninc eax\ninc eax\nhlt\n", 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    assert run(vcpu) == hv.VMX_REASON_IO
    skip_instruction(vcpu)
    set_primary_controls(vcpu, hv.CPU_BASED_MTF)
    assert run(vcpu) == hv.VMX_REASON_MTF
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 4
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFF == 1


def test_fpstate_round_trip(vm: dict[str, object]) -> None:
    vcpu = new_vcpu(vm, 64, assemble_flat("hlt\n", 64, ORG))
    image = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, image)
    assert struct.unpack_from("<H", image, 0)[0] == 0x37F
    assert struct.unpack_from("<I", image, 24)[0] == 0x1F80
    for i in range(16):
        image[160 + 16 * i : 176 + 16 * i] = bytes([i + 1] * 16)
        image[576 + 16 * i : 592 + 16 * i] = bytes([0x80 + i] * 16)
    struct.pack_into("<Q", image, 32 + 16 * 0, 0x8000000000000000)
    struct.pack_into("<H", image, 32 + 8, 0x3FFF)  # ST0 = 1.0
    image[4] = 0x01
    struct.pack_into("<Q", image, 512, 7)
    hv.hv_vcpu_write_fpstate(vcpu, image)
    again = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, again)
    assert again[160:416] == image[160:416]
    assert again[576:832] == image[576:832]
    assert again[32:42] == image[32:42]
    assert again[4] == 0x01
    with pytest.raises(hv.HvError):
        hv.hv_vcpu_read_fpstate(vcpu, bytearray(100))


def test_protect_gives_exit_48(vm: dict[str, object]) -> None:
    code = assemble_flat("mov eax, [0x6000]\nmov [0x6000], eax\nmov eax, [0x300000]\n", 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    hv.hv_vm_protect(0x6000, 0x1000, hv.HV_MEMORY_READ)
    assert run(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x6000
    qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    assert qual & hv.EPT_VIOLATION_DATA_WRITE and qual & hv.EPT_VIOLATION_GPA_READABLE
    rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    assert rip == ORG + 7  # at the store
    assert vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DECODED) == 0
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, rip + 7)
    assert run(vcpu) == hv.VMX_REASON_EPT_VIOLATION
    assert vmcs(vcpu, hv.VMCS_GUEST_PHYSICAL_ADDRESS) == 0x300000
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) & hv.EPT_VIOLATION_DATA_READ


def test_two_address_spaces(vm: dict[str, object]) -> None:
    code = assemble_flat("top: mov eax, [0x100000]\nout 0x80, al\njmp top\n", 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    ram = vm["ram"]
    ram[0x100000] = 0x11  # type: ignore[index]
    other = hv.hv_vm_allocate(RAM)
    other[:] = bytes(ram)  # type: ignore[call-overload,index,unused-ignore]
    other[0x100000] = 0x22  # type: ignore[index,unused-ignore]
    asid = hv.hv_vm_space_create()
    hv.hv_vm_map_space(asid, other, 0, RAM, RWX)
    assert run(vcpu) == hv.VMX_REASON_IO
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFF == 0x11
    skip_instruction(vcpu)
    hv.hv_vcpu_set_space(vcpu, asid)
    assert run(vcpu) == hv.VMX_REASON_IO
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFF == 0x22
    with pytest.raises(hv.HvError) as info:
        hv.hv_vm_space_destroy(asid)
    assert info.value.code == hv.HV_BUSY
    hv.hv_vcpu_set_space(vcpu, 0)
    hv.hv_vm_space_destroy(asid)


def test_msr_permissions(vm: dict[str, object]) -> None:
    code = assemble_flat(
        "mov ecx, 0xc0000082\nrdmsr\nwrmsr\nmov ecx, 0xc0000081\nrdmsr\nhlt\n", 64, ORG
    )
    vcpu = new_vcpu(vm, 64, code)
    set_primary_controls(vcpu, hv.CPU_BASED_HLT)
    hv.hv_vcpu_write_msr(vcpu, hv.MSR_LSTAR, 0x1234)
    assert run(vcpu) == hv.VMX_REASON_RDMSR
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 5
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2
    hv.hv_vcpu_enable_native_msr(vcpu, hv.MSR_LSTAR, True)
    assert run(vcpu) == hv.VMX_REASON_RDMSR  # RIP not advanced: runs natively now, then STAR
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) == hv.MSR_STAR
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) == 0x1234
    hv.hv_vcpu_enable_managed_msr(vcpu, hv.MSR_STAR, True)
    hv.hv_vcpu_set_msr_access(vcpu, hv.MSR_STAR, hv.HV_MSR_READ)
    assert run(vcpu) == hv.VMX_REASON_HLT


def test_cpuid_exits(vm: dict[str, object]) -> None:
    vcpu = new_vcpu(vm, 64, assemble_flat("xor eax, eax\ncpuid\nhlt\n", 64, ORG))
    assert run(vcpu) == hv.VMX_REASON_CPUID
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 2
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2


MODE_SWITCH = """
        lgdt [gdtr]
        mov eax, cr4
        or eax, 0x20                    ; PAE
        mov cr4, eax
        mov eax, 0x10000
        mov cr3, eax
        mov ecx, 0xC0000080
        rdmsr
        or eax, 0x100                   ; LME
        wrmsr
        mov eax, cr0
        or eax, 0x80000001
        mov cr0, eax
        jmp 0x08:long64
bits 64
long64:
        mov rax, 0xffffffff80000000 + high
        jmp rax
high:
        mov rbx, rip_probe
rip_probe:
        lea rcx, [rel rip_probe]
        out 0x80, al
align 8
gdt:    dq 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF
gdtr:   dw 23
        dd gdt
"""


def test_32bit_to_long_mode_and_higher_half(vm: dict[str, object]) -> None:
    ram = vm["ram"]
    build_long_mode_tables(ram)  # type: ignore[arg-type]
    # map the last 2 GiB of the address space (PML4 511, PDPT 510) onto physical 0
    struct.pack_into("<Q", ram, 0x10000 + 511 * 8, 0x13000 | 3)  # type: ignore[arg-type]
    struct.pack_into("<Q", ram, 0x13000 + 510 * 8, 0x12000 | 3)  # type: ignore[arg-type]
    code = assemble_flat(MODE_SWITCH, 32, ORG)
    vcpu = new_vcpu(vm, 32, code)
    hv.hv_vcpu_enable_native_msr(vcpu, hv.MSR_EFER, True)
    reason = run(vcpu)
    while reason == hv.VMX_REASON_MOV_CR:  # CR0.PG is the VMM's to intercept (vmxsetup)
        assert not vmxsetup.handle_cr_access(vcpu).fault
        reason = run(vcpu)
    assert reason == hv.VMX_REASON_IO
    assert hv.hv_vcpu_read_msr(vcpu, hv.MSR_EFER) & hv.EFER_LMA
    rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    assert rip >= 0xFFFFFFFF80000000
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) == rip - 7
    assert vmcs(vcpu, hv.VMCS_GUEST_CS_AR) & 0x2000  # L
    assert vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & hv.VMENTRY_GUEST_IA32E


def test_registers_and_segments_round_trip(vm: dict[str, object]) -> None:
    vcpu = new_vcpu(vm, 64, assemble_flat("hlt\n", 64, ORG))
    set_seg(vcpu, 4, 0x2B, 0x12345000, 0xFFFFF, 0xC0F3)
    assert vmcs(vcpu, hv.VMCS_GUEST_FS_BASE) == 0x12345000
    assert vmcs(vcpu, hv.VMCS_GUEST_FS_AR) == 0xC0F3
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_FS) == 0x2B
    assert hv.hv_vcpu_read_msr(vcpu, hv.MSR_FSBASE) == 0x12345000
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_R13, 0xDEADBEEFCAFE)
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_R13) == 0xDEADBEEFCAFE
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR3, 0x4444)
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_DR3) == 0x4444
    with pytest.raises(hv.HvError) as info:
        hv.hv_vcpu_read_register(vcpu, 999)
    assert info.value.code == hv.HV_BAD_ARGUMENT


# --- code the host rewrites between runs (the VMM or the debugger writing guest RAM) -----------

LOOP = "top: inc ecx\nspot: nop\nnop\nout 0x80, al\njmp top\n"


def exit_port(vcpu: int) -> int:
    return vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16


def assert_int3_exit(vcpu: int, address: int) -> None:
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_EXC_NMI
    info = vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO)
    assert info & 0xFF == hv.IDT_BP
    assert info & hv.IRQ_INFO_TYPE_MASK == hv.IRQ_INFO_SOFT_EXC
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 1
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == address


@pytest.mark.parametrize("mode", [32, 64])
def test_host_rewrites_code_between_runs(vm: dict[str, object], mode: int) -> None:
    code = assemble_flat(LOOP, mode, ORG)
    vcpu = new_vcpu(vm, mode, code)
    ram = vm["ram"]
    spot = ORG + code.index(b"\x90\x90")
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)

    def rcx() -> int:
        return hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) & 0xFFFF

    assert run(vcpu) == hv.VMX_REASON_IO and rcx() == 1  # the loop is translated and scanned
    skip_instruction(vcpu)
    ram[spot] = 0xCC  # type: ignore[index]  # nop -> int3: intercepted at once
    run(vcpu)
    assert_int3_exit(vcpu, spot)
    assert rcx() == 2
    ram[spot] = 0x90  # type: ignore[index]  # int3 -> nop: no #BP any more
    assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x80 and rcx() == 2
    skip_instruction(vcpu)
    ram[spot : spot + 2] = b"\xe6\x81"  # type: ignore[index]  # nop; nop -> out 0x81, al
    assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x81 and rcx() == 3
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == spot
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x80
    skip_instruction(vcpu)
    ram[spot : spot + 2] = b"\x90\x90"  # type: ignore[index]  # and back: that exit is gone
    for count in (4, 5):
        assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x80 and rcx() == count
        skip_instruction(vcpu)
    ram[spot : spot + 2] = b"\x0f\xa2"  # type: ignore[index]  # cpuid
    assert run(vcpu) == hv.VMX_REASON_CPUID
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == spot


def test_step_over_replanted_int3(vm: dict[str, object]) -> None:
    """gdb's step over a breakpoint: remove it, single-step (MTF), plant it again, continue."""
    code = assemble_flat(LOOP, 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    ram = vm["ram"]
    spot = ORG + code.index(b"\x90\x90")
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)
    ram[spot] = 0xCC  # type: ignore[index]
    for hit in range(1, 5):
        run(vcpu)
        assert_int3_exit(vcpu, spot)
        assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RCX) == hit
        ram[spot] = 0x90  # type: ignore[index]
        set_primary_controls(vcpu, hv.CPU_BASED_MTF)
        assert run(vcpu) == hv.VMX_REASON_MTF
        assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == spot + 1
        ram[spot] = 0xCC  # type: ignore[index]
        set_primary_controls(vcpu, 0)
        assert run(vcpu) == hv.VMX_REASON_IO
        skip_instruction(vcpu)


INT3_HANDLER = """
        int3
after:  out 0x81, al
        hlt
align 16
handler:
        inc ebx
        out 0x80, al
        iretq
"""


def install_bp_gate(vm: dict[str, object], vcpu: int, handler: int) -> None:
    gate = struct.pack("<HHBBHIi", handler & 0xFFFF, 8, 0, 0x8E, handler >> 16, 0, 0)
    vm["ram"][0xA000 + 16 * 3 : 0xA000 + 16 * 4] = gate  # type: ignore[index]
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_IDT_BASE, 0xA000)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_IDT_LIMIT, 0xFFF)


def test_guest_int3_reinjected_handler_returns(vm: dict[str, object]) -> None:
    code = assemble_flat(INT3_HANDLER, 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    install_bp_gate(vm, vcpu, ORG + 16)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)
    run(vcpu)
    assert_int3_exit(vcpu, ORG)
    hv.hv_vmx_vcpu_write_vmcs(
        vcpu, hv.VMCS_CTRL_VMENTRY_IRQ_INFO, hv.IRQ_INFO_VALID | hv.IRQ_INFO_SOFT_EXC | hv.IDT_BP
    )
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_INSTR_LEN, 1)
    assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x80  # in the handler
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x81  # returned after the int3
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 1
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RBX) == 1
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RSP) == 0x8000


def test_host_written_int3_not_intercepted_goes_to_guest(vm: dict[str, object]) -> None:
    code = assemble_flat("nop\n" + INT3_HANDLER.replace("int3", "nop", 1), 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    install_bp_gate(vm, vcpu, ORG + code.index(b"\xff\xc3"))  # inc ebx
    set_primary_controls(vcpu, hv.CPU_BASED_HLT)
    assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x81
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_HLT  # nop; nop; out; hlt ran and were scanned
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, ORG)
    vm["ram"][ORG + 1] = 0xCC  # type: ignore[index]
    assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x80
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_IO and exit_port(vcpu) == 0x81
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 2
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RBX) == 1


def test_data_next_to_code_keeps_exits(vm: dict[str, object]) -> None:
    """Guest and host writing data on a code page: exits stay exact, the code is rescanned
    only where it changed."""
    code = assemble_flat(
        "top: inc dword [rel var]\nout 0x80, al\njmp top\nalign 64\nvar: dd 0\n", 64, ORG
    )
    vcpu = new_vcpu(vm, 64, code)
    ram = vm["ram"]
    var = ORG + len(code) - 4
    for i in range(1, 20):
        assert run(vcpu) == hv.VMX_REASON_IO
        assert struct.unpack_from("<I", ram, var)[0] == i  # type: ignore[arg-type]
        skip_instruction(vcpu)
    struct.pack_into("<I", ram, var, 100)  # type: ignore[arg-type]
    assert run(vcpu) == hv.VMX_REASON_IO
    assert struct.unpack_from("<I", ram, var)[0] == 101  # type: ignore[arg-type]


@pytest.mark.parametrize("insn", ["ud2", "db 0x06", "db 0x0f, 0xff"])
def test_invalid_opcode_with_code_hooks(vm: dict[str, object], insn: str) -> None:
    """unicorn loses the #UD of an invalid opcode once a code hook (here: the OUT's) exists."""
    code = assemble_flat(f"out 0x80, al\nnop\nbad: {insn}\n", 64, ORG)
    vcpu = new_vcpu(vm, 64, code)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_UD)
    assert run(vcpu) == hv.VMX_REASON_IO
    skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_EXC_NMI
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO) & 0x7FF == hv.IRQ_INFO_HARD_EXC | hv.IDT_UD
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 3
    set_primary_controls(vcpu, hv.CPU_BASED_MTF)  # and stepping
    assert run(vcpu) == hv.VMX_REASON_EXC_NMI
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 3
    set_primary_controls(vcpu, 0)
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 0)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_IDT_LIMIT, 0)
    assert run(vcpu) == hv.VMX_REASON_TRIPLE_FAULT


def test_jmp_self_runs_until_the_deadline(vm: dict[str, object]) -> None:
    vcpu = new_vcpu(vm, 64, assemble_flat("out 0x80, al\nl: jmp l\n", 64, ORG))
    assert run(vcpu) == hv.VMX_REASON_IO
    skip_instruction(vcpu)
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(50_000_000))
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_VMX_TIMER_EXPIRED
    set_primary_controls(vcpu, hv.CPU_BASED_MTF)
    assert run(vcpu) == hv.VMX_REASON_MTF
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 2


def run_for(vcpu: int, nanoseconds: int = 2_000_000_000) -> int:
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(nanoseconds))
    return vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)


def test_exit_later_in_a_block_first_run_one_step(vm: dict[str, object]) -> None:
    """Scanned code leaves the block hooks: the scan of a one-instruction step must reach the
    OUT that a free run of the same block executes."""
    vcpu = new_vcpu(vm, 16, assemble_flat("nop\nnop\nout 0x80, al\njmp $\n", 16, ORG))
    set_primary_controls(vcpu, hv.CPU_BASED_MTF)
    assert run_for(vcpu) == hv.VMX_REASON_MTF
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 1
    set_primary_controls(vcpu, 0)
    assert run_for(vcpu) == hv.VMX_REASON_IO
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == ORG + 2


def test_other_code_at_a_scanned_user_address_still_exits(vm: dict[str, object]) -> None:
    """Two processes at one linear address: the second one's CPUID exits although the first
    one's code at that address was scanned (lower-half code stays under the block hooks)."""
    ram = vm["ram"]
    user, other, table = 0x100000, 0x101000, 0x14000
    vcpu = new_vcpu(vm, 64, assemble_flat("nop\nnop\nout 0x80, al\njmp $\n", 64, user), user)
    for i in range(512):  # the first 2 MiB in 4 KiB pages, identity-mapped
        struct.pack_into("<Q", ram, table + 8 * i, i << 12 | 3)  # type: ignore[arg-type]
    struct.pack_into("<Q", ram, 0x12000, table | 3)  # type: ignore[arg-type]
    second = assemble_flat("nop\ncpuid\nnop\nnop\njmp $\n", 64, user)  # not 6 bytes long
    ram[other : other + len(second)] = second  # type: ignore[index]
    assert run_for(vcpu) == hv.VMX_REASON_IO
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == user + 2
    struct.pack_into("<Q", ram, table + 8 * (user >> 12), other | 3)  # type: ignore[arg-type]
    hv.hv_vcpu_invalidate_tlb(vcpu)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, user)
    assert run_for(vcpu) == hv.VMX_REASON_CPUID
    assert hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == user + 1
