"""``scripts/bench linux``: wall time from start to the shell prompt of Debian's Linux.

Each runner boots the same kernel (Debian 12's ``linux-image-amd64`` bzImage, or the PVH
``vmlinux`` inside it) with the same busybox initramfs and command line, types ``poweroff -f``
at the prompt and reads the clock; QEMU runs beside gdbstub in the same invocation:

* ``gdbstub-emu`` / ``gdbstub-emu-pvh`` / ``gdbstub-kvm``: ``python -m gdbstub run KERNEL
  --initrd ... --append ... --serial stdio --no-reboot --backend B``;
* ``qemu-tcg`` / ``qemu-kvm``: ``qemu-system-x86_64 -kernel ... -nographic -no-reboot -accel A``.

A runner that does not reach the prompt within ``--minutes`` is stopped and reported with the
last line its console printed, so two that both time out are compared by how far they got.
The kernel and busybox come from tests/debian_kernel.py's cache (``apt-get download``).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from debian_kernel import (  # noqa: E402  (tests/ is put on the path above)
    INIT_MARKER,
    SHELL_PROMPT,
    busybox_initramfs,
    cached_busybox,
    cached_debian_kernel,
    extract_vmlinux,
)

CMDLINE = "console=ttyS0 earlyprintk=ttyS0 nokaslr panic=-1"  # the log shows how far a boot got
PROMPT = re.compile(SHELL_PROMPT)
RUNNERS = ("gdbstub-emu", "gdbstub-emu-pvh", "gdbstub-kvm", "qemu-tcg", "qemu-kvm")


@dataclass
class BootResult:
    """One runner's boot: seconds to the prompt (None: not reached) and its last console line."""

    runner: str
    seconds: float | None
    last_line: str
    status: int | None


def _command(runner: str, bzimage: Path, vmlinux: Path, initramfs: Path) -> list[str]:
    if runner.startswith("qemu"):
        accel = runner.split("-")[1]
        return [
            "qemu-system-x86_64", "-kernel", str(bzimage), "-initrd", str(initramfs),
            "-append", CMDLINE, "-m", "256M", "-nographic", "-no-reboot", "-accel", accel,
        ]  # fmt: skip
    backend = runner.split("-")[1]
    kernel = vmlinux if runner.endswith("-pvh") else bzimage
    return [
        sys.executable, "-m", "gdbstub", "run", str(kernel), "--initrd", str(initramfs),
        "--append", CMDLINE, "--memory", "256M", "--backend", backend, "--serial", "stdio",
        "--no-reboot", "--listen", "127.0.0.1:0",
    ]  # fmt: skip


def boot_to_prompt(command: list[str], runner: str, limit: float) -> BootResult:
    """Run ``command`` until its console shows the shell prompt after the initramfs marker,
    then type ``poweroff -f``; stop it after ``limit`` seconds otherwise."""
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    chunks: queue.SimpleQueue[bytes] = queue.SimpleQueue()

    def pump() -> None:
        assert proc.stdout is not None
        while data := proc.stdout.read1(4096):
            chunks.put(data)

    threading.Thread(target=pump, daemon=True).start()
    text, seconds = "", None
    while time.monotonic() - start < limit and proc.poll() is None:
        try:
            text += chunks.get(timeout=0.2).decode("utf-8", "replace")
        except queue.Empty:
            continue
        marker = text.find(INIT_MARKER)
        if marker >= 0 and PROMPT.search(text, marker):
            seconds = time.monotonic() - start
            break
    status = None
    if seconds is not None:
        assert proc.stdin is not None
        proc.stdin.write(b"poweroff -f\n")
        proc.stdin.flush()
        try:
            status = proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    lines = [line.strip() for line in text.replace("\r", "").splitlines() if line.strip()]
    return BootResult(runner, seconds, lines[-1] if lines else "", status)


def bench_linux(args: argparse.Namespace) -> list[BootResult]:
    """Boot every runner in ``args.runners`` once and print a markdown table."""
    bzimage, busybox = cached_debian_kernel(), cached_busybox()
    if bzimage is None or busybox is None:
        print("linux: Debian's kernel or busybox-static could not be fetched (apt-get download)")
        return []
    work = Path(tempfile.mkdtemp(prefix="bench-linux-"))
    initramfs = busybox_initramfs(work / "initramfs.cpio", busybox)
    vmlinux = extract_vmlinux(bzimage, work / "vmlinux")
    results = []
    for runner in args.runners.split(","):
        if runner not in RUNNERS:
            raise SystemExit(f"bench linux: unknown runner {runner!r} (one of {RUNNERS})")
        if runner.startswith("qemu") and shutil.which("qemu-system-x86_64") is None:
            print(f"{runner}: qemu-system-x86_64 is not installed")
            continue
        command = _command(runner, bzimage, vmlinux, initramfs)
        result = boot_to_prompt(command, runner, args.minutes * 60)
        results.append(result)
        print(f"{runner}: {_cell(result)}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nkernel {bzimage.name}, initramfs busybox, `{CMDLINE}`, limit {args.minutes} min\n")
    print("| runner | to the shell prompt | poweroff status | last console line |")
    print("|---|---|---|---|")
    for r in results:
        line = r.last_line.replace("|", "\\|")[:100]
        status = "" if r.status is None else str(r.status)
        print(f"| {r.runner} | {_cell(r)} | {status} | `{line}` |")
    return results


def _cell(result: BootResult) -> str:
    if result.seconds is None:
        return "not reached"
    return f"{result.seconds:.1f} s"
