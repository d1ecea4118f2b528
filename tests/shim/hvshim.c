/*
 * hvshim: a stand-in for Hypervisor.framework on Linux, for testing gdbstub/hv/hvf.py.
 *
 * It exports the framework's C symbols with the framework's exact signatures (hv_x86.h, which
 * the compiler checks every definition against) and forwards each call, with the same
 * arguments, to a function pointer of the same signature registered by the test at load time
 * (hvshim_register).  The test fills the table with ctypes callbacks that call the kvm backend
 * (gdbstub.hv.kvm.KvmBackend) and write out-parameters through the C pointers.  So the hvf
 * binding's ctypes prototypes, out-parameters, buffers and status handling meet real C calling
 * conventions on the way in, and a real hypervisor on the way out.
 *
 * Each call runs on the calling thread, and so does the callback: the kvm backend's
 * owner-thread rules hold as on the framework.
 *
 * Build-time knobs:
 *   HVSHIM_MACOS=1014|1015|1100 (default 1100): leave out the symbols the framework of an older
 *     macOS lacks (10.15: hv_capability, spaces, hv_vcpu_run_until; 11.0: managed MSRs), to test
 *     the binding's version checks.
 * Time: mach_absolute_time / mach_timebase_info are exported too, with a timebase of 125/3
 * (ticks of 24 ns, as on Apple silicon; Intel Macs have 1/1) so that a binding that ignores or
 * swaps the timebase gets deadlines wrong by a factor of ~40 or ~1700.  hv_vcpu_run_until
 * converts its deadline from ticks to CLOCK_MONOTONIC nanoseconds, the kvm backend's clock.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "hv_x86.h"

#ifndef HVSHIM_MACOS
#define HVSHIM_MACOS 1100
#endif

#define HVSHIM_EXPORT __attribute__((visibility("default")))
#define HV_ERROR_CODE ((hv_return_t)0xfae94001u)
#define DEADLINE_FOREVER (~(uint64_t)0)
#define TB_NUMER 125u
#define TB_DENOM 3u

/* X(name, since, (parameters), (arguments)) for every plainly forwarded call, in slot order. */
#define HVSHIM_FORWARDED(X) \
    X(hv_capability, 1015, (hv_capability_t cap, uint64_t *value), (cap, value)) \
    X(hv_vm_create, 1010, (hv_vm_options_t flags), (flags)) \
    X(hv_vm_destroy, 1010, (void), ()) \
    X(hv_vm_map, 1010, (hv_uvaddr_t uva, hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags), \
      (uva, gpa, size, flags)) \
    X(hv_vm_unmap, 1010, (hv_gpaddr_t gpa, size_t size), (gpa, size)) \
    X(hv_vm_protect, 1010, (hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags), \
      (gpa, size, flags)) \
    X(hv_vm_space_create, 1015, (hv_vm_space_t *asid), (asid)) \
    X(hv_vm_space_destroy, 1015, (hv_vm_space_t asid), (asid)) \
    X(hv_vm_map_space, 1015, \
      (hv_vm_space_t asid, hv_uvaddr_t uva, hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags), \
      (asid, uva, gpa, size, flags)) \
    X(hv_vm_unmap_space, 1015, (hv_vm_space_t asid, hv_gpaddr_t gpa, size_t size), \
      (asid, gpa, size)) \
    X(hv_vm_protect_space, 1015, \
      (hv_vm_space_t asid, hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags), \
      (asid, gpa, size, flags)) \
    X(hv_vm_sync_tsc, 1010, (uint64_t tsc), (tsc)) \
    X(hv_vcpu_create, 1010, (hv_vcpuid_t *vcpu, hv_vcpu_options_t flags), (vcpu, flags)) \
    X(hv_vcpu_destroy, 1010, (hv_vcpuid_t vcpu), (vcpu)) \
    X(hv_vcpu_set_space, 1015, (hv_vcpuid_t vcpu, hv_vm_space_t asid), (vcpu, asid)) \
    X(hv_vcpu_run, 1010, (hv_vcpuid_t vcpu), (vcpu)) \
    X(hv_vcpu_interrupt, 1010, (hv_vcpuid_t *vcpus, unsigned int vcpu_count), (vcpus, vcpu_count)) \
    X(hv_vcpu_invalidate_tlb, 1010, (hv_vcpuid_t vcpu), (vcpu)) \
    X(hv_vcpu_flush, 1010, (hv_vcpuid_t vcpu), (vcpu)) \
    X(hv_vcpu_get_exec_time, 1010, (hv_vcpuid_t vcpu, uint64_t *time), (vcpu, time)) \
    X(hv_vcpu_read_register, 1010, (hv_vcpuid_t vcpu, hv_x86_reg_t reg, uint64_t *value), \
      (vcpu, reg, value)) \
    X(hv_vcpu_write_register, 1010, (hv_vcpuid_t vcpu, hv_x86_reg_t reg, uint64_t value), \
      (vcpu, reg, value)) \
    X(hv_vcpu_read_fpstate, 1010, (hv_vcpuid_t vcpu, void *buffer, size_t size), \
      (vcpu, buffer, size)) \
    X(hv_vcpu_write_fpstate, 1010, (hv_vcpuid_t vcpu, void *buffer, size_t size), \
      (vcpu, buffer, size)) \
    X(hv_vcpu_enable_native_msr, 1010, (hv_vcpuid_t vcpu, uint32_t msr, bool enable), \
      (vcpu, msr, enable)) \
    X(hv_vcpu_enable_managed_msr, 1100, (hv_vcpuid_t vcpu, uint32_t msr, bool enable), \
      (vcpu, msr, enable)) \
    X(hv_vcpu_set_msr_access, 1100, (hv_vcpuid_t vcpu, uint32_t msr, hv_msr_flags_t flags), \
      (vcpu, msr, flags)) \
    X(hv_vcpu_read_msr, 1010, (hv_vcpuid_t vcpu, uint32_t msr, uint64_t *value), \
      (vcpu, msr, value)) \
    X(hv_vcpu_write_msr, 1010, (hv_vcpuid_t vcpu, uint32_t msr, uint64_t value), \
      (vcpu, msr, value)) \
    X(hv_vmx_vcpu_read_vmcs, 1010, (hv_vcpuid_t vcpu, uint32_t field, uint64_t *value), \
      (vcpu, field, value)) \
    X(hv_vmx_vcpu_write_vmcs, 1010, (hv_vcpuid_t vcpu, uint32_t field, uint64_t value), \
      (vcpu, field, value)) \
    X(hv_vmx_read_capability, 1010, (hv_vmx_capability_t field, uint64_t *value), (field, value))

