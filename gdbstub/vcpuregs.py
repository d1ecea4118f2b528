"""The debugger's registers of a gdbstub.hv vCPU: read all at once, read what a stop needs,
write back what gdb changed.

Theory of operation
-------------------
General, segment, control and debug registers come from ``hv_vcpu_read_register``; fs_base,
gs_base and EFER from the VMCS, k_gs_base from its MSR, cr8 from the TPR, the x87/SSE/AVX
registers from the XSAVE image of ``hv_vcpu_read_fpstate``. CR0 and CR4 are shown as the guest
sees them (``vmxsetup.read_cr0``/``read_cr4``: the read shadows in the bits the VMM owns, so no
CR4.VMXE and the guest's own CR0.NE/CD/NW), and a value gdb writes is the guest's new view: the
real register keeps the bits VMX requires and the VMM owns (``vmxsetup.debugger_write_cr``).
The paging bits (PG, PE, PAE, LA57) are the same in both views, so guest-virtual memory access
translates with what is shown.
"""

from __future__ import annotations

from . import hv, regs, vmxsetup, xsave

FPSTATE_SIZE = 4096

# gdb register name -> how to read it from the vCPU
_HV_GPRS = {
    "rax": hv.HV_X86_RAX,
    "rbx": hv.HV_X86_RBX,
    "rcx": hv.HV_X86_RCX,
    "rdx": hv.HV_X86_RDX,
    "rsi": hv.HV_X86_RSI,
    "rdi": hv.HV_X86_RDI,
    "rbp": hv.HV_X86_RBP,
    "rsp": hv.HV_X86_RSP,
    "r8": hv.HV_X86_R8,
    "r9": hv.HV_X86_R9,
    "r10": hv.HV_X86_R10,
    "r11": hv.HV_X86_R11,
    "r12": hv.HV_X86_R12,
    "r13": hv.HV_X86_R13,
    "r14": hv.HV_X86_R14,
    "r15": hv.HV_X86_R15,
    "rip": hv.HV_X86_RIP,
    "eflags": hv.HV_X86_RFLAGS,
    "cs": hv.HV_X86_CS,
    "ss": hv.HV_X86_SS,
    "ds": hv.HV_X86_DS,
    "es": hv.HV_X86_ES,
    "fs": hv.HV_X86_FS,
    "gs": hv.HV_X86_GS,
    "cr0": hv.HV_X86_CR0,
    "cr2": hv.HV_X86_CR2,
    "cr3": hv.HV_X86_CR3,
    "cr4": hv.HV_X86_CR4,
    "dr0": hv.HV_X86_DR0,
    "dr1": hv.HV_X86_DR1,
    "dr2": hv.HV_X86_DR2,
    "dr3": hv.HV_X86_DR3,
    "dr6": hv.HV_X86_DR6,
    "dr7": hv.HV_X86_DR7,
}
_VMCS_REGS = {
    "fs_base": hv.VMCS_GUEST_FS_BASE,
    "gs_base": hv.VMCS_GUEST_GS_BASE,
    "efer": hv.VMCS_GUEST_IA32_EFER,
}
_MSR_REGS = {"k_gs_base": hv.MSR_KGSBASE}
# efer before cr0/cr4 (a PG change then sees the new LME), everything else after them
_WRITE_ORDER = {"efer": 0, "cr4": 1, "cr3": 1, "cr0": 2}


def read_cpu(vcpu: int) -> tuple[dict[str, int], bytearray]:
    """All registers gdb shows for ``vcpu`` (owner thread): gdb names -> values, XSAVE image."""
    values = {name: hv.hv_vcpu_read_register(vcpu, reg) for name, reg in _HV_GPRS.items()}
    values["cr0"], values["cr4"] = vmxsetup.read_cr0(vcpu), vmxsetup.read_cr4(vcpu)
    for name, field_ in _VMCS_REGS.items():
        values[name] = hv.hv_vmx_vcpu_read_vmcs(vcpu, field_)
    for name, msr in _MSR_REGS.items():
        try:
            values[name] = hv.hv_vcpu_read_msr(vcpu, msr)
        except hv.HvError:
            values[name] = 0
    values["cr8"] = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_TPR) >> 4
    image = bytearray(FPSTATE_SIZE)
    hv.hv_vcpu_read_fpstate(vcpu, image)
    values.update(xsave.fp_registers_from_xsave(bytes(image)))
    return values, image


# Read at every stop: the expedited registers and the paging state for memory access.
_STOP_GPRS = (*regs.EXPEDITED, "cr0", "cr3", "cr4")


def read_stop_registers(vcpu: int) -> dict[str, int]:
    """What every stop needs of ``vcpu`` (owner thread), cheap to read: the registers stop
    replies expedite and those memory access translates with. gdb takes the expedited ones
    and skips ``g`` after a step, lldb asks for others with ``p``; the whole set (fpstate,
    MSRs, debug registers) is read when asked for."""
    values = {name: hv.hv_vcpu_read_register(vcpu, _HV_GPRS[name]) for name in _STOP_GPRS}
    values["cr0"], values["cr4"] = vmxsetup.read_cr0(vcpu), vmxsetup.read_cr4(vcpu)
    values["efer"] = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_GUEST_IA32_EFER)
    return values


def write_cpu(
    vcpu: int,
    values: dict[str, int],
    names: set[str],
    image: bytearray,
    memory: vmxsetup.PhysicalMemory | None = None,
) -> None:
    """Write the registers ``names`` of ``values`` back to ``vcpu`` (owner thread); CR0/CR4
    as the guest's view (``vmxsetup.debugger_write_cr``: the fixed bits stay in the real
    register), EFER with LMA following LME & PG; ``memory`` for the PDPTEs of PAE paging."""
    fp_written = False
    for name in sorted(names, key=lambda n: _WRITE_ORDER.get(n, 3)):
        value = values[name]
        if name in ("cr0", "cr4"):
            vmxsetup.debugger_write_cr(vcpu, int(name[2]), value, memory)
        elif name == "efer":
            vmxsetup.write_efer(vcpu, value, memory)
        elif name in _HV_GPRS:
            hv.hv_vcpu_write_register(vcpu, _HV_GPRS[name], value)
        elif name in _VMCS_REGS:
            hv.hv_vmx_vcpu_write_vmcs(vcpu, _VMCS_REGS[name], value)
        elif name in _MSR_REGS:
            hv.hv_vcpu_write_msr(vcpu, _MSR_REGS[name], value)
        elif name == "cr8":
            hv.hv_vcpu_write_register(vcpu, hv.HV_X86_TPR, value << 4)
        else:
            fp_written = True
    if fp_written:
        xsave.apply_fp_registers(image, {n: values[n] for n in names if n not in _HV_GPRS})
        hv.hv_vcpu_write_fpstate(vcpu, image)
