"""The hvf backend's ctypes binding, end to end against a C shim of Hypervisor.framework.

``tests/shim/hvshim.c`` exports the framework's C symbols with its exact signatures and forwards
each call to the kvm backend through ctypes callbacks (``tests/shim/hvshim.py``). These tests run
``gdbstub.hv.hvf.HvfBackend`` on that library: the prototypes, out-parameters, buffers, error
mapping, thread rules, kick flag and version checks of the binding meet real C calls. What they
cannot show is how Apple's framework itself behaves: see docs/macos.md.

Each test gets the shim-backed HvfBackend as the ``gdbstub.hv`` backend (``hvshim.installed``),
so the ``tests/hvguest.py`` helpers run on it unchanged; the kvm backend behind the shim is the
shim host's own instance, not the one ``gdbstub.hv`` would select.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hvguest import (
    CODE,
    RWX,
    GuestMemory,
    Vm,
    asm,
    new_vm,
    reg,
    run,
    set_reg,
    tear_down,
    vmcs,
)
from shim import hvshim

from gdbstub import hv
from gdbstub.hv import hvf
from gdbstub.hv.hvf import PROTOTYPES, HvfBackend

MS = 1_000_000

pytestmark = [
    pytest.mark.skipif(
        "kvm" not in hv.available_backends(), reason="the shim forwards to KVM: needs /dev/kvm"
    ),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the shim is built with gcc"),
]


def _cleanup(vm: Vm) -> None:
    tear_down(vm, hvshim.HOST.reset_kvm)  # a vCPU left behind: fresh KVM behind the shim


@pytest.fixture
def backend() -> Iterator[HvfBackend]:
    """HvfBackend on the full (macOS 11) shim, installed as gdbstub.hv's backend."""
    with hvshim.installed(1100) as hvf_backend:
        yield hvf_backend
    assert not hvshim.HOST.unexpected, "\n".join(hvshim.HOST.unexpected)


@pytest.fixture
def vm(backend: HvfBackend) -> Iterator[Vm]:
    """The process's VM (through the binding) with RAM at GPA 0."""
    machine = new_vm()
    try:
        yield machine
    finally:
        _cleanup(machine)


def calls(name: str) -> int:
    return hvshim.HOST.calls[name]


# --- the prototype table ------------------------------------------------------------------

_C_TYPES = {
    "hv_return_t": ctypes.c_uint32,  # mach_error_t, compared unsigned
    "hv_vcpuid_t": ctypes.c_uint32,
    "hv_x86_reg_t": ctypes.c_int,
    "hv_vmx_capability_t": ctypes.c_int,
    "hv_vm_space_t": ctypes.c_uint32,
    "hv_uvaddr_t": ctypes.c_void_p,
    "hv_gpaddr_t": ctypes.c_uint64,
    "hv_vm_options_t": ctypes.c_uint64,
    "hv_vcpu_options_t": ctypes.c_uint64,
    "hv_memory_flags_t": ctypes.c_uint64,
    "hv_capability_t": ctypes.c_uint64,
    "hv_msr_flags_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64,
    "uint32_t": ctypes.c_uint32,
    "size_t": ctypes.c_size_t,
    "bool": ctypes.c_bool,
    "unsigned int": ctypes.c_uint,
    "void *": ctypes.c_void_p,
}


def _ctype(decl: str) -> object:
    decl = re.sub(r"\s*\b\w+$", "", decl.strip())  # drop the parameter name
    if decl.endswith("*") and decl != "void *":
        return ctypes.POINTER(_C_TYPES[decl[:-1].strip()])
    return _C_TYPES[decl]


def _header_prototypes() -> dict[str, tuple[object, tuple[object, ...], str]]:
    text = (Path(hvshim.SHIM_DIR) / "hv_x86.h").read_text()
    found: dict[str, tuple[object, tuple[object, ...], str]] = {}
    for ret, name, params, since in re.findall(
        r"^(\w+) (hv_\w+)\((.*)\); // since ([\d.]+)$", text, re.M
    ):
        args = () if params == "void" else tuple(_ctype(p) for p in params.split(","))
        found[name] = (_C_TYPES[ret], args, since)
    return found


