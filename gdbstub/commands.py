"""The one table of packets the stub understands: prefix -> parser -> typed command.

Theory of operation
-------------------
``COMMANDS`` lists every packet. A row holds the packet's prefix, a parser that turns the rest
of the payload into a frozen command dataclass, the name of the session method that handles
it, whether the handler may resume the guest (and so answer later with a stop reply instead
of now), and the target capability the packet needs (None: always available).

``lookup`` picks the row with the longest prefix that starts the payload, so ``vCont?`` and
``vCont;`` never compete and ``qC`` does not swallow ``qCRC`` (its parser insists on an empty
rest and raises ``UnknownPacket``, which the session answers with the empty reply, as for any
packet without a row). A parser raises ``PacketError`` for a packet it recognises but cannot
read (bad hex, missing fields); the session answers ``E01``.

Thread ids are parsed by ``parse_thread_id``: ``-1`` is ``ALL_THREADS``, ``0`` is
``ANY_THREAD``, anything else a hex id (lldb pads with zeros; a multiprocess ``pP.T`` form is
accepted and the process part ignored).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from .rsp import hex_decode, parse_hex
from .target import ResumeAction

__all__ = [
    "ALL_THREADS",
    "ANY_THREAD",
    "COMMANDS",
    "Breakpoint",
    "Command",
    "Continue",
    "Detach",
    "Empty",
    "Kill",
    "Monitor",
    "PacketError",
    "QueryMemoryRegion",
    "QueryRegisterInfo",
    "QuerySupported",
    "ReadMemory",
    "ReadRegister",
    "ReadRegisters",
    "Row",
    "SetPhysicalMode",
    "SetStepFlags",
    "SetThread",
    "Step",
    "ThreadAlive",
    "ThreadExtendedInfo",
    "ThreadExtraInfo",
    "ThreadStopInfo",
    "UnknownPacket",
    "VCont",
    "WriteMemory",
    "WriteRegister",
    "WriteRegisters",
    "XferFeatures",
    "lookup",
    "parse_thread_id",
]

ALL_THREADS = -1
"""Thread id ``-1``: every thread."""
ANY_THREAD = 0
"""Thread id ``0``: any thread (the stub picks)."""


class PacketError(ValueError):
    """A recognised packet whose arguments cannot be read; answered with ``E01``."""


class UnknownPacket(Exception):
    """The payload only looks like a known packet; answered with the empty reply."""


# --- command values -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """Base of every parsed packet."""


@dataclass(frozen=True, slots=True)
class Empty(Command):
    """A packet without arguments (``?``, ``g``, ``qC``, ``k``...)."""


@dataclass(frozen=True, slots=True)
class QuerySupported(Command):
    """``qSupported[:feature;...]``: the features the client offers."""

    features: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadRegisters(Command):
    """``g[;thread:N;]``."""

    thread: int | None


@dataclass(frozen=True, slots=True)
class WriteRegisters(Command):
    """``G<hex>[;thread:N;]``."""

    data: bytes
    thread: int | None


@dataclass(frozen=True, slots=True)
class ReadRegister(Command):
    """``p<regnum>[;thread:N;]``."""

    regnum: int
    thread: int | None


@dataclass(frozen=True, slots=True)
class WriteRegister(Command):
    """``P<regnum>=<hex>[;thread:N;]``."""

    regnum: int
    data: bytes
    thread: int | None


@dataclass(frozen=True, slots=True)
class ReadMemory(Command):
    """``m<addr>,<length>`` (and ``x`` with the same arguments)."""

    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteMemory(Command):
    """``M<addr>,<length>:<hex>`` or ``X<addr>,<length>:<binary>``; ``data`` is raw bytes."""

    addr: int
    length: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Continue(Command):
    """``c[addr]`` or ``C<sig>[;addr]``."""

    signal: int | None
    addr: int | None


@dataclass(frozen=True, slots=True)
class Step(Command):
    """``s[addr]`` or ``S<sig>[;addr]``."""

    signal: int | None
    addr: int | None


@dataclass(frozen=True, slots=True)
class VCont(Command):
    """``vCont;action[:thread]...`` in order; thread None means "every other thread"."""

    actions: tuple[tuple[ResumeAction, int | None], ...]


@dataclass(frozen=True, slots=True)
class Breakpoint(Command):
    """``Z<kind>,<addr>,<length>`` (insert) or ``z...`` (remove)."""

    insert: bool
    kind: int
    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class XferFeatures(Command):
    """``qXfer:features:read:<annex>:<offset>,<length>``."""

    annex: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class SetThread(Command):
    """``H<op><thread>``: op ``g`` (registers, memory) or ``c`` (legacy continue/step)."""

    op: str
    thread: int


@dataclass(frozen=True, slots=True)
class ThreadAlive(Command):
    """``T<thread>``."""

    thread: int


@dataclass(frozen=True, slots=True)
class ThreadExtraInfo(Command):
    """``qThreadExtraInfo,<thread>``."""

    thread: int


@dataclass(frozen=True, slots=True)
class ThreadStopInfo(Command):
    """lldb's ``qThreadStopInfo<thread>``."""

    thread: int


