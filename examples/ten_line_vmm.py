"""The README's example: map memory, run a real-mode guest, handle its I/O exits (gdbstub.hv)."""
from gdbstub import hv, vmxsetup

hv.hv_vm_create()
ram = hv.hv_vm_allocate(0x10000)
ram[0x1000:0x1006] = bytes.fromhex("e610 fec0 ebfa")  # 1: out 0x10, al; inc al; jmp 1b
hv.hv_vm_map(ram, 0, len(ram), hv.HV_MEMORY_READ | hv.HV_MEMORY_WRITE | hv.HV_MEMORY_EXEC)
vcpu = hv.hv_vcpu_create()
for i, ar in enumerate((0x93, 0x9B, 0x93, 0x93, 0x93, 0x93, 0x10000, 0x8B)):  # ES CS SS DS FS GS LDTR TR
    for field, value in ((hv.VMCS_GUEST_ES, 0), (hv.VMCS_GUEST_ES_BASE, 0), (hv.VMCS_GUEST_ES_LIMIT, 0xFFFF), (hv.VMCS_GUEST_ES_AR, ar)):
        hv.hv_vmx_vcpu_write_vmcs(vcpu, field + 2 * i, value)
vmxsetup.setup_vcpu(vcpu, cr0=0x10)  # controls by cap2ctrl; CR0.NE, CR4.VMXE behind masks
hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RFLAGS, 0x2)
hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, 0x1000)
for _ in range(5):
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    assert hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_IO
    port = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16
    print(f"out port {port:#x} value {hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFF}")
    rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, rip + hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN))