def test_prototype_table_matches_the_header() -> None:
    """Every ctypes prototype of hvf.py has exactly the C types (and availability) of the
    framework prototypes the shim is compiled against."""
    header = _header_prototypes()
    assert set(header) == set(PROTOTYPES)
    for name, (restype, argtypes, since) in PROTOTYPES.items():
        assert (restype, tuple(argtypes), since) == header[name], name


def test_shim_exports_every_prototype() -> None:
    lib = ctypes.CDLL(str(hvshim.load(1100)))
    for name in PROTOTYPES:
        assert hasattr(lib, name), name


# --- VM, memory, vCPUs ----------------------------------------------------------------------


def test_backend_is_selected_for_darwin_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert hv.available_backends()[0] == "hvf"


def test_library_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(hvshim.load(1100))
    monkeypatch.setenv(hvf.LIBRARY_ENV, path)
    assert HvfBackend().library_path == path
    monkeypatch.setenv(hvf.LIBRARY_ENV, "/nonexistent/Hypervisor")
    with pytest.raises(hv.HvError) as err:
        HvfBackend()
    assert err.value.code == hv.HV_NO_DEVICE
    assert "/nonexistent/Hypervisor" in str(err.value)


def test_capability_and_timebase(backend: HvfBackend) -> None:
    assert hv.hv_capability(hv.HV_CAP_VCPUMAX) >= 2
    assert hv.hv_capability(hv.HV_CAP_ADDRSPACEMAX) >= 2
    assert hv.mach_timebase_info() == (125, 3)  # the shim's, from its mach_timebase_info
    ticks = hv.mach_absolute_time()
    assert abs(ticks * 125 // 3 - time.monotonic_ns()) < 50 * MS


def test_vm_create_twice_is_busy(vm: Vm) -> None:
    with pytest.raises(hv.HvError) as err:
        hv.hv_vm_create(hv.HV_VM_DEFAULT)
    assert (err.value.code, err.value.call) == (hv.HV_BUSY, "hv_vm_create")


def test_map_passes_the_buffer_address(vm: Vm) -> None:
    """The guest sees the host buffer: the binding handed the framework its address."""
    extra = GuestMemory(0x1000, base=0x80000)
    extra.write(0x80000, b"\x5a")
    hv.hv_vm_map(extra.buf, 0x80000, 0x1000, RWX)
    vcpu = vm.vcpu("real", asm("mov ax, 0x8000\nmov ds, ax\nmov al, [0]\nout 0x80, al\nhlt"))
    assert run(vcpu) == hv.VMX_REASON_IO
    assert reg(vcpu, hv.HV_X86_RAX) & 0xFF == 0x5A
    hv.hv_vm_unmap(0x80000, 0x1000)
    with pytest.raises(hv.HvError) as err:
        hv.hv_vm_unmap(0x80000, 0x1000)  # the kvm backend's answer, through C
    assert err.value.code == hv.HV_BAD_ARGUMENT


def test_map_refuses_a_short_buffer(vm: Vm) -> None:
    before = calls("hv_vm_map")
    with pytest.raises(hv.HvError) as err:
        hv.hv_vm_map(bytearray(0x1000), 0x200000, 0x2000, RWX)
    assert err.value.code == hv.HV_BAD_ARGUMENT
    assert calls("hv_vm_map") == before  # refused before reaching the framework


def test_address_spaces_out_parameter(vm: Vm) -> None:
    asid = hv.hv_vm_space_create()
    assert asid >= 1
    mem = GuestMemory(0x1000)
    hv.hv_vm_map_space(asid, mem.buf, 0, 0x1000, RWX)
    hv.hv_vm_protect_space(asid, 0, 0x1000, hv.HV_MEMORY_READ)
    hv.hv_vm_unmap_space(asid, 0, 0x1000)
    hv.hv_vm_space_destroy(asid)


def test_vcpu_on_a_thread_registers_round_trip(vm: Vm) -> None:
    """A vCPU created on a thread: registers round-trip there; other threads are refused by
    the binding before the call reaches the framework."""
    created = threading.Event()
    release = threading.Event()
    result: dict[str, object] = {}

    def owner() -> None:
        try:
            vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
            result["vcpu"] = vcpu
            values = {hv.HV_X86_RAX: 0x0123456789ABCDEF, hv.HV_X86_R15: (1 << 64) - 2,
                      hv.HV_X86_RSP: 0x8000, hv.HV_X86_CR2: 0xDEAD000}  # fmt: skip
            for r, value in values.items():
                set_reg(vcpu, r, value)
            result["back"] = {r: reg(vcpu, r) for r in values} == values
            hv.hv_vcpu_write_msr(vcpu, hv.MSR_KGSBASE, 0xFFFF800000001000)
            result["msr"] = hv.hv_vcpu_read_msr(vcpu, hv.MSR_KGSBASE)
            created.set()
            release.wait(10)
            hv.hv_vcpu_destroy(vcpu)
        except BaseException as exc:
            result["error"] = exc
            created.set()

    thread = threading.Thread(target=owner)
    thread.start()
    assert created.wait(10)
    try:
        assert "error" not in result, result
        assert result["back"] is True
        assert result["msr"] == 0xFFFF800000001000
        vcpu = int(result["vcpu"])  # type: ignore[call-overload]
        before = calls("hv_vcpu_read_register")
        with pytest.raises(hv.HvError) as err:
            reg(vcpu, hv.HV_X86_RAX)
        assert err.value.code == hv.HV_BAD_ARGUMENT
        assert "another thread" in str(err.value)
        assert calls("hv_vcpu_read_register") == before
    finally:
        release.set()
        thread.join(10)
    assert "error" not in result, result


# --- running: I/O, deadlines, kicks -----------------------------------------------------------


def test_real_mode_out_loop(vm: Vm) -> None:
    """I/O exits read through the VMCS calls; the VMM advances RIP each time."""
    vcpu = vm.vcpu("real", asm("xor ax, ax\nagain:\nout 0x80, al\ninc ax\njmp again"))
    seen = []
    for _ in range(6):
        assert run(vcpu) == hv.VMX_REASON_IO
        qual = vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
        assert (qual >> 16, qual & 7, qual & hv.EXIT_QUAL_IO_IN) == (0x80, 0, 0)
        assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 2
        seen.append(reg(vcpu, hv.HV_X86_RAX) & 0xFF)
        rip = reg(vcpu, hv.HV_X86_RIP)
        set_reg(vcpu, hv.HV_X86_RIP, rip + 2)
    assert seen == [0, 1, 2, 3, 4, 5]
    assert hv.hv_vcpu_get_exec_time(vcpu) > 0


def test_run_until_deadline(vm: Vm) -> None:
    """A deadline in mach ticks (timebase 125/3 in the shim) ends a spinning guest with 52."""
    vcpu = vm.vcpu("real", asm("jmp $"))
    start = time.monotonic_ns()
    hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(60 * MS))
    elapsed = time.monotonic_ns() - start
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_VMX_TIMER_EXPIRED
    assert 50 * MS <= elapsed < 2000 * MS


