"""The ``gdbstub`` command line: options, QEMU's spellings of them, and the help a user reads.

Theory of operation
-------------------
``parse(argv)`` returns an ``argparse.Namespace`` for ``gdbstub run`` or raises ``UsageError``
(one line, exit status 2). Before argparse sees the arguments, ``translate_qemu`` rewrites the
options of ``qemu-system-x86_64`` that map one to one onto ours (``-kernel``, ``-append``,
``-initrd``, ``-m``, ``-smp 1``, ``-serial``, ``-nographic``, ``-no-reboot``, ``-s``, ``-S``,
``-gdb``, and the harmless ``-device isa-debug-exit``, ``-display none``, ``-enable-kvm``,
``-accel``), so that a QEMU command line from a kernel's Makefile runs with ``gdbstub run`` in
front of it (the ``qemu-system-x86_64`` word itself may stay). Any other QEMU option is refused
by name. Values are passed as ``--opt=value``, so an ``-append`` text that starts with ``-``
survives argparse.

``parse_listen`` reads where gdb connects: ``HOST:PORT``, ``:PORT``, ``PORT``, ``[IPV6]:PORT``,
``unix:PATH`` (QEMU's ``tcp:HOST:PORT`` too). ``parse_serial`` reads the COM1 back end:
``stdio``, ``file:PATH[,append]``, ``pty``, ``tcp:[HOST]:PORT[,server][,nowait]``, ``none``.
``--dump-dir DIR`` names the one folder ``monitor dump-guest-memory`` may write into (an
existing folder; without it, monitor commands write no host file).
``HELP`` is the text of ``gdbstub``, ``gdbstub -h`` and ``gdbstub run --help``: every option,
its default, an example and the QEMU equivalent.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import NoReturn

from . import __version__

__all__ = [
    "HELP",
    "Listen",
    "SerialSpec",
    "UsageError",
    "parse",
    "parse_listen",
    "parse_serial",
    "parse_size",
    "translate_qemu",
]

HELP = f"""\
gdbstub {__version__}: boot an x86-64 kernel in a VM and serve it to gdb or lldb (like QEMU -s)

usage: gdbstub run KERNEL [options]
       gdbstub run qemu-system-x86_64 -kernel KERNEL [QEMU options]   (a QEMU command line)
       gdbstub --version

options               what it does (default)                                QEMU's spelling
  KERNEL              the kernel: ELF (Multiboot, PVH or plain ELF64),      -kernel KERNEL
                      a Multiboot image or a Linux bzImage
  --listen ADDRESS    where gdb connects: HOST:PORT, [IPV6]:PORT or         -s, -gdb tcp::PORT,
                      unix:PATH (127.0.0.1:1234; beyond loopback: warning)  -gdb unix:PATH
  --wait              stop before the first instruction (run at once)       -S
  --memory SIZE       guest RAM: 64M, 1G, 512 (MiB) (256M)                  -m SIZE
  --serial DEV        COM1: stdio, file:PATH[,append], pty, none,           -serial DEV,
                      tcp:HOST:PORT (stdio; file: truncates the file)       -nographic
  --append TEXT       kernel command line; also --cmdline (empty)           -append TEXT
  --initrd FILE       initial ramdisk, or Multiboot/PVH module (none)       -initrd FILE
  --no-reboot         exit (status 0) when the guest resets (restart it)    -no-reboot
  --backend NAME      auto, kvm, emu, hvf (auto: hvf, kvm, then emu)        -enable-kvm,
                                                                            -accel kvm|tcg
  --log-packets PATH  write every RSP packet to PATH (off)
  --dump-dir DIR      the one folder monitor dump-guest-memory may write to
                      (none: monitor commands write no host files)
  -v, --verbose       log what the stub does, with tracebacks (off)
  Also accepted: -smp 1, -device isa-debug-exit (built in, at 0xf4), -display none.

example
  gdbstub run build/kernel.elf --wait        # qemu-system-x86_64 -kernel build/kernel.elf -s -S
  gdb build/kernel.elf -ex 'target remote :1234'

exit status: 0 the guest powered off (or reset, with --no-reboot); (v << 1) | 1 the guest wrote
v to isa-debug-exit; 1 a runtime failure; 2 a usage error; 130 SIGINT; 143 SIGTERM.
With --serial stdio on a terminal, keys go to the guest (Ctrl-C too): Ctrl-A h lists the
escapes, Ctrl-A x quits, Ctrl-A s stops the guest for gdb. docs/usage.md has the details.
"""


class UsageError(Exception):
    """A bad command line; reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --- sizes, addresses, serial back ends ----------------------------------------------------


