"""gdbstub.vmxsetup: a vCPU set up and kept the way a VMM on Hypervisor.framework must.

Real guests on every backend (kvm, emu, the hvf binding over the shim): the set-up of every test
guest passes the VM-entry checks VMX makes, the guest reads CR0/CR4 from the read shadows, a
guest that turns on paging with EFER.LME set enters long mode with the IA-32e mode guest
control and EFER.LMA set by the VMM (on emu through the MOV-CR exit the VMM completes with
``handle_cr_access``; KVM switches modes itself and the backend reports the control from
EFER.LMA), and the CR helpers keep masks, shadows, PDPTEs and long mode in step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gdbdrive import backends, session
from guestbuild import build
from hvguest import (
    PML4,
    Vm,
    asm,
    backend_kind,
    build_long_mode_tables,
    hv_vm,
    reg,
    run_to_exit,
    set_reg,
    skip_instruction,
    vmcs,
)

from gdbstub import hv, vmxsetup
from gdbstub.hv import vmx_rules

__all__ = ["hv_vm"]

MODES = ("real", "protected", "paged32", "long", "user64")


def entry_failure(vcpu: int) -> vmx_rules.EntryFailure | None:
    """What VMX would say about entering ``vcpu`` now (None: the entry succeeds)."""
    caps = vmx_rules.Capabilities.read(hv.hv_vmx_read_capability)
    view = vmx_rules.VmcsView(lambda field_: hv.hv_vmx_vcpu_read_vmcs(vcpu, field_))
    return vmx_rules.check_entry(view, caps)


@pytest.mark.parametrize("mode", MODES)
def test_every_test_guest_set_up_passes_the_vm_entry_checks(hv_vm: Vm, mode: str) -> None:
    vcpu = hv_vm.vcpu(mode, b"\xe6\x10")  # out 0x10, al
    assert entry_failure(vcpu) is None
    assert vmcs(vcpu, hv.VMCS_GUEST_CR0) & hv.CR0_NE
    assert vmcs(vcpu, hv.VMCS_GUEST_CR4) & hv.CR4_VMXE
    assert vmcs(vcpu, hv.VMCS_CTRL_CR4_MASK) & hv.CR4_VMXE
    assert not vmxsetup.read_cr4(vcpu) & hv.CR4_VMXE
    proc = vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    assert proc & hv.CPU_BASED_TPR_SHADOW and proc & hv.CPU_BASED_SECONDARY_CTLS
    assert proc & hv.CPU_BASED_HLT
    assert vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED2) & hv.CPU_BASED2_UNRESTRICTED
    pin = vmcs(vcpu, hv.VMCS_CTRL_PIN_BASED)
    assert pin & hv.PIN_BASED_INTR and pin & hv.PIN_BASED_NMI
    entry = vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS)
    assert entry & hv.VMENTRY_LOAD_EFER
    long_mode = mode in ("long", "user64")
    assert bool(entry & hv.VMENTRY_GUEST_IA32E) == long_mode
    assert bool(vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER) & hv.EFER_LMA) == long_mode
    if mode == "paged32" and backend_kind() in ("kvm", "hvf-shim"):
        return  # this host's kvm_pvm runs no 32-bit paging (a triple fault at the first fetch)
    assert run_to_exit(vcpu) == hv.VMX_REASON_IO


def test_without_the_fixed_bits_the_entry_checks_fail(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu("protected", b"\xf4")
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_CR4, 0x600)  # no VMXE
    failure = entry_failure(vcpu)
    assert failure is not None and "CR4" in str(failure)
    vmxsetup.write_cr4(vcpu, 0x600)
    assert entry_failure(vcpu) is None


READ_CRS = asm(
    """
    mov eax, cr0
    out 0x10, eax
    mov eax, cr4
    out 0x11, eax
    hlt
    """,
    bits=32,
)


def _ports(vcpu: int, count: int) -> list[tuple[int, int]]:
    seen = []
    for _ in range(count):
        assert run_to_exit(vcpu) == hv.VMX_REASON_IO
        port = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16
        seen.append((port, reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF))
        skip_instruction(vcpu)
    return seen


def test_the_guest_reads_cr4_from_the_shadow(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu("protected", READ_CRS)
    cr4 = hv.CR4_OSFXSR | hv.CR4_OSXMMEXCPT
    assert vmcs(vcpu, hv.VMCS_GUEST_CR4) == cr4 | hv.CR4_VMXE
    seen = _ports(vcpu, 2)[1]
    assert seen == (0x11, cr4)
    assert vmxsetup.read_cr4(vcpu) == cr4


def test_cr0_the_guest_wrote_is_its_view_the_real_one_has_the_fixed_bits(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu("protected", READ_CRS)
    guest = hv.CR0_PE | hv.CR0_ET | hv.CR0_CD | hv.CR0_NW  # no NE; caches off
    vmxsetup.write_cr0(vcpu, guest)
    assert vmcs(vcpu, hv.VMCS_GUEST_CR0) == hv.CR0_PE | hv.CR0_ET | hv.CR0_NE
    assert vmcs(vcpu, hv.VMCS_CTRL_CR0_SHADOW) == guest
    assert vmcs(vcpu, hv.VMCS_CTRL_CR0_MASK) == vmxsetup.CR0_MASK
    assert vmxsetup.read_cr0(vcpu) == guest
    assert entry_failure(vcpu) is None
    cr0 = _ports(vcpu, 1)[0][1]
    if backend_kind() in ("kvm", "hvf-shim"):
        # KVM runs and shows the guest the real CR0 (docs/library.md): no CR0 shadow there
        assert cr0 == hv.CR0_PE | hv.CR0_ET | hv.CR0_NE
    else:  # emu shows the guest the shadow in the masked bits, as VMX does
        assert cr0 == guest


ENTER_LONG_MODE = asm(
    f"""
    mov eax, cr4
    or eax, 0x20            ; PAE
    mov cr4, eax
    mov eax, {PML4}
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100           ; EFER.LME
    wrmsr
    mov eax, cr0
    or eax, 0x80000000      ; PG: exits (masked) for the VMM to switch to long mode
    mov cr0, eax
    jmp 0x18:long64
    bits 64
