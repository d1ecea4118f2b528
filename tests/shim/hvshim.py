"""Build and drive ``hvshim``: Hypervisor.framework's C symbols on Linux, forwarding to KVM.

* :func:`build` compiles ``hvshim.c`` with gcc into ``tests/_build/hvshim_<macos>.so``
  (``macos`` 1100, 1015 or 1014: which framework release's symbols it exports).
* :data:`HOST` is the process's one :class:`ShimHost`: the ctypes callbacks every loaded shim
  forwards to, each calling the *host's own* :class:`gdbstub.hv.kvm.KvmBackend` (separate from
  whatever backend ``gdbstub.hv`` selected). It counts calls per function, and records any
  exception that is not an HvError (those become HV_ERROR in C, so a test must look).
* :func:`load` builds, registers the callbacks with that library and returns its path, for
  ``HvfBackend(library=...)`` or ``GDBSTUB_HVF_LIBRARY``.
* :func:`installed` makes an ``HvfBackend`` on a shim the backend of ``gdbstub.hv`` for the
  duration of a ``with`` block, so that ``tests/hvguest.py`` helpers and the ``hv_vm`` fixture
  run on hvf-over-shim unchanged.

The callback signatures below are written from the framework headers independently of the
table in ``gdbstub/hv/hvf.py``, so a wrong type there is not mirrored here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gdbstub import hv
from gdbstub.hv.hvf import HvfBackend
from gdbstub.hv.kvm import KvmBackend

SHIM_DIR = Path(__file__).resolve().parent
BUILD_DIR = SHIM_DIR.parent / "_build"
SOURCES = (SHIM_DIR / "hvshim.c", SHIM_DIR / "hv_x86.h")

_u32, _u64, _int, _size, _ptr = (
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_size_t,
    ctypes.c_void_p,
)
_u64p = ctypes.POINTER(ctypes.c_uint64)
_u32p = ctypes.POINTER(ctypes.c_uint32)

# name -> C argument types of the callback (same as the framework function); returns int.
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "hv_capability": (_u64, _u64p),
    "hv_vm_create": (_u64,),
    "hv_vm_destroy": (),
    "hv_vm_map": (_ptr, _u64, _size, _u64),
    "hv_vm_unmap": (_u64, _size),
    "hv_vm_protect": (_u64, _size, _u64),
    "hv_vm_space_create": (_u32p,),
    "hv_vm_space_destroy": (_u32,),
    "hv_vm_map_space": (_u32, _ptr, _u64, _size, _u64),
    "hv_vm_unmap_space": (_u32, _u64, _size),
    "hv_vm_protect_space": (_u32, _u64, _size, _u64),
    "hv_vm_sync_tsc": (_u64,),
    "hv_vcpu_create": (_u32p, _u64),
    "hv_vcpu_destroy": (_u32,),
    "hv_vcpu_set_space": (_u32, _u32),
    "hv_vcpu_run": (_u32,),
    "hv_vcpu_run_until": (_u32, _u64),
    "hv_vcpu_interrupt": (_u32p, ctypes.c_uint),
    "hv_vcpu_invalidate_tlb": (_u32,),
    "hv_vcpu_flush": (_u32,),
    "hv_vcpu_get_exec_time": (_u32, _u64p),
    "hv_vcpu_read_register": (_u32, _int, _u64p),
    "hv_vcpu_write_register": (_u32, _int, _u64),
    "hv_vcpu_read_fpstate": (_u32, _ptr, _size),
    "hv_vcpu_write_fpstate": (_u32, _ptr, _size),
    "hv_vcpu_enable_native_msr": (_u32, _u32, ctypes.c_bool),
    "hv_vcpu_enable_managed_msr": (_u32, _u32, ctypes.c_bool),
    "hv_vcpu_set_msr_access": (_u32, _u32, _u32),
    "hv_vcpu_read_msr": (_u32, _u32, _u64p),
    "hv_vcpu_write_msr": (_u32, _u32, _u64),
    "hv_vmx_vcpu_read_vmcs": (_u32, _u32, _u64p),
    "hv_vmx_vcpu_write_vmcs": (_u32, _u32, _u64),
    "hv_vmx_read_capability": (_int, _u64p),
}


def _signed(code: int) -> int:
    code &= 0xFFFFFFFF
    return code - (1 << 32) if code >= 1 << 31 else code


def _memory(address: int | None, size: int) -> Any:
    """The caller's C buffer as a writable ctypes array (no copy)."""
    if not address or not size:
        return bytearray(0)
    return (ctypes.c_char * size).from_address(address)


