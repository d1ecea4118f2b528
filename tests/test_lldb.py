"""Real lldb against ``gdbstub run`` (``gdb-remote``), on every backend this machine has."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from gdbdrive import ROOT, Stub, backends

pytestmark = pytest.mark.lldb


@pytest.fixture(scope="module")
def hello() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)
    return ROOT / "examples" / "build" / "hello.elf"


@pytest.mark.parametrize("backend", backends())
def test_lldb_session(hello: Path, backend: str, tmp_path: Path) -> None:
    if shutil.which("lldb") is None:
        pytest.skip("lldb is not installed")
    stub = Stub(hello, backend, tmp=tmp_path)
    try:
        commands = [
            f"gdb-remote 127.0.0.1:{stub.port}",
            "register read rip",
            "breakpoint set -n fib",
            "continue",
            "register read rip cr3 efer",
            "memory read -c 8 &ticks",
            "thread step-inst",
            "register read rip",
            "process plugin packet monitor info breakpoints",
            "kill",
        ]
        args = ["lldb", "-b", str(hello)]
        for command in commands:
            args += ["-o", command]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        out = result.stdout
        start = int(
            subprocess.run(["nm", str(hello)], capture_output=True, text=True)
            .stdout.split(" T start32")[0]
            .split("\n")[-1],
            16,
        )
        assert f"rip = 0x{start:016x}" in out  # stopped before the first instruction
        assert "stop reason = breakpoint 1.1" in out and "`fib" in out
        assert "cr3 = 0x" in out and "efer = 0x" in out
        assert "stop reason = instruction step into" in out
        assert "software breakpoints:" in out  # the monitor command reached the stub
        assert "failed to send the k packet" not in out + result.stderr
        assert stub.wait_exit(30) == 0
    finally:
        stub.stop()
