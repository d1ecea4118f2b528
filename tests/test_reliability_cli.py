"""Issue 13/14 on the command line: QEMU's spellings, the help, the serial back ends, the stub's
terminal (Ctrl-A escapes), and real gdb across client faults."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from gdbdrive import ROOT, Gdb
from guestbuild import assemble_flat, build
from test_reliability import Client, Stub, run_stub, stub

from gdbstub import cli
from gdbstub.console import ConsoleKeys, EscapeKeys

# A Multiboot kernel (a.out kludge) that echoes COM1 input as "<hex>" and exits with status
# 0x43 on 'q'; it prints "ready" first.
ECHO_SOURCE = """
mb_header:
        dd 0x1BADB002
        dd 0x00010000
        dd -(0x1BADB002 + 0x00010000)
        dd mb_header
        dd 0x100000
        dd 0
        dd 0
        dd start
start:
        cli
        mov     esp, 0x90000
        mov     esi, ready
.print: lodsb
        test    al, al
        jz      poll
        mov     dx, 0x3f8
        out     dx, al
        jmp     .print
poll:   mov     dx, 0x3fd
        in      al, dx
        test    al, 1
        jz      poll
        mov     dx, 0x3f8
        in      al, dx
        cmp     al, 'q'
        je      quit
        mov     bl, al
        mov     al, '<'
        out     dx, al
        mov     al, bl
        shr     al, 4
        call    digit
        mov     al, bl
        and     al, 0x0f
        call    digit
        mov     al, '>'
        out     dx, al
        jmp     poll
digit:  add     al, '0'
        cmp     al, '9'
        jbe     .out
        add     al, 7
.out:   out     dx, al
        ret
quit:   mov     al, 0x21
        out     0xf4, al
        hlt
