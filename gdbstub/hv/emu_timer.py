"""The emu backend's run deadlines: one watchdog thread instead of unicorn's timeout thread.

Theory of operation
-------------------
``uc_emu_start`` with a timeout creates a thread and joins it on every call (about 180 us on
the machine this was measured on), and an entry with a deadline is the common case: the
machine runs its vCPU until the next device deadline. The backend therefore starts emulation
without a timeout and arms this watchdog instead: one daemon thread per backend, sleeping on a
condition variable until the earliest armed deadline, then calling ``emu_stop`` for the vCPU
whose entry is still running. An entry is identified by a generation number, so a deadline
left armed by an entry that already returned is ignored. ``emu_stop`` is lost when it lands
before ``emu_start`` has begun (unicorn clears its stop request there), so the watchdog
repeats it every ``RETRY_NS`` until the entry has ended, as ``hv_vcpu_interrupt`` does for
kicks. Arming costs a lock and, when the new deadline is the earliest, a notify.
"""

from __future__ import annotations

import ctypes
import heapq
import importlib
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from .emu_state import unicorn

RETRY_NS = 200_000


class Watchdog:
    """Calls ``stop(token)`` at armed deadlines until the token is disarmed."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int]] = []  # (deadline ns, entry generation)
        self._armed: dict[int, Callable[[int], None]] = {}  # generation -> stop
        self._next = 0
        self._thread: threading.Thread | None = None
        self._wake_at: int | None = None  # the deadline the thread sleeps for

    def arm(self, deadline_ns: int, stop: Callable[[int], None]) -> int:
        """Call ``stop(token)`` at ``deadline_ns`` (monotonic), and again every ``RETRY_NS``,
        until :meth:`disarm`; returns the token."""
        with self._cond:
            self._next += 1
            token = self._next
            self._armed[token] = stop
            heapq.heappush(self._heap, (deadline_ns, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="emu-watchdog", daemon=True)
                self._thread.start()
            elif self._wake_at is None or deadline_ns < self._wake_at:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        """The entry ended: its deadline no longer stops anything."""
        with self._cond:
            self._armed.pop(token, None)

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake_at = None
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                now = time.monotonic_ns()
                if now < deadline:
                    self._wake_at = deadline
                    self._cond.wait((deadline - now) / 1e9)
                    self._wake_at = None
                    continue
                heapq.heappop(self._heap)
                stop = self._armed[token]
                heapq.heappush(self._heap, (now + RETRY_NS, token))  # until disarmed
                self._cond.release()
                try:
                    stop(token)
                finally:
                    self._cond.acquire()


class StopSwitch:
    """Stops a running ``Uc`` from any thread at the start of its next translated block.

    unicorn's own ``emu_stop`` is not safe from another thread: it raises QEMU's exit request,
    and unicorn checks that request after *every* memory access, leaving with RIP restored to
    the instruction whose access it was. After the store of a read-modify-write instruction
    (``add [mem], 1``, ``xchg``, ``inc``) that instruction then runs a second time when
    emulation resumes; the Linux boot decompressor's "XZ-compressed data is corrupt" was its
    input position counter incremented twice. Two native UC_HOOK_BLOCK hooks avoid it: one,
    over every address, whose callback is a C function doing nothing (``abs``), so that every
    translated block calls unicorn's hook helper at its start, with RIP synchronised; and one
    whose callback is ``uc_emu_stop`` itself and whose address range is normally empty.
    :meth:`arm` widens that range (two words of unicorn's hook record, read on every call of
    the helper), so the next block start stops emulation before any of its instructions, from
    the emulation thread; :meth:`disarm` empties it again. Where the record cannot be found
    (another unicorn build) it falls back to ``emu_stop``."""

    _EMPTY = (1 << 64) - 1

    def __init__(self, uc: Any) -> None:
        self.uc = uc
        self._bounds = 0  # address of the stop hook's (begin, end) words; 0: fallback
        self._handles: list[int] = []
        try:
            binding: Any = importlib.import_module("unicorn.unicorn_py3.unicorn")
            lib = binding.uclib
            noop = ctypes.cast(ctypes.CDLL(None).abs, ctypes.c_void_p)
            stop = ctypes.cast(lib.uc_emu_stop, ctypes.c_void_p)
        except (ImportError, AttributeError, OSError):  # pragma: no cover - other bindings
            return
        for callback, begin in ((noop, 0), (stop, self._EMPTY)):
            handle = binding.uc_hook_h()
            status = lib.uc_hook_add(
                uc._uch,
                ctypes.byref(handle),
                unicorn.UC_HOOK_BLOCK,
                callback,
                None,
                ctypes.c_uint64(begin),
                ctypes.c_uint64(self._EMPTY),
            )
            if status:  # pragma: no cover - unicorn refused the hook
                return
            self._handles.append(int(handle.value))
        record = self._handles[1]
        begin, end, callback = struct.unpack("<QQQ", ctypes.string_at(record + 24, 24))
        if (begin, end, callback) == (self._EMPTY, self._EMPTY, stop.value):
            self._bounds = record + 24

    def arm(self) -> None:
        """Stop at the next block start (from any thread)."""
        if self._bounds:
            ctypes.memmove(self._bounds, _ALL, 16)
        else:  # pragma: no cover - see the class docstring
            self.uc.emu_stop()

    def disarm(self) -> None:
        """The emulation thread, after ``emu_start`` returned."""
        if self._bounds:
            ctypes.memmove(self._bounds, _NONE, 16)


_ALL = struct.pack("<QQ", 0, (1 << 64) - 1)
_NONE = struct.pack("<QQ", (1 << 64) - 1, (1 << 64) - 1)
