"""The vCPU worker: one thread that owns one ``gdbstub.hv`` vCPU.

Theory of operation
-------------------
The framework binds a vCPU to the thread that created it, so every vCPU gets a worker thread
that creates it and then serves two kinds of requests from a queue:

* ``call(fn)``: run ``fn(vcpu)`` on the owner thread while the vCPU is paused (register,
  fpstate, MSR and VMCS access) and hand back the result or exception;
* ``resume(handler, prepare=...)``: run the guest. The worker calls ``prepare(vcpu)`` (the
  run's settings), loops ``hv_vcpu_run_until(FOREVER)`` and passes every exit to
  ``handler(vcpu)``, which returns None to keep running or a ``Stop`` to end the run. The stop
  is delivered through ``on_stop``.

``kick()`` is the only cross-thread operation: it raises the stop flag, which the worker checks
before every entry, and calls ``hv_vcpu_interrupt``. A kicked run ends with
``Stop(kind="interrupted")``; a kick that lands between runs is harmless (the next run returns
at once with exit 1, and the loop simply enters again unless a stop was requested).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import hv

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


ExitHandler = Callable[[int], "Stop | None"]


class _Call:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[int], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Resume:
    __slots__ = ("handler", "parked", "prepare")

    def __init__(
        self,
        handler: ExitHandler,
        parked: Callable[[], bool] | None,
        prepare: Callable[[int], None] | None,
    ) -> None:
        self.handler = handler
        self.parked = parked
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
        parked: Callable[[], bool] | None = None,
        prepare: Callable[[int], None] | None = None,
    ) -> None:
        """Start running the guest; the run's ``Stop`` arrives through ``on_stop``.

        ``prepare(vcpu)`` runs on the owner thread before the first entry (settings for this
        run, without a round trip through ``call``); an HvError there ends the run as a fault.
        While ``parked()`` is true (a vCPU halted with nothing to wake it) the worker does not
        enter the guest: it waits for a kick, as a halted CPU waits for an interrupt.
        """
        self._stop_requested.clear()
        self.running = True
        self._inbox.put(_Resume(handler, parked, prepare))

    def kick(self) -> None:
        """Ask a running vCPU to stop (the one cross-thread call: ``hv_vcpu_interrupt``)."""
        self._stop_requested.set()
        if self.vcpu >= 0:
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
                stop = self._run(item.handler, item.parked, item.prepare)
                self.running = False
                self._on_stop(self, stop)
        try:
            hv.hv_vcpu_destroy(self.vcpu)
        except hv.HvError:
            pass

    def _run(
        self,
        handler: ExitHandler,
        parked: Callable[[], bool] | None,
        prepare: Callable[[int], None] | None,
    ) -> Stop:
        try:
            if prepare is not None:
                prepare(self.vcpu)
            while True:
                if parked is not None and parked():
                    self._stop_requested.wait()
                if self._stop_requested.is_set():
                    return Stop("interrupted", signal=2)
                hv.hv_vcpu_run_until(self.vcpu, hv.HV_DEADLINE_FOREVER)
                reason = hv.hv_vmx_vcpu_read_vmcs(self.vcpu, hv.VMCS_RO_EXIT_REASON)
                if reason == hv.VMX_REASON_IRQ:
                    continue  # a kick: the loop head decides whether to stop
                stop = handler(self.vcpu)
                if stop is not None:
                    return stop
        except hv.HvError as exc:
            return Stop("fault", signal=6, message=str(exc))
        except Exception as exc:  # a bug in an exit handler must not kill the thread
            return Stop("fault", signal=6, message=f"exit handler failed: {exc!r}")
