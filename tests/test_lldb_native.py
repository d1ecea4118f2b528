"""lldb as a first-class client, through real lldb: what a kernel developer types in lldb works
as in gdb, served by lldb's own packets (seen in the stub's packet log)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from gdbdrive import ROOT, Stub, backends

from gdbstub import regs

pytestmark = pytest.mark.lldb


def run_lldb(elf: Path, commands: list[str], tmp: Path) -> list[tuple[str, str]]:
    """Run ``commands`` in one real lldb session; (command, its output) in order.

    lldb runs them synchronously (batch mode) from a command file it sources with
    stop-on-error and stop-on-continue off, so a failing command does not end the session.
    """
    if shutil.which("lldb") is None:
        pytest.skip("lldb is not installed")
    script = tmp / "commands.lldb"
    script.write_text("".join(f"{c}\n" for c in commands))
    result = subprocess.run(
        [
            "lldb",
            "--no-use-colors",
            "-b",
            "-o",
            "settings set stop-line-count-before 0",
            "-o",
            "settings set stop-line-count-after 0",
            "-o",
            f"command source -e false -c false {script}",
            str(elf),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, TERM="dumb"),
    )
    transcript = result.stdout.split(f"Executing commands in '{script}'.\n", 1)[-1]
    pieces = transcript.split("(lldb) ")[1:]
    outputs = [tuple(piece.split("\n", 1)) for piece in pieces]
    answered = [(c, o) for c, o in outputs if c in commands]
    assert [c for c, _ in answered] == commands, result.stdout + result.stderr
    return answered


@pytest.fixture(scope="module")
def hello() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)
    return ROOT / "examples" / "build" / "hello.elf"


def _symbol(elf: Path, name: str) -> int:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    match = re.search(rf"^([0-9a-f]+) \w {re.escape(name)}$", out, re.M)
    assert match, name
    return int(match.group(1), 16)


@pytest.mark.parametrize("backend", backends())
def test_lldb_session_as_in_gdb(hello: Path, backend: str, tmp_path: Path) -> None:
    packets = tmp_path / "packets.log"
    fib, ticks = _symbol(hello, "fib"), _symbol(hello, "ticks")
    stub = Stub(hello, backend, "--log-packets", str(packets), tmp=tmp_path)
    try:
        commands = [
            f"gdb-remote 127.0.0.1:{stub.port}",
            "target list",
            "memory region 0x40000000",
            f"breakpoint set -a {fib:#x}",
            "continue",
            "memory region $pc",
            "memory region 0x40000000",
            "register read --all",
            "thread list",
            "thread info -j",
            f"disassemble -c 4 -s {fib:#x}",
            f"watchpoint set expression -w write -s 8 -- {ticks:#x}",
            "breakpoint delete 1",
            "continue",
            "continue",
            f"memory read -c 8 {ticks:#x}",
            "kill",
        ]
        if backend == "hvf-shim":  # as in test_gdb: the shim cannot model watched pages
            commands[11:16] = []
        out = run_lldb(hello, commands, tmp_path)
    finally:
        stub.stop()
    (_, connected), (_, targets), (_, before_paging), (_, bp), (_, stop) = out[:5]
    assert "stop reason = signal SIGTRAP" in connected and "name = 'vCPU 0'" in connected
    assert "hello.elf" in targets and "arch=x86_64" in targets  # the ELF stays with x86_64
    # at start32 paging is off: the first 4 GiB are the physical address space
    assert "[0x0000000000000000-0x0000000100000000) rwx" in before_paging
    assert "Breakpoint 1:" in bp
    assert "stop reason = breakpoint 1.1" in stop and "`fib" in stop

    # memory region: from the guest's page tables (hello maps 1 GiB with 2 MiB pages, rwx)
    (_, region), (_, hole), (_, every), (_, threads), (_, info), (_, disassembly) = out[5:11]
    assert "[0x0000000000000000-0x0000000040000000) rwx" in region
    assert "[0x0000000040000000-0xffffffffffffffff) ---" in hole

    # register read --all: every register of the target description, in its groups
    shown = set(re.findall(r"^\s+(\w+) = ", every, re.M))
    described = {r.name for r in regs.g_layout("ymm0h =" in every)}
    assert described <= shown, described - shown
    for group in ("general:", "float:", "vector:", "system:"):
        assert group in every
    assert "cr3 = 0x0000000000101000" in every

    assert "* thread #1: tid = 0x0001" in threads and "name = 'vCPU 0'" in threads
    extended = json.loads(info[info.index("{") :])
    assert extended["name"] == "vCPU 0" and extended["paging"].startswith("4-level paging")
    assert extended["rip"] == fib

    lines = [line for line in disassembly.splitlines() if re.search(r"0x[0-9a-f]+ <\+\d+>:", line)]
    assert len(lines) == 4, disassembly
    assert "xorl   %eax, %eax" in lines[0] and "movl   $0x1, %edx" in lines[1]

    assert "status = 9" in out[-1][1]
    log = packets.read_text(errors="replace")
    assert "x0,0#" in log and "$OK#9a" in log  # lldb's binary reads are served
    assert "<- b'$jThreadsInfo" in log and '-> b\'$[{"tid":1' in log
    assert "qMemoryRegionInfo:" in log and "permissions:rwx;" in log
    if backend == "hvf-shim":
        return
    # a write watchpoint, as gdb's `watch`: trap-after, old and new values, every write
    (_, created), _, (_, first), (_, second), (_, memory), _ = out[11:]
    assert "Watchpoint created" in created
    for value, hit in ((1, first), (2, second)):
        assert "stop reason = watchpoint 1" in hit, hit
        assert f"old value: {value - 1}\nnew value: {value}\n" in hit
        assert "`idle" in hit
    assert f"{ticks:#010x}: 02 00 00 00 00 00 00 00" in memory
