"""The host probe (gdbstub.hvprobe) sets its scratch vCPU up as a framework VMM must: with the
VM-entry checks on (GDBSTUB_VMX_CHECKS=1, VMX's rules on kvm and emu) it measures the same
features as with them off, where before it gave TR a 4 GiB limit with G=0 and CR4 without
VMXE, and every feature probed absent."""

from __future__ import annotations

import pytest

from gdbstub import hv
from gdbstub.hvprobe import HostDebugFeatures, probe_host
from gdbstub.memory import GuestMemory


def _probe() -> HostDebugFeatures:
    hv.hv_vm_create(hv.HV_VM_DEFAULT)
    try:
        memory = GuestMemory()
        memory.allocate(0, 0x100000)
        memory.write(0x8000, b"\x5a" * 0x2000)
        features = probe_host(memory)
        assert memory.read(0x8000, 0x2000) == b"\x5a" * 0x2000  # the page lent is restored
        return features
    finally:
        hv.hv_vm_destroy()


def test_the_probe_measures_the_same_with_the_entry_checks_on(
    hv_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GDBSTUB_VMX_CHECKS", "0")
    unchecked = _probe()
    monkeypatch.setenv("GDBSTUB_VMX_CHECKS", "1")
    checked = _probe()
    assert checked == unchecked
    assert checked.step and (checked.int3 or checked.dr_exec)
