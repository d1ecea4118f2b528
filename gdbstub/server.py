"""The TCP server: the only module of the stub that touches sockets.

Theory of operation
-------------------
``GdbServer`` listens (127.0.0.1 by default) and serves one client at a time. For each client
it makes a fresh ``Decoder`` and ``GdbSession`` and then blocks in ``select`` on three things:

* the client socket: bytes go through the decoder, frames through the session, and the
  session's outputs are written back (``SendBytes``) or end the client (``CloseConnection``
  after ``D``, ``Shutdown`` after ``k``);
* ``target.wake_fd``: readable while the target holds a stop; every pending stop is taken
  with ``take_stop()`` and handed to the session, which answers the outstanding resume;
* a private socketpair that ``stop()`` writes to, so another thread can end ``serve_forever``.

There are no timeouts in the steady state and no polling. When a client goes away without
``D``, the server detaches the target for it (breakpoints removed, guest running) and waits
for the next client; a new client finds the guest halted again, because the server interrupts
a running guest and waits for its stop before reading the client's first packet (the stop is
then what ``?`` reports). After ``k`` ``serve_forever`` returns.

``log_packets`` names a file that receives every chunk read and written, with a timestamp.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from types import TracebackType
from typing import IO

from .rsp import Decoder
from .session import CloseConnection, GdbSession, Output, SendBytes, Shutdown
from .target import StopEvent, Target

__all__ = ["GdbServer", "serve"]

log = logging.getLogger(__name__)

_RECV_SIZE = 0x40000


class GdbServer:
    """Serve ``target`` to gdb or lldb clients over TCP, one client at a time.

    The socket is bound and listening once the constructor returns, so ``port`` is known even
    when 0 was asked for. ``running`` tells the server that the guest is already running when
    the first client connects (it is then halted for that client, as for later clients).
    ``attach_timeout`` bounds the wait for that halt.
    """

    def __init__(
        self,
        target: Target,
        host: str = "127.0.0.1",
        port: int = 1234,
        *,
        log_packets: str | os.PathLike[str] | None = None,
        running: bool = False,
        attach_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self._listener = socket.create_server((host, port), backlog=1)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._log: IO[str] | None = (
            open(log_packets, "a", encoding="utf-8") if log_packets is not None else None  # noqa: SIM115
        )
        self._guest_running = running
        self._held_stops: list[StopEvent] = []
        self._attach_timeout = attach_timeout
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.attached = False
        """Whether a debugger is connected now."""

    # --- public API ----------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on."""
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        """The TCP port the server listens on (useful when constructed with port 0)."""
        return self.address[1]

    def serve_forever(self) -> bool:
        """Serve clients until one kills the target or the guest exits (True), or ``stop()``.

        Between clients the target's stops are watched too: a guest that exits while nobody is
        attached ends the server; any other stop is kept for the next client's ``?``.
        """
        while not self._stopping.is_set():
            listener, wake, stops_fd = (
                self._listener.fileno(),
                self._wake_r.fileno(),
                self.target.wake_fd,
            )
            ready, _, _ = select.select([listener, wake, stops_fd], [], [])
            if wake in ready:
                break
            if stops_fd in ready:
                stops = self._take_stops()
                self._held_stops += stops
                if stops:
                    self._guest_running = False
                if any(stop.exit_status is not None for stop in stops):
                    return True
                continue
            try:
                conn, peer = self._listener.accept()
            except OSError:
                continue
            log.info("debugger connected from %s", peer)
            self.attached = True
            try:
                with conn:
                    if self._serve_client(conn):
                        return True
            finally:
                self.attached = False
            log.info("debugger %s gone", peer)
        return False

    def start(self) -> threading.Thread:
        """Run ``serve_forever`` on a daemon thread (for embedding); returns the thread."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        self._thread = threading.Thread(target=self.serve_forever, name="gdbstub-server")
        self._thread.daemon = True
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        """Make ``serve_forever`` return (from any thread); joins the ``start()`` thread."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        """Stop serving and release the sockets and the packet log."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> GdbServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- one client ----------------------------------------------------------------------

    def _serve_client(self, conn: socket.socket) -> bool:
        """Serve one client; True if it killed the target."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = GdbSession(self.target)
        decoder = Decoder()
        self._halt_guest(session)
        wake_fd = self.target.wake_fd
        conn_fd, stop_fd = conn.fileno(), self._wake_r.fileno()
        while True:
            ready, _, _ = select.select([conn_fd, wake_fd, stop_fd], [], [])
            if stop_fd in ready:
                self._drop_client(session)
                return False
            outputs: list[Output] = []
            exited = False
            if wake_fd in ready:
                for stop in self._take_stops():
                    outputs += session.on_stop(stop)
                    exited = exited or stop.exit_status is not None
            if conn_fd in ready:
                try:
                    data = conn.recv(_RECV_SIZE)
                except OSError:
                    data = b""
                if not data:
                    self._drop_client(session)
                    return False
                self._record("<-", data)
                for frame in decoder.feed(data):
                    outputs += session.on_frame(frame)
            for output in outputs:
                match output:
                    case SendBytes(data=out):
                        self._record("->", out)
                        try:
                            conn.sendall(out)
                        except OSError:
                            self._drop_client(session)
                            return False
                    case CloseConnection():
                        self._guest_running = True  # detached: the guest runs on
                        return False
                    case Shutdown():
                        return True
            if exited:
                return True  # the guest is gone: the client has its W, the server ends

    def _take_stops(self) -> list[StopEvent]:
        stops: list[StopEvent] = []
        while (stop := self.target.take_stop()) is not None:
            stops.append(stop)
        return stops

    def _halt_guest(self, session: GdbSession) -> None:
        """Stop a running guest before a new client looks at it; the stop goes to ``?``."""
        stops = self._held_stops + self._take_stops()
        self._held_stops = []
        if self._guest_running and not stops:
            self.target.interrupt()
            ready, _, _ = select.select(
                [self.target.wake_fd, self._wake_r.fileno()], [], [], self._attach_timeout
            )
            if self.target.wake_fd in ready:
                stops = self._take_stops()
            else:
                log.warning("the guest did not stop within %.1f s", self._attach_timeout)
        self._guest_running = False
        for stop in stops:
            session.on_stop(stop)  # IDLE: held for '?'

    def _drop_client(self, session: GdbSession) -> None:
        """The client vanished (or the server stops) without D: let the guest run."""
        if not session.finished:
            try:
                self.target.detach()
            except Exception:
                log.exception("detach after a lost client failed")
            self._guest_running = True

    def _record(self, direction: str, data: bytes) -> None:
        if self._log is not None:
            self._log.write(f"{time.time():.6f} {direction} {data!r}\n")
            self._log.flush()


def serve(
    target: Target,
    host: str = "127.0.0.1",
    port: int = 1234,
    *,
    log_packets: str | os.PathLike[str] | None = None,
    running: bool = False,
) -> bool:
    """Listen on ``host:port`` and serve ``target`` until a client kills it (True)."""
    with GdbServer(target, host, port, log_packets=log_packets, running=running) as server:
        log.info("listening on %s:%d", *server.address)
        return server.serve_forever()
