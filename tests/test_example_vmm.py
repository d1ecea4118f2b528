"""The library use case: examples/tiny_vmm.py (a user's own VMM on gdbstub.hv) driven by gdb."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from gdbdrive import ROOT, Gdb

pytestmark = pytest.mark.gdb


@pytest.mark.parametrize("backend", ["kvm", "emu"])
def test_gdb_drives_the_example_vmm(backend: str) -> None:
    from gdbdrive import backends

    if backend not in backends():
        pytest.skip(f"no {backend} here")
    env = dict(os.environ, PYTHONPATH=str(ROOT), GDBSTUB_BACKEND=backend)
    vmm = subprocess.Popen(
        [sys.executable, "examples/tiny_vmm.py", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert vmm.stdout is not None
        line = vmm.stdout.readline()
        port = int(re.search(r":(\d+)'", line).group(1))  # type: ignore[union-attr]
        gdb = Gdb(None, port)  # a raw guest: no symbol file
        assert gdb.value("$rip") == 0x1000
        assert "Breakpoint 1" in gdb.cmd("break *0x1011")
        gdb.cmd("continue")
        assert gdb.value("$rip") == 0x1011 and gdb.value("$ecx") == 1
        gdb.cmd("continue")
        assert gdb.value("$ecx") == 2
        gdb.cmd("delete")
        gdb.cmd("set var $ecx = 990")
        assert "exited with code 025" in gdb.cmd("continue")  # 0x15
        assert vmm.wait(30) == 0x15
        rest = vmm.stdout.read()
        assert "guest: tiny vmm says hi" in line + rest
        gdb.close()
    finally:
        if vmm.poll() is None:
            vmm.kill()


@pytest.mark.parametrize("backend", ["kvm", "emu"])
def test_readme_example_vmm_runs(backend: str) -> None:
    from gdbdrive import backends

    if backend not in backends():
        pytest.skip(f"no {backend} here")
    env = dict(os.environ, PYTHONPATH=str(ROOT), GDBSTUB_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "examples/ten_line_vmm.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"out port 0x10 value {n}" for n in range(5)]
