"""Progress on stderr for steps that can take a while (loading a large kernel and its symbols).

``with Progress("loading vmlinux (650 MB)"):`` prints nothing when the step is quick; past one
second it prints the step once, and at the end how long it took, so a user with a kernel of
hundreds of megabytes of debug information knows the stub is working.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """A context manager that reports a slow step (see the module docstring)."""

    def __init__(self, what: str, *, after: float = 1.0, stream: TextIO | None = None) -> None:
        self.what = what
        self.after = after
        self.stream = stream if stream is not None else sys.stderr
        self._done = threading.Event()
        self._shown = False
        self._lock = threading.Lock()
        self._start = 0.0
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        if not self._done.wait(self.after):
            with self._lock:
                if not self._done.is_set():
                    self._shown = True
                    print(f"gdbstub: {self.what}...", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._done.set()
            shown = self._shown
        if shown and exc_type is None:
            elapsed = time.monotonic() - self._start
            print(f"gdbstub: {self.what}: done in {elapsed:.1f} s", file=self.stream, flush=True)
