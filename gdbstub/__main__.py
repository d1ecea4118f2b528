"""Command line: ``gdbstub run KERNEL`` boots a kernel under the stub, like ``qemu -kernel -s``.

    gdbstub run KERNEL [--listen HOST:PORT] [--wait] [--memory SIZE]
                       [--serial stdio|file:PATH|none] [--backend auto|kvm|emu|hvf]
                       [--log-packets PATH] [--cmdline TEXT] [--initrd FILE] [--no-reboot]
    gdbstub --version

A bad argument, a missing kernel or an image with no way to boot it: one line on stderr, exit 2.
The process exits with the guest's status when it writes to isa-debug-exit (port 0xf4).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NoReturn

from . import __version__, hv

log = logging.getLogger("gdbstub")


class UsageError(Exception):
    """A bad command line; reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``65536``, ``64K`` -> bytes (a multiple of 4 KiB, at least 2 MiB)."""
    match = re.fullmatch(r"(\d+)([KkMmGg]?)i?[Bb]?", text.strip())
    if not match:
        raise UsageError(f"--memory: cannot read size {text!r} (try 256M)")
    value = (
        int(match.group(1))
        * {
            "": 1 << 20 if int(match.group(1)) < 65536 else 1,
            "k": 1 << 10,
            "m": 1 << 20,
            "g": 1 << 30,
        }[match.group(2).lower()]
    )
    if value < 2 << 20 or value > 64 << 30 or value % 4096:
        raise UsageError(f"--memory: {text} is out of range (2M to 64G, a multiple of 4K)")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` -> (host, port); the host defaults to 127.0.0.1."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen: {text!r} is not HOST:PORT")
    return host, int(port)


def serial_sink(spec: str) -> Callable[[bytes], None]:
    """The guest's COM1 output: ``stdio``, ``file:PATH`` or ``none``."""
    if spec == "none":
        return lambda data: None
    if spec == "stdio":
        out = sys.stdout.buffer

        def to_stdout(data: bytes) -> None:
            out.write(data)
            out.flush()

        return to_stdout
    if spec.startswith("file:") and len(spec) > 5:
        try:
            handle: BinaryIO = open(spec[5:], "ab", buffering=0)  # noqa: SIM115 - lives with the VM
        except OSError as exc:
            raise UsageError(f"--serial: cannot open {spec[5:]}: {exc.strerror}") from exc
        return handle.write  # type: ignore[return-value]
    raise UsageError(f"--serial: {spec!r} is not stdio, file:PATH or none")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``run`` is the one command)."""
    parser = _Parser(prog="gdbstub", description="GDB/LLDB remote stub for x86-64 guests")
    parser.add_argument("--version", action="version", version=f"gdbstub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="boot KERNEL and serve it to gdb")
    run.add_argument("kernel", metavar="KERNEL")
    run.add_argument(
        "--listen", default="127.0.0.1:1234", help="HOST:PORT (default 127.0.0.1:1234)"
    )
    run.add_argument(
        "--wait", action="store_true", help="stop before the first instruction (qemu -S)"
    )
    run.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    run.add_argument("--serial", default="stdio", help="stdio | file:PATH | none (default stdio)")
    run.add_argument("--backend", default="auto", choices=("auto", "kvm", "emu", "hvf"))
    run.add_argument("--log-packets", metavar="PATH", help="write every RSP packet to PATH")
    run.add_argument(
        "--cmdline", "--append", default="", help="kernel command line (QEMU: -append)"
    )
    run.add_argument(
        "--initrd", metavar="FILE", help="initial ramdisk (Linux initrd, PVH/Multiboot module)"
    )
    run.add_argument(
        "--no-reboot",
        action="store_true",
        help="end the process when the guest resets (status 0), as QEMU -no-reboot",
    )
    run.add_argument("--verbose", "-v", action="store_true", help="log what the stub does")
    return parser


def run(args: argparse.Namespace) -> int:
    """``gdbstub run``: boot, serve, and return the guest's exit status."""
    from .hvtarget import HvTarget
    from .machine.firmware.layout import ACPI_ADDR as RSDP_ADDR
    from .machine.loader import BootError, load_kernel, symbols
    from .machine.machine import Machine
    from .server import GdbServer
    from .target import ResumeAction

    memory = parse_size(args.memory)
    host, port = parse_listen(args.listen)
    sink = serial_sink(args.serial)
    kernel = Path(args.kernel)
    if not kernel.is_file() or not os.access(kernel, os.R_OK):
        raise UsageError(f"cannot read kernel {args.kernel}")
    if args.initrd is not None:
        initrd = Path(args.initrd)
        if not initrd.is_file() or not os.access(initrd, os.R_OK):
            raise UsageError(f"cannot read initrd {args.initrd}")
    try:
        plan = load_kernel(
            kernel,
            mem_size=memory,
            cmdline=args.cmdline,
            initrd=None if args.initrd is None else Path(args.initrd),
            rsdp_addr=RSDP_ADDR,
        )
    except BootError as exc:
        raise UsageError(str(exc)) from exc
    try:
        hv.select_backend(args.backend)
        backend = hv.backend_name()
    except hv.HvError as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from exc
    log.warning("gdbstub %s: backend %s", __version__, backend)
    try:
        machine = Machine(plan, serial_sink=sink, no_reboot=args.no_reboot)
    except hv.HvError as exc:
        raise UsageError(f"cannot create the VM: {exc}") from exc
    try:
        kernel_symbols = symbols(kernel)
    except BootError:  # a raw image (Multiboot a.out kludge) has no symbol table
        kernel_symbols = {}
    machine.symbols = kernel_symbols
    target = HvTarget(machine, 1, symbols=kernel_symbols)
    machine.cpu_avx = target.features.avx
    if args.serial == "stdio" and not sys.stdin.isatty():
        threading.Thread(target=_feed_stdin, args=(machine,), daemon=True).start()
    try:
        server = GdbServer(
            target, host=host, port=port, log_packets=args.log_packets, running=not args.wait
        )
    except OSError as exc:
        raise UsageError(f"--listen {host}:{port}: {exc.strerror}") from exc
    log.warning(
        "gdbstub: %s booted (%s); gdb: target remote %s:%d%s",
        kernel.name,
        machine.plan.protocol,
        host,
        server.address[1],
        "" if args.wait else " (the guest is running)",
    )
    machine.debugger_attached = lambda: server.attached
    if not args.wait:
        target.resume({}, ResumeAction(kind="c"))
    with server:
        server.serve_forever()
    status = target.exit_status
    target.close()
    return 0 if status is None else status


def _feed_stdin(machine: object) -> None:
    uart = getattr(machine, "uart", None)
    while uart is not None:
        data = os.read(0, 4096)
        if not data:
            return
        uart.feed_input(data)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gdbstub`` and ``python -m gdbstub``."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "verbose", False):
            logging.getLogger().setLevel(logging.INFO)
        return run(args)
    except UsageError as exc:
        print(f"gdbstub: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
