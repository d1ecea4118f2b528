"""Shared helpers for the ``gdbstub.hv`` tests: a VM fixture, guest memory, vCPU mode setup.

* ``hv_backend`` (a pytest fixture in tests/conftest.py, used directly or through ``hv_vm``):
  runs the test once per backend this machine offers, ``kvm``, ``emu`` and ``hvf-shim`` (the
  hvf binding over the C shim of tests/shim, forwarding to KVM). Yields the parameter's name.
* ``hv_vm`` (a pytest fixture, import it into a test module): creates the process's VM, yields
  a :class:`Vm`, then destroys the vCPUs the test thread created and the VM.
* :func:`kvm_backend`: the KvmBackend under the backend in use (itself on kvm, the shim's on
  hvf-shim), for tests that look inside KVM; skips on emu, which has no KVM underneath.
* :class:`Vm` holds guest RAM (``Vm.mem``, a :class:`GuestMemory` mapped at GPA 0) and creates
  vCPUs already set up for real mode, 32-bit protected mode (optionally with paging) or long mode,
  as a VMM on the framework must: controls, CR0/CR4 (fixed bits behind masks and read shadows)
  and EFER through ``gdbstub.vmxsetup``, segments through ``hv_vmx_vcpu_write_vmcs``.
* :func:`asm` assembles inline NASM source (``tests/guestbuild.assemble_flat``).

Guests run at CPL0, which this host's kvm_pvm emulates at ~1-2 M instructions/s: keep them tiny.
"""

from __future__ import annotations

import mmap
import shutil
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import pytest
from guestbuild import assemble_flat

from gdbstub import hv, vmxsetup

if TYPE_CHECKING:
    from gdbstub.hv.kvm import KvmBackend

RAM_SIZE = 0x40000  # 256 KiB at GPA 0
CODE = 0x1000  # where guest programs are loaded
STACK = 0x8000  # initial stack pointer
PML4 = 0x10000  # long-mode / 32-bit page tables live here (0x10000..0x14fff)
GDT = 0x500
IDT = 0x600
RWX = hv.HV_MEMORY_READ | hv.HV_MEMORY_WRITE | hv.HV_MEMORY_EXEC

# VMCS access-rights values
AR_CODE16 = 0x9B
AR_DATA16 = 0x93
AR_CODE32 = 0xC09B
AR_DATA32 = 0xC093
AR_CODE64 = 0xA09B
AR_LDTR = 0x10082
AR_TR = 0x8B

CR0_PE, CR0_ET, CR0_NE, CR0_PG = hv.CR0_PE, hv.CR0_ET, hv.CR0_NE, hv.CR0_PG
CR4_PSE, CR4_PAE, CR4_OSXSAVE = hv.CR4_PSE, hv.CR4_PAE, hv.CR4_OSXSAVE
CR4_OSFXSR, CR4_OSXMMEXCPT = hv.CR4_OSFXSR, hv.CR4_OSXMMEXCPT


def asm(source: str, bits: int = 16, org: int = CODE) -> bytes:
    """Assemble NASM ``source`` to a flat binary (``bits``-bit code at ``org``)."""
    return assemble_flat(source, bits=bits, org=org)


