"""Apple's Hypervisor.framework x86 API for Python, on hvf, Linux KVM or a software vCPU.

    from gdbstub import hv
    hv.hv_vm_create(hv.HV_VM_DEFAULT)
    ram = hv.hv_vm_allocate(0x10000)
    hv.hv_vm_map(ram, 0, len(ram), hv.HV_MEMORY_READ | hv.HV_MEMORY_WRITE | hv.HV_MEMORY_EXEC)
    vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    reason = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)

Names and constants are Apple's. C out-parameters become return values; a status other than
HV_SUCCESS raises :class:`HvError`. The backend is chosen by ``GDBSTUB_BACKEND`` (``hvf``,
``kvm``, ``emu``) or by :func:`select_backend`, else automatically (hvf on Darwin/x86_64,
then kvm when /dev/kvm opens, then emu). It is fixed by the first call that needs it.
"""

from __future__ import annotations

import os
import platform
import threading

from ..buffers import Buffer, page_aligned_memory
from .backend import HvBackend
from .constants import *  # noqa: F403  (Apple's names are the API)
from .constants import HV_BAD_ARGUMENT, HV_MSR_NONE, HV_UNSUPPORTED
from .errors import HvError as HvError

BACKEND_NAMES = ("hvf", "kvm", "emu")

_lock = threading.Lock()
_backend: HvBackend | None = None
_requested: str | None = None


def available_backends() -> list[str]:
    """Backends this machine can run, in the order ``auto`` tries them."""
    found: list[str] = []
    if platform.system() == "Darwin" and platform.machine() == "x86_64":
        found.append("hvf")
    if os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK):
        found.append("kvm")
    try:
        import unicorn  # noqa: F401

        found.append("emu")
    except ImportError:
        pass
    return found


def select_backend(name: str) -> None:
    """Choose the backend (``auto``, ``hvf``, ``kvm`` or ``emu``) before the first hv call.

    Raises HvError(HV_BUSY) when another backend is already in use, and
    HvError(HV_BAD_ARGUMENT) for an unknown name.
    """
    global _requested
    if name not in (*BACKEND_NAMES, "auto"):
        raise HvError(HV_BAD_ARGUMENT, "select_backend", f"unknown backend {name!r}")
    with _lock:
        if _backend is not None and name not in ("auto", _backend.name):
            raise HvError(0xFAE94002, "select_backend", f"backend {_backend.name} already in use")
        _requested = None if name == "auto" else name


def _load(name: str) -> HvBackend:
    if name == "kvm":
        from .kvm import KvmBackend

        return KvmBackend()
    if name == "emu":
        from .emu import EmuBackend

        return EmuBackend()
    if name == "hvf":
        from .hvf import HvfBackend  # type: ignore[import-not-found,unused-ignore]

        hvf: HvBackend = HvfBackend()
        return hvf
    raise HvError(HV_BAD_ARGUMENT, "select_backend", f"unknown backend {name!r}")


def backend() -> HvBackend:
    """The backend in use, loading it on first use."""
    global _backend
    if _backend is not None:
        return _backend
    with _lock:
        if _backend is None:
            name = _requested or os.environ.get("GDBSTUB_BACKEND") or "auto"
            if name == "auto":
                choices = available_backends()
                if not choices:
                    raise HvError(
                        HV_UNSUPPORTED, "backend", "no hvf, no usable /dev/kvm, no unicorn"
                    )
                name = choices[0]
            _backend = _load(name)
            _bind_hot_calls(_backend)
    return _backend


# The calls a VMM makes at every exit. Once the backend is loaded, the module's names for them
# are the backend's bound methods (same arguments, same errors), which saves a Python call and
# a lookup per call; the wrappers below document them and serve until then.
_HOT_CALLS = (
    "hv_vcpu_run",
    "hv_vcpu_run_until",
    "hv_vcpu_read_register",
    "hv_vcpu_write_register",
    "hv_vmx_vcpu_read_vmcs",
    "hv_vmx_vcpu_write_vmcs",
)
_wrappers: dict[str, object] = {}


def _bind_hot_calls(loaded: HvBackend) -> None:
    module = globals()
    for name in _HOT_CALLS:
        _wrappers.setdefault(name, module[name])
        module[name] = getattr(loaded, name)


def backend_name() -> str:
    """Name of the backend in use (``hvf``, ``kvm`` or ``emu``)."""
    return backend().name


