"""The debug-target contract: what the protocol session asks of the thing being debugged.

The session (``gdbstub.session``) speaks the remote protocol; a ``Target`` answers in typed
values: register blobs as little-endian bytes, memory as bytes, stops as ``StopEvent``. The real
implementation (``HvTarget``) drives vCPU worker threads; the tests use an in-memory fake.

Rules every implementation follows:

* Threads are gdb thread ids, 1-based (vCPU ``n`` is thread ``n + 1``).
* Calls other than ``interrupt``, ``wake_fd`` and ``take_stop`` are made only while the guest is
  stopped (the session never touches registers or memory while it is running).
* ``resume`` does not block: it starts the guest and returns. The stop arrives later: the target
  makes ``wake_fd`` readable and the server calls ``take_stop``, which consumes the stop (and
  drains the wake-up, so ``wake_fd`` is readable exactly while a stop is pending).
* Failures the debugger should see as an error reply raise ``TargetError`` (reply ``E%02x``).
  Things the target cannot do at all raise ``NotSupported`` (the empty reply: "unsupported").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "BAD_ADDRESS_ERRNO",
    "CAPABILITIES",
    "EFAULT_REPLY",
    "NotSupported",
    "ResumeAction",
    "StopEvent",
    "Target",
    "TargetError",
]

EFAULT_REPLY = b"E14"
"""The project's literal reply for an unreadable or unwritable address."""

BAD_ADDRESS_ERRNO = 0x14
"""The ``errno`` value of ``TargetError.bad_address()``: formatted ``E%02x`` it gives ``E14``."""

CAPABILITIES = frozenset({"swbreak", "hwbreak", "watch", "step", "range_step", "avx"})
"""Every name ``Target.capabilities`` may return.

``swbreak``: Z0 software breakpoints. ``hwbreak``: Z1 hardware breakpoints. ``watch``: Z2/Z3/Z4
watchpoints. ``step``: single-step (``s``, ``S``, ``vCont;s``). ``range_step``: ``vCont;r``.
``avx``: the target description carries the AVX feature.
"""


class TargetError(Exception):
    """A non-fatal failure the debugger sees as ``E%02x`` with ``errno``.

    gdb shows the number but does not interpret it; use ``bad_address()`` for memory that cannot
    be read or written, so every layer answers the same ``E14``.
    """

    def __init__(self, errno: int, message: str = "") -> None:
        if not 0 <= errno <= 0xFF:
            raise ValueError(f"errno {errno} does not fit the E NN reply")
        self.errno = errno
        super().__init__(message or f"target error 0x{errno:02x}")

    @classmethod
    def bad_address(cls, address: int | None = None) -> TargetError:
        """The error for an address with nothing readable or writable; replies ``E14``."""
        detail = "bad address" if address is None else f"bad address 0x{address:x}"
        return cls(BAD_ADDRESS_ERRNO, detail)

    @property
    def reply(self) -> bytes:
        """The packet payload answering the failed request (``b"E14"`` for a bad address)."""
        return b"E%02x" % self.errno


class NotSupported(Exception):
    """The target cannot do this at all; the session answers with the empty reply."""


@dataclass(frozen=True, slots=True)
class StopEvent:
    """Why the guest stopped (or that it exited), as the target reports it.

    ``exit_status`` not None means the guest is gone (reply ``W%02x``); otherwise the stop reply
    is ``T<signal>thread:<thread>;`` with the reason and the expedited registers.
    """

    thread: int
    """The gdb thread id (1-based) that stopped."""
    signal: int
    """5 SIGTRAP (breakpoint, step, watchpoint), 2 SIGINT (interrupt), 4 SIGILL, 11 SIGSEGV..."""
    reason: str | None = None
    """gdb stop reason: "swbreak", "hwbreak", "watch", "rwatch", "awatch", "replaylog" or None."""
    address: int | None = None
    """The data address for the watchpoint reasons."""
    exit_status: int | None = None
    """Not None: the process exited with this status."""
    expedite: tuple[tuple[int, bytes], ...] = field(default=())
    """(regnum, little-endian register bytes) pairs sent with the stop so gdb skips a ``g``."""
    lldb_reason: str | None = None
    """lldb's ``reason:`` key ("breakpoint", "trace", "watchpoint", "signal"...), or None."""