@dataclass(frozen=True, slots=True)
class Detach(Command):
    """``D`` or ``D;<pid>``."""

    pid: int | None


@dataclass(frozen=True, slots=True)
class Kill(Command):
    """``k``."""


@dataclass(frozen=True, slots=True)
class Monitor(Command):
    """``qRcmd,<hex command>``; ``command`` is the decoded text."""

    command: str


@dataclass(frozen=True, slots=True)
class SetPhysicalMode(Command):
    """``Qqemu.PhyMemMode:0|1``."""

    on: bool


@dataclass(frozen=True, slots=True)
class SetStepFlags(Command):
    """``Qqemu.sstep=<hex>``: QEMU's single-step flags (1 enable, 2 no IRQs, 4 no timers)."""

    flags: int


@dataclass(frozen=True, slots=True)
class QueryMemoryRegion(Command):
    """lldb's ``qMemoryRegionInfo:<addr>``."""

    addr: int


@dataclass(frozen=True, slots=True)
class QueryRegisterInfo(Command):
    """lldb's ``qRegisterInfo<regnum>`` (hex)."""

    regnum: int


@dataclass(frozen=True, slots=True)
class ThreadExtendedInfo(Command):
    """lldb's ``jThreadExtendedInfo:{"thread":N}``; thread None is lldb's support probe."""

    thread: int | None


# --- parsers (each gets the payload after the row's prefix) ------------------------------


def _hex(text: bytes, what: str) -> int:
    try:
        return parse_hex(text)
    except ValueError:
        raise PacketError(f"bad {what}: {text[:40]!r}") from None


def _hexdata(text: bytes, what: str) -> bytes:
    try:
        return hex_decode(text)
    except ValueError:
        raise PacketError(f"bad {what}") from None


def parse_thread_id(text: bytes) -> int:
    """A thread id: ``-1`` (ALL_THREADS), ``0`` (ANY_THREAD), hex, or multiprocess ``pP.T``."""
    if text.startswith(b"p"):
        _, dot, tid = text[1:].partition(b".")
        text = tid if dot else b"-1"
    if text == b"-1":
        return ALL_THREADS
    return _hex(text, "thread id")


def _split_thread_suffix(rest: bytes) -> tuple[bytes, int | None]:
    """Split lldb's ``;thread:N;`` suffix off a ``g``/``G``/``p``/``P`` argument."""
    head, sep, suffix = rest.partition(b";")
    if not sep:
        return rest, None
    for item in suffix.split(b";"):
        key, colon, value = item.partition(b":")
        if colon and key == b"thread":
            return head, parse_thread_id(value)
    return head, None


def _bare(rest: bytes) -> Command:
    if rest:
        raise UnknownPacket
    return Empty()


def _bare_or_args(rest: bytes) -> Command:
    """A packet whose optional ``:...`` arguments the stub ignores (``qAttached:pid``...)."""
    if rest and rest[:1] not in (b":", b","):
        raise UnknownPacket
    return Empty()


def _anything(rest: bytes) -> Command:
    return Empty()