# --- time ---------------------------------------------------------------------------------


def mach_absolute_time() -> int:
    """The clock of ``hv_vcpu_run_until`` deadlines (mach_absolute_time units)."""
    return backend().mach_absolute_time()


def mach_timebase_info() -> tuple[int, int]:
    """``(numer, denom)``: nanoseconds = ticks * numer / denom."""
    return backend().mach_timebase_info()


def deadline_after_ns(nanoseconds: int) -> int:
    """A ``hv_vcpu_run_until`` deadline ``nanoseconds`` from now."""
    numer, denom = mach_timebase_info()
    return mach_absolute_time() + nanoseconds * denom // numer


# --- VM and memory -------------------------------------------------------------------------


def hv_capability(cap: int) -> int:
    """Value of capability ``cap`` (HV_CAP_VCPUMAX, HV_CAP_ADDRSPACEMAX)."""
    return backend().hv_capability(cap)


def hv_vm_create(flags: int = 0) -> None:
    """Create the process's VM. A second one raises HV_BUSY."""
    backend().hv_vm_create(flags)


def hv_vm_destroy() -> None:
    """Destroy the process's VM (its vCPUs must have been destroyed)."""
    backend().hv_vm_destroy()


def hv_vm_allocate(size: int) -> Buffer:
    """Page-aligned, zeroed host memory (an ``mmap``) of ``size`` bytes, for ``hv_vm_map``."""
    if size <= 0 or size % 4096:
        raise HvError(HV_BAD_ARGUMENT, "hv_vm_allocate", f"size 0x{size:x} is not a page multiple")
    return page_aligned_memory(size)


def hv_vm_map(uva: Buffer | int, gpa: int, size: int, flags: int) -> None:
    """Map ``size`` bytes of host memory ``uva`` (a writable buffer or an address) at ``gpa``."""
    backend().hv_vm_map(uva, gpa, size, flags)


def hv_vm_unmap(gpa: int, size: int) -> None:
    """Unmap ``[gpa, gpa+size)`` from the default address space."""
    backend().hv_vm_unmap(gpa, size)


def hv_vm_protect(gpa: int, size: int, flags: int) -> None:
    """Change the permissions of ``[gpa, gpa+size)`` in the default address space."""
    backend().hv_vm_protect(gpa, size, flags)


def hv_vm_space_create() -> int:
    """Create an additional guest-physical address space and return its id."""
    return backend().hv_vm_space_create()


def hv_vm_space_destroy(asid: int) -> None:
    """Destroy address space ``asid`` (no vCPU may still be in it)."""
    backend().hv_vm_space_destroy(asid)


def hv_vm_map_space(asid: int, uva: Buffer | int, gpa: int, size: int, flags: int) -> None:
    """``hv_vm_map`` into address space ``asid``."""
    backend().hv_vm_map_space(asid, uva, gpa, size, flags)


def hv_vm_unmap_space(asid: int, gpa: int, size: int) -> None:
    """``hv_vm_unmap`` in address space ``asid``."""
    backend().hv_vm_unmap_space(asid, gpa, size)


def hv_vm_protect_space(asid: int, gpa: int, size: int, flags: int) -> None:
    """``hv_vm_protect`` in address space ``asid``."""
    backend().hv_vm_protect_space(asid, gpa, size, flags)


def hv_vm_sync_tsc(tsc: int) -> None:
    """Set the TSC of every vCPU to ``tsc``."""
    backend().hv_vm_sync_tsc(tsc)


# --- vCPUs ------------------------------------------------------------------------------------


def hv_vcpu_create(flags: int = 0) -> int:
    """Create a vCPU owned by the calling thread and return its id."""
    return backend().hv_vcpu_create(flags)


def hv_vcpu_destroy(vcpu: int) -> None:
    """Destroy ``vcpu`` (owner thread only)."""
    backend().hv_vcpu_destroy(vcpu)


def hv_vcpu_set_space(vcpu: int, asid: int) -> None:
    """Move ``vcpu`` into address space ``asid`` (owner thread only)."""
    backend().hv_vcpu_set_space(vcpu, asid)


def hv_vcpu_run(vcpu: int) -> None:
    """Run ``vcpu`` until its next exit of any kind (owner thread only)."""
    backend().hv_vcpu_run(vcpu)


def hv_vcpu_run_until(vcpu: int, deadline: int) -> None:
    """Run until an exit the VMM must handle, a kick (exit 1) or ``deadline`` (exit 52)."""
    backend().hv_vcpu_run_until(vcpu, deadline)


