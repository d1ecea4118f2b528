"""Drive ``gdbstub run`` and a real gdb (pexpect) for the end-to-end tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pexpect
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = r"\(gdb\) "


def backends() -> list[str]:
    """Backends this machine can run (the suite runs on each)."""
    sys.path.insert(0, str(ROOT))
    from gdbstub import hv

    found = [b for b in hv.available_backends() if b in ("kvm", "emu")]
    if "kvm" in found and shutil.which("gcc"):
        found.append("hvf-shim")  # the hvf binding over a C library forwarding to KVM
    return found


class Stub:
    """A ``gdbstub run`` process listening on a free port."""

    def __init__(
        self, kernel: Path, backend: str, *extra: str, wait: bool = True, tmp: Path
    ) -> None:
        self.serial = tmp / "serial.log"
        self.log = tmp / "stub.log"
        launcher = ["-m", "gdbstub"]
        if backend == "hvf-shim":  # gdbstub run with the hvf binding on tests/shim/hvshim.c
            launcher, backend = [str(ROOT / "tests" / "shim" / "run_stub.py")], "hvf"
        args = [
            sys.executable,
            *launcher,
            "run",
            str(kernel),
            "--listen",
            "127.0.0.1:0",
            "--backend",
            backend,
            "--serial",
            f"file:{self.serial}",
            *extra,
        ]
        if wait:
            args.append("--wait")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            match = re.search(r"target remote [\d.]+:(\d+)", text)
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"gdbstub exited early: {text}")
            time.sleep(0.05)
        raise AssertionError("gdbstub did not start listening")

    def serial_text(self) -> str:
        """What the guest wrote to COM1 so far."""
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for the process to end and return its exit status."""
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill the stub if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


def _elf_class(path: Path) -> int:
    """1 for ELF32, 2 for ELF64 (0 for anything else)."""
    head = path.read_bytes()[:5]
    return head[4] if head[:4] == b"\x7fELF" else 0


def _clean(text: str) -> str:
    """Terminal output without escape sequences and carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


class Gdb:
    """A real gdb under pexpect."""

    def __init__(self, elf: Path | None, port: int, timeout: float = 60) -> None:
        if shutil.which("gdb") is None:
            pytest.skip("gdb is not installed")
        env = dict(os.environ, TERM="dumb")
        # the stub describes an x86-64 CPU; a 32-bit kernel's ELF would select i386 (gdb then
        # rejects the target description), so the architecture is set first, as QEMU users do
        files = ["-ex", "set architecture i386:x86-64"]
        if elf is not None:
            files = [str(elf)] if _elf_class(elf) == 2 else [*files, "-ex", f"file {elf}"]
        self.child = pexpect.spawn(
            "gdb",
            ["-nx", "-q", *files],
            encoding="utf-8",
            env=env,
            timeout=timeout,
            dimensions=(200, 250),
        )
        self.child.expect(PROMPT)
        for setting in (
            "set pagination off",
            "set confirm off",
            "set width 0",
            "set style enabled off",
        ):
            self.cmd(setting)
        self.connect(port)

    def connect(self, port: int) -> str:
        """``target remote`` to the stub."""
        return self.cmd(f"target remote 127.0.0.1:{port}")

    def cmd(self, line: str, timeout: float | None = None) -> str:
        """Run one command and return its output (up to the next prompt)."""
        self.child.sendline(line)
        self.child.expect(PROMPT, timeout=timeout if timeout is not None else self.child.timeout)
        out = _clean(str(self.child.before))
        return out.split("\n", 1)[1] if "\n" in out else ""

    def value(self, expression: str) -> int:
        """The integer value of ``expression`` (printed with p/x)."""
        out = self.cmd(f"p/x {expression}")
        match = re.search(r"= (0x[0-9a-f]+)", out)
        assert match, out
        return int(match.group(1), 16)

    def interrupt(self) -> str:
        """Ctrl-C while the guest runs; the stop report."""
        self.child.sendcontrol("c")
        self.child.expect(PROMPT)
        return _clean(str(self.child.before))

    def close(self) -> None:
        """End gdb (forcibly if it does not quit, e.g. while stuck in ``continue``)."""
        try:
            if self.child.isalive():
                self.child.sendline("quit")
                self.child.expect(pexpect.EOF, timeout=10)
        except pexpect.ExceptionPexpect:
            pass
        finally:
            self.child.close(force=True)


@contextmanager
def session(
    kernel: Path, backend: str, tmp: Path, *extra: str, wait: bool = True
) -> Iterator[tuple[Stub, Gdb]]:
    """A stub booting ``kernel`` and a gdb attached to it."""
    stub = Stub(kernel, backend, *extra, wait=wait, tmp=tmp)
    gdb = None
    try:
        gdb = Gdb(kernel, stub.port)
        yield stub, gdb
    finally:
        try:
            if gdb is not None:
                gdb.close()
        finally:
            stub.stop()
