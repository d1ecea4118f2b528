"""The target description advertises exactly the registers the backend's vCPU has, and gdb
reads every one of them (AVX only where the vCPU runs AVX; none on emu)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gdbdrive import backends, session
from guestbuild import build

from gdbstub import regs

pytestmark = pytest.mark.gdb


@pytest.fixture(scope="module")
def kernel() -> Path:
    return build("pvh_kernel")


@pytest.mark.parametrize("backend", backends())
def test_description_matches_the_vcpu(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        assert "Breakpoint 1" in gdb.cmd("break dispatch")
        assert "Breakpoint 1," in gdb.cmd("continue")
        # the guest's own finding: CPUID offers AVX, xsetbv took it and vmovdqu ran
        guest_avx = gdb.value("*(long*)&avx_enabled") == 1
        if backend == "emu":
            assert not guest_avx  # unicorn has no AVX, and the CPUID model says so
        ymm = gdb.cmd("p $ymm1")
        advertised = "void" not in ymm
        assert advertised == guest_avx, ymm
        assert "unavailable" not in ymm

        names = [r.name for r in regs.g_layout(advertised)]
        out = gdb.cmd("info registers " + " ".join(names))
        assert "Invalid register" not in out and "unavailable" not in out, out
        assert len([line for line in out.splitlines() if line[:1].isalpha()]) == len(names)
        if advertised:
            bytes_ = gdb.cmd("p/x $ymm1.v32_int8")
            assert "{0x20, 0x21, 0x22" in bytes_ and "0x3e, 0x3f}" in bytes_, bytes_
        else:
            assert "Invalid register" in gdb.cmd("info registers ymm0h")
        assert "{0x0, 0x1, 0x2" in gdb.cmd("p/x $xmm0.v16_int8")


@pytest.mark.parametrize("backend", [b for b in backends() if b in ("kvm", "emu")])
def test_avx_registers_read_where_advertised(kernel: Path, backend: str) -> None:
    """On a host whose vCPUs run AVX (forced here: this machine's may not), the ymm halves are
    in the g packet and each reads through p, as gdb asks for them."""
    from gdbstub import hv
    from gdbstub.hvtarget import HostDebugFeatures, HvTarget
    from gdbstub.machine.machine import Machine
    from gdbstub.target import TargetError

    hv._reset_for_tests()
    hv.select_backend(backend)
    machine = Machine(kernel, memory_size=64 << 20)
    target = HvTarget(machine, 1, probe=False)
    try:
        for avx in (True, False):
            target.features = HostDebugFeatures(avx=avx)
            assert (b"64bit-avx.xml" in (target.target_xml("target.xml") or b"")) == avx
            assert len(target.read_registers(1)) == regs.g_size(avx)
            ymm0h = regs.by_name["ymm0h"].regnum
            if avx:
                assert target.read_register(1, ymm0h) == bytes(16)
            else:
                with pytest.raises(TargetError):
                    target.read_register(1, ymm0h)
    finally:
        target.close()
        machine.close()
        hv._reset_for_tests()