def _q_supported(rest: bytes) -> Command:
    if rest and not rest.startswith(b":"):
        raise UnknownPacket
    items = rest[1:].split(b";") if rest else []
    return QuerySupported(tuple(item.decode("ascii", "replace") for item in items if item))


def _read_registers(rest: bytes) -> Command:
    head, thread = _split_thread_suffix(rest)
    if head:
        raise PacketError("g takes no arguments")
    return ReadRegisters(thread)


def _write_registers(rest: bytes) -> Command:
    head, thread = _split_thread_suffix(rest)
    return WriteRegisters(_hexdata(head, "register data"), thread)


def _read_register(rest: bytes) -> Command:
    head, thread = _split_thread_suffix(rest)
    return ReadRegister(_hex(head, "register number"), thread)


def _write_register(rest: bytes) -> Command:
    head, thread = _split_thread_suffix(rest)
    num, eq, value = head.partition(b"=")
    if not eq:
        raise PacketError("P needs regnum=value")
    return WriteRegister(_hex(num, "register number"), _hexdata(value, "register value"), thread)


def _addr_length(text: bytes) -> tuple[int, int]:
    addr, comma, length = text.partition(b",")
    if not comma:
        raise PacketError("expected addr,length")
    return _hex(addr, "address"), _hex(length, "length")


def _read_memory(rest: bytes) -> Command:
    return ReadMemory(*_addr_length(rest))


def _write_memory_hex(rest: bytes) -> Command:
    head, colon, data = rest.partition(b":")
    if not colon:
        raise PacketError("M needs addr,length:data")
    addr, length = _addr_length(head)
    return WriteMemory(addr, length, _hexdata(data, "memory data"))


def _write_memory_binary(rest: bytes) -> Command:
    head, colon, data = rest.partition(b":")
    if not colon:
        raise PacketError("X needs addr,length:data")
    addr, length = _addr_length(head)
    return WriteMemory(addr, length, data)  # the decoder already undid the escapes


def _optional_addr(text: bytes) -> int | None:
    return _hex(text, "address") if text else None


def _continue(rest: bytes) -> Command:
    return Continue(None, _optional_addr(rest))


def _step(rest: bytes) -> Command:
    return Step(None, _optional_addr(rest))


def _signal_and_addr(rest: bytes) -> tuple[int, int | None]:
    sig, semi, addr = rest.partition(b";")
    return _hex(sig, "signal"), (_hex(addr, "address") if semi else None)


def _continue_signal(rest: bytes) -> Command:
    return Continue(*_signal_and_addr(rest))


def _step_signal(rest: bytes) -> Command:
    return Step(*_signal_and_addr(rest))


def _vcont_action(text: bytes) -> ResumeAction:
    kind = text[:1].decode("ascii", "replace")
    arg = text[1:]
    if kind in ("c", "s", "t"):
        if arg:
            raise PacketError(f"vCont;{kind} takes no argument")
        return ResumeAction(kind)
    if kind in ("C", "S"):
        return ResumeAction(kind.lower(), signal=_hex(arg, "signal"))
    if kind == "r":
        start, comma, end = arg.partition(b",")
        if not comma:
            raise PacketError("vCont;r needs start,end")
        return ResumeAction("r", range=(_hex(start, "range start"), _hex(end, "range end")))
    raise PacketError(f"unknown vCont action {text[:8]!r}")


def _vcont(rest: bytes) -> Command:
    actions: list[tuple[ResumeAction, int | None]] = []
    for item in rest.split(b";"):
        if not item:
            raise PacketError("empty vCont action")
        action, colon, thread = item.partition(b":")
        tid = parse_thread_id(thread) if colon else None
        actions.append((_vcont_action(action), None if tid == ALL_THREADS else tid))
    return VCont(tuple(actions))


def _breakpoint(insert: bool, kind: int) -> Callable[[bytes], Command]:
    def parse(rest: bytes) -> Command:
        if not rest.startswith(b","):
            raise PacketError("Z/z needs ,addr,kind")
        # Conditions and commands (";X...", ";cmds...") are not advertised; ignore them.
        fields = rest[1:].partition(b";")[0]
        addr, length = _addr_length(fields)
        return Breakpoint(insert, kind, addr, length)

    return parse


