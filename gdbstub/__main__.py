"""Command line: ``gdbstub run KERNEL`` boots a kernel under the stub, like ``qemu -kernel -s``.

    gdbstub run KERNEL [--listen ADDRESS] [--wait] [--memory SIZE] [--serial DEV]
                       [--backend auto|kvm|emu|hvf] [--log-packets PATH] [--append TEXT]
                       [--initrd FILE] [--no-reboot] [--dump-dir DIR] [-v]
    gdbstub run qemu-system-x86_64 -kernel KERNEL -s -S ...     (QEMU's spellings, gdbstub.cli)
    gdbstub --version

Theory of operation
-------------------
``main`` parses the command line (``gdbstub.cli``), then ``run`` builds the VM in an order
that lets every failure be one line on stderr before anything is half made: the kernel is
read and planned (unreadable or unbootable: usage error), the backend is loaded (missing:
runtime failure), the listening socket is bound (busy port: runtime failure), the serial back
end is opened, and only then is guest RAM allocated (too much: runtime failure) and the
vCPU created. Exit statuses, as QEMU has them:

====  ==================================================================================
0     the guest powered off (ACPI), reset under ``--no-reboot``, or gdb killed it (``k``)
odd   ``(v << 1) | 1``: the guest wrote ``v`` to isa-debug-exit (port 0xf4)
1     a runtime failure: the host cannot give what was asked (RAM, port, backend)
2     a usage error: a bad argument, an unreadable or unbootable kernel
130   SIGINT (Ctrl-C in the stub's terminal, unless the terminal is the guest's console)
143   SIGTERM (also Ctrl-A x on the console)
====  ==================================================================================

SIGINT and SIGTERM are handled on the Python side: the server stops (a gdb waiting for a stop
reply gets ``X``), the port or socket is freed, the vCPU is kicked out of the engine and its
thread joined before the VM is destroyed, so no native library is ever interrupted in the
middle of its work. Without ``-v`` an exception in a log record is printed as one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from . import __version__, hv
from .cli import HELP, HelpRequested, UsageError, parse

log = logging.getLogger("gdbstub")

EXIT_FAILURE = 1
EXIT_USAGE = 2


class RuntimeFailure(Exception):
    """The host cannot give what was asked; one line on stderr, exit status 1."""


class _Signalled(BaseException):
    """A signal arrived before the server ran: unwind and exit with 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _OneLineFormatter(logging.Formatter):
    """Messages as they are; an exception as ``: Type: text`` on the same line, unless
    ``verbose`` (then the traceback follows)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose or not record.exc_info:
            return super().format(record)
        exc = record.exc_info[1]
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            text = super().format(record)
        finally:
            record.exc_info, record.exc_text = saved
        return f"{text}: {type(exc).__name__}: {exc} (-v shows the traceback)"


class _Shutdown:
    """The signal handlers' side of ``run``: before the server exists a signal unwinds the
    start-up; afterwards it asks the server to stop, once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.server: Any = None

    def request(self, signum: int) -> None:
        """End the VM as ``signum`` would (on the main thread: a signal handler)."""
        if self.signum is not None:
            os._exit(128 + self.signum)  # a second signal while shutting down: now
        self.signum = signum
        if self.server is None:
            raise _Signalled(signum)
        self.server.stop(signal=signum)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        """``signal.signal`` handler."""
        self.request(signum)


