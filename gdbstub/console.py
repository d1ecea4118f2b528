"""The guest's COM1 outside the VM: the serial back ends of ``gdbstub run`` and its terminal.

Theory of operation
-------------------
``open_serial(spec, feed, keys)`` returns a ``Serial``: ``write`` is the UART's sink (the
guest's output), and input from the back end is handed to ``feed`` (the UART's
``feed_input``) on a daemon thread. The back ends are QEMU's:

* ``stdio``: output to stdout. When stdin is a terminal it is put in raw mode (output
  processing stays on, so ``\\n`` still starts a new line) and every key goes to the guest,
  Ctrl-C included, through ``EscapeKeys``: Ctrl-A starts an escape as in QEMU (``x`` quit,
  ``h`` help, ``a`` a literal Ctrl-A, ``s`` stop the guest for the debugger). When stdin is
  not a terminal its bytes go to the guest as they are.
* ``file:PATH``: truncated at start, as QEMU does; ``file:PATH,append`` appends.
* ``pty``: a new pseudo-terminal in raw mode; its path is printed (``screen /dev/pts/N``).
* ``tcp:HOST:PORT``: a listening socket; one client at a time gets the output and types
  input. Output while nobody is connected is dropped.
* ``none``: output dropped, no input.

No back end ever blocks the vCPU thread for long: the pty and the TCP client are written
without blocking (what does not fit is dropped); stdout and files are written as usual.
``close`` restores the terminal and releases descriptors and sockets.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import sys
import threading
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from .cli import SerialSpec, UsageError

__all__ = ["ESCAPE_HELP", "ConsoleKeys", "EscapeKeys", "Serial", "SerialError", "open_serial"]

log = logging.getLogger("gdbstub")

CTRL_A = 0x01
ESCAPE_HELP = """\
gdbstub console keys (the guest's COM1 is this terminal):
  Ctrl-A h    this help
  Ctrl-A x    quit: end the VM as SIGTERM does (exit status 143)
  Ctrl-A s    stop the guest for the debugger, as Ctrl-C in gdb does
  Ctrl-A a    send Ctrl-A to the guest
Every other key goes to the guest, Ctrl-C included.
"""


@dataclass
class ConsoleKeys:
    """What the escapes do: ``quit`` (Ctrl-A x) and ``stop_guest`` (Ctrl-A s)."""

    quit: Callable[[], None]
    stop_guest: Callable[[], None]


class EscapeKeys:
    """QEMU's Ctrl-A escapes over a stream of keys: ``feed`` returns what goes to the guest
    and calls the actions for the escapes. Pure: no terminal, no threads."""

    def __init__(self, keys: ConsoleKeys, show: Callable[[str], None]) -> None:
        self._keys = keys
        self._show = show
        self._escape = False

    def feed(self, data: bytes) -> bytes:
        """Keys typed; returns the bytes for the guest."""
        out = bytearray()
        for byte in data:
            if not self._escape:
                if byte == CTRL_A:
                    self._escape = True
                else:
                    out.append(byte)
                continue
            self._escape = False
            key = chr(byte).lower()
            if byte == CTRL_A or key == "a":
                out.append(CTRL_A)
            elif key == "x":
                self._show("gdbstub: Ctrl-A x: quitting\n")
                self._keys.quit()
            elif key == "h" or byte == ord("?"):
                self._show(ESCAPE_HELP)
            elif key == "s":
                self._keys.stop_guest()
            elif key == "c":
                self._show("gdbstub: there is no QEMU monitor here; gdb's monitor command is\n")
        return bytes(out)


class SerialError(Exception):
    """A serial back end the host cannot give (a busy port): a runtime failure, exit 1."""


class Serial:
    """A COM1 back end: ``write`` takes the guest's output; ``close`` releases it."""

    description = ""
    """A line for the log (``serial: char device redirected to /dev/pts/4``), or ""."""

    def write(self, data: bytes) -> None:
        """The guest transmitted ``data``."""

    def close(self) -> None:
        """Stop reading, restore what was changed."""


class _NoSerial(Serial):
    pass


class _FileSerial(Serial):
    def __init__(self, path: str, append: bool) -> None:
        try:
            self._file: BinaryIO = open(path, "ab" if append else "wb", buffering=0)  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"--serial: cannot open {path}: {exc.strerror}") from exc

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def close(self) -> None:
        self._file.close()