def parse_size(text: str, option: str = "--memory") -> int:
    """``256M``, ``1G``, ``64K``, ``512`` (MiB, as QEMU's -m) -> bytes (4K multiple, >= 2M)."""
    value_text = text.strip().split(",")[0].removeprefix("size=")
    match = re.fullmatch(r"(\d+)([KkMmGgTt]?)(?:i?[Bb])?", value_text)
    if not match:
        raise UsageError(f"{option}: cannot read size {text!r} (try 256M)")
    number, unit = int(match.group(1)), match.group(2).lower()
    if not unit:
        unit = "m" if number < 65536 else ""
    value = number * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    if value < 2 << 20 or value > 64 << 30 or value % 4096:
        raise UsageError(f"{option}: {text} is out of range (2M to 64G, a multiple of 4K)")
    return value


@dataclass(frozen=True)
class Listen:
    """Where the stub listens: ``host``/``port`` for TCP, or ``path`` for a Unix socket."""

    host: str = "127.0.0.1"
    port: int = 1234
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, option: str = "--listen") -> Listen:
    """``HOST:PORT``, ``:PORT``, ``PORT``, ``[IPV6]:PORT``, ``unix:PATH`` -> ``Listen``."""
    spec = text.strip()
    if spec.startswith("unix:"):
        path = spec[5:].split(",")[0]
        if not path:
            raise UsageError(f"{option}: unix: needs a path (unix:/tmp/gdb.sock)")
        return Listen(path=path)
    spec = spec.removeprefix("tcp:").split(",")[0]
    if spec.isdigit():
        spec = ":" + spec
    host, colon, port = spec.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{option}: put an IPv6 address in brackets: [{host}]:{port}")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{option}: {text!r} is not HOST:PORT, [IPV6]:PORT or unix:PATH")
    return Listen(host=host or "127.0.0.1", port=int(port))


@dataclass(frozen=True)
class SerialSpec:
    """A COM1 back end: ``kind`` stdio, file, pty, tcp or none, and its details."""

    kind: str
    path: str | None = None
    append: bool = False
    listen: Listen | None = None


def parse_serial(text: str, option: str = "--serial") -> SerialSpec:
    """``stdio``, ``file:PATH[,append]``, ``pty``, ``tcp:[HOST]:PORT[,server][,nowait]``,
    ``none`` (QEMU's ``mon:stdio`` is stdio, ``null`` is none)."""
    spec = text.strip()
    if spec in ("stdio", "mon:stdio"):
        return SerialSpec("stdio")
    if spec in ("none", "null"):
        return SerialSpec("none")
    if spec == "pty":
        return SerialSpec("pty")
    if spec.startswith("file:") and len(spec) > 5:
        path, _, flags = spec[5:].partition(",")
        if flags not in ("", "append", "append=on"):
            raise UsageError(f"{option}: file: takes ,append only (not {flags!r})")
        return SerialSpec("file", path=path, append=bool(flags))
    if spec.startswith("tcp:"):
        address, *options = spec[4:].split(",")
        unknown = [f for f in options if f not in ("server", "server=on", "nowait", "wait=off")]
        if unknown:
            raise UsageError(f"{option}: tcp: takes ,server and ,nowait only (not {unknown[0]})")
        return SerialSpec("tcp", listen=parse_listen(address, option))
    raise UsageError(
        f"{option}: {text!r} is not stdio, file:PATH[,append], pty, tcp:HOST:PORT or none"
    )


# --- QEMU's spellings -------------------------------------------------------------------------

# QEMU option -> our long option, for options with a value that maps one to one
_QEMU_VALUE = {
    "-kernel": "--kernel",
    "-append": "--append",
    "-initrd": "--initrd",
    "-m": "--memory",
    "-serial": "--serial",
}
_QEMU_FLAG = {"-S": "--wait", "-no-reboot": "--no-reboot", "-s": "--listen=127.0.0.1:1234"}
_QEMU_IGNORED_VALUE = {"-display": ("none",), "-vga": ("none",)}
_QEMU_IGNORED_FLAG = ("-nographic",)


def _qemu_value(option: str, argv: list[str], index: int) -> str:
    if index + 1 >= len(argv):
        raise UsageError(f"{option} needs a value")
    return argv[index + 1]