def run(args: argparse.Namespace, shutdown: _Shutdown) -> int:
    """``gdbstub run``: boot, serve, and return the exit status (see the module docstring)."""
    from .machine.loader import BootError, load_kernel
    from .progress import Progress
    from .server import Listener

    kernel = Path(args.kernel)
    if not kernel.is_file() or not os.access(kernel, os.R_OK):
        raise UsageError(f"cannot read kernel {args.kernel}")
    initrd = None if args.initrd is None else Path(args.initrd)
    if initrd is not None and (not initrd.is_file() or not os.access(initrd, os.R_OK)):
        raise UsageError(f"cannot read initrd {args.initrd}")
    from .machine.firmware.layout import ACPI_ADDR as RSDP_ADDR

    size_mb = kernel.stat().st_size / 1e6
    try:
        with Progress(f"loading {kernel.name} ({size_mb:.0f} MB)"):
            plan = load_kernel(
                kernel,
                mem_size=args.memory_bytes,
                cmdline=args.cmdline,
                initrd=initrd,
                rsdp_addr=RSDP_ADDR,
            )
    except BootError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename or args.kernel}: {exc.strerror}") from exc
    if args.log_packets is not None:
        try:
            open(args.log_packets, "a").close()
        except OSError as exc:
            message = f"--log-packets: cannot open {args.log_packets}: {exc.strerror}"
            raise UsageError(message) from exc
    backend = _load_backend(args.backend)
    where = args.listen_at
    try:
        listener = Listener(where.host, where.port, where.path)
    except socket.gaierror as exc:
        raise UsageError(f"--listen {where}: {exc.strerror}") from exc
    except OSError as exc:
        raise RuntimeFailure(_listen_failure(str(where), exc)) from exc
    parts: dict[str, Any] = {"listener": listener}
    try:
        return _serve(args, shutdown, plan, kernel, backend, parts)
    finally:
        _teardown(parts)


def _serve(
    args: argparse.Namespace,
    shutdown: _Shutdown,
    plan: Any,
    kernel: Path,
    backend: str,
    parts: dict[str, Any],
) -> int:
    from .console import ConsoleKeys, SerialError, open_serial
    from .hvtarget import HvTarget
    from .machine.loader import BootError, symbols
    from .machine.machine import Machine
    from .progress import Progress
    from .server import GdbServer, is_loopback
    from .target import ResumeAction

    machine_box: list[Any] = []
    early: list[bytes] = []  # input that came before the machine (a pipe on stdin)
    feed_lock = threading.Lock()

    def feed(data: bytes) -> None:  # the UART changes when the machine resets: look it up
        with feed_lock:
            if not machine_box:
                early.append(data)
                return
        machine_box[0].uart.feed_input(data)

    keys = ConsoleKeys(quit=lambda: os.kill(os.getpid(), signal.SIGTERM), stop_guest=_pause(parts))
    try:
        serial = open_serial(args.serial_spec, feed, keys)
    except SerialError as exc:
        raise RuntimeFailure(str(exc)) from exc
    parts["serial"] = serial
    try:
        machine = Machine(plan, serial_sink=serial.write, no_reboot=args.no_reboot)
    except (MemoryError, OSError, hv.HvError) as exc:
        raise RuntimeFailure(_vm_failure(args, exc)) from exc
    parts["machine"] = machine
    with feed_lock:
        machine_box.append(machine)
        for data in early:
            machine.uart.feed_input(data)
    try:
        with Progress(f"reading the symbols of {kernel.name}"):
            kernel_symbols = symbols(kernel)
    except BootError:  # a raw image (Multiboot a.out kludge) has no symbol table
        kernel_symbols = {}
    machine.symbols = kernel_symbols
    try:
        target = HvTarget(machine, 1, symbols=kernel_symbols)
    except (MemoryError, OSError, hv.HvError) as exc:
        raise RuntimeFailure(f"cannot create the vCPU: {exc}") from exc
    parts["target"] = target
    if args.dump_dir is not None:
        from .monitor import allow_dumps

        allow_dumps(target, Path(os.path.abspath(args.dump_dir)))
    machine.cpu_avx = target.features.avx
    log.warning("gdbstub %s: backend %s", __version__, backend)
    if serial.description:
        log.warning("gdbstub: %s", serial.description)
    where = args.listen_at
    if where.path is None and not is_loopback(where.host):
        log.warning(
            "gdbstub: warning: listening on %s, beyond this machine: whoever connects controls "
            "the guest and reads its memory (127.0.0.1 or unix:PATH keep it local)",
            where,
        )
    server = GdbServer(
        target,
        listener=parts.pop("listener"),
        log_packets=args.log_packets,
        running=not args.wait,
    )
    parts["server"] = server
    log.warning(
        "gdbstub: %s booted (%s); gdb: target remote %s%s",
        kernel.name,
        machine.plan.protocol,
        server.endpoint,
        "" if args.wait else " (the guest is running)",
    )
    machine.debugger_attached = lambda: server.attached
    shutdown.server = server
    server.wake_on_signals()  # a signal that lands on a vCPU thread still ends the VM
    if not args.wait:
        target.resume({}, ResumeAction(kind="c"))
    server.serve_forever()
    if shutdown.signum is not None:
        return 128 + shutdown.signum
    status = target.exit_status
    return 0 if status is None else status


