"""gdbstub's pytest plugin, as a kernel project uses it: pytest runs the example in examples/,
reports a failing kernel test as a failure, and leaves no stub behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from gdbdrive import ROOT, backends

pytestmark = pytest.mark.gdb


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
    )


def test_the_plugin_is_an_entry_point() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("gdbstub.pytest_plugin") == "gdbstub.pytest_plugin", plugins


def test_the_example_passes(tmp_path: Path) -> None:
    example = ROOT / "examples" / "test_my_kernel.py"
    result = _pytest(str(example), "--gdbstub-backend", backends()[0], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


FAILING = """
from pathlib import Path

def test_reports_the_port(gdbstub_stub):
    Path("port").write_text(str(gdbstub_stub.port))
    assert gdbstub_stub.serial_text() == ""  # --wait: nothing ran yet

def test_wrong_expectation(gdbstub_gdb):
    assert gdbstub_gdb.value("$rip") == 0x1234
"""


def test_a_failing_kernel_test_fails_and_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "test_kernel.py").write_text(FAILING)
    kernel = ROOT / "examples" / "build" / "hello.elf"
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)
    result = _pytest(
        "-p",
        "gdbstub.pytest_plugin",  # named as well as loaded by the entry point: no conflict
        f"--gdbstub-kernel={kernel}",
        f"--gdbstub-backend={backends()[0]}",
        "test_kernel.py",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout
    assert "assert 1048608 == 4660" in result.stdout  # rip at start32 (0x100020), shown
    port = int((tmp_path / "port").read_text())
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the stub outlived its test"


def test_no_kernel_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "test_kernel.py").write_text("def test_x(gdbstub_stub):\n    pass\n")
    result = _pytest("test_kernel.py", cwd=tmp_path)
    assert result.returncode != 0
    assert "no kernel to boot; pass --gdbstub-kernel PATH" in result.stdout + result.stderr