def hv_vcpu_interrupt(vcpus: list[int] | int) -> None:
    """Force the listed vCPUs out of the guest; callable from any thread."""
    backend().hv_vcpu_interrupt([vcpus] if isinstance(vcpus, int) else list(vcpus))


def hv_vcpu_invalidate_tlb(vcpu: int) -> None:
    """Flush the guest TLB of ``vcpu``."""
    backend().hv_vcpu_invalidate_tlb(vcpu)


def hv_vcpu_flush(vcpu: int) -> None:
    """Commit cached vCPU state."""
    backend().hv_vcpu_flush(vcpu)


def hv_vcpu_get_exec_time(vcpu: int) -> int:
    """Nanoseconds ``vcpu`` has spent running guest code."""
    return backend().hv_vcpu_get_exec_time(vcpu)


def hv_vcpu_read_register(vcpu: int, reg: int) -> int:
    """Value of ``hv_x86_reg_t`` register ``reg``."""
    return backend().hv_vcpu_read_register(vcpu, reg)


def hv_vcpu_write_register(vcpu: int, reg: int, value: int) -> None:
    """Set ``hv_x86_reg_t`` register ``reg``."""
    backend().hv_vcpu_write_register(vcpu, reg, value)


def hv_vcpu_read_fpstate(vcpu: int, buffer: Buffer, size: int | None = None) -> None:
    """Fill ``buffer`` with the XSAVE image of ``vcpu`` (x87, SSE, AVX...)."""
    backend().hv_vcpu_read_fpstate(vcpu, buffer, len(memoryview(buffer)) if size is None else size)


def hv_vcpu_write_fpstate(vcpu: int, buffer: Buffer, size: int | None = None) -> None:
    """Load the XSAVE image in ``buffer`` into ``vcpu``."""
    backend().hv_vcpu_write_fpstate(vcpu, buffer, len(memoryview(buffer)) if size is None else size)


def hv_vcpu_read_msr(vcpu: int, msr: int) -> int:
    """Guest value of MSR ``msr``."""
    return backend().hv_vcpu_read_msr(vcpu, msr)


def hv_vcpu_write_msr(vcpu: int, msr: int, value: int) -> None:
    """Set the guest value of MSR ``msr``."""
    backend().hv_vcpu_write_msr(vcpu, msr, value)


def hv_vcpu_enable_native_msr(vcpu: int, msr: int, enable: bool) -> None:
    """Let the guest read and write ``msr`` without exits (or take that back)."""
    backend().hv_vcpu_enable_native_msr(vcpu, msr, enable)


def hv_vcpu_enable_managed_msr(vcpu: int, msr: int, enable: bool) -> None:
    """Bind ``msr`` to the vCPU as a managed MSR (access then set by hv_vcpu_set_msr_access)."""
    backend().hv_vcpu_enable_managed_msr(vcpu, msr, enable)


def hv_vcpu_set_msr_access(vcpu: int, msr: int, flags: int = HV_MSR_NONE) -> None:
    """Grant the guest HV_MSR_READ and/or HV_MSR_WRITE on managed MSR ``msr``."""
    backend().hv_vcpu_set_msr_access(vcpu, msr, flags)


def hv_vmx_vcpu_read_vmcs(vcpu: int, field: int) -> int:
    """Value of VMCS field ``field`` of ``vcpu``."""
    return backend().hv_vmx_vcpu_read_vmcs(vcpu, field)


def hv_vmx_vcpu_write_vmcs(vcpu: int, field: int, value: int) -> None:
    """Write VMCS field ``field`` of ``vcpu``."""
    backend().hv_vmx_vcpu_write_vmcs(vcpu, field, value)


def hv_vmx_read_capability(field: int) -> int:
    """VMX capability ``field`` (low 32 bits: must be 1; high 32 bits: may be 1)."""
    return backend().hv_vmx_read_capability(field)


def cap2ctrl(cap: int, wanted: int) -> int:
    """Combine ``wanted`` control bits with a capability by the allowed-0/allowed-1 rule."""
    return (wanted | (cap & 0xFFFFFFFF)) & (cap >> 32)


def _reset_for_tests() -> None:
    """Forget the backend choice (tests that switch backends in one process)."""
    global _backend, _requested
    with _lock:
        _backend = None
        _requested = None
        globals().update(_wrappers)