class _StdioSerial(Serial):
    """stdout for output; stdin (raw terminal with escapes, or a plain stream) for input."""

    def __init__(self, feed: Callable[[bytes], None], keys: ConsoleKeys) -> None:
        self._feed = feed
        self._saved: list[Any] | None = None
        self._escapes: EscapeKeys | None = None
        try:
            terminal = os.isatty(0)
        except OSError:
            terminal = False
        if terminal:
            self._escapes = EscapeKeys(keys, self._show)
            self._raw_mode()
        threading.Thread(target=self._read, name="serial-stdin", daemon=True).start()

    def _raw_mode(self) -> None:
        import termios

        try:
            self._saved = termios.tcgetattr(0)
            mode = termios.tcgetattr(0)
            mode[tty.IFLAG] &= ~(
                termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON
            )
            mode[tty.CFLAG] |= termios.CS8
            mode[tty.LFLAG] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
            mode[tty.CC][termios.VMIN] = 1
            mode[tty.CC][termios.VTIME] = 0
            termios.tcsetattr(0, termios.TCSAFLUSH, mode)  # output processing (OPOST) stays
        except termios.error:
            self._saved = None

    def _show(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(0, 4096)
            except OSError:
                return
            if not data:
                return
            if self._escapes is not None:
                data = self._escapes.feed(data)
            if data:
                self._feed(data)

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(1, data)

    def close(self) -> None:
        if self._saved is not None:
            import termios

            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, self._saved)
            self._saved = None


class _PtySerial(Serial):
    def __init__(self, feed: Callable[[bytes], None]) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self._feed = feed
        self._closed = False
        self.description = f"serial: char device redirected to {os.ttyname(self._slave)}"
        threading.Thread(target=self._read, name="serial-pty", daemon=True).start()

    def _read(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self._master], [], [], 0.5)
                if ready:
                    data = os.read(self._master, 4096)
                    if data:
                        self._feed(data)
            except BlockingIOError:
                continue
            except OSError:
                return

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # nobody reads: drop what does not fit
            os.write(self._master, data)

    def close(self) -> None:
        self._closed = True
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class _TcpSerial(Serial):
    def __init__(self, host: str, port: int, feed: Callable[[bytes], None]) -> None:
        from .server import listen_tcp

        try:
            self._listener = listen_tcp(host, port)
        except OSError as exc:
            raise SerialError(f"--serial tcp:{host}:{port}: {exc.strerror or exc}") from exc
        self._feed = feed
        self._client: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        bound = self._listener.getsockname()
        self.description = f"serial: listening on {bound[0]}:{bound[1]} (telnet or nc to it)"
        threading.Thread(target=self._serve, name="serial-tcp", daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setblocking(False)
            with self._lock:
                old, self._client = self._client, conn
            if old is not None:
                old.close()
            while not self._closed:
                try:
                    ready, _, _ = select.select([conn], [], [], 0.5)
                    if not ready:
                        continue
                    data = conn.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    break
                self._feed(data)
            with self._lock:
                if self._client is conn:
                    self._client = None
            conn.close()

    def write(self, data: bytes) -> None:
        with self._lock:
            client = self._client
        if client is not None:
            try:
                client.send(data)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    with contextlib.suppress(OSError):
                        client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(OSError):
                    self._client.close()


def open_serial(spec: SerialSpec, feed: Callable[[bytes], None], keys: ConsoleKeys) -> Serial:
    """The back end ``spec`` names; ``feed`` receives the input meant for the guest."""
    if spec.kind == "none":
        return _NoSerial()
    if spec.kind == "file":
        assert spec.path is not None
        return _FileSerial(spec.path, spec.append)
    if spec.kind == "stdio":
        return _StdioSerial(feed, keys)
    if spec.kind == "pty":
        return _PtySerial(feed)
    assert spec.kind == "tcp" and spec.listen is not None
    return _TcpSerial(spec.listen.host, spec.listen.port, feed)
