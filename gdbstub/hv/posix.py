"""POSIX pieces the KVM backend needs and Python's stdlib lacks: raw ioctl and per-thread timers.

* ``ioctl(fd, request, arg)`` calls libc directly so that EINTR comes back to us instead of
  being retried (PEP 475 would retry and lose a kick).
* ``ThreadTimer`` is a ``timer_create(CLOCK_MONOTONIC, SIGEV_THREAD_ID)`` timer that sends a
  signal to one thread at an absolute deadline: the KVM backend's deadline for
  ``hv_vcpu_run_until``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

CLOCK_MONOTONIC = 1
TIMER_ABSTIME = 1
SIGEV_THREAD_ID = 4


# The same libc function without argtypes: the run loop's KVM_RUN (two ints and NULL) skips
# ctypes' argument conversion, about a microsecond per call. Returns -1 with errno set.
_plain_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
ioctl_plain: Any = _plain_libc.ioctl
"""``ioctl(fd, request, None)`` as libc returns it (-1 and ``ctypes.get_errno()`` on failure)."""


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """``ioctl(2)``; ``arg`` is None, an int, or a ctypes object passed by reference.

    Returns the (non-negative) result; raises OSError with errno on failure, EINTR included.
    """
    if arg is None:
        pointer: Any = None
    elif isinstance(arg, int):
        pointer = ctypes.c_void_p(arg)
    else:
        pointer = ctypes.byref(arg)
    result: int = _libc.ioctl(fd, request, pointer)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_notify_thread_id", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


_libc.timer_create.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Sigevent),
    ctypes.POINTER(ctypes.c_void_p),
]
_libc.timer_settime.argtypes = [
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.POINTER(_Itimerspec),
    ctypes.POINTER(_Itimerspec),
]
_libc.timer_delete.argtypes = [ctypes.c_void_p]


class ThreadTimer:
    """A one-shot CLOCK_MONOTONIC timer that sends ``signo`` to the calling thread."""

    def __init__(self, signo: int) -> None:
        event = _Sigevent()
        event.sigev_signo = signo
        event.sigev_notify = SIGEV_THREAD_ID
        event.sigev_notify_thread_id = threading.get_native_id()
        self._timer = ctypes.c_void_p()
        if _libc.timer_create(CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._timer)):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._armed = False

    def arm(self, deadline_ns: int) -> None:
        """Fire at the absolute CLOCK_MONOTONIC time ``deadline_ns``."""
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(max(deadline_ns, 1), 1_000_000_000)
        _libc.timer_settime(self._timer, TIMER_ABSTIME, ctypes.byref(spec), None)
        self._armed = True

    def disarm(self) -> None:
        """Cancel the pending expiry, if any."""
        if self._armed:
            _libc.timer_settime(self._timer, 0, ctypes.byref(_Itimerspec()), None)
            self._armed = False

    def close(self) -> None:
        """Delete the timer."""
        if self._timer:
            _libc.timer_delete(self._timer)
            self._timer = ctypes.c_void_p()
