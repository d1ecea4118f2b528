/*
 * The x86 Hypervisor.framework prototypes this project binds, as Apple's headers declare them
 * (hv.h, hv_vmx.h, hv_types.h, hv_error.h of the macOS 10.15 / 11.3 SDKs; see
 * shared/reference/hv-framework.md, sections 1 and 4).  Written from that reference, not copied
 * from the SDK.  hvshim.c includes this file, so the compiler checks that every function the shim
 * exports has exactly this signature; tests/test_hv_hvf_shim.py parses it to check the ctypes
 * table of gdbstub/hv/hvf.py against it.
 *
 * One prototype per line, in the form:  hv_return_t NAME(ARGS); // since X.Y
 */
#ifndef HVSHIM_HV_X86_H
#define HVSHIM_HV_X86_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef int mach_error_t;
typedef mach_error_t hv_return_t;
typedef unsigned hv_vcpuid_t;
typedef const void *hv_uvaddr_t;
typedef uint64_t hv_gpaddr_t;
typedef unsigned hv_vm_space_t;
typedef uint64_t hv_vm_options_t;
typedef uint64_t hv_vcpu_options_t;
typedef uint64_t hv_memory_flags_t;
typedef uint64_t hv_capability_t;
typedef uint32_t hv_msr_flags_t;
typedef enum { HV_X86_RIP_ = 0, HV_X86_REGISTERS_MAX_ = 51 } hv_x86_reg_t;
typedef enum { HV_VMX_CAP_PINBASED_ = 0, HV_VMX_CAP_PREEMPTION_TIMER_ = 32 } hv_vmx_capability_t;

/* hv.h: VM */
hv_return_t hv_capability(hv_capability_t cap, uint64_t *value); // since 10.15
hv_return_t hv_vm_create(hv_vm_options_t flags); // since 10.10
hv_return_t hv_vm_destroy(void); // since 10.10
/* hv.h: memory */
hv_return_t hv_vm_map(hv_uvaddr_t uva, hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags); // since 10.10
hv_return_t hv_vm_unmap(hv_gpaddr_t gpa, size_t size); // since 10.10
hv_return_t hv_vm_protect(hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags); // since 10.10
hv_return_t hv_vm_space_create(hv_vm_space_t *asid); // since 10.15
hv_return_t hv_vm_space_destroy(hv_vm_space_t asid); // since 10.15
hv_return_t hv_vm_map_space(hv_vm_space_t asid, hv_uvaddr_t uva, hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags); // since 10.15
hv_return_t hv_vm_unmap_space(hv_vm_space_t asid, hv_gpaddr_t gpa, size_t size); // since 10.15
hv_return_t hv_vm_protect_space(hv_vm_space_t asid, hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags); // since 10.15
hv_return_t hv_vm_sync_tsc(uint64_t tsc); // since 10.10
/* hv.h: vCPUs */
hv_return_t hv_vcpu_create(hv_vcpuid_t *vcpu, hv_vcpu_options_t flags); // since 10.10
hv_return_t hv_vcpu_destroy(hv_vcpuid_t vcpu); // since 10.10
hv_return_t hv_vcpu_set_space(hv_vcpuid_t vcpu, hv_vm_space_t asid); // since 10.15
hv_return_t hv_vcpu_run(hv_vcpuid_t vcpu); // since 10.10
hv_return_t hv_vcpu_run_until(hv_vcpuid_t vcpu, uint64_t deadline); // since 10.15
hv_return_t hv_vcpu_interrupt(hv_vcpuid_t *vcpus, unsigned int vcpu_count); // since 10.10
hv_return_t hv_vcpu_invalidate_tlb(hv_vcpuid_t vcpu); // since 10.10
hv_return_t hv_vcpu_flush(hv_vcpuid_t vcpu); // since 10.10
hv_return_t hv_vcpu_get_exec_time(hv_vcpuid_t vcpu, uint64_t *time); // since 10.10
hv_return_t hv_vcpu_read_register(hv_vcpuid_t vcpu, hv_x86_reg_t reg, uint64_t *value); // since 10.10
hv_return_t hv_vcpu_write_register(hv_vcpuid_t vcpu, hv_x86_reg_t reg, uint64_t value); // since 10.10
hv_return_t hv_vcpu_read_fpstate(hv_vcpuid_t vcpu, void *buffer, size_t size); // since 10.10
hv_return_t hv_vcpu_write_fpstate(hv_vcpuid_t vcpu, void *buffer, size_t size); // since 10.10
hv_return_t hv_vcpu_enable_native_msr(hv_vcpuid_t vcpu, uint32_t msr, bool enable); // since 10.10
hv_return_t hv_vcpu_enable_managed_msr(hv_vcpuid_t vcpu, uint32_t msr, bool enable); // since 11.0
hv_return_t hv_vcpu_set_msr_access(hv_vcpuid_t vcpu, uint32_t msr, hv_msr_flags_t flags); // since 11.0
hv_return_t hv_vcpu_read_msr(hv_vcpuid_t vcpu, uint32_t msr, uint64_t *value); // since 10.10
hv_return_t hv_vcpu_write_msr(hv_vcpuid_t vcpu, uint32_t msr, uint64_t value); // since 10.10
/* hv_vmx.h */
hv_return_t hv_vmx_vcpu_read_vmcs(hv_vcpuid_t vcpu, uint32_t field, uint64_t *value); // since 10.10
hv_return_t hv_vmx_vcpu_write_vmcs(hv_vcpuid_t vcpu, uint32_t field, uint64_t value); // since 10.10
hv_return_t hv_vmx_read_capability(hv_vmx_capability_t field, uint64_t *value); // since 10.10

#endif
