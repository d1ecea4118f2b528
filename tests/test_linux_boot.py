"""Debian 12's own Linux kernel under ``gdbstub run``: to a busybox shell on the serial console.

The kernel package and busybox-static are fetched with ``apt-get download`` into a cache outside
the repository (tests/debian_kernel.py); the tests skip with a message when that is impossible.
The shell is driven through the stub's stdin and stdout (``--serial stdio``), as a user types.
``LINUX_BOOT_TIMEOUT`` (seconds, default 600) bounds each boot.

The bzImage boot runs in the default suite (the one real kernel CI boots, about a minute on
emu); the PVH boot and the gdb session are marked ``linux`` and run with ``pytest -m linux``.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from debian_kernel import (
    INIT_MARKER,
    SHELL_PROMPT,
    busybox_initramfs,
    cached_busybox,
    cached_debian_kernel,
    extract_vmlinux,
)
from gdbdrive import ROOT, Gdb

from gdbstub.machine.loader import symbols

BOOT_TIMEOUT = float(os.environ.get("LINUX_BOOT_TIMEOUT", "600"))
CMDLINE = "console=ttyS0 nokaslr panic=-1 quiet"


@pytest.fixture(scope="module")
def bzimage() -> Path:
    kernel = cached_debian_kernel()
    if kernel is None:
        pytest.skip("Debian's linux-image-amd64 could not be fetched (apt-get download)")
    return kernel


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    busybox = cached_busybox()
    if busybox is None:
        pytest.skip("Debian's busybox-static could not be fetched (apt-get download)")
    return busybox_initramfs(tmp_path_factory.mktemp("initramfs") / "initramfs.cpio", busybox)


class Console:
    """``gdbstub run`` with the guest's serial line on its stdin/stdout."""

    def __init__(self, kernel: Path, initramfs: Path, *extra: str) -> None:
        args = [
            sys.executable, "-m", "gdbstub", "run", str(kernel),
            "--initrd", str(initramfs), "--append", CMDLINE, "--backend", "emu",
            "--serial", "stdio", "--listen", "127.0.0.1:0", *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.text = ""
        self.log = ""
        self._chunks: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()

    def _pump(self, stream: object, serial: bool) -> None:
        while True:
            data = stream.read1(4096)  # type: ignore[attr-defined]
            if not data:
                return
            text = data.decode("utf-8", "replace")
            if serial:
                self._chunks.put(text)
            else:
                self.log += text

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the serial output matches ``pattern`` (a regex)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text)
            if match:
                return match
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self._chunks.empty()):
                raise AssertionError(
                    f"no {pattern!r} on the console; last output:\n{self.text[-3000:]}\n"
                    f"stub log:\n{self.log[-2000:]}"
                )
            try:
                self.text += self._chunks.get(timeout=min(left, 1.0))
            except queue.Empty:
                pass

    def type(self, line: str) -> None:
        """Type ``line`` and Enter on the guest's console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def port(self) -> int:
        """The stub's gdb port (from its first log lines)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = re.search(r"target remote [\d.]+:(\d+)", self.log)
            if match:
                return int(match.group(1))
            time.sleep(0.05)
        raise AssertionError(f"no port in the stub's log: {self.log}")

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(30)


@contextmanager
def console(kernel: Path, initramfs: Path, *extra: str) -> Iterator[Console]:
    con = Console(kernel, initramfs, *extra)
    try:
        yield con
    finally:
        con.close()


def _shell_session(con: Console) -> None:
    con.expect(re.escape(INIT_MARKER), BOOT_TIMEOUT)
    con.expect(SHELL_PROMPT, 120)
    con.type("echo typed-$((6 * 7))")
    con.expect("typed-42", 120)
    con.type("poweroff -f")
    assert con.proc.wait(120) == 0, con.log


def test_bzimage_boots_to_a_shell_and_powers_off(bzimage: Path, initramfs: Path) -> None:
    with console(bzimage, initramfs, "--no-reboot") as con:
        _shell_session(con)


@pytest.mark.linux
def test_pvh_vmlinux_boots_to_a_shell_and_powers_off(
    bzimage: Path, initramfs: Path, tmp_path: Path
) -> None:
    vmlinux = extract_vmlinux(bzimage, tmp_path / "vmlinux")
    with console(vmlinux, initramfs, "--no-reboot") as con:
        _shell_session(con)


SYMBOLS = ("start_kernel", "__x64_sys_newuname")


@pytest.fixture(scope="module")
def kernel_symbols(bzimage: Path) -> dict[str, int]:
    """The addresses of ``SYMBOLS`` in Debian's kernel under ``nokaslr``: Debian's
    ``System.map`` is a placeholder, so they come from the kernel's own kallsyms table, as
    ``gdbstub run`` reads it (gdbstub.kallsyms)."""
    found = symbols(bzimage)
    missing = [name for name in SYMBOLS if name not in found]
    assert not missing, f"{missing}: not in the kallsyms table of {bzimage}"
    return {name: found[name] for name in SYMBOLS}


@pytest.mark.linux
def test_gdb_breaks_in_start_kernel_and_in_a_system_call(
    bzimage: Path, initramfs: Path, kernel_symbols: dict[str, int]
) -> None:
    symbols = kernel_symbols
    with console(bzimage, initramfs, "--no-reboot", "--wait") as con:
        gdb = Gdb(None, con.port(), timeout=BOOT_TIMEOUT)
        try:
            gdb.cmd(f"hbreak *{symbols['start_kernel']:#x}")
            out = gdb.cmd("continue", timeout=BOOT_TIMEOUT)
            assert "Breakpoint 1" in out, out
            assert gdb.value("$pc") == symbols["start_kernel"]
            # the stub read the same table: monitor commands take the kernel's names
            assert f"{symbols['start_kernel']:#x}" in gdb.cmd("monitor disas start_kernel 1")
            gdb.cmd("delete")
            gdb.child.sendline("continue")
            con.expect(re.escape(INIT_MARKER), BOOT_TIMEOUT)
            con.expect(SHELL_PROMPT, 120)
            gdb.interrupt()
            gdb.cmd(f"hbreak *{symbols['__x64_sys_newuname']:#x}")
            gdb.child.sendline("continue")
            gdb.child.expect("Continuing")
            con.type("uname -r")  # uname(2) is sys_newuname on x86-64
            gdb.child.expect(r"\(gdb\) ", timeout=120)
            assert gdb.value("$pc") == symbols["__x64_sys_newuname"]
            gdb.cmd("delete")
            gdb.child.sendline("continue")
            con.expect(r"6\.1\.\d+", 120)
            con.type("poweroff -f")
            assert con.proc.wait(120) == 0
        finally:
            gdb.close()