class GuestMemory:
    """Host view of guest RAM mapped at ``base``: byte and integer access by GPA."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.buf = cast(mmap.mmap, hv.hv_vm_allocate(size))
        self.base = base
        self.size = size

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        self.buf[off : off + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        off = gpa - self.base
        return bytes(self.buf[off : off + size])

    def u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def u16(self, gpa: int) -> int:
        return int(struct.unpack("<H", self.read(gpa, 2))[0])

    def u32(self, gpa: int) -> int:
        return int(struct.unpack("<I", self.read(gpa, 4))[0])

    def u64(self, gpa: int) -> int:
        return int(struct.unpack("<Q", self.read(gpa, 8))[0])

    def put32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def put64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))


def vmcs(vcpu: int, field_: int) -> int:
    return hv.hv_vmx_vcpu_read_vmcs(vcpu, field_)


def set_vmcs(vcpu: int, field_: int, value: int) -> None:
    hv.hv_vmx_vcpu_write_vmcs(vcpu, field_, value)


def reg(vcpu: int, r: int) -> int:
    return hv.hv_vcpu_read_register(vcpu, r)


def set_reg(vcpu: int, r: int, value: int) -> None:
    hv.hv_vcpu_write_register(vcpu, r, value)


def exit_reason(vcpu: int) -> int:
    return vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)


def set_segment(vcpu: int, index: int, selector: int, base: int, limit: int, ar: int) -> None:
    """Segment ``index`` in VMCS order (0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS, 6 LDTR, 7 TR)."""
    set_vmcs(vcpu, hv.VMCS_GUEST_ES + 2 * index, selector)
    set_vmcs(vcpu, hv.VMCS_GUEST_ES_BASE + 2 * index, base)
    set_vmcs(vcpu, hv.VMCS_GUEST_ES_LIMIT + 2 * index, limit)
    set_vmcs(vcpu, hv.VMCS_GUEST_ES_AR + 2 * index, ar)


def setup_controls(vcpu: int, hlt_exit: bool = True) -> None:
    """The control words a framework VMM writes (``vmxsetup.control_words``: cap2ctrl of HLT
    exiting (on by default), TPR shadow, secondary controls, load EFER...)."""
    for field_, value in vmxsetup.control_words(hlt_exiting=hlt_exit).items():
        set_vmcs(vcpu, field_, value)


def _start_at(
    vcpu: int, rip: int, *, cr0: int, cr4: int, efer: int = 0, cr3: int = 0, rflags: int = 2
) -> None:
    """The controls every test vCPU has, its CR0/CR4/EFER/CR3 as the guest has them (fixed
    bits, masks and shadows: ``vmxsetup.setup_vcpu``), RIP, RFLAGS and RSP."""
    vmxsetup.setup_vcpu(vcpu, cr0=cr0, cr4=cr4, efer=efer, cr3=cr3)
    set_reg(vcpu, hv.HV_X86_RIP, rip)
    set_reg(vcpu, hv.HV_X86_RFLAGS, rflags)
    set_reg(vcpu, hv.HV_X86_RSP, STACK)


def setup_real_mode(vcpu: int, rip: int = CODE) -> None:
    """16-bit real mode, all segment bases 0, RIP at ``rip``, SP at STACK."""
    for i in range(6):
        set_segment(vcpu, i, 0, 0, 0xFFFF, AR_CODE16 if i == 1 else AR_DATA16)
    set_segment(vcpu, 6, 0, 0, 0xFFFF, AR_LDTR)
    set_segment(vcpu, 7, 0, 0, 0xFFFF, AR_TR)
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_BASE, 0)
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_LIMIT, 0xFFFF)
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_BASE, 0)
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_LIMIT, 0x3FF)
    _start_at(vcpu, rip, cr0=CR0_ET, cr4=0)


def _flat_gdt(mem: GuestMemory) -> None:
    """GDT at GDT: null, 0x08 code32, 0x10 data32, 0x18 code64, 0x20 TSS (placeholder),
    0x28 user data, 0x30 user code64 (selectors 0x2b / 0x33 with RPL 3)."""
    mem.put64(GDT + 0x00, 0)
    mem.put64(GDT + 0x08, 0x00CF9B000000FFFF)
    mem.put64(GDT + 0x10, 0x00CF93000000FFFF)
    mem.put64(GDT + 0x18, 0x00AF9B000000FFFF)
    mem.put64(GDT + 0x20, 0x00008B000000FFFF)
    mem.put64(GDT + 0x28, 0x00CFF3000000FFFF)
    mem.put64(GDT + 0x30, 0x00AFFB000000FFFF)


def setup_protected_mode(
    vcpu: int, mem: GuestMemory, rip: int = CODE, paging: bool = False
) -> None:
    """Flat 32-bit protected mode (CS 0x08, data 0x10); with ``paging``, 32-bit paging with
    4 KiB pages identity-mapping the first 4 MiB (page directory at PML4, table at PML4+0x1000)."""
    _flat_gdt(mem)
    for i in range(6):
        if i == 1:
            set_segment(vcpu, i, 0x08, 0, 0xFFFFFFFF, AR_CODE32)
        else:
            set_segment(vcpu, i, 0x10, 0, 0xFFFFFFFF, AR_DATA32)
    set_segment(vcpu, 6, 0, 0, 0, AR_LDTR)
    set_segment(vcpu, 7, 0x20, 0, 0xFFFF, AR_TR)
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_BASE, GDT)
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_LIMIT, 0x37)
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_BASE, IDT)
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_LIMIT, 0x3FF)
    cr0 = CR0_PE | CR0_ET | CR0_NE
    if paging:
        mem.put32(PML4, (PML4 + 0x1000) | 0x3)
        for i in range(1024):
            mem.put32(PML4 + 0x1000 + 4 * i, (i << 12) | 0x3)
        cr0 |= CR0_PG
    _start_at(vcpu, rip, cr0=cr0, cr4=CR4_OSFXSR | CR4_OSXMMEXCPT, cr3=PML4 if paging else 0)


def build_long_mode_tables(mem: GuestMemory) -> None:
    """4-level tables at PML4 identity-mapping the first 2 MiB with 4 KiB user-accessible pages
    (PML4 -> PDPT at +0x1000 -> PD at +0x2000 -> PT at +0x3000)."""
    mem.put64(PML4, (PML4 + 0x1000) | 0x7)
    mem.put64(PML4 + 0x1000, (PML4 + 0x2000) | 0x7)
    mem.put64(PML4 + 0x2000, (PML4 + 0x3000) | 0x7)
    for i in range(512):
        mem.put64(PML4 + 0x3000 + 8 * i, (i << 12) | 0x7)


def pte_address(linear: int) -> int:
    """GPA of the long-mode PTE for ``linear`` (< 2 MiB) in the tables of build_long_mode_tables."""
    return PML4 + 0x3000 + 8 * (linear >> 12)


def setup_long_mode(vcpu: int, mem: GuestMemory, rip: int = CODE, user: bool = False) -> None:
    """64-bit mode, identity paging of the first 2 MiB, flat segments, SSE and XSAVE enabled.

    With ``user`` the vCPU starts at CPL3 (CS 0x33, SS 0x2b) with IOPL 3, so it may use IN/OUT:
    CPL3 code runs natively on this host, where CPL0 code is emulated (and the emulator knows no
    VEX-encoded instructions)."""
    _flat_gdt(mem)
    build_long_mode_tables(mem)
    if user:
        set_segment(vcpu, 1, 0x33, 0, 0xFFFFFFFF, AR_CODE64 | 0x60)
        for i in (0, 2, 3, 4, 5):
            set_segment(vcpu, i, 0x2B, 0, 0xFFFFFFFF, AR_DATA32 | 0x60)
    else:
        set_segment(vcpu, 1, 0x18, 0, 0xFFFFFFFF, AR_CODE64)
        for i in (0, 2, 3, 4, 5):
            set_segment(vcpu, i, 0x10, 0, 0xFFFFFFFF, AR_DATA32)
    set_segment(vcpu, 6, 0, 0, 0, AR_LDTR)
    set_segment(vcpu, 7, 0x20, 0, 0xFFFF, AR_TR)
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_BASE, GDT)
    set_vmcs(vcpu, hv.VMCS_GUEST_GDTR_LIMIT, 0x37)
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_BASE, IDT)
    set_vmcs(vcpu, hv.VMCS_GUEST_IDTR_LIMIT, 0xFFF)
    _start_at(
        vcpu,
        rip,
        cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE,
        efer=hv.EFER_LME,  # LMA and the IA-32e mode guest control follow from LME & PG
        cr3=PML4,
        rflags=0x3002 if user else 2,
    )


@dataclass
class Vm:
    """The process's VM for one test: RAM at GPA 0 and the vCPUs created through it."""

    mem: GuestMemory
    vcpus: list[int] = field(default_factory=list)

    def vcpu(self, mode: str = "real", code: bytes = b"", rip: int = CODE) -> int:
        """A new vCPU (owned by the calling thread) in ``mode`` (real, protected, paged32,
        long, user64) with ``code`` loaded at ``rip``."""
        if code:
            self.mem.write(rip, code)
        vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
        if threading.current_thread() is threading.main_thread():
            self.vcpus.append(vcpu)
        if mode == "real":
            setup_real_mode(vcpu, rip)
        elif mode == "protected":
            setup_protected_mode(vcpu, self.mem, rip)
        elif mode == "paged32":
            setup_protected_mode(vcpu, self.mem, rip, paging=True)
        elif mode == "long":
            setup_long_mode(vcpu, self.mem, rip)
        elif mode == "user64":
            setup_long_mode(vcpu, self.mem, rip, user=True)
        else:
            raise ValueError(mode)
        return vcpu

    def destroy(self, vcpu: int) -> None:
        hv.hv_vcpu_destroy(vcpu)
        if vcpu in self.vcpus:
            self.vcpus.remove(vcpu)