def translate_qemu(argv: list[str]) -> list[str]:
    """Rewrite QEMU's spellings in ``run``'s arguments into ours (see the module docstring)."""
    out: list[str] = []
    args = list(argv)
    if args and os.path.basename(args[0]).startswith("qemu-system-"):
        if os.path.basename(args[0]) not in ("qemu-system-x86_64", "qemu-system-i386"):
            raise UsageError(f"{args[0]}: gdbstub runs x86-64 guests only")
        args = args[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _QEMU_VALUE:
            out.append(f"{_QEMU_VALUE[arg]}={_qemu_value(arg, args, i)}")
            i += 2
            continue
        if arg in _QEMU_FLAG:
            out.append(_QEMU_FLAG[arg])
        elif arg in _QEMU_IGNORED_FLAG:
            pass
        elif arg in _QEMU_IGNORED_VALUE:
            value = _qemu_value(arg, args, i)
            if value not in _QEMU_IGNORED_VALUE[arg]:
                raise UsageError(f"{arg} {value}: gdbstub has no display; use {arg} none")
            i += 1
        elif arg == "-gdb":
            out.append(f"--listen={_gdb_device(_qemu_value(arg, args, i))}")
            i += 1
        elif arg == "-smp":
            _check_smp(_qemu_value(arg, args, i))
            i += 1
        elif arg == "-device":
            _check_device(_qemu_value(arg, args, i))
            i += 1
        elif arg == "-enable-kvm":
            out.append("--backend=kvm")
        elif arg == "-accel":
            out.append("--backend=" + _accel(_qemu_value(arg, args, i)))
            i += 1
        elif arg in ("--append", "--cmdline") and i + 1 < len(args):
            out.append(f"{arg}={args[i + 1]}")  # a command line may start with '-'
            i += 1
        elif len(arg) > 2 and arg.startswith("-") and not arg.startswith("--"):
            raise UsageError(
                f"{arg}: a QEMU option gdbstub run does not have "
                "(gdbstub run --help lists the ones it accepts)"
            )
        else:
            out.append(arg)
        i += 1
    return out


def _gdb_device(value: str) -> str:
    """QEMU's ``-gdb`` device: ``tcp::PORT``, ``tcp:HOST:PORT``, ``unix:PATH,server``."""
    device = value.split(",")[0]
    if device.startswith("unix:"):
        return device
    if device.startswith("tcp:"):
        host, _, port = device[4:].rpartition(":")
        return f"{host or '127.0.0.1'}:{port}"
    raise UsageError(f"-gdb {value}: gdbstub listens on tcp::PORT, tcp:HOST:PORT or unix:PATH")


def _check_smp(value: str) -> None:
    first = value.split(",")[0].removeprefix("cpus=")
    if not first.isdigit():
        raise UsageError(f"-smp {value}: cannot read the number of CPUs")
    if int(first) != 1 or any(
        part.split("=")[0] in ("cpus", "maxcpus") and part.split("=")[1] != "1"
        for part in value.split(",")[1:]
        if "=" in part
    ):
        raise UsageError(f"-smp {value}: gdbstub runs one vCPU for now (use -smp 1)")


def _check_device(value: str) -> None:
    driver, *props = value.split(",")
    if driver != "isa-debug-exit":
        raise UsageError(f"-device {driver}: gdbstub has no such device (only isa-debug-exit)")
    for prop in props:
        key, _, setting = prop.partition("=")
        if key == "iobase" and int(setting, 0) != 0xF4:
            raise UsageError(f"-device {value}: isa-debug-exit is at iobase=0xf4 here")


def _accel(value: str) -> str:
    name = value.split(",")[0]
    mapping = {"kvm": "kvm", "tcg": "emu", "hvf": "hvf"}
    if name not in mapping:
        raise UsageError(f"-accel {value}: gdbstub has kvm, tcg (its emu backend) and hvf")
    return mapping[name]


# --- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``run`` is the one command); help is ``HELP``, not argparse's."""
    parser = _Parser(prog="gdbstub", add_help=False)
    parser.add_argument("--version", action="version", version=f"gdbstub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", add_help=False)
    run.add_argument("kernel_arg", metavar="KERNEL", nargs="?")
    run.add_argument("--kernel", dest="kernel_opt")
    run.add_argument("--listen", default="127.0.0.1:1234")
    run.add_argument("--wait", action="store_true")
    run.add_argument("--memory", default="256M")
    run.add_argument("--serial", default="stdio")
    run.add_argument("--backend", default="auto", choices=("auto", "kvm", "emu", "hvf"))
    run.add_argument("--log-packets", metavar="PATH")
    run.add_argument("--dump-dir", metavar="DIR")
    run.add_argument("--cmdline", "--append", default="")
    run.add_argument("--initrd", metavar="FILE")
    run.add_argument("--no-reboot", action="store_true")
    run.add_argument("--verbose", "-v", action="store_true")
    return parser


class HelpRequested(Exception):
    """``-h``/``--help``, or no arguments at all: print ``HELP``."""


def parse(argv: list[str]) -> argparse.Namespace:
    """The ``gdbstub`` arguments; raises ``UsageError`` or ``HelpRequested``."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        raise HelpRequested
    if argv[0] == "run":
        rest = argv[1:]
        if "-h" in rest or "--help" in rest:
            raise HelpRequested
        argv = ["run", *translate_qemu(rest)]
    args = build_parser().parse_args(argv)
    kernels = [k for k in (args.kernel_arg, args.kernel_opt) if k is not None]
    if not kernels:
        raise UsageError("the following arguments are required: KERNEL (or -kernel KERNEL)")
    if len(kernels) == 2 and kernels[0] != kernels[1]:
        raise UsageError(f"two kernels given: {kernels[0]} and {kernels[1]}")
    args.kernel = kernels[0]
    args.memory_bytes = parse_size(args.memory)
    args.listen_at = parse_listen(args.listen)
    args.serial_spec = parse_serial(args.serial)
    if args.dump_dir is not None and not os.path.isdir(args.dump_dir):
        raise UsageError(f"--dump-dir {args.dump_dir}: not a folder (create it first)")
    return args