long64:
    mov rax, cr0
    out 0x10, eax
    mov ecx, 0xC0000080
    rdmsr
    out 0x11, eax
    hlt
    """,
    bits=32,
)


def run_like_a_framework_vmm(vcpu: int, mem: vmxsetup.PhysicalMemory) -> list[tuple[int, int]]:
    """Run to HLT as a framework VMM: MOV-CR exits through vmxsetup, EFER through the VMCS,
    other MSRs through the backend; the (port, EAX) of each OUT, and each CR access seen."""
    seen: list[tuple[int, int]] = []
    while True:
        reason = run_to_exit(vcpu)
        if reason == hv.VMX_REASON_HLT:
            return seen
        if reason == hv.VMX_REASON_MOV_CR:
            access = vmxsetup.handle_cr_access(vcpu, mem)
            assert not access.fault, access
            seen.append((-1, access.cr))
            continue
        msr = reg(vcpu, hv.HV_X86_RCX) & 0xFFFFFFFF
        if reason == hv.VMX_REASON_RDMSR:
            if msr == hv.MSR_EFER:
                value = vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER)
            else:
                value = hv.hv_vcpu_read_msr(vcpu, msr)
            set_reg(vcpu, hv.HV_X86_RAX, value & 0xFFFFFFFF)
            set_reg(vcpu, hv.HV_X86_RDX, value >> 32)
        elif reason == hv.VMX_REASON_WRMSR:
            value = (reg(vcpu, hv.HV_X86_RDX) & 0xFFFFFFFF) << 32
            value |= reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF
            if msr == hv.MSR_EFER:
                vmxsetup.write_efer(vcpu, value, mem)
            else:
                hv.hv_vcpu_write_msr(vcpu, msr, value)
        else:
            assert reason == hv.VMX_REASON_IO, f"exit {reason}"
            port = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16
            seen.append((port, reg(vcpu, hv.HV_X86_RAX) & 0xFFFFFFFF))
        vmxsetup.skip_instruction(vcpu)


def test_a_guest_turning_on_paging_with_lme_enters_long_mode(hv_vm: Vm) -> None:
    build_long_mode_tables(hv_vm.mem)
    vcpu = hv_vm.vcpu("protected", ENTER_LONG_MODE)
    assert not vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & hv.VMENTRY_GUEST_IA32E
    seen = run_like_a_framework_vmm(vcpu, hv_vm.mem)
    outs = [(port, value) for port, value in seen if port >= 0]
    cr0 = hv.CR0_PG | hv.CR0_PE | hv.CR0_ET | hv.CR0_NE
    efer = hv.EFER_LME | hv.EFER_LMA
    assert outs[0][0] == 0x10 and outs[0][1] & cr0 == cr0
    assert outs[1] == (0x11, efer)
    assert vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & hv.VMENTRY_GUEST_IA32E
    assert vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER) & efer == efer
    assert vmxsetup.read_cr0(vcpu) & cr0 == cr0
    assert vmcs(vcpu, hv.VMCS_GUEST_TR_AR) & 0xF == 11
    assert entry_failure(vcpu) is None
    if backend_kind() == "emu":
        assert (-1, 0) in seen  # the VMM saw the MOV to CR0 that set PG


def test_vmm_switches_long_mode_with_pg_and_lme(hv_vm: Vm) -> None:
    """The VMM's own CR0/EFER writes keep LMA, the IA-32e control and TR in step."""
    build_long_mode_tables(hv_vm.mem)
    vcpu = hv_vm.vcpu("protected", b"\xf4")
    vmxsetup.set_control_registers(vcpu, cr4=hv.CR4_PAE, cr3=PML4, efer=hv.EFER_LME)
    assert not vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER) & hv.EFER_LMA
    vmxsetup.write_cr0(vcpu, hv.CR0_PG | hv.CR0_PE | hv.CR0_ET)
    assert vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER) == hv.EFER_LME | hv.EFER_LMA
    assert vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & hv.VMENTRY_GUEST_IA32E
    vmxsetup.write_cr0(vcpu, hv.CR0_PE | hv.CR0_ET)
    assert vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER) == hv.EFER_LME
    assert not vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & hv.VMENTRY_GUEST_IA32E
    assert entry_failure(vcpu) is None


