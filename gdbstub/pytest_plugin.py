"""pytest fixtures that boot a kernel under gdbstub and hand the test a debugger.

Theory of operation
-------------------
Installed with the package, the plugin is an entry point (``pytest11``), so pytest loads it
by itself; ``pytest -p gdbstub.pytest_plugin`` names it explicitly (``-p
no:gdbstub.pytest_plugin`` turns it off). Every name it adds starts with ``gdbstub``:

* ``gdbstub_kernel``: the kernel to boot, from ``--gdbstub-kernel PATH`` or the ``gdbstub_kernel``
  ini option (relative to the ini file); override the fixture to build the kernel first.
* ``gdbstub_args``: more ``gdbstub run`` options (``--gdbstub-args "--memory 64M"``;
  ``--gdbstub-backend`` adds ``--backend``). Override it for per-test options.
* ``gdbstub_stub``: a ``gdbstub run KERNEL --wait`` subprocess listening on a free port of
  127.0.0.1, its COM1 going to a file (``serial_text()``); the vCPU waits before its first
  instruction. It is killed when the test ends.
* ``gdbstub_gdb``: a real gdb (under pexpect) connected to that stub: ``cmd(line)`` returns
  what gdb printed, ``value(expr)`` an integer, ``interrupt()`` sends Ctrl-C.
* ``gdbstub_rsp``: a raw Remote Serial Protocol client on the stub's socket:
  ``request(payload)`` sends a packet and returns the reply's payload (acks and escapes are
  handled), ``monitor(text)`` runs a monitor command and returns its output.

Nothing here imports the hypervisor layer: the stub runs in its own process, as in CI. pexpect
and gdb are only needed by ``gdbstub_gdb`` (a test that uses it is skipped without gdb).
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import rsp

__all__ = ["GdbClient", "RspClient", "StubProcess"]

_LISTENING = re.compile(r"target remote ([\d.]+):(\d+)")
_GDB_PROMPT = r"\(gdb\) "


class StubProcess:
    """A ``gdbstub run`` subprocess (see the module docstring)."""

    def __init__(self, kernel: Path, args: list[str], workdir: Path, timeout: float = 60) -> None:
        self.kernel = kernel
        self.serial = workdir / "serial.log"
        self.log = workdir / "gdbstub.log"
        command = [
            sys.executable,
            "-m",
            "gdbstub",
            "run",
            str(kernel),
            "--listen",
            "127.0.0.1:0",
            "--wait",
            "--serial",
            f"file:{self.serial}",
            *args,
        ]
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.host, self.port = self._wait_listening(timeout)

    def _wait_listening(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_text())
            if match:
                return match.group(1), int(match.group(2))
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"gdbstub run exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"gdbstub run did not listen within {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        """What the stub printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def serial_text(self) -> str:
        """What the guest wrote to COM1 so far."""
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for the stub to end (the guest exited, or a debugger killed it); its status."""
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill the stub if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


class GdbClient:
    """A real gdb under pexpect, connected to a stub."""

    def __init__(self, kernel: Path | None, host: str, port: int, timeout: float = 60) -> None:
        import pexpect  # a test extra; only this fixture needs it

        head = b""
        if kernel is not None:
            with open(kernel, "rb") as elf:
                head = elf.read(5)
        # the stub describes an x86-64 CPU: a 32-bit ELF would make gdb pick i386 first
        args = ["-nx", "-q", "-ex", "set architecture i386:x86-64"]
        if kernel is not None:
            args += ["-ex", f"file {kernel}"] if head[4:5] == b"\x01" else [str(kernel)]
        self.child = pexpect.spawn(
            "gdb",
            args,
            encoding="utf-8",
            env=dict(os.environ, TERM="dumb"),
            timeout=timeout,
            dimensions=(200, 250),
        )
        self.child.expect(_GDB_PROMPT)
        for setting in ("pagination off", "confirm off", "width 0", "style enabled off"):
            self.cmd(f"set {setting}")
        self.connected = self.cmd(f"target remote {host}:{port}")

    def cmd(self, line: str, timeout: float | None = None) -> str:
        """Run one gdb command; what gdb printed before its next prompt."""
        self.child.sendline(line)
        self.child.expect(_GDB_PROMPT, timeout=timeout if timeout is not None else -1)
        out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", str(self.child.before)).replace("\r", "")
        return out.split("\n", 1)[1] if "\n" in out else ""

    def value(self, expression: str) -> int:
        """The integer value of ``expression`` (gdb's ``p/x``)."""
        out = self.cmd(f"p/x {expression}")
        match = re.search(r"= (0x[0-9a-f]+)", out)
        if match is None:
            raise AssertionError(f"gdb could not evaluate {expression!r}: {out.strip()}")
        return int(match.group(1), 16)

    def interrupt(self) -> str:
        """Ctrl-C while the guest runs; gdb's stop report."""
        self.child.sendcontrol("c")
        self.child.expect(_GDB_PROMPT)
        return str(self.child.before).replace("\r", "")

    def close(self) -> None:
        """Quit gdb (forcibly if it does not quit, e.g. while waiting in ``continue``)."""
        import pexpect

        try:
            if self.child.isalive():
                self.child.sendline("quit")
                self.child.expect(pexpect.EOF, timeout=10)
        except pexpect.ExceptionPexpect:
            pass
        finally:
            self.child.close(force=True)


class RspClient:
    """A raw Remote Serial Protocol client: packets in, reply payloads out."""

    def __init__(self, host: str, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.ack = True
        self._decoder = rsp.Decoder()
        self._frames: list[rsp.Frame] = []

    def send(self, payload: bytes) -> None:
        """Send one packet (escaped and checksummed)."""
        self.sock.sendall(rsp.encode(payload, rle=False))

    def receive(self, timeout: float | None = None) -> bytes:
        """The payload of the next packet from the stub (acknowledged when acks are on)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            while self._frames:
                frame = self._frames.pop(0)
                if isinstance(frame, rsp.Packet):
                    if self.ack:
                        self.sock.sendall(b"+")
                    return frame.payload
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("no packet from the stub")
            data = self.sock.recv(0x40000)
            if not data:
                raise ConnectionError("the stub closed the connection")
            self._frames += self._decoder.feed(data)

    def request(self, payload: bytes, timeout: float | None = None) -> bytes:
        """Send ``payload`` and return the reply's payload."""
        self.send(payload)
        return self.receive(timeout)

    def no_ack(self) -> None:
        """Switch acknowledgements off (``QStartNoAckMode``), as gdb and lldb do."""
        if self.request(b"QStartNoAckMode") != b"OK":
            raise AssertionError("the stub refused QStartNoAckMode")
        self.ack = False

    def monitor(self, command: str) -> str:
        """``qRcmd``: the monitor command's output text."""
        self.send(b"qRcmd," + command.encode().hex().encode())
        out = b""
        while (reply := self.receive()).startswith(b"O") and reply != b"OK":
            out += bytes.fromhex(reply[1:].decode())
        if reply != b"OK":
            raise AssertionError(f"monitor {command!r}: {reply!r}")
        return out.decode(errors="replace")

    def interrupt(self) -> None:
        """Ctrl-C (a raw 0x03) while the guest runs; the stop reply follows."""
        self.sock.sendall(b"\x03")

    def close(self) -> None:
        """Close the connection (the stub detaches as from a vanished debugger)."""
        self.sock.close()


# --- pytest hooks and fixtures -------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--gdbstub-kernel``, ``--gdbstub-backend``, ``--gdbstub-args``; ini ``gdbstub_kernel``."""
    group = parser.getgroup("gdbstub", "kernels under gdbstub (gdbstub.pytest_plugin)")
    group.addoption("--gdbstub-kernel", metavar="PATH", help="kernel the gdbstub fixtures boot")
    group.addoption(
        "--gdbstub-backend", metavar="NAME", help="gdbstub run --backend (auto|kvm|emu|hvf)"
    )
    group.addoption(
        "--gdbstub-args", metavar="ARGS", default="", help="more gdbstub run options, one string"
    )
    parser.addini("gdbstub_kernel", "kernel the gdbstub fixtures boot (relative to the ini file)")


@pytest.fixture
def gdbstub_kernel(request: pytest.FixtureRequest) -> Path:
    """The kernel to boot: ``--gdbstub-kernel`` or the ``gdbstub_kernel`` ini option."""
    option = request.config.getoption("--gdbstub-kernel")
    if option:
        return Path(option).resolve()
    ini = request.config.getini("gdbstub_kernel")
    if ini and request.config.inipath is not None:
        return (request.config.inipath.parent / str(ini)).resolve()
    raise pytest.UsageError(
        "gdbstub: no kernel to boot; pass --gdbstub-kernel PATH, set gdbstub_kernel in the "
        "pytest ini options, or override the gdbstub_kernel fixture"
    )


@pytest.fixture
def gdbstub_args(request: pytest.FixtureRequest) -> list[str]:
    """More ``gdbstub run`` options (``--gdbstub-args``, ``--gdbstub-backend``)."""
    args = shlex.split(request.config.getoption("--gdbstub-args") or "")
    backend = request.config.getoption("--gdbstub-backend")
    return [*args, "--backend", backend] if backend else args


@pytest.fixture
def gdbstub_stub(
    gdbstub_kernel: Path, gdbstub_args: list[str], tmp_path: Path
) -> Iterator[StubProcess]:
    """``gdbstub run KERNEL --wait`` on a free port; killed after the test."""
    if not gdbstub_kernel.is_file():
        raise pytest.UsageError(f"gdbstub: kernel {gdbstub_kernel} does not exist")
    stub = StubProcess(gdbstub_kernel, gdbstub_args, tmp_path)
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture
def gdbstub_gdb(gdbstub_stub: StubProcess) -> Iterator[GdbClient]:
    """A real gdb connected to ``gdbstub_stub``, the kernel's symbols loaded."""
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed")
    try:
        import pexpect  # noqa: F401
    except ImportError:
        pytest.skip("pexpect is not installed (pip install pexpect)")
    gdb = GdbClient(gdbstub_stub.kernel, gdbstub_stub.host, gdbstub_stub.port)
    try:
        yield gdb
    finally:
        gdb.close()


@pytest.fixture
def gdbstub_rsp(gdbstub_stub: StubProcess) -> Iterator[RspClient]:
    """A raw RSP client connected to ``gdbstub_stub``."""
    client = RspClient(gdbstub_stub.host, gdbstub_stub.port)
    try:
        yield client
    finally:
        client.close()


def pytest_report_header(config: pytest.Config) -> Any:
    """One header line when a kernel is configured."""
    kernel = config.getoption("--gdbstub-kernel") or config.getini("gdbstub_kernel")
    return f"gdbstub: kernel {kernel}" if kernel else None
