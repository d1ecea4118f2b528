"""One debugger connection as a state machine: frames in, bytes and actions out. No I/O.

Theory of operation
-------------------
``GdbSession`` sits between the codec (``gdbstub.rsp``) and the target (``gdbstub.target``).
The server feeds it every decoded frame (``on_frame``) and every stop the target reports
(``on_stop``); both return a list of outputs: ``SendBytes`` (ready for the socket: acks, naks,
encoded packets), ``CloseConnection`` (after ``D``) and ``Shutdown`` (after ``k``).

States::

    IDLE --resume packet--> RUNNING --stop--> IDLE     (the stop reply answers the resume)
    IDLE --D--> DETACHED    IDLE --k--> KILLED         (both final: frames are ignored)

* IDLE: the guest is stopped; packets are looked up in ``commands.COMMANDS`` and answered at
  once. A resume packet (a row with ``stop_reply``) starts the target and sends nothing:
  the answer is the stop reply, sent by ``on_stop``.
* RUNNING: only Ctrl-C matters (it calls ``target.interrupt()``; the resulting stop carries
  SIGINT). Any other packet is answered ``E10`` (busy) without touching the target.
* A stop that arrives while IDLE is not sent (the client did not ask); it is kept and
  reported by ``?``. A Ctrl-C while IDLE is ignored.

Acknowledgements: until ``QStartNoAckMode`` every packet received is acked ``+`` (or nakked
``-`` when it arrived damaged) and every packet sent is kept until the next one, so a ``-``
from the client resends it. After ``QStartNoAckMode`` (acked and answered ``OK`` first)
neither side acks and damaged packets are dropped.

Clients: gdb and lldb speak the same packets with different extras. lldb's (``qHostInfo``,
``qProcessInfo``, ``qRegisterInfo``, ``jThreadsInfo``, ``jThreadExtendedInfo``,
``qMemoryRegionInfo``, ``reason:`` in stop replies) are built by ``gdbstub.lldbext``; the
``x`` binary read answers in the dialect the client announced: ``b``-prefixed after gdb's
``binary-upload+``, raw (and ``OK`` to the ``x0,0`` probe) for lldb.

Errors never escape: a malformed packet gets ``E01``, a ``TargetError`` its own ``E%02x``,
``NotSupported``, a capability the target lacks or an unknown packet the empty reply, and an
unexpected exception from the target ``E79`` (logged).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias, cast

from . import __version__, lldbext, paging
from .commands import (
    ALL_THREADS,
    ANY_THREAD,
    Breakpoint,
    Command,
    Continue,
    Detach,
    Monitor,
    PacketError,
    QueryMemoryRegion,
    QueryRegisterInfo,
    QuerySupported,
    ReadMemory,
    ReadRegister,
    ReadRegisters,
    SetPhysicalMode,
    SetStepFlags,
    SetThread,
    Step,
    ThreadAlive,
    ThreadExtendedInfo,
    ThreadExtraInfo,
    ThreadStopInfo,
    UnknownPacket,
    VCont,
    WriteMemory,
    WriteRegister,
    WriteRegisters,
    XferFeatures,
    lookup,
)
from .rsp import PACKET_SIZE, Ack, BadPacket, Frame, Interrupt, Nak, Packet, encode, hex_encode
from .target import NotSupported, ResumeAction, StopEvent, Target, TargetError

__all__ = [
    "CloseConnection",
    "GdbSession",
    "Output",
    "SendBytes",
    "SessionState",
    "Shutdown",
]

log = logging.getLogger(__name__)

OK = b"OK"
E_MALFORMED = b"E01"
E_BUSY = b"E10"
E_INTERNAL = b"E79"
E_NO_SUCH_ANNEX = b"E00"

MAX_MEMORY_READ = (PACKET_SIZE - 32) // 2
"""The most bytes one ``m`` reply carries (hex doubles them); longer requests get a prefix."""
MAX_BINARY_READ = (PACKET_SIZE - 32) // 2
"""The most bytes one ``x`` reply carries: escapes may double them, as hex does for ``m``."""
_CONSOLE_CHUNK = 0x4000  # bytes of monitor output per 'O' packet

_DEFAULT_HOST_INFO = {
    "triple": "x86_64-unknown-none",
    "ptrsize": "8",
    "endian": "little",
    "ostype": "none",
    "vendor": "unknown",
    "watchpoint_exceptions_received": "after",
}
_HEX_VALUED_KEYS = frozenset({"triple", "hostname", "name", "os_build", "os_kernel"})
_PROCESS_INFO_KEYS = ("pid", "cputype", "cpusubtype", "ostype", "vendor", "endian", "ptrsize")
_WATCH_REASONS = frozenset({"watch", "rwatch", "awatch"})
_EXTENDED_REGISTERS = ("rip", "cr0", "cr3", "cr4", "efer")
"""What jThreadExtendedInfo reports about a vCPU, with its paging mode."""
_NEGOTIATED_REASONS = frozenset({"swbreak", "hwbreak"})


class SessionState(enum.Enum):
    """Where the connection is; see the module docstring for the transitions."""

    IDLE = "idle"
    RUNNING = "running"
    DETACHED = "detached"
    KILLED = "killed"


@dataclass(frozen=True, slots=True)
class SendBytes:
    """Bytes to write to the client as they are."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the client connection (after detach); the target keeps running."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The client killed the target: close the connection and stop serving."""


Output: TypeAlias = SendBytes | CloseConnection | Shutdown
"""What ``on_frame`` and ``on_stop`` return."""

_Reply: TypeAlias = bytes | None
# A handler's answer; None means "no reply now": the guest was resumed and the stop reply
# comes later (rows with stop_reply), or the session ended without one (k).


class GdbSession:
    """The protocol state of one client connection over one ``Target``."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._state = SessionState.IDLE
        self._ack = True
        self._last_sent: bytes | None = None
        self._caps = target.capabilities()
        self._client_features: frozenset[str] = frozenset()
        self._g_thread: int | None = None
        self._c_thread: int | None = None
        self._held_stop: StopEvent | None = None
        self._last_stop: StopEvent | None = None
        self._lldb = False
        self._threads_in_stop_reply = False
        self._stepping = False  # the last resume stepped: a plain SIGTRAP is lldb's "trace"
        self._register_infos: tuple[bytes, ...] | None = None
        self._physical = False
        self._console: list[bytes] = []
        self._after: list[Output] = []

    # --- public API ----------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """The current state."""
        return self._state

    @property
    def ack_mode(self) -> bool:
        """True until the client switched acknowledgements off with ``QStartNoAckMode``."""
        return self._ack

    @property
    def running(self) -> bool:
        """True while the guest runs on this session's behalf (a stop reply is owed)."""
        return self._state is SessionState.RUNNING

    @property
    def finished(self) -> bool:
        """True after ``D`` or ``k``: the connection is over."""
        return self._state in (SessionState.DETACHED, SessionState.KILLED)

    def on_frame(self, frame: Frame) -> list[Output]:
        """Handle one frame from the client."""
        if self.finished:
            return []
        match frame:
            case Ack():
                return []
            case Nak():
                if self._ack and self._last_sent is not None:
                    return [SendBytes(self._last_sent)]
                return []
            case Interrupt():
                if self._state is SessionState.RUNNING:
                    self.target.interrupt()
                return []
            case BadPacket(reason=reason):
                log.debug("damaged packet: %s", reason)
                return [SendBytes(b"-")] if self._ack else []
            case Packet(payload=payload):
                return self._on_packet(payload)
        return []  # pragma: no cover - Frame is exhaustive

    def on_stop(self, stop: StopEvent) -> list[Output]:
        """Handle a stop reported by the target."""
        if self.finished:
            return []
        self._last_stop = stop
        if self._state is not SessionState.RUNNING:
            self._held_stop = stop
            return []
        self._state = SessionState.IDLE
        self._held_stop = None
        return [SendBytes(self._packet(self._stop_reply(stop)))]

    # --- plumbing --------------------------------------------------------------------------

    def _packet(self, payload: bytes) -> bytes:
        wire = encode(payload)
        self._last_sent = wire
        return wire

    def _on_packet(self, payload: bytes) -> list[Output]:
        acked = self._ack
        if self._state is SessionState.RUNNING:
            reply: _Reply = E_BUSY
        else:
            reply = self._dispatch(payload)
        wire = bytearray(b"+" if acked else b"")
        for line in self._console:
            wire += self._packet(b"O" + line)
        self._console.clear()
        if reply is not None:
            wire += self._packet(reply)
        outputs: list[Output] = [SendBytes(bytes(wire))] if wire else []
        outputs += self._after
        self._after.clear()
        return outputs

    def _dispatch(self, payload: bytes) -> _Reply:
        found = lookup(payload)
        if found is None:
            return b""
        row, rest = found
        if row.needs is not None and row.needs not in self._caps:
            return b""
        try:
            command = row.parse(rest)
        except UnknownPacket:
            return b""
        except (PacketError, ValueError) as exc:
            log.debug("malformed packet %r: %s", payload[:40], exc)
            return E_MALFORMED
        handler = cast(Callable[[Command], _Reply], getattr(self, "_h_" + row.handler))
        try:
            reply = handler(command)
        except TargetError as exc:
            return exc.reply
        except NotSupported:
            return b""
        except Exception:
            log.exception("target failed on %r", payload[:40])
            return E_INTERNAL
        return reply

    def _query_stop(self) -> StopEvent:
        if self._held_stop is not None:
            return self._held_stop
        if self._last_stop is None:
            self._last_stop = self.target.last_stop()
        return self._last_stop

    def _current_thread(self) -> int:
        threads = self.target.thread_ids()
        stop = self._query_stop()
        if stop.thread in threads or not threads:
            return stop.thread
        return threads[0]

    def _thread(self, explicit: int | None = None) -> int:
        tid = explicit if explicit is not None else self._g_thread
        if tid is None or tid in (ALL_THREADS, ANY_THREAD):
            return self._current_thread()
        return tid

    def _stop_reply(self, stop: StopEvent) -> bytes:
        if stop.exit_status is not None:
            return b"W%02x" % (stop.exit_status & 0xFF)
        out = bytearray(b"T%02xthread:%x;" % (stop.signal & 0xFF, stop.thread))
        for regnum, value in stop.expedite:
            out += b"%02x:%s;" % (regnum, hex_encode(value))
        reason = stop.reason
        if reason in _WATCH_REASONS:
            out += b"%s:%x;" % (reason.encode(), stop.address or 0)
        elif reason in _NEGOTIATED_REASONS:
            if reason + "+" in self._client_features:
                out += b"%s:;" % reason.encode()
        elif reason is not None:
            out += b"%s:;" % reason.encode()
        if self._threads_in_stop_reply:
            out += self._threads_fields()
        if self._lldb and reason not in _WATCH_REASONS:  # lldb reads a watch key itself
            lldb_reason, description = lldbext.stop_reason(stop, self._stepping)
            if lldb_reason is not None:
                out += b"reason:%s;" % lldb_reason.encode()
            if description is not None:
                out += b"description:%s;" % hex_encode(description.encode())
        return bytes(out)

    def _threads_fields(self) -> bytes:
        threads = self.target.thread_ids()
        out = b"threads:%s;" % b",".join(b"%x" % t for t in threads)
        try:
            regnum = self.target.pc_regnum()
            pcs = [int.from_bytes(self.target.read_register(t, regnum), "little") for t in threads]
        except (TargetError, NotSupported):
            return out
        return out + b"thread-pcs:%s;" % b",".join(b"%x" % pc for pc in pcs)

    def _resume(self, actions: dict[int, ResumeAction], default: ResumeAction | None) -> _Reply:
        kinds = [a.kind for a in actions.values()] + ([default.kind] if default else [])
        self._stepping = any(kind in ("s", "r") for kind in kinds)
        self.target.resume(actions, default)
        self._state = SessionState.RUNNING
        self._held_stop = None
        return None

    def _set_pc(self, tid: int, addr: int) -> None:
        regnum = self.target.pc_regnum()
        width = len(self.target.read_register(tid, regnum))
        value = addr & ((1 << (8 * width)) - 1)
        self.target.write_register(tid, regnum, value.to_bytes(width, "little"))

    def _check_thread(self, tid: int) -> bool:
        return tid in (ALL_THREADS, ANY_THREAD) or tid in self.target.thread_ids()

    # --- handlers: connection ---------------------------------------------------------------

    def _h_supported(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, QuerySupported)
        self._client_features = frozenset(cmd.features)
        features = [
            b"PacketSize=%x" % PACKET_SIZE,
            b"qXfer:features:read+",
            b"QStartNoAckMode+",
        ]
        features += [b"%s+" % c.encode() for c in ("swbreak", "hwbreak") if c in self._caps]
        features.append(b"vContSupported+")
        if "binary-upload+" in self._client_features:
            features.append(b"binary-upload+")  # x answers carry gdb's 'b' prefix
        features += [b"QThreadSuffixSupported+", b"QListThreadsInStopReply+"]
        return b";".join(features)

    def _h_reply_empty(self, cmd: Command) -> _Reply:
        return b""

    def _h_start_no_ack(self, cmd: Command) -> _Reply:
        self._ack = False
        return OK

    def _h_stop_query(self, cmd: Command) -> _Reply:
        return self._stop_reply(self._query_stop())

    # --- handlers: registers and memory -----------------------------------------------------

    def _h_read_registers(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, ReadRegisters)
        return hex_encode(self.target.read_registers(self._thread(cmd.thread)))

    def _h_write_registers(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, WriteRegisters)
        self.target.write_registers(self._thread(cmd.thread), cmd.data)
        return OK

    def _h_read_register(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, ReadRegister)
        return hex_encode(self.target.read_register(self._thread(cmd.thread), cmd.regnum))

    def _h_write_register(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, WriteRegister)
        self.target.write_register(self._thread(cmd.thread), cmd.regnum, cmd.data)
        return OK

    def _h_read_memory(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, ReadMemory)
        if cmd.length == 0:
            return b""
        length = min(cmd.length, MAX_MEMORY_READ)
        data = self.target.read_memory(self._thread(), cmd.addr, length)
        if not data:
            raise TargetError.bad_address(cmd.addr)
        return hex_encode(data[:length])

    def _h_binary_read(self, cmd: Command) -> _Reply:
        # Two dialects: gdb (16 and later) offers binary-upload+ in qSupported and reads
        # "b<data>"; lldb probes with "x0,0", wants "OK" for it, then raw data.
        assert isinstance(cmd, ReadMemory)
        gdb_dialect = "binary-upload+" in self._client_features
        if cmd.length == 0:
            return b"b" if gdb_dialect else OK
        length = min(cmd.length, MAX_BINARY_READ)
        data = self.target.read_memory(self._thread(), cmd.addr, length)
        if not data:
            raise TargetError.bad_address(cmd.addr)
        return (b"b" if gdb_dialect else b"") + data[:length]

    def _h_write_memory(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, WriteMemory)
        if len(cmd.data) != cmd.length:
            return E_MALFORMED
        if cmd.length:
            self.target.write_memory(self._thread(), cmd.addr, cmd.data)
        return OK

    # --- handlers: execution -----------------------------------------------------------------

    def _resume_thread(self) -> int:
        if self._c_thread is None or self._c_thread in (ALL_THREADS, ANY_THREAD):
            return self._current_thread()
        return self._c_thread

    def _h_continue_(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, Continue)
        action = ResumeAction("c", signal=cmd.signal)
        if cmd.addr is not None:
            self._set_pc(self._resume_thread(), cmd.addr)
        if self._c_thread is None or self._c_thread in (ALL_THREADS, ANY_THREAD):
            return self._resume({}, action)
        return self._resume({self._c_thread: action}, None)

    def _h_step(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, Step)
        tid = self._resume_thread()
        if cmd.addr is not None:
            self._set_pc(tid, cmd.addr)
        # Only the stepped thread moves: stepping one vCPU while the others run lets them
        # change what the step sees (gdb itself sends "vCont;s:N;c" when it wants that).
        return self._resume({tid: ResumeAction("s", signal=cmd.signal)}, None)

    def _h_vcont_query(self, cmd: Command) -> _Reply:
        reply = b"vCont;c;C"
        if "step" in self._caps:
            reply += b";s;S"
        reply += b";t"
        if "range_step" in self._caps:
            reply += b";r"
        return reply

    def _h_vcont(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, VCont)
        actions: dict[int, ResumeAction] = {}
        default: ResumeAction | None = None
        for action, tid in cmd.actions:
            if action.kind == "s" and "step" not in self._caps:
                return E_MALFORMED
            if action.kind == "r" and "range_step" not in self._caps:
                return E_MALFORMED
            if default is not None:
                continue  # the leftmost matching action wins; a default matches every thread
            if tid is None:
                default = action
            else:
                actions.setdefault(self._current_thread() if tid == ANY_THREAD else tid, action)
        if default is not None and default.kind == "t":
            default = None
        return self._resume(actions, default)

    # --- handlers: breakpoints -------------------------------------------------------------

    def _h_breakpoint(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, Breakpoint)
        if cmd.insert:
            self.target.insert_breakpoint(cmd.kind, cmd.addr, cmd.length)
        else:
            self.target.remove_breakpoint(cmd.kind, cmd.addr, cmd.length)
        return OK

    # --- handlers: threads -------------------------------------------------------------------

    def _h_set_thread(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, SetThread)
        if not self._check_thread(cmd.thread):
            return E_MALFORMED
        if cmd.op == "g":
            self._g_thread = cmd.thread
        else:
            self._c_thread = cmd.thread
        return OK

    def _h_thread_alive(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, ThreadAlive)
        return OK if cmd.thread in self.target.thread_ids() else E_MALFORMED

    def _h_current_thread(self, cmd: Command) -> _Reply:
        return b"QC%x" % self._current_thread()

    def _h_thread_info_first(self, cmd: Command) -> _Reply:
        return b"m" + b",".join(b"%x" % t for t in self.target.thread_ids())

    def _h_thread_info_next(self, cmd: Command) -> _Reply:
        return b"l"

    def _h_thread_extra_info(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, ThreadExtraInfo)
        tid = self._thread(cmd.thread)
        return hex_encode(self.target.thread_extra_info(tid).encode("utf-8"))

    def _h_attached(self, cmd: Command) -> _Reply:
        return b"1"

    # --- handlers: queries -------------------------------------------------------------------

    def _h_xfer_features(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, XferFeatures)
        document = self.target.target_xml(cmd.annex)
        if document is None:
            return E_NO_SUCH_ANNEX
        chunk = document[cmd.offset : cmd.offset + min(cmd.length, PACKET_SIZE // 2)]
        more = cmd.offset + len(chunk) < len(document)
        return (b"m" if more else b"l") + chunk

    def _h_symbol(self, cmd: Command) -> _Reply:
        return OK

    def _h_monitor(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, Monitor)
        output = self.target.monitor(cmd.command).encode("utf-8")
        for start in range(0, len(output), _CONSOLE_CHUNK):
            self._console.append(hex_encode(output[start : start + _CONSOLE_CHUNK]))
        if getattr(self.target, "quit_requested", False):  # ``monitor quit``, as QEMU's
            self.target.kill()
            self._state = SessionState.KILLED
            self._after.append(Shutdown())
        return OK

    def _h_set_physical_mode(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, SetPhysicalMode)
        self.target.set_physical_memory_mode(cmd.on)
        self._physical = cmd.on
        return OK

    def _h_physical_mode(self, cmd: Command) -> _Reply:
        return b"1" if self._physical else b"0"

    def _h_qemu_supported(self, cmd: Command) -> _Reply:
        return b"sstepbits;sstep;PhyMemMode"

    def _h_set_step_flags(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, SetStepFlags)
        if cmd.flags & ~0x7:
            return b"E22"
        self.target.set_step_flags(cmd.flags)
        return OK

    def _h_step_flags(self, cmd: Command) -> _Reply:
        return b"%x" % self.target.step_flags()

    def _h_step_flag_bits(self, cmd: Command) -> _Reply:
        return b"ENABLE=1,NOIRQ=2,NOTIMER=4"

    # --- handlers: end of session -----------------------------------------------------------

    def _h_detach(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, Detach)
        self.target.detach()
        self._state = SessionState.DETACHED
        self._after.append(CloseConnection())
        return OK

    def _h_kill(self, cmd: Command) -> _Reply:
        # gdb does not wait for an answer; lldb does ("failed to send the k packet" otherwise),
        # and gdbserver answers X09: the process ended by SIGKILL.
        self.target.kill()
        self._state = SessionState.KILLED
        self._after.append(Shutdown())
        return b"X09"

    # --- handlers: lldb ---------------------------------------------------------------------

    def _h_thread_suffix_supported(self, cmd: Command) -> _Reply:
        self._lldb = True
        return OK

    def _h_list_threads_in_stop_reply(self, cmd: Command) -> _Reply:
        self._lldb = True
        self._threads_in_stop_reply = True
        return OK

    def _h_enable_error_strings(self, cmd: Command) -> _Reply:
        return OK

    def _info_fields(self, keys: tuple[str, ...] | None) -> bytes:
        info = {**_DEFAULT_HOST_INFO, **self.target.host_info()}
        out = bytearray()
        for key, value in info.items():
            if keys is not None and key not in keys:
                continue
            text = value.encode("utf-8")
            if key in _HEX_VALUED_KEYS:
                text = hex_encode(text)
            out += b"%s:%s;" % (key.encode("ascii"), text)
        return bytes(out)

    def _h_host_info(self, cmd: Command) -> _Reply:
        self._lldb = True
        return self._info_fields(None)

    def _h_process_info(self, cmd: Command) -> _Reply:
        self._lldb = True
        fields = self._info_fields((*_PROCESS_INFO_KEYS, "triple"))
        return (b"" if b"pid:" in fields else b"pid:1;") + fields

    def _h_server_version(self, cmd: Command) -> _Reply:
        return b"name:gdbstub;version:%s;" % __version__.encode("ascii")

    def _h_thread_stop_info(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, ThreadStopInfo)
        tid = self._thread(cmd.thread)
        if tid not in self.target.thread_ids():
            return E_MALFORMED
        stop = self._query_stop()
        if stop.thread == tid or stop.exit_status is not None:
            return self._stop_reply(stop)
        return b"T00thread:%x;" % tid

    def _h_memory_region_info(self, cmd: Command) -> _Reply:
        # From the guest's page tables where the target can walk them; without region info
        # lldb treats memory as readable and simply tries it.
        assert isinstance(cmd, QueryMemoryRegion)
        memory_region = getattr(self.target, "memory_region", None)
        if memory_region is None:
            return b""
        region = memory_region(self._thread(), cmd.addr)
        return lldbext.region_reply(region.start, region.size, region.permissions)

    def _h_register_info(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, QueryRegisterInfo)
        if self._register_infos is None:
            try:
                self._register_infos = lldbext.register_infos(self.target.target_xml)
            except ValueError as exc:
                log.warning("no qRegisterInfo: %s", exc)
                return b""
        if cmd.regnum >= len(self._register_infos):
            return b"E45"  # lldb's "no more registers", as debugserver answers
        return self._register_infos[cmd.regnum]

    def _h_watchpoint_support_info(self, cmd: Command) -> _Reply:
        return b"num:4;"  # the debug registers (page watchpoints have no fixed limit)

    def _h_threads_info(self, cmd: Command) -> _Reply:
        stop = self._query_stop()
        if stop.exit_status is not None:
            return b"E01"
        threads = []
        for tid in self.target.thread_ids():
            entry: dict[str, object] = {"tid": tid, "name": f"vCPU {tid - 1}"}
            registers = {}
            if tid == stop.thread:
                entry["signal"] = stop.signal
                reason, description = lldbext.stop_reason(stop, self._stepping)
                if reason is not None:
                    entry["reason"] = reason
                if description is not None:
                    entry["description"] = description
                registers = {str(n): value.hex() for n, value in stop.expedite}
            else:
                entry["signal"] = 0
            pc = self.target.pc_regnum()
            if str(pc) not in registers:
                registers[str(pc)] = self.target.read_register(tid, pc).hex()
            entry["registers"] = registers
            threads.append(entry)
        return lldbext.json_payload(threads)

    def _h_thread_extended_info(self, cmd: Command) -> _Reply:
        assert isinstance(cmd, ThreadExtendedInfo)
        if cmd.thread is None:
            return OK  # lldb's probe: the packet is supported
        if cmd.thread not in self.target.thread_ids():
            return E_MALFORMED
        info: dict[str, object] = {
            "name": f"vCPU {cmd.thread - 1}",
            "state": self.target.thread_extra_info(cmd.thread),
        }
        try:
            numbers = lldbext.register_numbers(self.target.target_xml)
            values = {
                name: int.from_bytes(self.target.read_register(cmd.thread, numbers[name]), "little")
                for name in _EXTENDED_REGISTERS
            }
        except (KeyError, ValueError, TargetError, NotSupported):
            return lldbext.json_payload(info)  # not an x86 description, or no registers
        info.update(values)
        info["paging"] = paging.describe_mode(paging.PagingState.from_regs(values))
        return lldbext.json_payload(info)
