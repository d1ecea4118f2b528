"""Testing a kernel under the debugger with gdbstub's pytest plugin: a model for your own CI.

The plugin comes with the package (an entry point, so pytest loads it by itself; ``-p
gdbstub.pytest_plugin`` names it). Its fixtures boot the kernel with ``gdbstub run --wait`` on a
free port and hand the test a debugger:

* ``gdbstub_gdb``: a real gdb, connected, the kernel's symbols loaded (``cmd``, ``value``);
* ``gdbstub_rsp``: a raw Remote Serial Protocol client (``request``, ``monitor``);
* ``gdbstub_stub``: the stub process (``serial_text()``, ``wait_exit()``).

Say which kernel with ``pytest --gdbstub-kernel build/kernel.elf``, with ``gdbstub_kernel =
"build/kernel.elf"`` in ``[tool.pytest.ini_options]``, or, as here, by overriding the
``gdbstub_kernel`` fixture (this one builds examples/hello.asm first). Run it:

    pytest examples/test_my_kernel.py
    pytest examples/test_my_kernel.py --gdbstub-backend emu     # any ``gdbstub run`` backend
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gdbstub.pytest_plugin import GdbClient, RspClient, StubProcess

HERE = Path(__file__).resolve().parent


@pytest.fixture
def gdbstub_kernel() -> Path:
    """The kernel under test: examples/hello.asm, built by its Makefile (nasm, ld)."""
    subprocess.run(["make", "-s", "-C", str(HERE)], check=True)
    return HERE / "build" / "hello.elf"


def test_fib_sees_each_argument(gdbstub_gdb: GdbClient) -> None:
    gdb = gdbstub_gdb
    assert "Breakpoint 1 at" in gdb.cmd("break fib")
    for n in range(4):
        assert "Breakpoint 1, fib" in gdb.cmd("continue")
        assert gdb.value("$rdi") == n


def test_fibonacci_table_and_greeting(gdbstub_gdb: GdbClient, gdbstub_stub: StubProcess) -> None:
    gdb = gdbstub_gdb
    gdb.cmd("break idle")
    assert "Breakpoint 1, idle" in gdb.cmd("continue")
    table = [gdb.value(f"((long*)&fibs)[{i}]") for i in range(10)]
    assert table == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
    assert "Hello from the gdbstub example kernel!" in gdbstub_stub.serial_text()


def test_ticks_count_while_running(gdbstub_gdb: GdbClient) -> None:
    gdb = gdbstub_gdb
    assert "atchpoint 1" in gdb.cmd("watch *(long*)&ticks")
    out = gdb.cmd("continue")
    assert "Old value = 0" in out and "New value = 1" in out


def test_raw_protocol(gdbstub_rsp: RspClient, gdbstub_kernel: Path) -> None:
    rsp = gdbstub_rsp
    assert b"PacketSize=" in rsp.request(b"qSupported:swbreak+")
    assert rsp.request(b"?").startswith(b"T05")  # stopped before the first instruction
    rip = int.from_bytes(bytes.fromhex(rsp.request(b"p10").decode()), "little")  # p16: rip
    entry = int.from_bytes(gdbstub_kernel.read_bytes()[24:32], "little")  # ELF64 e_entry
    assert rip == entry  # start32, where the PVH note points too
    assert "software breakpoints:" in rsp.monitor("info breakpoints")
