"""The socket server over the fake target: loopback clients, disconnects, refusals, signals,
Unix sockets and IPv6."""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fake_target import FakeTarget

from gdbstub import rsp
from gdbstub.server import GdbServer, is_loopback
from gdbstub.target import ResumeAction, StopEvent


def wait_for(condition: Callable[[], bool]) -> None:
    """Wait until the server thread has done something (a real target could not stop
    before it was resumed; the fake must not either)."""
    event = threading.Event()
    for _ in range(1000):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition never became true")


class Target(FakeTarget):
    """The fake, with what HvTarget offers for a vanished client."""

    def remove_all_breakpoints(self) -> None:
        self.calls.append(("remove_all_breakpoints",))
        self.breakpoints.clear()


class Wire:
    """A minimal blocking RSP client on a real socket."""

    def __init__(self, port: int | str, family: int = socket.AF_INET) -> None:
        if isinstance(port, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(port)
        else:
            host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
            self.sock = socket.create_connection((host, port), timeout=10)
        self.decoder = rsp.Decoder()
        self.pending: list[rsp.Frame] = []

    def frame(self) -> rsp.Frame:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "server closed the connection"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def packet(self) -> bytes:
        while True:
            frame = self.frame()
            if isinstance(frame, rsp.Packet):
                return frame.payload

    def ask(self, payload: bytes) -> bytes:
        self.sock.sendall(rsp.encode(payload))
        return self.packet()

    def closed(self) -> bool:
        """Read (acks, at most) until the server closes; True once it has."""
        while data := self.sock.recv(4096):
            assert set(data) <= set(b"+"), data
        return True


@contextmanager
def serving(**kwargs: object) -> Iterator[tuple[GdbServer, Target]]:
    target = Target()
    target.stop_on_interrupt = True
    server = GdbServer(target, port=0, **kwargs)  # type: ignore[arg-type]
    thread = server.start()
    try:
        yield server, target
    finally:
        server.close()
        thread.join(10)
        target.close()


def test_loopback_session(tmp_path: Path) -> None:
    log = tmp_path / "packets.log"
    with serving(log_packets=log, running=False) as (server, target):
        assert server.address[0] == "127.0.0.1" and server.port > 0

        # First client: handshake, run to a stop, vanish while the guest runs.
        one = Wire(server.port)
        assert one.ask(b"qSupported:swbreak+").startswith(b"PacketSize=20000")
        assert one.ask(b"QStartNoAckMode") == b"OK"
        assert one.ask(b"m1000,4") == b"00010203"
        assert one.ask(b"Z0,1010,1") == b"OK"
        one.sock.sendall(rsp.encode(b"vCont;c"))
        wait_for(lambda: target.calls[-1:] == [("resume", {}, ResumeAction("c"))])
        target.post_stop(StopEvent(2, 5, reason="swbreak"))
        assert one.packet() == b"T05thread:2;swbreak:;"
        one.sock.sendall(rsp.encode(b"c"))
        one.sock.sendall(b"\x03")
        assert one.packet() == b"T02thread:1;"  # the fake stops itself when interrupted
        one.sock.sendall(rsp.encode(b"c"))
        wait_for(lambda: target.calls.count(("resume", {}, ResumeAction("c"))) == 3)
        one.sock.close()

        # The server stopped the guest to take the breakpoint out, then let it run on.
        wait_for(
            lambda: not server.attached and target.calls[-1:] and target.calls[-1][0] == "resume"
        )
        assert target.calls[-3:] == [
            ("interrupt",),
            ("remove_all_breakpoints",),
            ("resume", {}, ResumeAction("c")),
        ]
        assert not target.breakpoints and ("detach",) not in target.calls

        # Second client: attaching stops the running guest; '?' says so. D resumes.
        two = Wire(server.port)
        assert two.ask(b"?") == b"T02thread:1;"
        assert two.ask(b"D") == b"OK"
        assert two.closed()
        assert ("detach",) in target.calls

        # Third client kills the target: serve_forever returns.
        three = Wire(server.port)
        three.sock.sendall(rsp.encode(b"k"))
        received = b""
        while chunk := three.sock.recv(4096):
            received += chunk
        assert b"$X09#" in received  # lldb waits for it; then the server closes
        wait_for(lambda: target.calls[-1] == ("kill",))
    text = log.read_text()
    assert "<- b'$qSupported:swbreak+" in text and "-> b'+$PacketSize=20" in text


def test_vanishing_at_a_stop_leaves_the_guest_stopped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gdbstub.server")
    with serving() as (server, target):
        one = Wire(server.port)
        assert one.ask(b"Z0,1010,1") == b"OK" and target.breakpoints
        one.sock.sendall(rsp.encode(b"c"))
        wait_for(lambda: target.calls[-1:] and target.calls[-1][0] == "resume")
        target.post_stop(StopEvent(1, 5, reason="swbreak"))
        assert one.packet() == b"T05thread:1;"
        port = one.sock.getsockname()[1]
        one.sock.close()
        wait_for(lambda: not server.attached and ("remove_all_breakpoints",) in target.calls)
        two = Wire(server.port)
        assert two.ask(b"?") == b"T05thread:1;"  # the real stop, not an interrupt
        assert not target.breakpoints
        resumes = [c for c in target.calls if c[0] in ("resume", "interrupt", "detach")]
        assert resumes == [("resume", {}, ResumeAction("c"))]  # only the client's own 'c'
    lines = [r.getMessage() for r in caplog.records]
    assert f"gdbstub: debugger connected from 127.0.0.1:{port}" in lines
    assert (
        f"gdbstub: debugger 127.0.0.1:{port} disconnected without detaching; "
        "the guest stays stopped"
    ) in lines


def test_a_silent_or_noisy_connection_does_not_touch_the_guest() -> None:
    with serving(running=True) as (server, target):
        scanner = socket.create_connection(("127.0.0.1", server.port))
        scanner.close()  # nc -z
        health = socket.create_connection(("127.0.0.1", server.port))
        health.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no '$': not a debugger
        time.sleep(0.2)
        assert target.calls == []
        gdb = Wire(server.port)  # the silent one gives way
        assert gdb.ask(b"?") == b"T02thread:1;"  # now the guest is stopped for gdb
        assert target.calls == [("interrupt",)]
        assert health.recv(100) == b""  # closed
        health.close()


def test_a_second_debugger_is_refused_and_the_first_goes_on() -> None:
    with serving() as (server, _target):
        first = Wire(server.port)
        assert first.ask(b"qSupported").startswith(b"PacketSize")
        second = Wire(server.port)
        reply = second.ask(b"qSupported:multiprocess+")
        assert reply.startswith(b"E.another debugger (127.0.0.1:")
        assert b"is attached" in reply
        assert second.sock.recv(100) == b""
        assert first.ask(b"m1000,2") == b"0001"
        assert server.attached


def test_sigterm_tells_a_waiting_gdb_and_ends_serving() -> None:
    target = Target()
    server = GdbServer(target, port=0)
    thread = server.start()
    try:
        client = Wire(server.port)
        client.sock.sendall(rsp.encode(b"c"))
        wait_for(lambda: target.calls[-1:] == [("resume", {}, ResumeAction("c"))])
        server.stop(10, signal=15)
        assert not thread.is_alive()
        assert client.packet() == b"X0f"
        assert client.closed()
    finally:
        server.close()
        target.close()


def test_pause_guest_is_ctrl_c_for_the_attached_gdb_or_the_next_one() -> None:
    with serving(running=True) as (server, target):
        server.pause_guest()  # nobody attached: the guest stops and waits
        wait_for(lambda: target.calls == [("interrupt",)])
        client = Wire(server.port)
        assert client.ask(b"?") == b"T02thread:1;"
        assert target.calls == [("interrupt",)]  # the stop was kept
        client.sock.sendall(rsp.encode(b"c"))
        wait_for(lambda: target.calls[-1:] and target.calls[-1][0] == "resume")
        server.pause_guest()
        assert client.packet() == b"T02thread:1;"


def test_an_internal_error_ends_only_that_connection(caplog: pytest.LogCaptureFixture) -> None:
    with serving() as (server, target):
        original = target.capabilities
        target.capabilities = lambda: 1 / 0  # type: ignore[assignment, method-assign]
        broken = Wire(server.port)
        broken.sock.sendall(rsp.encode(b"qSupported"))
        assert broken.closed()
        target.capabilities = original  # type: ignore[method-assign]
        fine = Wire(server.port)
        assert fine.ask(b"?") == b"T05thread:1;"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "ZeroDivisionError" in errors[0], errors
    assert all(r.exc_info is None for r in caplog.records if r.levelno == logging.ERROR)


def test_many_connect_detach_cycles() -> None:
    with serving() as (server, target):
        for i in range(200):
            client = Wire(server.port)
            if i % 2:
                assert client.ask(b"Z0,1000,1") == b"OK"
                assert client.ask(b"D") == b"OK"
                assert client.closed()
            else:
                assert client.ask(b"m1000,1") == b"00"
                client.sock.close()
            wait_for(lambda: not server.attached and server._client is None)
        assert not target.breakpoints


def test_stop_from_another_thread() -> None:
    target = Target()
    with GdbServer(target, port=0) as server:
        thread = server.start()
        client = Wire(server.port)
        assert client.ask(b"qAttached") == b"1"
        server.stop(timeout=10)
        assert not thread.is_alive()
        assert client.closed()
    target.close()


def test_unix_socket_mode_0600_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "gdb.sock"
    path.touch()
    with pytest.raises(FileExistsError):
        GdbServer(FakeTarget(), unix_path=path)
    path.unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a leftover of a process that died
    stale.close()
    target = Target()
    with GdbServer(target, unix_path=path) as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert server.endpoint == str(path)
        with pytest.raises(OSError):
            GdbServer(target, unix_path=path)  # busy
        server.start()
        client = Wire(str(path))
        assert client.ask(b"m1000,2") == b"0001"
    assert not path.exists()
    target.close()


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    target = Target()
    try:
        server = GdbServer(target, "::1", 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with server:
        server.start()
        assert server.endpoint == f"[::1]:{server.port}"
        client = Wire(server.port, socket.AF_INET6)
        assert client.ask(b"m1000,1") == b"00"
    target.close()


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