def run(vcpu: int, timeout_ns: int = 5_000_000_000) -> int:
    """``hv_vcpu_run_until`` with a safety deadline; returns the exit reason."""
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(timeout_ns))
    return exit_reason(vcpu)


def run_to_exit(vcpu: int, timeout_ns: int = 5_000_000_000) -> int:
    """Run until an exit other than a kick or deadline, failing the test on a timeout."""
    reason = run(vcpu, timeout_ns)
    assert reason != hv.VMX_REASON_VMX_TIMER_EXPIRED, "guest did not exit before the deadline"
    return reason


def skip_instruction(vcpu: int) -> None:
    """Advance RIP by VMCS_RO_VMEXIT_INSTR_LEN (what a VMM does after emulating)."""
    length = vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN)
    set_reg(vcpu, hv.HV_X86_RIP, reg(vcpu, hv.HV_X86_RIP) + length)


def run_to_port(vcpu: int) -> int:
    """Run, completing RDMSR/WRMSR exits as a VMM does, to the next OUT; its port."""
    while True:
        reason = run_to_exit(vcpu)
        if reason == hv.VMX_REASON_RDMSR:
            value = hv.hv_vcpu_read_msr(vcpu, reg(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF)
            set_reg(vcpu, hv.HV_X86_RAX, value & 0xFFFFFFFF)
            set_reg(vcpu, hv.HV_X86_RDX, value >> 32)
        elif reason == hv.VMX_REASON_WRMSR:
            value = (reg(vcpu, hv.HV_X86_RDX) & 0xFFFFFFFF) << 32
            value |= reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF
            hv.hv_vcpu_write_msr(vcpu, reg(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF, value)
        else:
            assert reason == hv.VMX_REASON_IO, f"exit {reason} at {reg(vcpu, hv.HV_X86_RIP):#x}"
            port = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16
            skip_instruction(vcpu)
            return port
        skip_instruction(vcpu)


def backend_params() -> list[str]:
    """The backends this machine offers, as test parameters (``hvf-shim`` needs KVM and gcc)."""
    found = [name for name in ("kvm", "emu") if name in hv.available_backends()]
    if "hvf" in hv.available_backends():
        found.insert(0, "hvf")
    if "kvm" in found and shutil.which("gcc") is not None:
        found.append("hvf-shim")
    return found


def backend_kind() -> str:
    """``kvm``, ``emu``, ``hvf-shim`` (the hvf binding over the test shim) or ``hvf``."""
    name = hv.backend_name()
    if name == "hvf" and "hvshim_" in str(getattr(hv.backend(), "library_path", "")):
        return "hvf-shim"
    return name


def kvm_backend() -> KvmBackend:
    """The KvmBackend that runs the vCPUs: the backend itself on kvm, the shim host's behind
    hvf-shim. Skips on emu and on a real hvf, where no KVM is underneath."""
    kind = backend_kind()
    if kind == "kvm":
        return cast("KvmBackend", hv.backend())
    if kind == "hvf-shim":
        from shim import hvshim

        return hvshim.HOST.kvm
    pytest.skip(f"looks inside KVM: the {kind} backend has no KVM underneath")


def new_vm() -> Vm:
    """Create the process's VM with RAM_SIZE bytes of RWX memory at GPA 0."""
    hv.hv_vm_create(hv.HV_VM_DEFAULT)
    mem = GuestMemory(RAM_SIZE)
    try:
        hv.hv_vm_map(mem.buf, 0, RAM_SIZE, RWX)
    except BaseException:
        hv.hv_vm_destroy()
        raise
    return Vm(mem)


def tear_down(vm: Vm, start_over: Callable[[], None]) -> None:
    """Destroy the test's vCPUs and the VM; ``start_over`` when a vCPU is left behind."""
    for vcpu in list(vm.vcpus):
        try:
            hv.hv_vcpu_destroy(vcpu)
        except hv.HvError:
            pass
    try:
        hv.hv_vm_destroy()
    except hv.HvError:
        start_over()


def emu_vm() -> Iterator[Vm]:
    """A fresh VM on the emu backend for a fixture (``yield from emu_vm()``), torn down after."""
    hv._reset_for_tests()
    hv.select_backend("emu")
    machine = new_vm()
    try:
        yield machine
    finally:
        tear_down(machine, hv._reset_for_tests)
        hv._reset_for_tests()


@pytest.fixture
def hv_vm(hv_backend: str) -> Iterator[Vm]:
    """The process's VM with RAM_SIZE bytes of RWX memory at GPA 0."""
    vm = new_vm()
    try:
        yield vm
    finally:
        # a vCPU of a test thread that survives: start over with a fresh backend
        tear_down(vm, hv._reset_for_tests)