class ShimHost:
    """The Python side of every loaded shim: callbacks into one KvmBackend."""

    def __init__(self) -> None:
        self._kvm: KvmBackend | None = None
        self.calls: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self._callbacks: dict[str, Any] = {}  # kept alive for as long as C may call them
        self.registered: set[str] = set()

    @property
    def kvm(self) -> KvmBackend:
        if self._kvm is None:
            self._kvm = KvmBackend()
        return self._kvm

    def reset_kvm(self) -> None:
        """Forget the KVM backend (after a test left a vCPU or a VM behind)."""
        self._kvm = None

    def _implementations(self) -> dict[str, Callable[..., None]]:
        def kvm() -> KvmBackend:
            return self.kvm

        def out(pointer: Any, value: int) -> None:
            pointer[0] = value

        def interrupt(vcpus: Any, count: int) -> None:
            kvm().hv_vcpu_interrupt([int(vcpus[i]) for i in range(count)])

        return {
            "hv_capability": lambda cap, value: out(value, kvm().hv_capability(cap)),
            "hv_vm_create": lambda flags: kvm().hv_vm_create(flags),
            "hv_vm_destroy": lambda: kvm().hv_vm_destroy(),
            "hv_vm_map": lambda uva, gpa, size, flags: kvm().hv_vm_map(uva or 0, gpa, size, flags),
            "hv_vm_unmap": lambda gpa, size: kvm().hv_vm_unmap(gpa, size),
            "hv_vm_protect": lambda gpa, size, flags: kvm().hv_vm_protect(gpa, size, flags),
            "hv_vm_space_create": lambda asid: out(asid, kvm().hv_vm_space_create()),
            "hv_vm_space_destroy": lambda asid: kvm().hv_vm_space_destroy(asid),
            "hv_vm_map_space": lambda asid, uva, gpa, size, flags: kvm().hv_vm_map_space(
                asid, uva or 0, gpa, size, flags
            ),
            "hv_vm_unmap_space": lambda asid, gpa, size: kvm().hv_vm_unmap_space(asid, gpa, size),
            "hv_vm_protect_space": lambda asid, gpa, size, flags: kvm().hv_vm_protect_space(
                asid, gpa, size, flags
            ),
            "hv_vm_sync_tsc": lambda tsc: kvm().hv_vm_sync_tsc(tsc),
            "hv_vcpu_create": lambda vcpu, flags: out(vcpu, kvm().hv_vcpu_create(flags)),
            "hv_vcpu_destroy": lambda vcpu: kvm().hv_vcpu_destroy(vcpu),
            "hv_vcpu_set_space": lambda vcpu, asid: kvm().hv_vcpu_set_space(vcpu, asid),
            "hv_vcpu_run": lambda vcpu: kvm().hv_vcpu_run(vcpu),
            "hv_vcpu_run_until": lambda vcpu, deadline: kvm().hv_vcpu_run_until(vcpu, deadline),
            "hv_vcpu_interrupt": interrupt,
            "hv_vcpu_invalidate_tlb": lambda vcpu: kvm().hv_vcpu_invalidate_tlb(vcpu),
            "hv_vcpu_flush": lambda vcpu: kvm().hv_vcpu_flush(vcpu),
            "hv_vcpu_get_exec_time": lambda vcpu, time: out(
                time, kvm().hv_vcpu_get_exec_time(vcpu)
            ),
            "hv_vcpu_read_register": lambda vcpu, reg, value: out(
                value, kvm().hv_vcpu_read_register(vcpu, reg)
            ),
            "hv_vcpu_write_register": lambda vcpu, reg, value: kvm().hv_vcpu_write_register(
                vcpu, reg, value
            ),
            "hv_vcpu_read_fpstate": lambda vcpu, buffer, size: kvm().hv_vcpu_read_fpstate(
                vcpu, _memory(buffer, size), size
            ),
            "hv_vcpu_write_fpstate": lambda vcpu, buffer, size: kvm().hv_vcpu_write_fpstate(
                vcpu, _memory(buffer, size), size
            ),
            "hv_vcpu_enable_native_msr": lambda vcpu, msr, on: kvm().hv_vcpu_enable_native_msr(
                vcpu, msr, bool(on)
            ),
            "hv_vcpu_enable_managed_msr": lambda vcpu, msr, on: kvm().hv_vcpu_enable_managed_msr(
                vcpu, msr, bool(on)
            ),
            "hv_vcpu_set_msr_access": lambda vcpu, msr, flags: kvm().hv_vcpu_set_msr_access(
                vcpu, msr, flags
            ),
            "hv_vcpu_read_msr": lambda vcpu, msr, value: out(
                value, kvm().hv_vcpu_read_msr(vcpu, msr)
            ),
            "hv_vcpu_write_msr": lambda vcpu, msr, value: kvm().hv_vcpu_write_msr(vcpu, msr, value),
            "hv_vmx_vcpu_read_vmcs": lambda vcpu, field, value: out(
                value, kvm().hv_vmx_vcpu_read_vmcs(vcpu, field)
            ),
            "hv_vmx_vcpu_write_vmcs": lambda vcpu, field, value: kvm().hv_vmx_vcpu_write_vmcs(
                vcpu, field, value
            ),
            "hv_vmx_read_capability": lambda field, value: out(
                value, kvm().hv_vmx_read_capability(field)
            ),
        }

    def _guard(self, name: str, impl: Callable[..., None]) -> Callable[..., int]:
        """Never let an exception cross into C: HvError -> its code, anything else -> HV_ERROR."""

        def callback(*args: Any) -> int:
            self.calls[name] += 1
            try:
                impl(*args)
            except hv.HvError as exc:
                return _signed(exc.code)
            except BaseException:
                self.unexpected.append(f"{name}: {traceback.format_exc()}")
                return _signed(hv.HV_ERROR)
            return 0

        return callback

    def callback(self, name: str) -> Any:
        if name not in self._callbacks:
            proto = ctypes.CFUNCTYPE(ctypes.c_int, *SIGNATURES[name])
            self._callbacks[name] = proto(self._guard(name, self._implementations()[name]))
        return self._callbacks[name]

    def register(self, library: Path) -> None:
        """Fill the function table of the shim at ``library`` with this host's callbacks."""
        lib = ctypes.CDLL(str(library))
        lib.hvshim_slot_count.restype = ctypes.c_uint
        lib.hvshim_slot_name.restype = ctypes.c_char_p
        lib.hvshim_slot_name.argtypes = [ctypes.c_uint]
        lib.hvshim_register.restype = None
        lib.hvshim_register.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        count = lib.hvshim_slot_count()
        table = (ctypes.c_void_p * count)()
        for slot in range(count):
            name = lib.hvshim_slot_name(slot).decode()
            table[slot] = ctypes.cast(self.callback(name), ctypes.c_void_p)
        lib.hvshim_register(table)
        self.registered.add(str(library))