def _xfer_features(rest: bytes) -> Command:
    annex, colon, window = rest.rpartition(b":")
    if not colon:
        raise PacketError("qXfer needs annex:offset,length")
    offset, length = _addr_length(window)
    return XferFeatures(annex.decode("ascii", "replace"), offset, length)


def _set_thread(rest: bytes) -> Command:
    op = rest[:1].decode("ascii", "replace")
    if op not in ("g", "c", "m"):  # 'm' (memory) is treated like 'g'
        raise PacketError(f"unknown H operation {op!r}")
    return SetThread("g" if op == "m" else op, parse_thread_id(rest[1:]))


def _thread_alive(rest: bytes) -> Command:
    return ThreadAlive(parse_thread_id(rest))


def _thread_extra_info(rest: bytes) -> Command:
    if not rest.startswith(b","):
        raise UnknownPacket
    return ThreadExtraInfo(parse_thread_id(rest[1:]))


def _thread_stop_info(rest: bytes) -> Command:
    return ThreadStopInfo(parse_thread_id(rest))


def _detach(rest: bytes) -> Command:
    if not rest:
        return Detach(None)
    if not rest.startswith(b";"):
        raise PacketError("D takes ;pid")
    return Detach(_hex(rest[1:], "pid"))


def _kill(rest: bytes) -> Command:
    return Kill()


def _monitor(rest: bytes) -> Command:
    if not rest.startswith(b","):
        raise UnknownPacket
    return Monitor(_hexdata(rest[1:], "monitor command").decode("utf-8", "replace"))


def _set_physical_mode(rest: bytes) -> Command:
    if rest not in (b"0", b"1"):
        raise PacketError("PhyMemMode is 0 or 1")
    return SetPhysicalMode(rest == b"1")


def _set_step_flags(rest: bytes) -> Command:
    return SetStepFlags(_hex(rest, "sstep flags"))


def _memory_region(rest: bytes) -> Command:
    return QueryMemoryRegion(_hex(rest, "address"))


def _register_info(rest: bytes) -> Command:
    return QueryRegisterInfo(_hex(rest, "register number"))


