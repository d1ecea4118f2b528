"""The emu backend on kernel-style code: stops from other threads, chunk scanning and the
safety nets that catch IN/OUT/CPUID/HLT without a code hook (gdbstub/hv/emu_nets.py,
emu_timer.py). What a guest observes: exits exactly at the instruction, nothing of the rest of
the block left behind, and no instruction run twice however often the vCPU is kicked."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("unicorn")

from gdbstub import hv

try:
    from guestbuild import assemble_flat  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - another engineer's helper
    from tests.guestbuild import assemble_flat  # type: ignore[import-not-found,no-redef]

from tests.test_hv_emu import RWX, new_vcpu, set_primary_controls, skip_instruction, vmcs

KERNEL = 0xFFFF_8000_0000_0000  # the upper half maps guest-physical 0 (shared code)
ORG = 0x1000


@pytest.fixture
def vm() -> Iterator[dict[str, object]]:
    hv._reset_for_tests()
    hv.select_backend("emu")
    hv.hv_vm_create(hv.HV_VM_DEFAULT)
    ram = hv.hv_vm_allocate(0x200000)
    hv.hv_vm_map(ram, 0, 0x200000, RWX)
    state: dict[str, object] = {"ram": ram, "vcpus": []}
    try:
        yield state
    finally:
        for vcpu in state["vcpus"]:  # type: ignore[attr-defined]
            hv.hv_vcpu_destroy(vcpu)
        hv.hv_vm_destroy()
        hv._reset_for_tests()


def kernel_vcpu(vm: dict[str, object], source: str) -> int:
    """A 64-bit vCPU running ``source`` in the upper half (code shared by address spaces,
    scanned by chunk and cut out of the block hooks)."""
    code = assemble_flat(source, 64, KERNEL + ORG)
    vcpu = new_vcpu(vm, 64, code, ORG)
    struct.pack_into("<Q", vm["ram"], 0x10000 + 256 * 8, 0x11000 | 3)  # type: ignore[arg-type]
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, KERNEL + ORG)
    return vcpu


def run(vcpu: int) -> int:
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(2_000_000_000))
    return vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)


def reg(vcpu: int, which: int) -> int:
    return hv.hv_vcpu_read_register(vcpu, which)


def u64(vm: dict[str, object], address: int) -> int:
    return int(struct.unpack_from("<Q", vm["ram"], address)[0])  # type: ignore[arg-type]


# The first block (the jmp) is decoded and its chunk scanned by byte patterns only: the
# instructions below run in a later block, without a code hook, the first time.
UNHOOKED = """
        jmp body
        align 64
body:   mov qword [0x3000], 1
        mov eax, 0x1234
        mov edx, 0x71
        {insn}
        mov qword [0x3000], 2
        add qword [0x3008], 5
        out 0x80, al
        jmp $
"""


@pytest.mark.parametrize(
    ("insn", "reason"),
    [
        ("in al, dx", hv.VMX_REASON_IO),
        ("out dx, al", hv.VMX_REASON_IO),
        ("cpuid", hv.VMX_REASON_CPUID),
        ("hlt", hv.VMX_REASON_HLT),
    ],
)
def test_unhooked_site_exits_at_the_instruction(
    vm: dict[str, object], insn: str, reason: int
) -> None:
    vcpu = kernel_vcpu(vm, UNHOOKED.format(insn=insn))
    set_primary_controls(vcpu, hv.CPU_BASED_HLT)
    code = assemble_flat(UNHOOKED.format(insn=insn), 64, KERNEL + ORG)
    site = KERNEL + ORG + code.index(assemble_flat(insn, 64, 0))
    assert run(vcpu) == reason
    assert reg(vcpu, hv.HV_X86_RIP) == site  # before the instruction
    assert reg(vcpu, hv.HV_X86_RAX) == 0x1234  # nothing of it (or after it) happened
    assert u64(vm, 0x3000) == 1 and u64(vm, 0x3008) == 0  # the rest of the block undone
    if reason == hv.VMX_REASON_CPUID:
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, site + 2)
    else:
        skip_instruction(vcpu)
    assert run(vcpu) == hv.VMX_REASON_IO  # the out 0x80 after it
    assert u64(vm, 0x3000) == 2 and u64(vm, 0x3008) == 5
    skip_instruction(vcpu)
    for _ in range(3):  # from now on it is an ordinary site: exits every time, once
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, KERNEL + ORG)
        assert run(vcpu) == reason and reg(vcpu, hv.HV_X86_RIP) == site
    assert u64(vm, 0x3008) == 5


def test_pattern_sites_exit_in_chunk_code(vm: dict[str, object]) -> None:
    """RDMSR/WRMSR found by their bytes in a chunk exit before they execute."""
    source = """
        jmp body
        align 64