def test_kick_from_another_thread(vm: Vm) -> None:
    vcpu = vm.vcpu("real", asm("jmp $"))
    before = calls("hv_vcpu_interrupt")
    timer = threading.Timer(0.05, hv.hv_vcpu_interrupt, args=([vcpu],))
    timer.start()
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    timer.join()
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_IRQ
    assert calls("hv_vcpu_interrupt") == before + 1  # the framework's kick was used
    # the kick was served once: the next run is not cut short
    assert run(vcpu, 30 * MS) == hv.VMX_REASON_VMX_TIMER_EXPIRED


def test_kick_before_entry_uses_the_stop_flag(vm: Vm) -> None:
    """A kick while the vCPU is outside the guest sets the binding's flag: the next run returns
    exit 1 at once without entering (macOS 10.15 ignored such kicks)."""
    vcpu = vm.vcpu("real", asm("out 0x80, al\nhlt"))
    assert run(vcpu) == hv.VMX_REASON_IO
    thread = threading.Thread(target=hv.hv_vcpu_interrupt, args=(vcpu,))
    thread.start()
    thread.join()
    entries = calls("hv_vcpu_run_until")
    interrupts = calls("hv_vcpu_interrupt")
    hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
    assert calls("hv_vcpu_run_until") == entries  # not entered
    assert calls("hv_vcpu_interrupt") == interrupts  # flag only, no framework kick
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_IRQ
    assert vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) == 0
    assert vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN) == 0
    # the I/O exit was not completed: the guest is still at the OUT; complete it and go on
    set_reg(vcpu, hv.HV_X86_RIP, CODE + 2)
    assert run(vcpu) == hv.VMX_REASON_HLT
    assert calls("hv_vcpu_run_until") == entries + 1


