"""The one socket test: a loopback client against GdbServer over the fake target."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

from fake_target import FakeTarget

from gdbstub import rsp
from gdbstub.server import GdbServer
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


class Wire:
    """A minimal blocking RSP client on a real socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
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


def test_loopback_session(tmp_path: Path) -> None:
    target = FakeTarget()
    target.stop_on_interrupt = True
    log = tmp_path / "packets.log"
    server = GdbServer(target, port=0, log_packets=log)
    thread = server.start()
    try:
        assert server.address[0] == "127.0.0.1" and server.port > 0

        # First client: handshake, run to a stop, vanish without D.
        one = Wire(server.port)
        assert one.ask(b"qSupported:swbreak+").startswith(b"PacketSize=20000")
        assert one.ask(b"QStartNoAckMode") == b"OK"
        assert one.ask(b"m1000,4") == b"00010203"
        one.sock.sendall(rsp.encode(b"vCont;c"))
        wait_for(lambda: target.calls[-1:] == [("resume", {}, ResumeAction("c"))])
        target.post_stop(StopEvent(2, 5, reason="swbreak"))
        assert one.packet() == b"T05thread:2;swbreak:;"
        one.sock.sendall(rsp.encode(b"c"))
        one.sock.sendall(b"\x03")
        assert one.packet() == b"T02thread:1;"  # the fake stops itself when interrupted
        one.sock.sendall(rsp.encode(b"c"))
        one.sock.close()

        # Second client: the server detached for the first one and halts the guest again.
        two = Wire(server.port)
        assert two.ask(b"?") == b"T02thread:1;"
        assert ("detach",) in target.calls
        assert target.calls.count(("interrupt",)) == 2
        assert two.ask(b"D") == b"OK"
        assert two.closed()

        # Third client kills the target: serve_forever returns.
        three = Wire(server.port)
        three.sock.sendall(rsp.encode(b"k"))
        received = b""
        while chunk := three.sock.recv(4096):
            received += chunk
        assert b"$X09#" in received  # lldb waits for it; then the server closes
        assert three.closed()
        thread.join(10)
        assert not thread.is_alive()
        assert target.calls[-1] == ("kill",)
    finally:
        server.close()
        target.close()
    text = log.read_text()
    assert "<- b'$qSupported:swbreak+" in text and "-> b'+$PacketSize=20" in text


def test_stop_from_another_thread() -> None:
    target = FakeTarget()
    with GdbServer(target, port=0) as server:
        thread = server.start()
        client = Wire(server.port)
        assert client.ask(b"qAttached") == b"1"
        server.stop(timeout=10)
        assert not thread.is_alive()
        assert client.closed()
    target.close()
