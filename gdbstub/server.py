"""The debugger server: the only module of the stub that touches sockets.

Theory of operation
-------------------
``GdbServer`` listens on TCP (127.0.0.1 by default; IPv6 too) or on a Unix socket (created
with mode 0600, removed by ``close``) and runs one event loop, ``serve_forever``, over a
``select`` of:

* the listener: a new connection becomes the client when there is none, or when the client
  has not said anything yet (a port scanner, ``nc -z``, a health check: they never stop the
  guest, and a real debugger is not kept out by them). While a debugger is attached, a second
  one is refused: its first packet is answered with ``E.another debugger ... is attached``
  (gdb prints it as "Remote failure reply") and the connection is closed; the first client
  notices nothing;
* the client: bytes go through a ``Decoder`` and a ``GdbSession``; the session's outputs are
  written back (``SendBytes``) or end the client (``CloseConnection`` after ``D``,
  ``Shutdown`` after ``k``). The client *attaches* with its first packet: a running guest is
  stopped for it then (as QEMU stops the VM for a new gdb), and the stop is what ``?`` says;
* ``target.wake_fd``: stops go to the session (the stop reply) or, with nobody attached, are
  kept for the next client's ``?``; a guest that exits ends the loop;
* a private socketpair: ``stop()`` (any thread; the signal handlers of ``gdbstub run``) and
  ``pause_guest()`` (the console's Ctrl-A s) write a command byte to it.

Rules of a connection's end (docs/usage.md has them for users):

* ``D``: the session removes the breakpoints and resumes the guest (gdb's "detach").
* The client closes, dies, or its connection breaks (TCP keepalive notices a dead peer; a
  write that cannot complete in ``send_timeout`` s counts as broken) without ``D``: every
  breakpoint and watchpoint it inserted is removed (memory shows the guest's own bytes) and
  the guest is left as it was: stopped if it was stopped (a ``--wait`` guest keeps waiting),
  running if it was running for the client (it is stopped briefly to take the breakpoints
  out, as debug registers are written on the vCPU's thread). A guest that stopped by itself
  meanwhile (a fault, a finished step) stays stopped.
* An exception while serving the client ends that connection only: one line in the log (the
  traceback too when the log level is INFO, ``gdbstub run -v``), the same clean-up as above.
* ``stop(signal)``: a client waiting for a stop reply gets ``X<signal>`` (the process ended
  by that signal), then the connection closes and ``serve_forever`` returns False.

Each debugger's arrival (its first packet) and departure is logged as one plain line
(``debugger connected from 127.0.0.1:53412``); connections that never send a packet only at
INFO level. ``log_packets`` names a file that receives every chunk read and written,
with a timestamp.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import signal as signals
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO

from .rsp import BadPacket, Decoder, Interrupt, Packet, encode
from .session import CloseConnection, GdbSession, Output, SendBytes, Shutdown
from .target import ResumeAction, StopEvent, Target

__all__ = ["GdbServer", "Listener", "is_loopback", "listen_tcp", "serve"]

log = logging.getLogger(__name__)

_RECV_SIZE = 0x40000
_REFUSE_WINDOW = 5.0  # seconds a refused client has to send its first packet
_CMD_STOP, _CMD_PAUSE = b"x", b"p"
# A vanished client's guest runs on after these stops (the client's own breakpoints, or the
# interrupt the server sent to take them out); any other stop is the guest's and is kept.
_CLIENT_STOP_REASONS = frozenset({"swbreak", "hwbreak", "watch", "rwatch", "awatch"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass
class _Client:
    conn: socket.socket
    name: str
    decoder: Decoder = field(default_factory=lambda: Decoder(expand_rle=False))
    session: GdbSession | None = None  # created when the client attaches (first packet)


@dataclass
class _Refused:
    conn: socket.socket
    name: str
    deadline: float
    decoder: Decoder = field(default_factory=Decoder)
    answered: bool = False


class GdbServer:
    """Serve ``target`` to gdb or lldb clients, one at a time (see the module docstring).

    The socket is bound and listening once the constructor returns, so ``port`` is known even
    when 0 was asked for. ``unix_path`` listens on a Unix socket instead of ``host:port``;
    ``listener`` is one made beforehand (the server closes it).
    ``running`` tells the server that the guest is already running (it is stopped when a
    client attaches). ``attach_timeout`` bounds the wait for that stop.
    """

    def __init__(
        self,
        target: Target,
        host: str = "127.0.0.1",
        port: int = 1234,
        *,
        unix_path: str | os.PathLike[str] | None = None,
        listener: Listener | None = None,
        log_packets: str | os.PathLike[str] | None = None,
        running: bool = False,
        attach_timeout: float = 5.0,
        send_timeout: float = 60.0,
    ) -> None:
        self.target = target
        if listener is None:
            path = None if unix_path is None else os.fspath(unix_path)
            listener = Listener(host, port, path)
        self._listening = listener
        self._listener = listener.sock
        self._unix_path = listener.path
        self._signal_wakeup = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._log: IO[str] | None = None
        if log_packets is not None:
            self._log = open(log_packets, "a", encoding="utf-8")  # noqa: SIM115
        self._guest_running = running
        self._held_stops: list[StopEvent] = []
        self._attach_timeout = attach_timeout
        self._send_timeout = send_timeout
        self._stopping = threading.Event()
        self._stop_signal: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._client: _Client | None = None
        self._refused: list[_Refused] = []
        self._pause_requested = False
        self.attached = False
        """Whether a debugger is attached now (it has sent a packet and not gone)."""

    # --- addresses -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on; (path, 0) for a Unix socket."""
        if self._unix_path is not None:
            return self._unix_path, 0
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        """The TCP port the server listens on (useful when constructed with port 0)."""
        return self.address[1]

    @property
    def endpoint(self) -> str:
        """What gdb's ``target remote`` takes: ``127.0.0.1:1234``, ``[::1]:1234`` or a path."""
        if self._unix_path is not None:
            return self._unix_path
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # --- public API ------------------------------------------------------------------------

    def serve_forever(self) -> bool:
        """Serve clients until one kills the target or the guest exits (True), or ``stop()``
        (False). Between clients the target's stops are kept for the next client's ``?``."""
        while not self._stopping.is_set():
            try:
                ended = self._loop_once()
            except Exception as exc:  # never let one fault end the VM
                self._internal_error(exc)
                continue
            if ended:
                if self._client is not None:  # it has its W (or its X09 after k)
                    self._close_quietly(self._client)
                return True
        if self._client is not None:
            self._end_client(self._client, "the stub is shutting down")
        for refused in self._refused:
            refused.conn.close()
        self._refused.clear()
        return False

    def start(self) -> threading.Thread:
        """Run ``serve_forever`` on a daemon thread (for embedding); returns the thread."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        self._thread = threading.Thread(target=self.serve_forever, name="gdbstub-server")
        self._thread.daemon = True
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None, *, signal: int | None = None) -> None:
        """Make ``serve_forever`` return (from any thread, also a signal handler). With
        ``signal``, a client waiting for a stop reply is told ``X<signal>`` first."""
        if signal is not None and self._stop_signal is None:
            self._stop_signal = signal
        self._stopping.set()
        self._command(_CMD_STOP)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wake_on_signals(self) -> None:
        """Let SIGINT/SIGTERM wake the event loop whichever thread the kernel hands them to.

        Python runs signal handlers on the main thread only. When the kernel delivers the
        signal to a vCPU thread, a main thread asleep in ``select`` would never run them and
        the process would not end; with this, the C-level handler also writes to the loop's
        wake socket (``signal.set_wakeup_fd``), ``select`` returns and the handler runs.
        Call it from the main thread that runs ``serve_forever``; ``close`` undoes it."""
        signals.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._signal_wakeup = True

    def pause_guest(self) -> None:
        """Stop the guest for the debugger, as Ctrl-C from gdb does (any thread). An attached
        gdb that waits sees SIGINT; with nobody attached the next gdb finds it stopped."""
        self._command(_CMD_PAUSE)

    def close(self) -> None:
        """Stop serving and release the sockets (a Unix socket's file too) and the log."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        if self._signal_wakeup:
            with contextlib.suppress(ValueError):  # only the main thread may undo it
                signals.set_wakeup_fd(-1)
        self._listening.close()
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

    # --- the event loop --------------------------------------------------------------------

    def _command(self, command: bytes) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(command)

    def _loop_once(self) -> bool:
        client = self._client
        listener, wake, stops = self._listener.fileno(), self._wake_r.fileno(), self.target.wake_fd
        client_fd = client.conn.fileno() if client is not None else -1
        refused = {r.conn.fileno(): r for r in self._refused}
        watched = [listener, wake, stops, *refused]
        if client is not None:
            watched.append(client_fd)
        timeout = None
        if self._refused:
            timeout = max(0.0, min(r.deadline for r in self._refused) - time.monotonic())
        ready, _, _ = select.select(watched, [], [], timeout)
        if wake in ready:
            commands = self._wake_r.recv(64)
            if _CMD_PAUSE in commands:
                self._pause()
            if self._stopping.is_set():
                return False
        if stops in ready and self._on_stops():
            return True
        if client is not None and client_fd in ready and self._client is client:
            ended = self._on_client_data(client)
            if ended:
                return True
        if listener in ready:
            self._accept()
        now = time.monotonic()
        for fd, item in refused.items():
            if fd in ready or item.deadline <= now:
                self._on_refused(item)
        return False

    def _on_stops(self) -> bool:
        """Hand the target's stops to the attached session or keep them; True if the guest
        exited."""
        stops = self._take_stops()
        if not stops:
            return False
        self._guest_running = False
        client = self._client
        exited = any(stop.exit_status is not None for stop in stops)
        if client is not None and client.session is not None:
            outputs: list[Output] = []
            for stop in stops:
                outputs += client.session.on_stop(stop)
            self._send_outputs(client, outputs)
        else:
            self._held_stops += stops
        return exited

    def _accept(self) -> None:
        try:
            conn, peer = self._listener.accept()
        except OSError:
            return
        name = _peer_name(peer, self._unix_path)
        current = self._client
        if current is not None and current.session is None:
            self._end_client(current, f"sent no packet; it gives way to {name}")
            current = None
        if current is not None and _closed_by_peer(current.conn):
            self._end_client(current, "disconnected")
            current = None
        if current is not None:
            conn.setblocking(False)
            self._refused.append(_Refused(conn, name, time.monotonic() + _REFUSE_WINDOW))
            return
        self._setup_connection(conn)
        self._client = _Client(conn, name)
        log.info("connection from %s", name)  # a debugger once it sends a packet

    def _setup_connection(self, conn: socket.socket) -> None:
        conn.settimeout(self._send_timeout)  # reads happen only when select says so
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
                if hasattr(socket, option):
                    with contextlib.suppress(OSError):
                        conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

    def _on_client_data(self, client: _Client) -> bool:
        """Read from the client and answer; True if the session ended the server (``k``, or
        the guest exited while it was answered)."""
        try:
            data = client.conn.recv(_RECV_SIZE)
        except OSError:
            data = b""
        if not data:
            self._end_client(client, "disconnected")
            return False
        self._record("<-", data)
        try:
            return self._serve(client, data)
        except Exception as exc:
            self._internal_error(exc, client)
            return False

    def _serve(self, client: _Client, data: bytes) -> bool:
        outputs: list[Output] = []
        for frame in client.decoder.feed(data):
            if client.session is None:
                if isinstance(frame, BadPacket):
                    outputs.append(SendBytes(b"-"))  # damaged: "send it again" (ack mode)
                if not isinstance(frame, Packet | Interrupt):
                    continue  # nothing whole yet: not a debugger (yet)
                client.session = self._attach(client)
            outputs += client.session.on_frame(frame)
        return self._send_outputs(client, outputs)

    def _send_outputs(self, client: _Client, outputs: list[Output]) -> bool:
        for output in outputs:
            match output:
                case SendBytes(data=out):
                    if not self._send(client, out):
                        return False
                case CloseConnection():
                    self._guest_running = True  # detached: the guest runs on
                    self._end_client(client, "detached; the guest runs on")
                    return False
                case Shutdown():
                    self._end_client(client, "killed the guest")
                    return True
        return False

    def _send(self, client: _Client, data: bytes) -> bool:
        self._record("->", data)
        try:
            client.conn.sendall(data)
        except OSError as exc:
            self._end_client(client, f"connection lost ({exc.strerror or exc})")
            return False
        return True

    def _attach(self, client: _Client) -> GdbSession:
        """The client's first packet: stop a running guest for it; stops go to ``?``."""
        session = GdbSession(self.target)
        stops = self._held_stops + self._take_stops()
        self._held_stops = []
        if self._guest_running and not stops:
            stops = self._interrupt_and_wait()
        for stop in stops:
            session.on_stop(stop)  # IDLE: held for '?'
        self.attached = True
        log.warning("gdbstub: debugger connected from %s", client.name)
        return session

    def _interrupt_and_wait(self) -> list[StopEvent]:
        self.target.interrupt()
        deadline = time.monotonic() + self._attach_timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.target.wake_fd], [], [], left)
            if ready:
                stops = self._take_stops()
                if stops:
                    self._guest_running = False
                    return stops
        log.warning("gdbstub: the guest did not stop within %.1f s", self._attach_timeout)
        return []

    def _pause(self) -> None:
        """Ctrl-A s: stop the guest for the debugger."""
        client = self._client
        if client is not None and client.session is not None:
            if client.session.running:
                self.target.interrupt()  # the session sends the SIGINT stop to gdb
            return
        if self._guest_running:
            self._held_stops += self._interrupt_and_wait()
            log.warning("gdbstub: the guest is stopped; attach gdb to look at it")

    # --- the end of a client -----------------------------------------------------------------

    def _end_client(self, client: _Client, why: str) -> None:
        """Close ``client``'s connection and log one line (at INFO level for a connection
        that never sent a packet); without ``D`` take its breakpoints out and leave the guest
        as it was."""
        session = client.session
        outcome = ""
        try:
            if session is not None and not session.finished:
                outcome = self._release(client, session)
                if self._stopping.is_set():
                    outcome = ""
        except Exception as exc:
            self._internal_error(exc)
        finally:
            self._close_quietly(client)
        if session is None:  # never a debugger: a port scanner, a health check
            log.info("connection from %s %s", client.name, why)
        else:
            log.warning("gdbstub: debugger %s %s%s", client.name, why, outcome)

    def _close_quietly(self, client: _Client) -> None:
        if self._client is client:
            self._client = None
            self.attached = False
        with contextlib.suppress(OSError):
            client.conn.close()

    def _release(self, client: _Client, session: GdbSession) -> str:
        """Take a vanished client's breakpoints out; say what became of the guest."""
        if self._stopping.is_set() and self._stop_signal is not None:
            # the VM ends: a client waiting for a stop reply learns how
            if session.running:
                with contextlib.suppress(OSError):
                    client.conn.sendall(encode(b"X%02x" % (self._stop_signal & 0xFF)))
            return ""
        remove = getattr(self.target, "remove_all_breakpoints", None)
        if not session.running:
            if remove is not None:
                remove()
            return " without detaching; the guest stays stopped"
        # running for the client: stop it (debug registers are written on the vCPU threads)
        stops = self._interrupt_and_wait()
        if not stops:  # still running: its breakpoints cannot be reached safely now
            self._guest_running = True
            return " without detaching; the guest did not stop, its breakpoints stay"
        if remove is not None:
            remove()
        if any(stop.exit_status is not None for stop in stops):
            self._held_stops += stops
            return " without detaching; the guest exited"
        if stops and all(s.signal == 2 or s.reason in _CLIENT_STOP_REASONS for s in stops):
            self.target.resume({}, ResumeAction("c"))
            self._guest_running = True
            return " without detaching; the guest runs on"
        self._held_stops += stops
        return " without detaching; the guest stopped by itself and stays stopped"

    def _take_stops(self) -> list[StopEvent]:
        stops: list[StopEvent] = []
        while (stop := self.target.take_stop()) is not None:
            stops.append(stop)
        return stops

    # --- refused clients -----------------------------------------------------------------------

    def _on_refused(self, refused: _Refused) -> None:
        """Answer a refused client's first packet with the reason, then close it gently."""
        done = refused.deadline <= time.monotonic()
        try:
            data = refused.conn.recv(_RECV_SIZE)
        except BlockingIOError:
            data = b"?"  # (not readable: only the deadline passed)
        except OSError:
            data = b""
        if not data:
            done = True
        elif not refused.answered and any(
            isinstance(f, Packet) for f in refused.decoder.feed(data)
        ):
            holder = self._client.name if self._client is not None else "another debugger"
            log.warning(
                "gdbstub: refused a second debugger from %s: %s is attached", refused.name, holder
            )
            message = (
                f"E.another debugger ({holder}) is attached to this VM; "
                "gdbstub serves one at a time"
            )
            with contextlib.suppress(OSError):
                refused.conn.sendall(b"+" + encode(message.encode()))
                refused.conn.shutdown(socket.SHUT_WR)
            refused.answered = True
            refused.deadline = min(refused.deadline, time.monotonic() + 1.0)
        if done:
            self._refused.remove(refused)
            with contextlib.suppress(OSError):
                refused.conn.close()

    # --- faults ---------------------------------------------------------------------------------

    def _internal_error(self, exc: BaseException, client: _Client | None = None) -> None:
        """One line for an unexpected error (the traceback at INFO level); the client, if
        any, is let go as if it had vanished."""
        where = f" while serving {client.name}" if client is not None else ""
        log.error(
            "gdbstub: internal error%s: %s: %s%s",
            where,
            type(exc).__name__,
            exc,
            "" if log.isEnabledFor(logging.INFO) else " (-v shows the traceback)",
            exc_info=exc if log.isEnabledFor(logging.INFO) else None,
        )
        if client is not None and self._client is client:
            self._end_client(client, "was disconnected after the error")

    def _record(self, direction: str, data: bytes) -> None:
        if self._log is not None:
            self._log.write(f"{time.time():.6f} {direction} {data!r}\n")
            self._log.flush()


