"""A newcomer's first hour: set-up that skips what is done, the demo, the README's promises."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pexpect
import pytest
from gdbdrive import ROOT, Gdb, Stub, backends
from guestbuild import build

SETUP = ROOT / "scripts" / "setup"


def _run_setup(cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(cwd / "scripts" / "setup")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    return elapsed, result.stdout + result.stderr


def test_second_setup_is_silent_and_quick() -> None:
    _run_setup(ROOT)  # does whatever a first run must (normally nothing: scripts/test ran it)
    elapsed, output = _run_setup(ROOT)
    assert output == ""
    assert elapsed < 2.0, f"the second scripts/setup took {elapsed:.1f} s"


_FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for .venv/bin/python: pip installs are logged, everything else runs for real
if [ "$1 $2 $3" = "-m pip install" ]; then
    echo "$*" >> "$(dirname "$0")/pip.log"
    if [ "${@: -1}" = ".[test]" ]; then
        printf '#!/bin/sh\\n' > "$(dirname "$0")/gdbstub"; chmod +x "$(dirname "$0")/gdbstub"
    fi
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def test_setup_installs_only_when_pyproject_changes(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "scripts" / "setup")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bindir = tmp_path / ".venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python").write_text(_FAKE_PYTHON)
    (bindir / "python").chmod(0o755)
    env = dict(os.environ, REAL_PYTHON=sys.executable)
    pip_log = bindir / "pip.log"

    def installs() -> int:
        text = pip_log.read_text() if pip_log.exists() else ""
        return text.count("-e .[test]")

    _, first = _run_setup(tmp_path, env)
    assert "installing gdbstub" in first and installs() == 1
    _, second = _run_setup(tmp_path, env)
    assert second == "" and installs() == 1
    with open(tmp_path / "pyproject.toml", "a") as handle:
        handle.write("\n# a new dependency would go here\n")
    _, third = _run_setup(tmp_path, env)
    assert "installing gdbstub" in third and installs() == 2
    _, fourth = _run_setup(tmp_path, env)
    assert fourth == "" and installs() == 2


def test_package_data_holds_every_file_the_package_reads() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = config["tool"]["setuptools"]
    assert "find" in tool["packages"], "packages are discovered (no list to keep in step)"
    patterns = tool["package-data"]["gdbstub"]
    package = ROOT / "gdbstub"
    data = [
        p.relative_to(package)
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert data, "the package has data files (the target description)"
    missing = [str(p) for p in data if not any(p.match(pattern) for pattern in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_license_file_is_mit_as_pyproject_says() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the gdbstub authors" in text
    assert "Permission is hereby granted, free of charge" in text


@pytest.mark.parametrize(
    "relative", ["README.md", "docs/library.md", "docs/usage.md", "tests/test_loader.py"]
)
def test_no_path_outside_the_repository(relative: str) -> None:
    text = (ROOT / relative).read_text()
    outside = re.findall(r"(?<![\w.])/(?:work|home|root|Users)/[\w./-]+", text)
    assert not outside, f"{relative} names {outside}"


def _listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) == 0


@pytest.mark.gdb
def test_demo_gdb_honours_listen_and_ends_the_stub_with_gdb() -> None:
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed")
    backend = "emu" if "emu" in backends() else backends()[0]
    child = pexpect.spawn(
        "bash",
        [str(ROOT / "scripts" / "demo"), "--gdb", "--listen", "127.0.0.1:0", "--backend", backend],
        cwd=ROOT,
        encoding="utf-8",
        timeout=120,
        env=dict(os.environ, TERM="dumb"),
    )
    try:
        child.expect(r"\(gdb\) ")
        banner = str(child.before)
        match = re.search(r"listening on ([\d.]+):(\d+)", banner)
        assert match, banner
        host, port = match.group(1), int(match.group(2))
        assert port != 1234  # --listen 127.0.0.1:0 was honoured: a free port
        assert f"Remote debugging using {host}:{port}" in banner
        assert "Breakpoint 1 at" in banner
        child.sendline("continue")
        child.expect(r"\(gdb\) ")
        assert "Breakpoint 1, main64" in str(child.before)
        assert _listening(host, port)
        child.sendline("quit")
        if child.expect([r"\(y or n\)", pexpect.EOF]) == 0:
            child.sendline("y")
            child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    deadline = time.monotonic() + 5
    while _listening(host, port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _listening(host, port), "the stub still runs after gdb quit"


def _readme_exit_line() -> tuple[str, int]:
    """The gdb line the README shows for a guest exit, and the port 0xf4 value it names."""
    text = (ROOT / "README.md").read_text()
    match = re.search(
        r"with al = (0x[0-9a-f]+)[^`]*`(\[Inferior [^`]*exited with code \d+\])`", text
    )
    assert match, "the README shows what gdb prints when the guest exits"
    return match.group(2), int(match.group(1), 16)


@pytest.mark.gdb
def test_readme_guest_exit_line_is_what_gdb_prints(tmp_path: Path) -> None:
    line, value = _readme_exit_line()
    status = (value << 1) | 1
    assert line.endswith(f"exited with code {status:03o}]")  # gdb prints the status in octal
    kernel = build("pvh_kernel")  # its default path writes 0x10 to port 0xf4
    stub = Stub(kernel, backends()[0], tmp=tmp_path)
    gdb = None
    try:
        gdb = Gdb(kernel, stub.port)
        out = gdb.cmd("continue")
        assert line in out.splitlines(), out
        assert stub.wait_exit() == status
    finally:
        if gdb is not None:
            gdb.close()
        stub.stop()
