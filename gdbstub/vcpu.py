"""The vCPU worker: one thread that owns one ``gdbstub.hv`` vCPU.

Theory of operation
-------------------
The framework binds a vCPU to the thread that created it, so every vCPU gets a worker thread
that creates it and then serves two kinds of requests from a queue:

* ``call(fn)``: run ``fn(vcpu)`` on the owner thread while the vCPU is paused (register,
  fpstate, MSR and VMCS access) and hand back the result or exception;
* ``resume(handler, before_entry=..., prepare=...)``: run the guest. The worker calls
  ``prepare(vcpu)`` (the run's settings), then loops: ``before_entry(vcpu)`` lets the VMM
  inject interrupts and decide the entry (an ``Entry``: a deadline, "halted: do not enter,
  wait", or a stop), ``hv_vcpu_run_until`` runs the guest, and every exit goes to
  ``handler(vcpu)``, which returns None to keep running or a ``Stop`` to end the run. The stop
  is delivered through ``on_stop``. A deadline exit (52) and a kick exit (1) are "slice over":
  the loop goes round again.

Two cross-thread operations, both built on ``hv_vcpu_interrupt`` (the framework's one
cross-thread call): ``kick()`` raises the stop flag, which the worker checks before every
entry, and ends the run with ``Stop(kind="interrupted")``; ``poke()`` only makes the vCPU
come round the loop (a device raised an interrupt: the VMM injects it before the next entry,
and a halted vCPU wakes). A kick or poke that lands between runs is harmless (the next run
returns at once with exit 1).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import hv, vmxsetup

T = TypeVar("T")


@dataclass(frozen=True)
class Stop:
    """Why a run of the guest ended.

    ``kind``: "debug" (breakpoint, watchpoint, step), "interrupted" (kick), "exited" (the guest
    asked the machine to end, ``exit_status`` set), "halted" (HLT with interrupts off),
    "fault" (triple fault, failed entry, unhandled exit). ``signal`` is the gdb signal number.
    """

    kind: str
    signal: int = 5
    reason: str | None = None
    address: int | None = None
    exit_status: int | None = None
    message: str = ""


@dataclass(frozen=True)
class Entry:
    """What the VMM decided before an entry (``before_entry``).

    ``deadline``: host monotonic nanoseconds at which the run should end (a device timer is
    due), None for no limit. ``halted``: do not enter; the vCPU sleeps until poked, kicked or
    the deadline. ``stop``: end the run with this stop instead of entering.
    """

    deadline: int | None = None
    halted: bool = False
    stop: Stop | None = None


ExitHandler = Callable[[int], "Stop | None"]
BeforeEntry = Callable[[int], Entry]


class _Call:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[int], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Resume:
    __slots__ = ("before_entry", "handler", "prepare")

    def __init__(
        self,
        handler: ExitHandler,
        before_entry: BeforeEntry | None,
        prepare: Callable[[int], None] | None,
    ) -> None:
        self.handler = handler
        self.before_entry = before_entry
        self.prepare = prepare


_QUIT = object()


class VcpuWorker:
    """A thread owning one vCPU; see the module docstring."""

    def __init__(
        self,
        index: int,
        on_stop: Callable[[VcpuWorker, Stop], None],
        setup: Callable[[int], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.index = index
        self.vcpu = -1
        self.running = False
        self._on_stop = on_stop
        self._setup = setup
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stop_requested = threading.Event()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name or f"vcpu{index}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    # --- requests (any thread) ---------------------------------------------------------------

    def call(self, fn: Callable[[int], T]) -> T:
        """Run ``fn(vcpu)`` on the owner thread and return its result (vCPU must be paused)."""
        if threading.current_thread() is self._thread:
            return fn(self.vcpu)
        request = _Call(fn)
        self._inbox.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        result: T = request.result
        return result

    def resume(
        self,
        handler: ExitHandler,
        before_entry: BeforeEntry | None = None,
        prepare: Callable[[int], None] | None = None,
    ) -> None:
        """Start running the guest; the run's ``Stop`` arrives through ``on_stop``.

        ``prepare(vcpu)`` runs on the owner thread before the first entry (settings for this
        run, without a round trip through ``call``); an HvError there ends the run as a fault.
        ``before_entry(vcpu)`` runs before every entry (see ``Entry``): while it says
        "halted" the worker does not enter the guest but waits for a poke, a kick or the
        deadline, as a halted CPU waits for an interrupt.
        """
        self._stop_requested.clear()
        self.running = True
        self._inbox.put(_Resume(handler, before_entry, prepare))

    def kick(self) -> None:
        """Ask a running vCPU to stop (the one cross-thread call: ``hv_vcpu_interrupt``)."""
        self._stop_requested.set()
        self._wake.set()
        if self.vcpu >= 0:
            hv.hv_vcpu_interrupt([self.vcpu])

    def poke(self) -> None:
        """Make a running vCPU come round its loop (an interrupt became pending); any thread."""
        self._wake.set()
        if self.vcpu >= 0 and self.running:
            hv.hv_vcpu_interrupt([self.vcpu])

    def close(self) -> None:
        """Destroy the vCPU and end the thread (the vCPU must not be running)."""
        if self._thread.is_alive():
            self._inbox.put(_QUIT)
            self._thread.join(5)

    # --- the owner thread ----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
            if self._setup is not None:
                self._setup(self.vcpu)
        except BaseException as exc:  # reported to the creator
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            item = self._inbox.get()
            if item is _QUIT:
                break
            if isinstance(item, _Call):
                try:
                    item.result = item.fn(self.vcpu)
                except BaseException as exc:
                    item.error = exc
                item.done.set()
            elif isinstance(item, _Resume):
                stop = self._run(item.handler, item.before_entry, item.prepare)
                self.running = False
                self._on_stop(self, stop)
        try:
            hv.hv_vcpu_destroy(self.vcpu)
        except hv.HvError:
            pass

    def _run(
        self,
        handler: ExitHandler,
        before_entry: BeforeEntry | None,
        prepare: Callable[[int], None] | None,
    ) -> Stop:
        vcpu = self.vcpu
        slice_over = (hv.VMX_REASON_IRQ, hv.VMX_REASON_VMX_TIMER_EXPIRED)
        try:
            if prepare is not None:
                prepare(vcpu)
            while True:
                if self._stop_requested.is_set():
                    return Stop("interrupted", signal=2)
                deadline = hv.HV_DEADLINE_FOREVER
                if before_entry is not None:
                    self._wake.clear()
                    entry = before_entry(vcpu)
                    if entry.stop is not None:
                        return entry.stop
                    if entry.halted:
                        timeout = None
                        if entry.deadline is not None:
                            timeout = max(0.0, (entry.deadline - time.monotonic_ns()) / 1e9)
                        self._wake.wait(timeout)
                        continue
                    if entry.deadline is not None:
                        deadline = hv.deadline_after_ns(
                            max(0, entry.deadline - time.monotonic_ns())
                        )
                hv.hv_vcpu_run_until(vcpu, deadline)
                reason = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)
                if reason in slice_over:
                    vmxsetup.reinject_event(vcpu)  # a kick can land during event delivery
                    continue  # a kick, a poke or a device deadline: the loop head decides
                stop = handler(vcpu)
                if stop is not None:
                    return stop
        except hv.HvError as exc:
            return Stop("fault", signal=6, message=str(exc))
        except Exception as exc:  # a bug in an exit handler must not kill the thread
            return Stop("fault", signal=6, message=f"exit handler failed: {exc!r}")