class Listener:
    """A listening socket: TCP (IPv4 or IPv6) on ``host:port``, or Unix at ``path`` (mode
    0600; a stale socket file is replaced, a live one is "busy"). ``close`` removes the
    Unix socket's file. Made before the VM, so that a busy port fails early."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1234, path: str | None = None):
        self.path = path
        self._inode: tuple[int, int] | None = None
        self.sock = listen_tcp(host, port) if path is None else self._listen_unix(path)

    def _listen_unix(self, path: str) -> socket.socket:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody listens: a leftover of a process that died
            else:
                raise OSError(errno.EADDRINUSE, "another process listens on it")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        info = os.stat(path)
        self._inode = (info.st_dev, info.st_ino)
        listener.listen(1)
        return listener

    def close(self) -> None:
        """Close the socket; remove the Unix socket's file if it is still ours."""
        self.sock.close()
        if self.path is not None and self._inode is not None:
            try:
                info = os.stat(self.path)
                if (info.st_dev, info.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
            self._inode = None


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (IPv4 or IPv6 address, or a name) and ``port``."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return socket.create_server(sockaddr, family=family, backlog=4)


def _closed_by_peer(conn: socket.socket) -> bool:
    """Whether the peer has closed ``conn`` (an end of file waits behind any data)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _peer_name(peer: object, unix_path: str | None) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), int(peer[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"on {unix_path}" if unix_path else "a local client"


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
        log.info("listening on %s", server.endpoint)
        return server.serve_forever()