def test_pae_paging_loads_the_pdptes_from_guest_memory(hv_vm: Vm) -> None:
    table = 0x20000 - 0x20  # 32-byte aligned, below the top of RAM
    pdptes = [0x21001, 0x22001, 0, 0x23001]
    hv_vm.mem.write(table, b"".join(p.to_bytes(8, "little") for p in pdptes))
    vcpu = hv_vm.vcpu("protected", b"\xf4")
    try:
        vmcs(vcpu, hv.VMCS_GUEST_PDPTE0)
    except hv.HvError:
        assert backend_kind() == "emu"
        pytest.xfail("emu has no PDPTE fields yet")
    with pytest.raises(ValueError, match="PDPTE"):
        vmxsetup.set_control_registers(vcpu, cr4=hv.CR4_PAE, cr3=table, cr0=0x80000031)
    vmxsetup.set_control_registers(
        vcpu, cr4=hv.CR4_PAE, cr3=table, cr0=0x80000031, memory=hv_vm.mem
    )
    fields = (hv.VMCS_GUEST_PDPTE0, hv.VMCS_GUEST_PDPTE1, hv.VMCS_GUEST_PDPTE2)
    assert [vmcs(vcpu, f) for f in (*fields, hv.VMCS_GUEST_PDPTE3)] == pdptes
    assert not vmcs(vcpu, hv.VMCS_CTRL_VMENTRY_CONTROLS) & hv.VMENTRY_GUEST_IA32E