def test_mtf_through_cap2ctrl(vm: Vm) -> None:
    """Single-step: MTF in VMCS_CTRL_CPU_BASED, combined with hv_vmx_read_capability."""
    vcpu = vm.vcpu("real", asm("inc ax\ninc bx\nhlt"))
    cap = hv.hv_vmx_read_capability(hv.HV_VMX_CAP_PROCBASED)
    assert cap >> 32 & hv.CPU_BASED_MTF
    controls = vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
    hv.hv_vmx_vcpu_write_vmcs(
        vcpu, hv.VMCS_CTRL_CPU_BASED, hv.cap2ctrl(cap, controls | hv.CPU_BASED_MTF)
    )
    assert run(vcpu) == hv.VMX_REASON_MTF
    assert reg(vcpu, hv.HV_X86_RIP) == CODE + 1
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, controls)
    assert run(vcpu) == hv.VMX_REASON_HLT


def test_mmio_extension_fields_read_zero(vm: Vm) -> None:
    vcpu = vm.vcpu("real", asm("hlt"))
    before = calls("hv_vmx_vcpu_read_vmcs")
    for field_ in (
        hv.GDBSTUB_VMCS_MMIO_DATA,
        hv.GDBSTUB_VMCS_MMIO_SIZE,
        hv.GDBSTUB_VMCS_MMIO_DECODED,
    ):
        assert vmcs(vcpu, field_) == 0
    hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.GDBSTUB_VMCS_MMIO_DATA, 5)
    assert calls("hv_vmx_vcpu_read_vmcs") == before


# --- fpstate, errors --------------------------------------------------------------------------


def test_fpstate_buffer_round_trip_and_short_buffer(vm: Vm) -> None:
    vcpu = vm.vcpu("real", asm("hlt"))
    image = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, image)
    assert int.from_bytes(image[0:2], "little") == 0x37F  # FCW after reset
    image[160:176] = bytes(range(16))  # XMM0
    image[512] |= 2  # XSTATE_BV: SSE
    hv.hv_vcpu_write_fpstate(vcpu, bytes(image))
    again = bytearray(4096)
    hv.hv_vcpu_read_fpstate(vcpu, again)
    assert again[160:176] == bytes(range(16))
    before = calls("hv_vcpu_read_fpstate")
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_read_fpstate(vcpu, bytearray(64))
    assert (err.value.code, err.value.call) == (hv.HV_BAD_ARGUMENT, "hv_vcpu_read_fpstate")
    assert calls("hv_vcpu_read_fpstate") == before + 1  # the shim's callback said so
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_read_fpstate(vcpu, bytearray(64), 4096)  # size beyond the buffer
    assert err.value.code == hv.HV_BAD_ARGUMENT
    assert calls("hv_vcpu_read_fpstate") == before + 1  # refused by the binding