def _pause(parts: dict[str, Any]) -> Any:
    def pause() -> None:
        server = parts.get("server")
        if server is not None:
            server.pause_guest()

    return pause


def _load_backend(name: str) -> str:
    """Select and load the backend; one line naming the way out when it cannot be had."""
    try:
        hv.select_backend(name)
        return hv.backend_name()
    except ImportError as exc:
        raise RuntimeFailure(
            f"--backend {name} needs {exc.name or 'unicorn'}, which is not installed: "
            "pip install 'gdbstub[emu]', or choose --backend kvm"
        ) from exc
    except (hv.HvError, OSError) as exc:
        hint = {
            "kvm": "is /dev/kvm there and readable and writable by you (group kvm)?",
            "hvf": "the hvf backend needs macOS on an Intel Mac",
            "emu": "pip install 'gdbstub[emu]'",
        }.get(name, "install unicorn (pip install 'gdbstub[emu]') or give access to /dev/kvm")
        raise RuntimeFailure(f"--backend {name}: {exc}; {hint}") from exc


def _listen_failure(where: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileExistsError):
        return f"--listen {where}: {exc.strerror}: remove it or choose another path"
    if exc.errno == 98:  # EADDRINUSE
        return (
            f"--listen {where}: {reason} (another gdbstub or QEMU -s?); "
            "choose another port, e.g. --listen 127.0.0.1:1235"
        )
    if exc.errno == 13:  # EACCES
        return f"--listen {where}: {reason}; ports below 1024 need privileges, use 1234"
    return f"--listen {where}: {reason}"


def _vm_failure(args: argparse.Namespace, exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == 12:
        return (
            f"cannot get {args.memory} of guest RAM from the host ({text}); "
            "ask for less with --memory (or -m), e.g. --memory 256M"
        )
    return f"cannot create the VM: {text}"


def _teardown(parts: dict[str, Any]) -> None:
    """Free the port first, then the terminal, the vCPU (kicked, joined) and the VM."""
    for name in ("server", "listener", "serial"):
        part = parts.pop(name, None)
        if part is not None:
            try:
                part.close()
            except Exception as exc:
                log.info("closing the %s: %s", name, exc)
    target = parts.pop("target", None)
    if target is not None:
        target.close()
    machine = parts.pop("machine", None)
    if machine is not None:
        machine.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gdbstub`` and ``python -m gdbstub``."""
    arguments = sys.argv[1:] if argv is None else argv
    verbose = "-v" in arguments or "--verbose" in arguments
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(verbose))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        args = parse(arguments)
    except HelpRequested:
        print(HELP, end="")
        return 0 if arguments else EXIT_USAGE
    except UsageError as exc:
        print(f"gdbstub: {exc}", file=sys.stderr)
        return EXIT_USAGE
    shutdown = _Shutdown()
    previous = {
        signum: signal.signal(signum, shutdown.handler)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        status = run(args, shutdown)
    except UsageError as exc:
        print(f"gdbstub: {exc}", file=sys.stderr)
        status = EXIT_USAGE
    except RuntimeFailure as exc:
        print(f"gdbstub: {exc}", file=sys.stderr)
        status = EXIT_FAILURE
    except (_Signalled, KeyboardInterrupt) as exc:
        status = 128 + (exc.signum if isinstance(exc, _Signalled) else signal.SIGINT)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if any(t.name.startswith("vcpu") and t.is_alive() for t in threading.enumerate()):
        # a vCPU thread did not end: never let the interpreter's exit run into its engine
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