CR_EXITS = asm(
    """
    mov eax, cr0
    or eax, 0x40000000      ; CD: a masked bit, so the MOV exits
    mov cr0, eax
    clts
    mov eax, cr0
    out 0x10, eax
    hlt
    """,
    bits=32,
)


def test_a_masked_cr0_write_is_completed_by_the_vmm(hv_vm: Vm) -> None:
    vcpu = hv_vm.vcpu("protected", CR_EXITS)
    seen = run_like_a_framework_vmm(vcpu, hv_vm.mem)
    if (-1, 0) not in seen:
        assert backend_kind() in ("kvm", "hvf-shim")  # KVM completes MOV to CR0 itself
        return
    assert vmcs(vcpu, hv.VMCS_CTRL_CR0_SHADOW) & hv.CR0_CD
    assert not vmcs(vcpu, hv.VMCS_GUEST_CR0) & hv.CR0_CD
    assert seen[-1] == (0x10, vmxsetup.read_cr0(vcpu))
    assert seen[-1][1] & hv.CR0_CD


def test_cr_write_rules() -> None:
    pe_pg = hv.CR0_PE | hv.CR0_PG
    assert vmxsetup.cr0_write_faults(hv.CR0_PG, 0, 0, 0, False)  # PG without PE
    assert vmxsetup.cr0_write_faults(hv.CR0_NW | hv.CR0_PE, 0, 0, 0, False)  # NW without CD
    assert vmxsetup.cr0_write_faults(pe_pg, hv.CR0_PE, 0, hv.EFER_LME, False)  # LME, no PAE
    assert not vmxsetup.cr0_write_faults(pe_pg, hv.CR0_PE, hv.CR4_PAE, hv.EFER_LME, False)
    assert vmxsetup.cr0_write_faults(hv.CR0_PE, pe_pg, hv.CR4_PAE, 0, True)  # PG off in 64-bit
    assert vmxsetup.cr0_write_faults(1 << 32 | hv.CR0_PE, 0, 0, 0, True)
    assert vmxsetup.guest_view(0x31, vmxsetup.CR0_MASK, 0x11) == 0x11
    assert vmxsetup.real_cr0(0x60000011) == 0x31 and vmxsetup.real_cr4(0) == hv.CR4_VMXE


@pytest.mark.gdb
@pytest.mark.parametrize("backend", ["kvm", "emu"])
def test_gdb_shows_and_sets_cr0_cr4_as_the_guest_sees_them(backend: str, tmp_path: Path) -> None:
    """pvh_kernel enters with the loader's CR0 = 0x11 and turns on PG itself: gdb shows
    0x80000011 (no NE) and CR4 without VMXE, while the VMCS holds the fixed bits; a CR4 gdb
    writes is the guest's view, VMXE stays in the real register, and the guest runs on."""
    if backend not in backends():
        pytest.skip(f"no {backend} here")
    with session(build("pvh_kernel"), backend, tmp_path) as (_stub, gdb):
        gdb.cmd("break main64")
        assert "main64" in gdb.cmd("continue", timeout=60)
        assert gdb.value("$cr0") == 0x80000011
        assert gdb.value("$cr4") == hv.CR4_PAE
        vmcs_text = gdb.cmd("monitor vmcs VMCS_GUEST_CR0 VMCS_GUEST_CR4")
        assert "0x80000031" in vmcs_text and "0x2020" in vmcs_text
        gdb.cmd("set $cr4 = $cr4 | 0x80")  # PGE
        assert gdb.value("$cr4") == hv.CR4_PAE | 0x80
        vmcs_text = gdb.cmd("monitor vmcs VMCS_GUEST_CR4 VMCS_CTRL_CR4_SHADOW")
        assert "0x20a0" in vmcs_text and "0xa0" in vmcs_text
        gdb.cmd("delete")
        assert "exited with code 041" in gdb.cmd("continue", timeout=60)