@dataclass(frozen=True, slots=True)
class ResumeAction:
    """What one thread (or every thread without its own action) does on resume.

    ``kind`` is "c" continue, "s" single-step, "t" stop (stay stopped), "r" range-step (step
    while the pc stays in ``range`` = [start, end)). ``signal`` is the signal to deliver, if any.
    """

    kind: str
    signal: int | None = None
    range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("c", "s", "t", "r"):
            raise ValueError(f"unknown resume kind {self.kind!r}")
        if (self.kind == "r") != (self.range is not None):
            raise ValueError("a range is given exactly for kind 'r'")


class Target(Protocol):
    """The debug target the session drives. See the module docstring for the rules."""

    @property
    def wake_fd(self) -> int:
        """A file descriptor that is readable exactly while a stop is pending."""
        ...

    def thread_ids(self) -> list[int]:
        """The gdb thread ids (1-based), in order."""
        ...

    def thread_extra_info(self, tid: int) -> str:
        """A short human description of a thread (``qThreadExtraInfo``)."""
        ...

    def target_xml(self, annex: str) -> bytes | None:
        """The target-description document ``annex`` ("target.xml"...), or None if unknown."""
        ...

    def pc_regnum(self) -> int:
        """The gdb register number of the program counter (rip)."""
        ...

    def read_registers(self, tid: int) -> bytes:
        """The whole ``g`` blob of thread ``tid``, in target-description order."""
        ...

    def write_registers(self, tid: int, data: bytes) -> None:
        """Write a whole ``G`` blob to thread ``tid``."""
        ...

    def read_register(self, tid: int, regnum: int) -> bytes:
        """One register, little-endian; raise TargetError for an unknown register number."""
        ...

    def write_register(self, tid: int, regnum: int, data: bytes) -> None:
        """Write one register (little-endian bytes of its full width)."""
        ...

    def read_memory(self, tid: int, addr: int, length: int) -> bytes:
        """Read memory as thread ``tid`` sees it; may return a short prefix.

        Raises TargetError (``bad_address()``) when nothing at ``addr`` is readable.
        """
        ...

    def write_memory(self, tid: int, addr: int, data: bytes) -> None:
        """Write memory as thread ``tid`` sees it; raise TargetError if it cannot all be written."""
        ...

    def resume(self, actions: dict[int, ResumeAction], default: ResumeAction | None) -> None:
        """Start the guest: ``actions`` per thread, ``default`` for every other thread.

        ``default`` None means the other threads stay stopped. Returns at once; the stop is
        reported later through ``wake_fd`` and ``take_stop``.
        """
        ...

    def interrupt(self) -> None:
        """Ask a running guest to stop; a StopEvent with signal 2 follows. May be called from
        any thread; does nothing if the guest is already stopped."""
        ...

    def take_stop(self) -> StopEvent | None:
        """Consume the pending stop, if any, without blocking."""
        ...

    def last_stop(self) -> StopEvent:
        """The most recent stop (what ``?`` reports); a fresh target reports its initial halt."""
        ...

    def insert_breakpoint(self, kind: int, addr: int, length: int) -> None:
        """Insert a breakpoint or watchpoint; ``kind`` 0..4 as in ``Z0``..``Z4``.

        Raises NotSupported if this kind is not possible, TargetError if it failed (no free
        debug register, unwritable address).
        """
        ...

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> None:
        """Remove what ``insert_breakpoint`` inserted with the same arguments."""
        ...

    def monitor(self, command: str) -> str:
        """Run a ``monitor`` command and return its output text."""
        ...

    def set_physical_memory_mode(self, on: bool) -> None:
        """Switch memory access between guest-virtual (off) and guest-physical (on) addresses."""
        ...

    def set_step_flags(self, flags: int) -> None:
        """QEMU's ``sstep`` flags: 1 enable, 2 steps take no interrupts, 4 no timers."""
        ...

    def step_flags(self) -> int:
        """The current ``sstep`` flags (QEMU's default 0x7: steps skip interrupt handlers)."""
        ...

    def detach(self) -> None:
        """Remove the debugger's breakpoints and let the guest run."""
        ...

    def kill(self) -> None:
        """Stop the guest for good (the session ends after this)."""
        ...

    def capabilities(self) -> frozenset[str]:
        """What this target can really do; a subset of ``CAPABILITIES``."""
        ...

    def host_info(self) -> dict[str, str]:
        """Plain-text keys for lldb's ``qHostInfo``/``qProcessInfo`` ("triple", "ostype"...).

        They override the session's defaults; the session hex-encodes the keys lldb expects hex.
        """
        ...
