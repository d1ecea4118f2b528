"""Issue 13 on real ``gdbstub run`` processes: disconnects keep the VM as it was, one client at a
time, malformed packets change nothing, exit statuses, signals, resources, listeners."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gdbdrive import ROOT
from guestbuild import build

from gdbstub import hv, regs, rsp
from gdbstub.machine.loader import symbols

BACKENDS = [b for b in hv.available_backends() if b in ("kvm", "emu")]
KVMA = 0xFFFFFFFF80000000


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def pvh() -> Path:
    return build("pvh_kernel")


@pytest.fixture(scope="module")
def syms(pvh: Path) -> dict[str, int]:
    return symbols(pvh)


class Stub:
    """``gdbstub run`` with its stderr in a file; ``port`` (or ``endpoint``) once it listens."""

    def __init__(self, tmp: Path, *args: str, wait_listen: bool = True, **popen: object) -> None:
        self.err = tmp / f"stderr-{time.monotonic_ns()}.txt"
        self._file = open(self.err, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "gdbstub", "run", *args]
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("stdout", subprocess.DEVNULL)
        self.proc = subprocess.Popen(
            command,
            stderr=self._file,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            **popen,  # type: ignore[call-overload]
        )
        self.endpoint = ""
        self.port = 0
        if wait_listen:
            deadline = time.monotonic() + 60
            while not self.endpoint:
                match = re.search(r"target remote (\S+)", self.text())
                if match:
                    self.endpoint = match.group(1)
                    port = self.endpoint.rpartition(":")[2]
                    self.port = int(port) if port.isdigit() else 0
                elif self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"gdbstub did not listen: {self.text()}")
                else:
                    time.sleep(0.02)

    def text(self) -> str:
        return self.err.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._file.close()


@contextmanager
def stub(tmp: Path, *args: str) -> Iterator[Stub]:
    process = Stub(tmp, *args)
    try:
        yield process
    finally:
        process.stop()


def _console(payload: bytes) -> bool:
    """An ``O`` packet: console output (hex), not the reply ``OK``."""
    return payload[:1] == b"O" and payload != b"OK"


class Client:
    """A raw RSP client in no-ack mode."""

    def __init__(self, port: int | str, *, handshake: bool = True) -> None:
        if isinstance(port, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(30)
            self.sock.connect(port)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.decoder = rsp.Decoder()
        self.frames: list[rsp.Frame] = []
        if handshake:
            assert self.ask(b"QStartNoAckMode") == b"OK"

    def frame(self) -> rsp.Frame:
        while not self.frames:
            data = self.sock.recv(0x40000)
            assert data, "the stub closed the connection"
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def packet(self) -> bytes:
        while True:
            frame = self.frame()
            if isinstance(frame, rsp.Packet) and not _console(frame.payload):
                return frame.payload
            if isinstance(frame, rsp.Nak):
                return b"-"

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.packet()

    def send(self, payload: bytes) -> None:
        self.sock.sendall(rsp.encode(payload, rle=False))

    def monitor(self, command: str) -> str:
        self.send(b"qRcmd," + command.encode().hex().encode())
        out = b""
        while True:
            frame = self.frame()
            if not isinstance(frame, rsp.Packet):
                continue  # acks
            if _console(frame.payload):
                out += bytes.fromhex(frame.payload[1:].decode())
            else:
                return out.decode()

    def reg(self, regnum: int) -> int:
        return int.from_bytes(bytes.fromhex(self.ask(b"p%x" % regnum).decode()), "little")

    def read(self, addr: int, length: int) -> bytes:
        reply = self.ask(b"m%x,%x" % (addr, length))
        assert not reply.startswith(b"E"), reply
        return bytes.fromhex(reply.decode())

    def close(self) -> None:
        self.sock.close()


RIP = 16
_DR0, _DR7_END = regs.by_name["dr0"].offset, regs.by_name["dr7"].offset + 8


def without_debug_registers(blob: bytes) -> bytes:
    """A ``g`` reply without dr0-dr7 (the stub's own breakpoints show there while set)."""
    return blob[: 2 * _DR0] + blob[2 * _DR7_END :]


def to_main64(client: Client, syms: dict[str, int], mode: int) -> None:
    """Run to main64 (paging on), set the kernel's mode, leave no breakpoint."""
    main64 = syms["main64"]
    assert client.ask(b"Z0,%x,1" % main64) == b"OK"
    assert client.ask(b"c").startswith(b"T05")
    assert client.reg(RIP) == main64
    assert client.ask(b"z0,%x,1" % main64) == b"OK"
    assert client.ask(b"M%x,8:%s" % (syms["mode"], mode.to_bytes(8, "little").hex().encode()))


# --- disconnects -----------------------------------------------------------------------------


def test_disconnects_leave_the_guest_as_it_was(
    pvh: Path, syms: dict[str, int], backend: str, tmp_path: Path
) -> None:
    entry = syms["pvh_start32"]
    add_numbers = syms["add_numbers"]
    with stub(tmp_path, str(pvh), "--wait", "--listen", "127.0.0.1:0", "--backend", backend,
              "--serial", f"file:{tmp_path / 'serial'}") as process:  # fmt: skip
        # a port scanner, a health check and a client that says hello and leaves: the
        # --wait guest keeps waiting at its first instruction
        socket.create_connection(("127.0.0.1", process.port)).close()
        http = socket.create_connection(("127.0.0.1", process.port))
        http.sendall(b"GET / HTTP/1.0\r\n\r\n")
        hello = Client(process.port)  # the silent HTTP client gives way to it
        assert hello.ask(b"?").startswith(b"T05")
        hello.close()
        http.close()
        time.sleep(0.3)
        first = Client(process.port)
        assert first.reg(RIP) == entry
        assert (tmp_path / "serial").read_bytes() == b""

        # a second debugger is refused; the first goes on
        second = Client(process.port, handshake=False)
        refusal = second.ask(b"qSupported:multiprocess+")
        assert refusal.startswith(b"E.another debugger (127.0.0.1:") and b"one at a time" in refusal
        assert second.sock.recv(100) == b""
        second.close()

        # stopped at a breakpoint with a watchpoint set, the client dies
        to_main64(first, syms, mode=0)
        code = first.read(add_numbers, 16)
        assert first.ask(b"Z0,%x,1" % add_numbers) == b"OK"
        assert first.ask(b"Z2,%x,8" % syms["counter"]) in (b"OK", b"E14")
        assert first.ask(b"c").startswith(b"T05")
        assert first.reg(RIP) == add_numbers
        registers = first.ask(b"g")
        first.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        first.close()  # a reset, as from a killed gdb

        # the next client finds it where it was, with the real stop and no breakpoint left
        deadline = time.monotonic() + 10
        while "disconnected without detaching" not in process.text():
            assert time.monotonic() < deadline, process.text()
            time.sleep(0.02)
        third = Client(process.port)
        stop = third.ask(b"?")
        assert stop.startswith(b"T05") and b"thread:1;" in stop, stop
        assert without_debug_registers(third.ask(b"g")) == without_debug_registers(registers)
        assert "no breakpoints" in third.monitor("info breakpoints")
        assert third.ask(b"Qqemu.PhyMemMode:1") == b"OK"
        assert third.read(add_numbers - KVMA, 16) == code  # the int3 is gone from RAM
        assert third.ask(b"Qqemu.PhyMemMode:0") == b"OK"
        assert third.ask(b"c") == b"W21"  # mode 0 runs to its end: nothing stray in its way
        assert process.wait() == 0x21
    lines = process.lines()
    assert any(re.fullmatch(r"gdbstub: debugger connected from 127\.0\.0\.1:\d+", x) for x in lines)
    assert any(
        re.fullmatch(
            r"gdbstub: debugger 127\.0\.0\.1:\d+ disconnected without detaching; "
            r"the guest stays stopped",
            x,
        )
        for x in lines
    ), lines
    assert "Traceback" not in process.text()


def test_a_client_dying_while_the_guest_runs(
    pvh: Path, syms: dict[str, int], backend: str, tmp_path: Path
) -> None:
    with stub(tmp_path, str(pvh), "--wait", "--listen", "127.0.0.1:0", "--backend", backend,
              "--serial", "none") as process:  # fmt: skip
        first = Client(process.port)
        to_main64(first, syms, mode=1)  # spin_loop: inc qword [counter] forever
        assert first.ask(b"Z0,%x,1" % syms["halt_forever"]) == b"OK"  # never reached
        first.send(b"c")
        time.sleep(0.3)
        first.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        first.close()
        deadline = time.monotonic() + 10
        while "the guest runs on" not in process.text():
            assert time.monotonic() < deadline, process.text()
            time.sleep(0.02)
        second = Client(process.port)
        assert second.ask(b"?").startswith(b"T02")  # stopped for the new client, as QEMU does
        counter = int.from_bytes(second.read(syms["counter"], 8), "little")
        assert counter > 0
        assert "no breakpoints" in second.monitor("info breakpoints")
        # a client killed in the middle of a big memory read
        second.send(b"m%x,%x" % (syms["main64"], 0xFFF0))
        second.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        second.close()
        third = Client(process.port)
        assert third.ask(b"?").startswith(b"T02")
        assert int.from_bytes(third.read(syms["counter"], 8), "little") == counter  # stopped
        assert third.ask(b"D") == b"OK"  # detach: the guest runs on
        time.sleep(0.2)
        fourth = Client(process.port)
        assert int.from_bytes(fourth.read(syms["counter"], 8), "little") > counter
        assert process.proc.poll() is None


def test_many_connect_detach_cycles(pvh: Path, syms: dict[str, int], tmp_path: Path) -> None:
    with stub(tmp_path, str(pvh), "--wait", "--listen", "127.0.0.1:0", "--serial", "none") as p:
        first = Client(p.port)
        to_main64(first, syms, mode=1)
        assert first.ask(b"D") == b"OK"
        for i in range(200):
            client = Client(p.port)
            assert client.ask(b"?").startswith(b"T02")
            if i % 3 == 0:
                assert client.ask(b"Z0,%x,1" % syms["spin_loop"]) == b"OK"
            if i % 2:
                assert client.ask(b"D") == b"OK"
            client.close()
        last = Client(p.port)
        assert "no breakpoints" in last.monitor("info breakpoints")
        assert last.ask(b"Qqemu.PhyMemMode:1") == b"OK"
        assert last.read(syms["spin_loop"] - KVMA, 1) != b"\xcc"
        assert p.proc.poll() is None


# --- malformed packets against the real stub ---------------------------------------------------


def _body(payload: bytes) -> bytes:
    return b"$%s#%02x" % (payload, rsp.checksum(payload))


MALFORMED: list[tuple[bytes, bytes]] = [
    (b"$m0,4#00", b"-"),  # bad checksum
    (b"$m0,4", b""),  # no '#': the next '$' starts over (the following packet is answered)
    (_body(b"a*}}"), b""),  # the codec crash of issue 13: a request "a*]" (no RLE in requests)
    (_body(b"m0,4}"), b"-"),  # a dangling escape
    (_body(b"mzz,4"), b"E"),  # bad hex
    (_body(b"m0* ,4"), b"E"),  # run-length bytes in a request are not expanded: bad hex
    (_body(b"m0,ffffffffffffffff"), b""),  # absurd length: a prefix, never the allocation
    (_body(b"mffffffffffffffff,10"), b"E"),
    (_body(b"M0,ffffffffffffffff:00"), b"E"),
    (_body(b"X0,10:\x01"), b"E"),
    (_body(b"G00"), b"E"),  # G of the wrong size
    (_body(b"P10=00"), b"E"),
    (_body(b"p1ffff"), b"E"),
    (_body(b"Hg99"), b"E"),  # unknown thread
    (_body(b"g;thread:99;"), b"E"),
    (_body(b"Z2,ffffffffffff0000,8"), b"Z"),  # a watchpoint at an unmapped address
    (_body(b"Z2,1000,ffffffffffffffff"), b"E"),  # and one longer than memory
    (_body(b"Z3,0,ffffffffffffffff"), b"E"),
    (_body(b"Z1,ffffffffffff0000,1"), b"Z"),  # a hardware breakpoint anywhere: a DR slot
    (_body(b"vFile:open:2f6574632f706173737764,0,0"), b""),  # no host files
    (_body(b"qXfer:features:read:../../../etc/passwd:0,1000"), b"E"),
    (b"$" + b"0" * (rsp.PACKET_SIZE + 10) + b"#00", b"-"),  # oversized
]


def test_malformed_packets_change_nothing(
    pvh: Path, syms: dict[str, int], backend: str, tmp_path: Path
) -> None:
    with stub(tmp_path, str(pvh), "--wait", "--listen", "127.0.0.1:0", "--backend", backend,
              "--serial", "none") as process:  # fmt: skip
        client = Client(process.port, handshake=False)
        to_main64(client, syms, mode=0)
        registers = client.ask(b"g")
        window = (syms["main64"], 0x2000)
        memory = client.read(*window)
        for wire, expected in MALFORMED:
            client.sock.sendall(wire + _body(b"qC"))
            replies = []
            while (reply := client.packet()) != b"QC1":
                replies.append(reply)
            if expected == b"-":
                assert replies == [b"-"], (wire[:40], replies)
            elif expected == b"E":
                assert len(replies) == 1 and replies[0].startswith(b"E"), (wire[:40], replies)
            elif expected == b"Z":  # a debug register takes any address; page watchpoints not
                assert replies in ([b"OK"], [b"E14"]), (wire[:40], replies)
                if replies == [b"OK"]:
                    assert client.ask(b"z" + wire[2:].partition(b"#")[0]) == b"OK"
            elif wire.startswith(b"$m0,ffff"):
                assert len(replies) == 1 and len(replies[0]) <= rsp.PACKET_SIZE
            elif expected == b"":
                assert replies in ([], [b""]), (wire[:40], replies)
        assert client.ask(b"?").startswith(b"T05")
        assert client.ask(b"g") == registers
        assert client.read(*window) == memory
        assert client.monitor("info breakpoints").startswith(("no breakpoints", "none inserted"))
        assert client.ask(b"c") == b"W21"
        assert process.wait() == 0x21
    assert "Traceback" not in process.text()


# --- exit statuses, signals, resources ---------------------------------------------------------


def run_stub(*args: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gdbstub", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **kwargs.pop("env", {})},  # type: ignore[dict-item]
        **kwargs,  # type: ignore[call-overload]
    )


def test_exit_status_table(pvh: Path, tmp_path: Path) -> None:
    pc, mb_pc = build("pc_kernel"), build("mb_pc_kernel")
    common = ["--listen", "127.0.0.1:0", "--serial", "none"]
    assert run_stub("run", str(pc), "--append", "quick", *common).returncode == 0  # ACPI off
    assert run_stub("run", str(mb_pc), "--no-reboot", *common).returncode == 0  # reset
    assert run_stub("run", str(pvh), *common).returncode == (0x10 << 1) | 1  # isa-debug-exit
    assert run_stub("run", str(pvh), "--bogus").returncode == 2
    assert run_stub("run", str(ROOT / "pyproject.toml"), *common).returncode == 2  # no kernel


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


@pytest.mark.parametrize(
    "case",
    [
        "memory",
        "busy-port",
        "no-unicorn",
        "unreadable",
        "serial-file",
        "listen-name",
        "smp",
        "log-packets",
    ],
)
def test_resource_and_argument_failures_are_one_line(case: str, pvh: Path, tmp_path: Path) -> None:
    common = ["--serial", "none"]
    kwargs: dict[str, object] = {}
    if case == "memory":
        args, status, words = [str(pvh), "--memory", "24G", "--listen", ":0"], 1, "--memory"
        kwargs["preexec_fn"] = _limit_address_space
    elif case == "busy-port":
        busy = socket.create_server(("127.0.0.1", 0))
        args = [str(pvh), "--listen", f"127.0.0.1:{busy.getsockname()[1]}"]
        status, words = 1, "Address already in use"
    elif case == "no-unicorn":
        fake = tmp_path / "nounicorn" / "unicorn"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ModuleNotFoundError(name='unicorn')\n")
        kwargs["env"] = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
        args, status, words = [str(pvh), "--backend", "emu", "--listen", ":0"], 1, "gdbstub[emu]"
    elif case == "unreadable":
        args, status, words = [str(tmp_path / "missing.elf")], 2, "cannot read kernel"
    elif case == "serial-file":
        args, status, words = [str(pvh), "--serial", f"file:{tmp_path}/no/such/dir"], 2, "--serial"
        common = []
    elif case == "listen-name":
        args, status, words = [str(pvh), "--listen", "no-such-host.invalid:1234"], 2, "--listen"
    elif case == "log-packets":
        args = [str(pvh), "--log-packets", f"{tmp_path}/no/such/dir/log"]
        status, words = 2, "--log-packets"
    else:
        args, status, words = [str(pvh), "-smp", "4"], 2, "one vCPU"
    result = run_stub("run", *args, *common, **kwargs)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and lines[0].startswith("gdbstub: ") and words in lines[0], lines
    if case == "busy-port":
        busy.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_end_the_vm_cleanly(
    signum: int, pvh: Path, syms: dict[str, int], backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "gdb.sock"
    process = Stub(tmp_path, str(pvh), "--wait", "--listen", f"unix:{path}", "--backend",
                   backend, "--serial", "none")  # fmt: skip
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        client = Client(str(path))
        to_main64(client, syms, mode=1)
        client.send(b"c")  # the guest spins in the engine; gdb waits for a stop reply
        time.sleep(0.5)
        process.proc.send_signal(signum)
        assert client.packet() == b"X%02x" % signum
        assert process.wait(20) == 128 + signum
        assert not path.exists()  # the socket is gone with the process
        assert "Traceback" not in process.text()
    finally:
        process.stop()


@pytest.mark.parametrize("mode", [1, 4], ids=["spinning", "halted-with-interrupts-off"])
def test_ctrl_c_while_running_without_a_debugger(
    mode: int, pvh: Path, syms: dict[str, int], backend: str, tmp_path: Path
) -> None:
    with stub(tmp_path, str(pvh), "--wait", "--listen", "127.0.0.1:0", "--backend", backend,
              "--serial", "none") as process:  # fmt: skip
        client = Client(process.port)
        to_main64(client, syms, mode=mode)
        assert client.ask(b"D") == b"OK"
        time.sleep(0.3)
        process.proc.send_signal(signal.SIGINT)
        assert process.wait(20) == 130
        # the port is free at once
        socket.create_server(("127.0.0.1", process.port)).close()
    assert "Traceback" not in process.text()


# --- listeners ----------------------------------------------------------------------------------


def test_ipv6_and_the_warning_beyond_loopback(pvh: Path, tmp_path: Path) -> None:
    with stub(tmp_path, str(pvh), "--wait", "--listen", "[::1]:0", "--serial", "none") as six:
        assert re.fullmatch(r"\[::1\]:\d+", six.endpoint), six.endpoint
        sock = socket.create_connection(("::1", six.port), timeout=10)
        sock.sendall(_body(b"?"))
        assert b"$T05" in sock.recv(100)
        sock.close()
        assert "beyond this machine" not in six.text()
    with stub(tmp_path, str(pvh), "--wait", "--listen", "0.0.0.0:0", "--serial", "none") as wide:
        warning = [line for line in wide.lines() if "beyond this machine" in line]
        assert len(warning) == 1 and "0.0.0.0" in warning[0]
