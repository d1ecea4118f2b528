"""The Hypervisor.framework API on the real framework (Intel Macs), through ctypes.

Theory of operation
-------------------
This backend is a thin binding: every call goes to the framework's C function of the same
name, declared once in :data:`PROTOTYPES` with the exact C types of Apple's headers
(``hv.h``, ``hv_vmx.h``, ``hv_types.h``). What the binding adds:

* **Statuses.** Every ``hv_return_t`` (a ``mach_error_t``, read as unsigned 32-bit) other
  than HV_SUCCESS becomes ``HvError(code, call)``, the same exception as on kvm and emu.
* **Out-parameters.** ``uint64_t *`` / ``hv_vcpuid_t *`` / ``hv_vm_space_t *`` arguments are
  passed as pointers to ctypes integers and returned as Python ints.
* **Threads.** The framework binds a vCPU to the thread that created it. The binding records
  the owner of each vCPU it created and refuses owner-only calls from other threads with
  HV_BAD_ARGUMENT before they reach the framework, exactly as the kvm backend does, so that
  the error is the same everywhere (Apple documents none, reference section 13).
  ``hv_vcpu_interrupt`` is the one cross-thread call.
* **Kicks.** On macOS 10.15 ``hv_vcpu_interrupt`` had no effect on a vCPU outside the guest.
  Each vCPU therefore has a stop flag, set by ``hv_vcpu_interrupt`` and checked before every
  entry: when set, ``hv_vcpu_run``/``hv_vcpu_run_until`` return at once without entering and
  the exit fields read as exit 1 (VMX_REASON_IRQ), through a small override of
  ``hv_vmx_vcpu_read_vmcs``. The framework's ``hv_vcpu_interrupt`` is called only for vCPUs
  that are inside a run call, so a kick is reported once, not once by the flag and once more by
  the framework's own pending kick (macOS 11+ keeps one for the next entry).
* **Versions.** Symbols are looked up one by one. A call whose symbol the installed framework
  lacks raises ``HvError(HV_UNSUPPORTED, call, "needs macOS X")``. HV_DEADLINE_FOREVER exists
  from macOS 11.0; on 10.15 a FOREVER run is done as a loop of one-second deadlines that goes on
  while the deadline (exit 52) is the only reason to return.
* **Time.** ``mach_absolute_time``/``mach_timebase_info`` come from libSystem on Darwin. The
  library named by ``GDBSTUB_HVF_LIBRARY`` may export them too (the test shim does); without
  either, the clock is ``time.monotonic_ns`` with timebase 1/1.
* **Memory.** ``hv_vm_map`` takes the host address of the buffer
  (:func:`gdbstub.buffers.buffer_address`); the binding keeps the buffer object alive while it is
  mapped.
* **Extensions.** GDBSTUB_VMCS_MMIO_* read 0 here: the framework does not decode MMIO accesses,
  the VMM decodes and advances RIP itself. Writes to GDBSTUB_VMCS_MMIO_DATA are accepted and
  dropped.
* **hv_vcpu_flush.** Deprecated in macOS 11.0, where it has no effect and returns HV_UNSUPPORTED;
  the binding treats that answer as success (there is no cached state to commit).

The library path is ``/System/Library/Frameworks/Hypervisor.framework/Hypervisor`` unless the
environment variable ``GDBSTUB_HVF_LIBRARY`` names another one (the tests point it at a C shim
that forwards to the kvm backend, see ``tests/shim/hvshim.c``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..buffers import Buffer, buffer_address
from . import constants as C
from .errors import HvError

FRAMEWORK_PATH = "/System/Library/Frameworks/Hypervisor.framework/Hypervisor"
LIBRARY_ENV = "GDBSTUB_HVF_LIBRARY"
LIBSYSTEM_PATH = "/usr/lib/libSystem.B.dylib"

# --- C types of hv_types.h / hv_error.h -----------------------------------------------------
hv_return_t = ctypes.c_uint32  # mach_error_t (int); compared unsigned
hv_vcpuid_t = ctypes.c_uint32  # unsigned
hv_x86_reg_t = ctypes.c_int  # enum
hv_vmx_capability_t = ctypes.c_int  # enum
hv_capability_t = ctypes.c_uint64
hv_vm_options_t = ctypes.c_uint64
hv_vcpu_options_t = ctypes.c_uint64
hv_memory_flags_t = ctypes.c_uint64
hv_msr_flags_t = ctypes.c_uint32
hv_vm_space_t = ctypes.c_uint32  # unsigned
hv_uvaddr_t = ctypes.c_void_p  # const void *
hv_gpaddr_t = ctypes.c_uint64
c_uint64_p = ctypes.POINTER(ctypes.c_uint64)

_P = ctypes.c_void_p  # a pointer argument
_Proto = tuple[Any, tuple[Any, ...], str]

PROTOTYPES: dict[str, _Proto] = {
    # name: (restype, argtypes, macOS version that introduced it)
    # hv.h: VM
    "hv_capability": (hv_return_t, (hv_capability_t, c_uint64_p), "10.15"),
    "hv_vm_create": (hv_return_t, (hv_vm_options_t,), "10.10"),
    "hv_vm_destroy": (hv_return_t, (), "10.10"),
    # hv.h: memory (hv_uvaddr_t is const void *, sizes are size_t)
    "hv_vm_map": (hv_return_t, (hv_uvaddr_t, hv_gpaddr_t, ctypes.c_size_t, hv_memory_flags_t),
                  "10.10"),
    "hv_vm_unmap": (hv_return_t, (hv_gpaddr_t, ctypes.c_size_t), "10.10"),
    "hv_vm_protect": (hv_return_t, (hv_gpaddr_t, ctypes.c_size_t, hv_memory_flags_t), "10.10"),
    "hv_vm_space_create": (hv_return_t, (ctypes.POINTER(hv_vm_space_t),), "10.15"),
    "hv_vm_space_destroy": (hv_return_t, (hv_vm_space_t,), "10.15"),
    "hv_vm_map_space": (hv_return_t, (hv_vm_space_t, hv_uvaddr_t, hv_gpaddr_t, ctypes.c_size_t,
                                      hv_memory_flags_t), "10.15"),
    "hv_vm_unmap_space": (hv_return_t, (hv_vm_space_t, hv_gpaddr_t, ctypes.c_size_t), "10.15"),
    "hv_vm_protect_space": (hv_return_t, (hv_vm_space_t, hv_gpaddr_t, ctypes.c_size_t,
                                          hv_memory_flags_t), "10.15"),
    "hv_vm_sync_tsc": (hv_return_t, (ctypes.c_uint64,), "10.10"),
    # hv.h: vCPUs
    "hv_vcpu_create": (hv_return_t, (ctypes.POINTER(hv_vcpuid_t), hv_vcpu_options_t), "10.10"),
    "hv_vcpu_destroy": (hv_return_t, (hv_vcpuid_t,), "10.10"),
    "hv_vcpu_set_space": (hv_return_t, (hv_vcpuid_t, hv_vm_space_t), "10.15"),
    "hv_vcpu_run": (hv_return_t, (hv_vcpuid_t,), "10.10"),
    "hv_vcpu_run_until": (hv_return_t, (hv_vcpuid_t, ctypes.c_uint64), "10.15"),
    "hv_vcpu_interrupt": (hv_return_t, (ctypes.POINTER(hv_vcpuid_t), ctypes.c_uint), "10.10"),
    "hv_vcpu_invalidate_tlb": (hv_return_t, (hv_vcpuid_t,), "10.10"),
    "hv_vcpu_flush": (hv_return_t, (hv_vcpuid_t,), "10.10"),
    "hv_vcpu_get_exec_time": (hv_return_t, (hv_vcpuid_t, c_uint64_p), "10.10"),
    "hv_vcpu_read_register": (hv_return_t, (hv_vcpuid_t, hv_x86_reg_t, c_uint64_p), "10.10"),
    "hv_vcpu_write_register": (hv_return_t, (hv_vcpuid_t, hv_x86_reg_t, ctypes.c_uint64),
                               "10.10"),
    "hv_vcpu_read_fpstate": (hv_return_t, (hv_vcpuid_t, _P, ctypes.c_size_t), "10.10"),
    "hv_vcpu_write_fpstate": (hv_return_t, (hv_vcpuid_t, _P, ctypes.c_size_t), "10.10"),
    "hv_vcpu_enable_native_msr": (hv_return_t, (hv_vcpuid_t, ctypes.c_uint32, ctypes.c_bool),
                                  "10.10"),
    "hv_vcpu_enable_managed_msr": (hv_return_t, (hv_vcpuid_t, ctypes.c_uint32, ctypes.c_bool),
                                   "11.0"),
    "hv_vcpu_set_msr_access": (hv_return_t, (hv_vcpuid_t, ctypes.c_uint32, hv_msr_flags_t),
                               "11.0"),
    "hv_vcpu_read_msr": (hv_return_t, (hv_vcpuid_t, ctypes.c_uint32, c_uint64_p), "10.10"),
    "hv_vcpu_write_msr": (hv_return_t, (hv_vcpuid_t, ctypes.c_uint32, ctypes.c_uint64), "10.10"),
    # hv_vmx.h
    "hv_vmx_vcpu_read_vmcs": (hv_return_t, (hv_vcpuid_t, ctypes.c_uint32, c_uint64_p), "10.10"),
    "hv_vmx_vcpu_write_vmcs": (hv_return_t, (hv_vcpuid_t, ctypes.c_uint32, ctypes.c_uint64),
                               "10.10"),
    "hv_vmx_read_capability": (hv_return_t, (hv_vmx_capability_t, c_uint64_p), "10.10"),
}  # fmt: skip
"""Every framework function this backend calls: C return type, C argument types, and the
macOS release that introduced it (from the headers' availability macros)."""

OWNER_ONLY = frozenset(
    name
    for name in PROTOTYPES
    if name.startswith(("hv_vcpu_", "hv_vmx_vcpu_"))
    and name not in ("hv_vcpu_create", "hv_vcpu_interrupt")
)
"""vCPU calls Apple documents as 'must be called by the owning thread'."""

MACOS_11_MARKER = "hv_vcpu_enable_managed_msr"
"""A symbol new in macOS 11.0: its presence means HV_DEADLINE_FOREVER is understood."""

FOREVER_SLICE_NS = 1_000_000_000
"""Length of one run_until slice when HV_DEADLINE_FOREVER is emulated (macOS 10.15)."""

_EXTENSION_FIELDS = frozenset(
    {C.GDBSTUB_VMCS_MMIO_DATA, C.GDBSTUB_VMCS_MMIO_SIZE, C.GDBSTUB_VMCS_MMIO_DECODED}
)


def _bounds(ctype: Any) -> tuple[int, int]:
    bits = 8 * ctypes.sizeof(ctype)
    if ctype in (ctypes.c_int, ctypes.c_int32, ctypes.c_int64):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


_INT_BOUNDS: dict[Any, tuple[int, int]] = {
    t: _bounds(t)
    for t in (ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
}


class _MachTimebaseInfo(ctypes.Structure):
    _fields_ = [("numer", ctypes.c_uint32), ("denom", ctypes.c_uint32)]


def _reg_name(reg: int) -> str:
    return C.HV_X86_REG_NAMES.get(reg, f"register {reg}")


def _field_name(field_: int) -> str:
    return C.VMCS_FIELD_NAMES.get(field_, f"VMCS field {field_:#x}")


@dataclass
class _Vcpu:
    """What the binding knows about a vCPU it created."""

    owner: int
    stop: bool = False  # kick requested; the next entry returns exit 1 at once
    running: bool = False  # inside hv_vcpu_run / hv_vcpu_run_until
    override: dict[int, int] | None = None  # exit fields of a kick served by the flag


@dataclass
class _Mapping:
    asid: int
    gpa: int
    size: int
    keep: object = field(default=None, repr=False)


class HvfBackend:
    """``gdbstub.hv`` on Apple's Hypervisor.framework (see the module docstring)."""

    name = "hvf"

    def __init__(self, library: str | None = None) -> None:
        path = library or os.environ.get(LIBRARY_ENV) or FRAMEWORK_PATH
        self.library_path = path
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as exc:
            raise HvError(
                C.HV_NO_DEVICE,
                "hv_vm_create",
                f"cannot load {path} (Hypervisor.framework needs an Intel Mac, macOS 10.10+): "
                f"{exc}",
            ) from exc
        self._fn: dict[str, Any] = {}
        for fname, (restype, argtypes, _since) in PROTOTYPES.items():
            try:
                fn = getattr(self._lib, fname)
            except AttributeError:
                continue
            fn.restype = restype
            fn.argtypes = list(argtypes)
            self._fn[fname] = fn
        self.macos_11 = MACOS_11_MARKER in self._fn
        self._lock = threading.Lock()
        self._vcpus: dict[int, _Vcpu] = {}
        self._mappings: list[_Mapping] = []
        self._clock, self._timebase = self._bind_clock()

    # --- plumbing ---------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        """Whether the loaded framework exports ``name``."""
        return name in self._fn

    def _call(self, fname: str, *args: Any, detail: str = "") -> None:
        """Call framework function ``fname``; raise HvError for any status but HV_SUCCESS.

        Integer arguments are range-checked against their C type first (ctypes would silently
        wrap -1 into 0xffffffffffffffff): out of range is HV_BAD_ARGUMENT. ``detail`` goes into
        the HvError of a failed call (the framework returns only a code)."""
        fn = self._fn.get(fname)
        if fn is None:
            since = PROTOTYPES[fname][2]
            raise HvError(
                C.HV_UNSUPPORTED,
                fname,
                f"needs macOS {since}; {self.library_path} does not export {fname}",
            )
        for index, (arg, ctype) in enumerate(zip(args, PROTOTYPES[fname][1], strict=True)):
            bounds = _INT_BOUNDS.get(ctype)
            if bounds is not None and isinstance(arg, int) and not bounds[0] <= arg <= bounds[1]:
                raise HvError(
                    C.HV_BAD_ARGUMENT, fname, f"argument {index + 1} ({arg:#x}) out of range"
                )
        status = int(fn(*args)) & 0xFFFFFFFF
        if status != C.HV_SUCCESS:
            raise HvError(status, fname, detail)

    def _owned(self, vid: int, call: str) -> _Vcpu | None:
        """The vCPU record for an owner-only call; refuse calls from a foreign thread.

        An id this binding did not create is passed on for the framework to judge."""
        if not 0 <= vid <= 0xFFFFFFFF:
            raise HvError(C.HV_BAD_ARGUMENT, call, f"vCPU id {vid} out of range")
        vcpu = self._vcpus.get(vid)
        if vcpu is not None and vcpu.owner != threading.get_ident():
            raise HvError(C.HV_BAD_ARGUMENT, call, f"vCPU {vid} belongs to another thread")
        return vcpu

    def _bind_clock(self) -> tuple[Any, tuple[int, int]]:
        candidates: list[Any] = [self._lib]
        if platform.system() == "Darwin":
            try:
                candidates.append(ctypes.CDLL(LIBSYSTEM_PATH))
            except OSError:
                pass
        for lib in candidates:
            try:
                clock = lib.mach_absolute_time
                timebase = lib.mach_timebase_info
            except AttributeError:
                continue
            clock.restype = ctypes.c_uint64
            clock.argtypes = []
            timebase.restype = ctypes.c_int  # kern_return_t
            timebase.argtypes = [ctypes.POINTER(_MachTimebaseInfo)]
            info = _MachTimebaseInfo()
            if timebase(ctypes.byref(info)) != 0 or not info.numer or not info.denom:
                continue
            return clock, (int(info.numer), int(info.denom))
        return None, (1, 1)

    # --- time -------------------------------------------------------------------------------

    def mach_absolute_time(self) -> int:
        if self._clock is None:
            return time.monotonic_ns()
        return int(self._clock())

    def mach_timebase_info(self) -> tuple[int, int]:
        return self._timebase

    # --- VM ---------------------------------------------------------------------------------

    def hv_capability(self, cap: int) -> int:
        value = ctypes.c_uint64()
        self._call("hv_capability", cap, ctypes.byref(value))
        return int(value.value)

    def hv_vm_create(self, flags: int) -> None:
        try:
            self._call("hv_vm_create", flags)
        except HvError as exc:
            if exc.code in (C.HV_ERROR, C.HV_DENIED, C.HV_NO_DEVICE):
                # What an interpreter without the hypervisor entitlement gets (reference 12.1).
                raise HvError(
                    exc.code,
                    "hv_vm_create",
                    "is the Python interpreter signed with the com.apple.security.hypervisor "
                    "entitlement? see docs/macos.md",
                ) from exc
            raise

    def hv_vm_destroy(self) -> None:
        self._call("hv_vm_destroy")
        with self._lock:
            self._vcpus.clear()
            self._mappings.clear()

    # --- memory -----------------------------------------------------------------------------

    @staticmethod
    def _host_address(call: str, uva: Buffer | int, size: int) -> tuple[int, object]:
        """Address to pass as ``hv_uvaddr_t`` and the object to keep alive while mapped."""
        if isinstance(uva, int):
            if not 0 < uva < 1 << 64:
                raise HvError(C.HV_BAD_ARGUMENT, call, f"host address {uva:#x}")
            return uva, None
        try:
            address, length = buffer_address(uva)
        except (TypeError, ValueError) as exc:
            raise HvError(C.HV_BAD_ARGUMENT, call, f"host memory: {exc}") from exc
        if length < size:
            # The framework would map memory past the end of the buffer.
            raise HvError(
                C.HV_BAD_ARGUMENT, call, f"host memory holds {length:#x} bytes, map wants {size:#x}"
            )
        return address, uva

    def hv_vm_map(self, uva: Buffer | int, gpa: int, size: int, flags: int) -> None:
        address, keep = self._host_address("hv_vm_map", uva, size)
        self._call("hv_vm_map", address, gpa, size, flags)
        self._keep(C.HV_VM_SPACE_DEFAULT, gpa, size, keep)

    def hv_vm_unmap(self, gpa: int, size: int) -> None:
        self._call("hv_vm_unmap", gpa, size)
        self._release(C.HV_VM_SPACE_DEFAULT, gpa, size)

    def hv_vm_protect(self, gpa: int, size: int, flags: int) -> None:
        self._call("hv_vm_protect", gpa, size, flags)

    def hv_vm_space_create(self) -> int:
        asid = hv_vm_space_t()
        self._call("hv_vm_space_create", ctypes.byref(asid))
        return int(asid.value)

    def hv_vm_space_destroy(self, asid: int) -> None:
        self._call("hv_vm_space_destroy", asid)
        with self._lock:
            self._mappings = [m for m in self._mappings if m.asid != asid]

    def hv_vm_map_space(
        self, asid: int, uva: Buffer | int, gpa: int, size: int, flags: int
    ) -> None:
        address, keep = self._host_address("hv_vm_map_space", uva, size)
        self._call("hv_vm_map_space", asid, address, gpa, size, flags)
        self._keep(asid, gpa, size, keep)

    def hv_vm_unmap_space(self, asid: int, gpa: int, size: int) -> None:
        self._call("hv_vm_unmap_space", asid, gpa, size)
        self._release(asid, gpa, size)

    def hv_vm_protect_space(self, asid: int, gpa: int, size: int, flags: int) -> None:
        self._call("hv_vm_protect_space", asid, gpa, size, flags)

    def _keep(self, asid: int, gpa: int, size: int, keep: object) -> None:
        if keep is not None:
            with self._lock:
                self._mappings.append(_Mapping(asid, gpa, size, keep))

    def _release(self, asid: int, gpa: int, size: int) -> None:
        """Drop the buffers whose whole mapping lies inside the unmapped range."""
        with self._lock:
            self._mappings = [
                m
                for m in self._mappings
                if not (m.asid == asid and gpa <= m.gpa and m.gpa + m.size <= gpa + size)
            ]

    def hv_vm_sync_tsc(self, tsc: int) -> None:
        self._call("hv_vm_sync_tsc", tsc)

    # --- vCPU lifecycle ---------------------------------------------------------------------

    def hv_vcpu_create(self, flags: int) -> int:
        vid = hv_vcpuid_t()
        self._call("hv_vcpu_create", ctypes.byref(vid), flags)
        with self._lock:
            self._vcpus[int(vid.value)] = _Vcpu(threading.get_ident())
        return int(vid.value)

    def hv_vcpu_destroy(self, vid: int) -> None:
        self._owned(vid, "hv_vcpu_destroy")
        self._call("hv_vcpu_destroy", vid)
        with self._lock:
            self._vcpus.pop(vid, None)

    def hv_vcpu_set_space(self, vid: int, asid: int) -> None:
        self._owned(vid, "hv_vcpu_set_space")
        self._call("hv_vcpu_set_space", vid, asid)

    # --- running ----------------------------------------------------------------------------

    def hv_vcpu_interrupt(self, vids: list[int]) -> None:
        for vid in vids:
            if not 0 <= vid <= 0xFFFFFFFF:
                raise HvError(C.HV_BAD_ARGUMENT, "hv_vcpu_interrupt", f"vCPU id {vid}")
        with self._lock:
            # An id this binding did not create: the framework judges the whole list (kvm:
            # HV_BAD_ARGUMENT, nobody is kicked); no stop flag is set unless it accepts.
            # Otherwise only vCPUs inside a run call need the framework's kick.
            unknown = any(vid not in self._vcpus for vid in vids)
            targets = list(vids) if unknown else [v for v in vids if self._vcpus[v].running]
            if targets:
                array = (hv_vcpuid_t * len(targets))(*targets)
                self._call("hv_vcpu_interrupt", array, len(targets))
            for vid in vids:
                vcpu = self._vcpus.get(vid)
                if vcpu is not None:
                    vcpu.stop = True

    def _enter(self, vid: int, call: str, *args: int) -> None:
        """One framework run call, unless a kick is pending (then exit 1 without entering)."""
        vcpu = self._owned(vid, call)
        if vcpu is None:
            self._call(call, vid, *args)  # not created here: the framework's answer
            return
        with self._lock:
            if vcpu.stop:
                vcpu.stop = False
                vcpu.override = {C.VMCS_RO_EXIT_REASON: C.VMX_REASON_IRQ}
                return
            vcpu.override = None
            vcpu.running = True
        try:
            self._call(call, vid, *args)
        finally:
            with self._lock:
                vcpu.running = False
                kicked = vcpu.stop
        # A kick that arrived during the run and is what ended it has been served.
        if kicked and self._read_vmcs(vid, C.VMCS_RO_EXIT_REASON) & 0xFFFF == C.VMX_REASON_IRQ:
            with self._lock:
                vcpu.stop = False

    def hv_vcpu_run(self, vid: int) -> None:
        self._enter(vid, "hv_vcpu_run")

    def hv_vcpu_run_until(self, vid: int, deadline: int) -> None:
        if not 0 <= deadline <= C.HV_DEADLINE_FOREVER:
            raise HvError(C.HV_BAD_ARGUMENT, "hv_vcpu_run_until", "deadline out of range")
        if deadline != C.HV_DEADLINE_FOREVER or self.macos_11 or not self.has("hv_vcpu_run_until"):
            self._enter(vid, "hv_vcpu_run_until", deadline)
            return
        # macOS 10.15: no HV_DEADLINE_FOREVER. Run in slices; a slice's own deadline is no
        # reason to return.
        numer, denom = self._timebase
        while True:
            slice_end = self.mach_absolute_time() + FOREVER_SLICE_NS * denom // numer
            self._enter(vid, "hv_vcpu_run_until", slice_end)
            if self.hv_vmx_vcpu_read_vmcs(vid, C.VMCS_RO_EXIT_REASON) != (
                C.VMX_REASON_VMX_TIMER_EXPIRED
            ):
                return

    def hv_vcpu_invalidate_tlb(self, vid: int) -> None:
        self._owned(vid, "hv_vcpu_invalidate_tlb")
        self._call("hv_vcpu_invalidate_tlb", vid)

    def hv_vcpu_flush(self, vid: int) -> None:
        self._owned(vid, "hv_vcpu_flush")
        try:
            self._call("hv_vcpu_flush", vid)
        except HvError as exc:
            # macOS 11.0+: deprecated, no effect, always HV_UNSUPPORTED.
            if exc.code != C.HV_UNSUPPORTED or not self.macos_11:
                raise

    def hv_vcpu_get_exec_time(self, vid: int) -> int:
        self._owned(vid, "hv_vcpu_get_exec_time")
        value = ctypes.c_uint64()
        self._call("hv_vcpu_get_exec_time", vid, ctypes.byref(value))
        return int(value.value)

    # --- registers, fpstate, MSRs -----------------------------------------------------------

    def hv_vcpu_read_register(self, vid: int, reg: int) -> int:
        self._owned(vid, "hv_vcpu_read_register")
        self._check_int(reg, "hv_vcpu_read_register", "register")
        value = ctypes.c_uint64()
        self._call("hv_vcpu_read_register", vid, reg, ctypes.byref(value), detail=_reg_name(reg))
        return int(value.value)

    def hv_vcpu_write_register(self, vid: int, reg: int, value: int) -> None:
        self._owned(vid, "hv_vcpu_write_register")
        self._check_int(reg, "hv_vcpu_write_register", "register")
        self._check_u64(value, "hv_vcpu_write_register")
        self._call("hv_vcpu_write_register", vid, reg, value, detail=_reg_name(reg))

    @staticmethod
    def _check_int(value: int, call: str, what: str) -> None:
        if not -(1 << 31) <= value < 1 << 31:
            raise HvError(C.HV_BAD_ARGUMENT, call, f"{what} {value} out of range")

    @staticmethod
    def _check_u32(value: int, call: str, what: str) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise HvError(C.HV_BAD_ARGUMENT, call, f"{what} {value:#x} out of range")

    @staticmethod
    def _check_u64(value: int, call: str) -> None:
        if not 0 <= value < 1 << 64:
            raise HvError(C.HV_BAD_ARGUMENT, call, f"value {value:#x} does not fit 64 bits")

    @staticmethod
    def _fp_view(call: str, buffer: Buffer, size: int) -> memoryview:
        try:
            view = memoryview(buffer).cast("B")
        except TypeError as exc:
            raise HvError(C.HV_BAD_ARGUMENT, call, f"buffer: {exc}") from exc
        if not 0 <= size <= len(view):
            # The framework would read or write past the end of the buffer.
            raise HvError(
                C.HV_BAD_ARGUMENT, call, f"size {size} with a buffer of {len(view)} bytes"
            )
        return view

    def hv_vcpu_read_fpstate(self, vid: int, buffer: Buffer, size: int) -> None:
        self._owned(vid, "hv_vcpu_read_fpstate")
        view = self._fp_view("hv_vcpu_read_fpstate", buffer, size)
        if view.readonly:
            raise HvError(C.HV_BAD_ARGUMENT, "hv_vcpu_read_fpstate", "buffer is read-only")
        address = buffer_address(view)[0] if size else None
        self._call("hv_vcpu_read_fpstate", vid, address, size)

    def hv_vcpu_write_fpstate(self, vid: int, buffer: Buffer, size: int) -> None:
        self._owned(vid, "hv_vcpu_write_fpstate")
        view = self._fp_view("hv_vcpu_write_fpstate", buffer, size)
        copy = (ctypes.c_char * max(size, 1)).from_buffer_copy(bytes(view[:size]).ljust(1, b"\0"))
        self._call("hv_vcpu_write_fpstate", vid, ctypes.addressof(copy), size)

    def hv_vcpu_read_msr(self, vid: int, msr: int) -> int:
        self._owned(vid, "hv_vcpu_read_msr")
        self._check_u32(msr, "hv_vcpu_read_msr", "MSR")
        value = ctypes.c_uint64()
        self._call("hv_vcpu_read_msr", vid, msr, ctypes.byref(value), detail=f"MSR {msr:#x}")
        return int(value.value)

    def hv_vcpu_write_msr(self, vid: int, msr: int, value: int) -> None:
        self._owned(vid, "hv_vcpu_write_msr")
        self._check_u32(msr, "hv_vcpu_write_msr", "MSR")
        self._check_u64(value, "hv_vcpu_write_msr")
        self._call("hv_vcpu_write_msr", vid, msr, value, detail=f"MSR {msr:#x}")

    def hv_vcpu_enable_native_msr(self, vid: int, msr: int, enable: bool) -> None:
        self._owned(vid, "hv_vcpu_enable_native_msr")
        self._check_u32(msr, "hv_vcpu_enable_native_msr", "MSR")
        self._call("hv_vcpu_enable_native_msr", vid, msr, bool(enable))

    def hv_vcpu_enable_managed_msr(self, vid: int, msr: int, enable: bool) -> None:
        self._owned(vid, "hv_vcpu_enable_managed_msr")
        self._check_u32(msr, "hv_vcpu_enable_managed_msr", "MSR")
        self._call("hv_vcpu_enable_managed_msr", vid, msr, bool(enable))

    def hv_vcpu_set_msr_access(self, vid: int, msr: int, flags: int) -> None:
        self._owned(vid, "hv_vcpu_set_msr_access")
        self._check_u32(msr, "hv_vcpu_set_msr_access", "MSR")
        self._check_u32(flags, "hv_vcpu_set_msr_access", "flags")
        self._call("hv_vcpu_set_msr_access", vid, msr, flags)

    # --- VMX --------------------------------------------------------------------------------

    def _read_vmcs(self, vid: int, field_: int) -> int:
        value = ctypes.c_uint64()
        self._call(
            "hv_vmx_vcpu_read_vmcs", vid, field_, ctypes.byref(value), detail=_field_name(field_)
        )
        return int(value.value)

    def hv_vmx_vcpu_read_vmcs(self, vid: int, field_: int) -> int:
        vcpu = self._owned(vid, "hv_vmx_vcpu_read_vmcs")
        self._check_u32(field_, "hv_vmx_vcpu_read_vmcs", "field")
        if vcpu is not None:
            if field_ in _EXTENSION_FIELDS:
                return 0  # the framework does not decode MMIO accesses
            override = vcpu.override
            if override is not None and field_ in C.VMCS_EXIT_INFORMATION_FIELDS:
                return override.get(field_, 0)
        return self._read_vmcs(vid, field_)

    def hv_vmx_vcpu_write_vmcs(self, vid: int, field_: int, value: int) -> None:
        vcpu = self._owned(vid, "hv_vmx_vcpu_write_vmcs")
        self._check_u32(field_, "hv_vmx_vcpu_write_vmcs", "field")
        self._check_u64(value, "hv_vmx_vcpu_write_vmcs")
        if vcpu is not None and field_ == C.GDBSTUB_VMCS_MMIO_DATA:
            return  # nothing was decoded, so there is no access to complete
        self._call("hv_vmx_vcpu_write_vmcs", vid, field_, value, detail=_field_name(field_))

    def hv_vmx_read_capability(self, field_: int) -> int:
        self._check_int(field_, "hv_vmx_read_capability", "capability")
        value = ctypes.c_uint64()
        self._call(
            "hv_vmx_read_capability", field_, ctypes.byref(value), detail=f"capability {field_}"
        )
        return int(value.value)