def _thread_extended_info(rest: bytes) -> Command:
    if not rest:
        return ThreadExtendedInfo(None)
    try:
        args = json.loads(rest.decode("utf-8"))
        return ThreadExtendedInfo(int(args["thread"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise PacketError(f'jThreadExtendedInfo needs {{"thread":N}}: {rest[:40]!r}') from None


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One packet: its prefix, parser, handler method name, stop-reply flag and capability."""

    prefix: bytes
    parse: Callable[[bytes], Command]
    handler: str
    stop_reply: bool = False
    needs: str | None = None


COMMANDS: tuple[Row, ...] = (
    # connection and capabilities
    Row(b"qSupported", _q_supported, "supported"),
    Row(b"vMustReplyEmpty", _anything, "reply_empty"),
    Row(b"QStartNoAckMode", _bare, "start_no_ack"),
    Row(b"?", _bare, "stop_query"),
    # registers
    Row(b"g", _read_registers, "read_registers"),
    Row(b"G", _write_registers, "write_registers"),
    Row(b"p", _read_register, "read_register"),
    Row(b"P", _write_register, "write_register"),
    # memory
    Row(b"m", _read_memory, "read_memory"),
    Row(b"M", _write_memory_hex, "write_memory"),
    Row(b"X", _write_memory_binary, "write_memory"),
    Row(b"x", _read_memory, "binary_read"),
    # execution
    Row(b"c", _continue, "continue_", stop_reply=True),
    Row(b"C", _continue_signal, "continue_", stop_reply=True),
    Row(b"s", _step, "step", stop_reply=True, needs="step"),
    Row(b"S", _step_signal, "step", stop_reply=True, needs="step"),
    Row(b"vCont?", _bare, "vcont_query"),
    Row(b"vCont;", _vcont, "vcont", stop_reply=True),
    # breakpoints and watchpoints
    Row(b"Z0", _breakpoint(True, 0), "breakpoint", needs="swbreak"),
    Row(b"z0", _breakpoint(False, 0), "breakpoint", needs="swbreak"),
    Row(b"Z1", _breakpoint(True, 1), "breakpoint", needs="hwbreak"),
    Row(b"z1", _breakpoint(False, 1), "breakpoint", needs="hwbreak"),
    Row(b"Z2", _breakpoint(True, 2), "breakpoint", needs="watch"),
    Row(b"z2", _breakpoint(False, 2), "breakpoint", needs="watch"),
    Row(b"Z3", _breakpoint(True, 3), "breakpoint", needs="watch"),
    Row(b"z3", _breakpoint(False, 3), "breakpoint", needs="watch"),
    Row(b"Z4", _breakpoint(True, 4), "breakpoint", needs="watch"),
    Row(b"z4", _breakpoint(False, 4), "breakpoint", needs="watch"),
    # threads
    Row(b"H", _set_thread, "set_thread"),
    Row(b"T", _thread_alive, "thread_alive"),
    Row(b"qC", _bare, "current_thread"),
    Row(b"qfThreadInfo", _bare, "thread_info_first"),
    Row(b"qsThreadInfo", _bare, "thread_info_next"),
    Row(b"qThreadExtraInfo", _thread_extra_info, "thread_extra_info"),
    Row(b"qAttached", _bare_or_args, "attached"),
    # target description, misc queries
    Row(b"qXfer:features:read:", _xfer_features, "xfer_features"),
    Row(b"qSymbol", _anything, "symbol"),
    Row(b"qOffsets", _bare, "reply_empty"),
    Row(b"qTStatus", _bare, "reply_empty"),
    Row(b"qRcmd", _monitor, "monitor"),
    Row(b"Qqemu.PhyMemMode:", _set_physical_mode, "set_physical_mode"),
    Row(b"qqemu.PhyMemMode", _bare, "physical_mode"),
    Row(b"qqemu.Supported", _bare, "qemu_supported"),
    Row(b"Qqemu.sstep=", _set_step_flags, "set_step_flags"),
    Row(b"qqemu.sstepbits", _bare, "step_flag_bits"),
    Row(b"qqemu.sstep", _bare, "step_flags"),
    # session end
    Row(b"D", _detach, "detach"),
    Row(b"k", _kill, "kill"),
    # lldb extensions
    Row(b"QThreadSuffixSupported", _bare, "thread_suffix_supported"),
    Row(b"QListThreadsInStopReply", _bare, "list_threads_in_stop_reply"),
    Row(b"QEnableErrorStrings", _bare, "enable_error_strings"),
    Row(b"qHostInfo", _bare, "host_info"),
    Row(b"qProcessInfo", _bare, "process_info"),
    Row(b"qGDBServerVersion", _bare, "server_version"),
    Row(b"qThreadStopInfo", _thread_stop_info, "thread_stop_info"),
    Row(b"qMemoryRegionInfo:", _memory_region, "memory_region_info"),
    Row(b"qRegisterInfo", _register_info, "register_info"),
    Row(b"qWatchpointSupportInfo", _bare_or_args, "watchpoint_support_info", needs="watch"),
    Row(b"jThreadsInfo", _bare, "threads_info"),
    Row(b"jThreadExtendedInfo:", _thread_extended_info, "thread_extended_info"),
)
"""Every packet the stub understands; anything else gets the empty reply."""

_BY_PREFIX: dict[bytes, Row] = {row.prefix: row for row in COMMANDS}
_PREFIX_LENGTHS: tuple[int, ...] = tuple(sorted({len(p) for p in _BY_PREFIX}, reverse=True))


def lookup(payload: bytes) -> tuple[Row, bytes] | None:
    """The row with the longest prefix starting ``payload`` and the rest, or None."""
    for length in _PREFIX_LENGTHS:
        if length <= len(payload):
            row = _BY_PREFIX.get(payload[:length])
            if row is not None:
                return row, payload[length:]
    return None