/* Every slot: hv_vcpu_run_until is defined by hand below (deadline conversion). */
#define HVSHIM_CALLS(X) \
    HVSHIM_FORWARDED(X) \
    X(hv_vcpu_run_until, 1015, (hv_vcpuid_t vcpu, uint64_t deadline), (vcpu, deadline))

#define SLOT(name, since, params, args) SLOT_##name,
enum { HVSHIM_CALLS(SLOT) SLOT_COUNT };

#define TYPEDEF(name, since, params, args) typedef hv_return_t(*name##_fn) params;
HVSHIM_CALLS(TYPEDEF)

static const void *table[SLOT_COUNT];

#define NAME(name, since, params, args) #name,
static const char *const slot_names[SLOT_COUNT] = {HVSHIM_CALLS(NAME)};

HVSHIM_EXPORT unsigned hvshim_slot_count(void) { return SLOT_COUNT; }

HVSHIM_EXPORT const char *hvshim_slot_name(unsigned slot) {
    return slot < SLOT_COUNT ? slot_names[slot] : NULL;
}

/* The callbacks, in slot order (NULL: the call returns HV_ERROR). */
HVSHIM_EXPORT void hvshim_register(const void **callbacks) {
    memcpy(table, callbacks, sizeof table);
}

/* Define the forwarder of `name` only if the emulated macOS has it. */
#define FORWARD(name, params, args) \
    HVSHIM_EXPORT hv_return_t name params { \
        name##_fn fn = (name##_fn)table[SLOT_##name]; \
        return fn ? fn args : HV_ERROR_CODE; \
    }
#define DEFINE_1010(name, params, args) FORWARD(name, params, args)
#if HVSHIM_MACOS >= 1015
#define DEFINE_1015(name, params, args) FORWARD(name, params, args)
#else
#define DEFINE_1015(name, params, args)
#endif
#if HVSHIM_MACOS >= 1100
#define DEFINE_1100(name, params, args) FORWARD(name, params, args)
#else
#define DEFINE_1100(name, params, args)
#endif
#define DEFINE(name, since, params, args) DEFINE_##since(name, params, args)
HVSHIM_FORWARDED(DEFINE)

/* --- time --------------------------------------------------------------------------------- */

struct mach_timebase_info {
    uint32_t numer;
    uint32_t denom;
};

static uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

HVSHIM_EXPORT uint64_t mach_absolute_time(void) {
    return (uint64_t)((unsigned __int128)monotonic_ns() * TB_DENOM / TB_NUMER);
}

HVSHIM_EXPORT int mach_timebase_info(struct mach_timebase_info *info) {
    info->numer = TB_NUMER;
    info->denom = TB_DENOM;
    return 0;
}

#if HVSHIM_MACOS >= 1015
HVSHIM_EXPORT hv_return_t hv_vcpu_run_until(hv_vcpuid_t vcpu, uint64_t deadline) {
    hv_vcpu_run_until_fn fn = (hv_vcpu_run_until_fn)table[SLOT_hv_vcpu_run_until];
    if (!fn) return HV_ERROR_CODE;
    if (deadline != DEADLINE_FOREVER) {
        unsigned __int128 ns = (unsigned __int128)deadline * TB_NUMER / TB_DENOM;
        deadline = ns >= DEADLINE_FOREVER ? DEADLINE_FOREVER - 1 : (uint64_t)ns;
    }
    return fn(vcpu, deadline);
}
#endif