body:   mov ecx, 0x12345
        rdmsr
        mov qword [0x3000], 7
        wrmsr
        jmp $
"""
    vcpu = kernel_vcpu(vm, source)
    code = assemble_flat(source, 64, KERNEL + ORG)
    rdmsr = KERNEL + ORG + code.index(b"\x0f\x32")
    assert run(vcpu) == hv.VMX_REASON_RDMSR and reg(vcpu, hv.HV_X86_RIP) == rdmsr
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, rdmsr + 2)
    assert run(vcpu) == hv.VMX_REASON_WRMSR and u64(vm, 0x3000) == 7


READ_MODIFY_WRITE = """
        mov ecx, {count}
        mov ebx, 1
l:      add qword [0x3000], 1
        xadd qword [0x3008], rbx
        dec ecx
        jnz l
        out 0x80, al
        jmp $
"""


def test_kicks_never_run_an_instruction_twice(vm: dict[str, object]) -> None:
    """unicorn's emu_stop from another thread ends emulation after any memory access, RIP
    back at that instruction, which then runs again: a read-modify-write counted twice."""
    count = 1_000_000
    vcpu = kernel_vcpu(vm, READ_MODIFY_WRITE.format(count=count))
    done = threading.Event()
    kicks = [0]

    def kicker() -> None:
        while not done.is_set():
            time.sleep(0.0001)
            hv.hv_vcpu_interrupt([vcpu])
            kicks[0] += 1

    thread = threading.Thread(target=kicker)
    thread.start()
    try:
        while run(vcpu) != hv.VMX_REASON_IO:
            pass
    finally:
        done.set()
        thread.join()
    assert kicks[0] > 100
    total, rbx = 0, 1
    for _ in range(count):  # xadd: memory += rbx, rbx = old memory
        total, rbx = (total + rbx) & (1 << 64) - 1, total
    assert u64(vm, 0x3000) == count
    assert u64(vm, 0x3008) == total and reg(vcpu, hv.HV_X86_RBX) == rbx


def test_deadline_stops_chunk_code(vm: dict[str, object]) -> None:
    """Deadlines come from the watchdog thread: a spinning kernel loop stops on time."""
    vcpu = kernel_vcpu(vm, "l: inc rax\njmp l\n")
    start = time.monotonic()
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(30_000_000))
    elapsed = time.monotonic() - start
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_VMX_TIMER_EXPIRED
    assert 0.025 < elapsed < 0.5
    assert reg(vcpu, hv.HV_X86_RAX) > 1000


def test_interrupt_window_opens_after_a_long_cli_section(vm: dict[str, object]) -> None:
    """Interrupt-window exiting without single-stepping: the loop with IF clear runs at
    full speed and the exit comes once STI has taken effect."""
    source = """
        cli
        mov ecx, 2000000
l:      add qword [0x3000], 1
        dec ecx
        jnz l
        sti
        nop
        jmp $
"""
    vcpu = kernel_vcpu(vm, source)
    set_primary_controls(vcpu, hv.CPU_BASED_IRQ_WND)
    start = time.monotonic()
    assert run(vcpu) == hv.VMX_REASON_IRQ_WND
    assert time.monotonic() - start < 1.5
    assert u64(vm, 0x3000) == 2_000_000
    assert reg(vcpu, hv.HV_X86_RFLAGS) & 0x200


def test_host_rewrites_a_chunk_page_wholesale(vm: dict[str, object]) -> None:
    """The VMM writes a new program over scanned chunk code: the old sites are gone and the
    new program's exit where they now are, before they execute."""
    vcpu = kernel_vcpu(vm, "mov ecx, 0x12345\nrdmsr\njmp $\n")
    assert run(vcpu) == hv.VMX_REASON_RDMSR and reg(vcpu, hv.HV_X86_RIP) == KERNEL + ORG + 5
    program = assemble_flat(
        "times 700 nop\nmov qword [0x3000], 9\nmov ecx, 0x12345\nwrmsr\njmp $\n", 64, 0
    )
    page = bytes(range(256)) * 16  # every byte of the page changes
    vm["ram"][ORG : ORG + 0x1000] = program + page[len(program) :]  # type: ignore[index]
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, KERNEL + ORG)
    assert run(vcpu) == hv.VMX_REASON_WRMSR
    assert reg(vcpu, hv.HV_X86_RIP) == KERNEL + ORG + program.index(b"\x0f\x30")
    assert u64(vm, 0x3000) == 9