ready:  db "ready", 10, 0
"""


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("echo") / "echo.bin"
    path.write_bytes(assemble_flat(ECHO_SOURCE, bits=32, org=0x100000))
    return path


@pytest.fixture(scope="module")
def pvh() -> Path:
    return build("pvh_kernel")


# --- the parser, pure --------------------------------------------------------------------------


def test_a_qemu_command_line_translates() -> None:
    line = "qemu-system-x86_64 -kernel k.elf -m 512 -smp 1 -serial stdio -nographic -no-reboot"
    line += " -display none -device isa-debug-exit,iobase=0xf4,iosize=0x04 -s -S -initrd r.img"
    argv = [*line.split(" "), "-append", "-v console=ttyS0"]
    args = cli.parse(["run", *argv])
    assert args.kernel == "k.elf" and args.memory_bytes == 512 << 20 and args.wait
    assert args.no_reboot and args.initrd == "r.img" and args.cmdline == "-v console=ttyS0"
    assert str(args.listen_at) == "127.0.0.1:1234" and args.serial_spec.kind == "stdio"
    assert str(cli.parse(["run", "k", "-gdb", "tcp::4321"]).listen_at) == "127.0.0.1:4321"
    assert str(cli.parse(["run", "k", "-gdb", "tcp:0.0.0.0:5"]).listen_at) == "0.0.0.0:5"
    assert cli.parse(["run", "k", "-gdb", "unix:/tmp/s,server,nowait"]).listen_at.path == "/tmp/s"
    assert cli.parse(["run", "k", "-enable-kvm"]).backend == "kvm"
    assert cli.parse(["run", "k", "-accel", "tcg"]).backend == "emu"
    assert cli.parse(["run", "k", "-m", "size=1G"]).memory_bytes == 1 << 30


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run", "k", "-smp", "2"], "one vCPU"),
        (["run", "k", "-smp", "cpus=1,maxcpus=4"], "one vCPU"),
        (["run", "k", "-cdrom", "x.iso"], "-cdrom: a QEMU option"),
        (["run", "k", "-device", "e1000"], "no such device"),
        (["run", "qemu-system-aarch64", "-kernel", "k"], "x86-64 guests only"),
        (["run", "k", "--listen", "::1:1234"], "brackets"),
        (["run", "k", "--serial", "file:x,bogus"], "append only"),
        (["run", "k", "--serial", "tcp:1:2,telnet"], "tcp: takes"),
        (["run"], "the following arguments are required: KERNEL"),
        (["run", "a", "-kernel", "b"], "two kernels"),
    ],
)
def test_bad_arguments_are_named(argv: list[str], words: str) -> None:
    with pytest.raises(cli.UsageError, match=re.escape(words)):
        cli.parse(argv)


def test_listen_and_serial_forms() -> None:
    assert cli.parse_listen("[::1]:9") == cli.Listen("::1", 9)
    assert cli.parse_listen("1234") == cli.Listen("127.0.0.1", 1234)
    assert cli.parse_listen(":7") == cli.Listen("127.0.0.1", 7)
    assert cli.parse_listen("unix:/x/y") == cli.Listen(path="/x/y")
    assert cli.parse_serial("file:/a,append") == cli.SerialSpec("file", "/a", True)
    assert cli.parse_serial("file:/a") == cli.SerialSpec("file", "/a", False)
    assert cli.parse_serial("mon:stdio").kind == "stdio" and cli.parse_serial("null").kind == "none"
    assert cli.parse_serial("tcp::4444,server,nowait").listen == cli.Listen("127.0.0.1", 4444)


def test_escape_keys() -> None:
    actions: list[str] = []
    shown: list[str] = []
    keys = EscapeKeys(
        ConsoleKeys(quit=lambda: actions.append("quit"), stop_guest=lambda: actions.append("s")),
        shown.append,
    )
    assert keys.feed(b"ab\x03") == b"ab\x03"  # Ctrl-C goes to the guest
    assert keys.feed(b"\x01a\x01\x01") == b"\x01\x01"
    assert keys.feed(b"\x01") == b"" and keys.feed(b"h") == b""  # an escape split across reads
    assert "Ctrl-A x" in shown[-1]
    assert keys.feed(b"x\x01s\x01x") == b"x"
    assert actions == ["s", "quit"]


def test_help_names_every_option_its_default_and_qemu_spelling() -> None:
    bare = run_stub()
    assert bare.returncode == 2
    asked = run_stub("run", "--help")
    assert asked.returncode == 0 and asked.stdout == bare.stdout
    text = asked.stdout
    for option in ("--listen", "--wait", "--memory", "--serial", "--append", "--initrd",
                   "--no-reboot", "--backend", "--log-packets", "--verbose"):  # fmt: skip
        assert option in text, option
    for qemu in ("-kernel", "-s", "-S", "-gdb tcp::PORT", "-m SIZE", "-serial", "-nographic",
                 "-append", "-initrd", "-no-reboot", "-smp 1"):  # fmt: skip
        assert qemu in text, qemu
    assert "127.0.0.1:1234" in text and "256M" in text and "example" in text
    assert max(len(line) for line in text.splitlines()) <= 100


# --- QEMU's command line and the serial back ends on real processes ----------------------------


def test_a_qemu_command_line_boots(pvh: Path, tmp_path: Path) -> None:
    serial = tmp_path / "serial.txt"
    serial.write_text("output of an earlier run\n")
    argv = [
        "qemu-system-x86_64", "-kernel", str(pvh), "-m", "128", "-smp", "1", "-nographic",
        "-serial", f"file:{serial}", "-no-reboot", "-display", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-gdb", "tcp::0", "-S",
    ]  # fmt: skip
    with stub(tmp_path, *argv) as process:
        client = Client(process.port)
        assert client.ask(b"?").startswith(b"T05")
        assert client.ask(b"c") == b"W21"
        assert process.wait() == 0x21
    assert serial.read_text().startswith("hello from pvh")  # truncated, as QEMU does
    with stub(tmp_path, str(pvh), "--serial", f"file:{serial},append", "--listen", ":0") as again:
        assert again.wait() == 0x21
    assert serial.read_text().count("hello from pvh") == 2


def test_serial_pty_and_tcp(pvh: Path, tmp_path: Path) -> None:
    with stub(tmp_path, str(pvh), "--wait", "--serial", "pty", "--listen", ":0") as process:
        match = re.search(r"gdbstub: serial: char device redirected to (/dev/pts/\d+)",
                          process.text())  # fmt: skip
        assert match, process.text()
        pty = os.open(match.group(1), os.O_RDWR | os.O_NOCTTY)
        client = Client(process.port)
        assert client.ask(b"c") == b"W21"
        out = b""
        while b"done" not in out and select.select([pty], [], [], 10)[0]:
            out += os.read(pty, 4096)
        assert out.startswith(b"hello from pvh\n"), out  # raw: no \r added
        os.close(pty)
    with stub(tmp_path, str(pvh), "--wait", "--serial", "tcp:127.0.0.1:0", "--listen", ":0") as p:
        match = re.search(r"gdbstub: serial: listening on 127.0.0.1:(\d+)", p.text())
        assert match, p.text()
        console = socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10)
        time.sleep(0.2)
        client = Client(p.port)
        assert client.ask(b"c") == b"W21"
        out = b""
        while b"done" not in out and (chunk := console.recv(4096)):
            out += chunk
        assert out.startswith(b"hello from pvh")


def test_stdin_that_is_not_a_terminal_goes_to_the_guest(echo: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gdbstub", "run", str(echo), "--listen", ":0"],
        input=b"ab\x03q",
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0x43, result.stderr
    assert result.stdout == b"ready\n<61><62><03>"


def test_the_terminal_is_the_guests_console(echo: Path, tmp_path: Path) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "gdbstub", "run", str(echo), "--listen", "127.0.0.1:0"],
        cwd=str(ROOT),
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=20,
    )
    try:
        child.expect(rb"target remote 127\.0\.0\.1:(\d+)")
        port = int(child.match.group(1))
        child.expect(b"ready")
        child.send(b"a\x03")  # Ctrl-C is a key for the guest, not a signal for the stub
        child.expect(re.escape(b"<61><03>"))
        child.send(b"\x01a")  # Ctrl-A a: a literal Ctrl-A
        child.expect(re.escape(b"<01>"))
        child.send(b"\x01h")
        child.expect(b"Ctrl-A x")
        child.send(b"\x01s")  # stop the guest for the debugger
        child.expect(b"the guest is stopped")
        client = Client(port)
        assert client.ask(b"?").startswith(b"T02")
        child.send(b"b")  # typed while stopped: the UART keeps it for the guest
        client.send(b"c")
        child.expect(re.escape(b"<62>"))
        child.send(b"\x01x")  # quit, as SIGTERM
        assert client.packet() == b"X0f"
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 143, (child.exitstatus, child.signalstatus)


# --- real gdb ------------------------------------------------------------------------------------


def test_gdb_killed_at_a_breakpoint_then_a_second_gdb(pvh: Path, tmp_path: Path) -> None:
    process = Stub(tmp_path, str(pvh), "--wait", "--listen", "127.0.0.1:0", "--serial", "none")
    gdb = gdb2 = None
    try:
        gdb = Gdb(pvh, process.port)
        assert "Breakpoint 1" in gdb.cmd("break main64")
        assert "Breakpoint 1," in gdb.cmd("continue")
        gdb.cmd("break add_numbers")
        assert "Breakpoint 2," in gdb.cmd("continue")
        rip = gdb.value("$rip")
        # a second gdb while the first is attached: refused with the reason, the first goes on
        refused = Gdb(pvh, process.port)
        out = refused.connect(process.port)
        assert "another debugger" in out and "one at a time" in out, out
        refused.close()
        assert gdb.value("$rip") == rip
        gdb.child.kill(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "without detaching" not in process.text():
            assert time.monotonic() < deadline, process.text()
            time.sleep(0.05)
        gdb2 = Gdb(pvh, process.port)
        assert gdb2.value("$rip") == rip  # where the first one left it
        assert "no breakpoints" in gdb2.cmd("monitor info breakpoints")
        assert "exited with code 041" in gdb2.cmd("continue")  # nothing stray in the way
        assert process.wait() == 0x21
    finally:
        for debugger in (gdb, gdb2):
            if debugger is not None:
                debugger.close()
        process.stop()


def test_gdb_over_a_unix_socket(pvh: Path, tmp_path: Path) -> None:
    path = tmp_path / "gdb.sock"
    process = Stub(tmp_path, str(pvh), "--wait", "--listen", f"unix:{path}", "--serial", "none")
    gdb = None
    try:
        assert process.endpoint == str(path)
        gdb = Gdb.__new__(Gdb)
        child = pexpect.spawn("gdb", ["-nx", "-q", str(pvh)], encoding="utf-8", timeout=30,
                              env=dict(os.environ, TERM="dumb"))  # fmt: skip
        gdb.child = child
        child.expect(r"\(gdb\) ")
        out = gdb.cmd(f"target remote {path}")
        assert "pvh_start32" in out or "0x0000000000100000" in out, out
        assert "exited with code 041" in gdb.cmd("continue")
        assert process.wait() == 0x21
        assert not path.exists()
    finally:
        if gdb is not None:
            gdb.close()
        process.stop()