HOST = ShimHost()


def build(macos: int = 1100) -> Path:
    """Compile the shim for framework release ``macos`` (1100, 1015, 1014); cached by mtime."""
    BUILD_DIR.mkdir(exist_ok=True)
    target = BUILD_DIR / f"hvshim_{macos}.so"
    newest = max(src.stat().st_mtime for src in SOURCES)
    if target.exists() and target.stat().st_mtime >= newest:
        return target
    fd, tmp = tempfile.mkstemp(dir=BUILD_DIR, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror",
             "-fvisibility=hidden", f"-DHVSHIM_MACOS={macos}", "-o", tmp,
             str(SHIM_DIR / "hvshim.c")],
            check=True,
            capture_output=True,
            text=True,
        )  # fmt: skip
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(macos: int = 1100) -> Path:
    """Build the shim for ``macos``, register :data:`HOST`'s callbacks with it, return its path.

    ctypes loads a path once per process (dlopen), so the registration holds for every
    ``HvfBackend`` later opened on the same path."""
    path = build(macos)
    if str(path) not in HOST.registered:
        HOST.register(path)
    return path


@contextlib.contextmanager
def installed(macos: int = 1100) -> Iterator[HvfBackend]:
    """An HvfBackend on the shim, as the backend of ``gdbstub.hv`` inside the block."""
    backend = HvfBackend(library=str(load(macos)))
    saved = hv._backend, hv._requested
    hv._backend = backend
    try:
        yield backend
    finally:
        hv._backend, hv._requested = saved