def test_error_mapping(vm: Vm) -> None:
    """Framework statuses become HvError(code, call), unsigned, through C."""
    vcpu = vm.vcpu("real", asm("hlt"))
    before = calls("hv_vcpu_read_register")
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_read_register(vcpu + 7, hv.HV_X86_RAX)  # no such vCPU
    assert (err.value.code, err.value.call) == (hv.HV_BAD_ARGUMENT, "hv_vcpu_read_register")
    assert err.value.name == "HV_BAD_ARGUMENT"
    assert calls("hv_vcpu_read_register") == before + 1
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_read_register(vcpu, 99)  # no such register
    assert err.value.code == hv.HV_BAD_ARGUMENT
    with pytest.raises(hv.HvError) as err:
        hv.hv_capability(77)
    assert err.value.code == hv.HV_BAD_ARGUMENT
    with pytest.raises(hv.HvError) as err:
        hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_EPTP)
    assert err.value.code == hv.HV_UNSUPPORTED
    with pytest.raises(hv.HvError) as err:
        hv.hv_vcpu_interrupt([vcpu, vcpu + 7])
    assert err.value.code == hv.HV_BAD_ARGUMENT
    assert run(vcpu) == hv.VMX_REASON_HLT  # nobody was kicked


def test_callback_exception_becomes_hv_error(backend: HvfBackend) -> None:
    """A Python exception in a callback never crosses into C: the call returns HV_ERROR."""
    saved = hvshim.HOST._kvm
    hvshim.HOST._kvm = object()  # type: ignore[assignment]
    try:
        with pytest.raises(hv.HvError) as err:
            hv.hv_vm_create(hv.HV_VM_DEFAULT)
        assert err.value.code == hv.HV_ERROR
        assert "com.apple.security.hypervisor" in str(err.value)  # the likely cause on a Mac
        assert any("hv_vm_create" in u for u in hvshim.HOST.unexpected)
    finally:
        hvshim.HOST._kvm = saved
        hvshim.HOST.unexpected.clear()


# --- older frameworks -------------------------------------------------------------------------


def test_missing_symbols_on_macos_10_14() -> None:
    with hvshim.installed(1014) as old:
        assert not old.has("hv_vcpu_run_until")
        machine = new_vm()
        try:
            vcpu = machine.vcpu("real", asm("hlt"))
            with pytest.raises(hv.HvError) as err:
                hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
            assert (err.value.code, err.value.call) == (hv.HV_UNSUPPORTED, "hv_vcpu_run_until")
            assert "needs macOS 10.15" in str(err.value)
            with pytest.raises(hv.HvError) as err:
                hv.hv_capability(hv.HV_CAP_VCPUMAX)
            assert "needs macOS 10.15" in str(err.value)
            hv.hv_vcpu_run(vcpu)  # 10.10's run still works
            assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_HLT
        finally:
            _cleanup(machine)


def test_macos_10_15_managed_msrs_and_forever() -> None:
    """10.15: no managed MSRs (clear error); HV_DEADLINE_FOREVER done as deadline slices."""
    with hvshim.installed(1015) as old:
        assert not old.macos_11
        machine = new_vm()
        try:
            vcpu = machine.vcpu("real", asm("jmp $"))
            with pytest.raises(hv.HvError) as err:
                hv.hv_vcpu_enable_managed_msr(vcpu, hv.MSR_TSC_AUX, True)
            assert err.value.code == hv.HV_UNSUPPORTED
            assert "hv_vcpu_enable_managed_msr: HV_UNSUPPORTED (needs macOS 11.0" in str(err.value)
            entries = calls("hv_vcpu_run_until")
            timer = threading.Timer(0.05, hv.hv_vcpu_interrupt, args=(vcpu,))
            timer.start()
            hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
            timer.join()
            assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_IRQ
            assert calls("hv_vcpu_run_until") == entries + 1
        finally:
            _cleanup(machine)


def test_forever_slices_go_on_past_the_slice_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hvf, "FOREVER_SLICE_NS", 20 * MS)
    with hvshim.installed(1015):
        machine = new_vm()
        try:
            vcpu = machine.vcpu("real", asm("jmp $"))
            entries = calls("hv_vcpu_run_until")
            timer = threading.Timer(0.15, hv.hv_vcpu_interrupt, args=(vcpu,))
            timer.start()
            hv.hv_vcpu_run_until(vcpu, hv.HV_DEADLINE_FOREVER)
            timer.join()
            assert vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) == hv.VMX_REASON_IRQ
            assert calls("hv_vcpu_run_until") >= entries + 3  # several slices, one return
        finally:
            _cleanup(machine)
