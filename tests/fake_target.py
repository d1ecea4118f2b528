"""An in-memory ``Target`` for protocol tests: a bytearray of memory and a register dict.

It does not execute anything. ``resume`` only records what it was asked; a test then injects
the stop it wants with ``post_stop`` (which makes ``wake_fd`` readable, as a real target does).
"""

from __future__ import annotations

import os

from gdbstub.target import NotSupported, ResumeAction, StopEvent, TargetError

REG_WIDTHS = [8] * 16 + [8, 4]  # rax..r15, rip (16), eflags (17)
PC = 16
MEMORY_BASE = 0x1000

TARGET_XML = (
    b'<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
    b"<target><architecture>i386:x86-64</architecture>"
    b'<xi:include href="fake-core.xml"/></target>\n'
)


class FakeTarget:
    """Implements ``gdbstub.target.Target`` over plain Python data."""

    def __init__(
        self,
        threads: int = 2,
        memory_size: int = 0x1000,
        caps: frozenset[str] = frozenset({"swbreak", "hwbreak", "watch", "step"}),
    ) -> None:
        self.threads = list(range(1, threads + 1))
        self.memory = bytearray(range(256)) * (memory_size // 256)
        self.regs: dict[int, list[int]] = {t: [0] * len(REG_WIDTHS) for t in self.threads}
        for t in self.threads:
            self.regs[t][PC] = 0x1000 + t
        self.caps = caps
        self.calls: list[tuple[object, ...]] = []
        self.breakpoints: set[tuple[int, int, int]] = set()
        self.physical = False
        self._stops: list[StopEvent] = []
        self._last = StopEvent(thread=1, signal=5)
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self.monitor_output = "hello\n"
        self.xml: dict[str, bytes] = {"target.xml": TARGET_XML}
        self.stop_on_interrupt = False  # post a SIGINT stop when interrupted (server tests)

    # --- test helpers -------------------------------------------------------------------

    def post_stop(self, stop: StopEvent) -> None:
        """Queue a stop as a real target would after running; wakes ``wake_fd``."""
        self._stops.append(stop)
        os.write(self._wfd, b"!")

    def close(self) -> None:
        """Release the wake-up pipe."""
        os.close(self._rfd)
        os.close(self._wfd)

    # --- Target --------------------------------------------------------------------------

    @property
    def wake_fd(self) -> int:
        return self._rfd

    def thread_ids(self) -> list[int]:
        return list(self.threads)

    def thread_extra_info(self, tid: int) -> str:
        return f"vCPU {tid - 1}"

    def target_xml(self, annex: str) -> bytes | None:
        return self.xml.get(annex)

    def pc_regnum(self) -> int:
        return PC

    def _check(self, tid: int) -> list[int]:
        if tid not in self.regs:
            raise TargetError(0x01, f"no thread {tid}")
        return self.regs[tid]

    def read_registers(self, tid: int) -> bytes:
        regs = self._check(tid)
        return b"".join(v.to_bytes(w, "little") for v, w in zip(regs, REG_WIDTHS, strict=True))

    def write_registers(self, tid: int, data: bytes) -> None:
        regs = self._check(tid)
        if len(data) != sum(REG_WIDTHS):
            raise TargetError(0x01, "bad g blob length")
        offset = 0
        for i, width in enumerate(REG_WIDTHS):
            regs[i] = int.from_bytes(data[offset : offset + width], "little")
            offset += width

    def read_register(self, tid: int, regnum: int) -> bytes:
        regs = self._check(tid)
        if not 0 <= regnum < len(REG_WIDTHS):
            raise TargetError(0x01, "no such register")
        return regs[regnum].to_bytes(REG_WIDTHS[regnum], "little")

    def write_register(self, tid: int, regnum: int, data: bytes) -> None:
        regs = self._check(tid)
        if not 0 <= regnum < len(REG_WIDTHS) or len(data) != REG_WIDTHS[regnum]:
            raise TargetError(0x01, "bad register write")
        regs[regnum] = int.from_bytes(data, "little")

    def read_memory(self, tid: int, addr: int, length: int) -> bytes:
        start = addr - MEMORY_BASE
        if not 0 <= start < len(self.memory):
            raise TargetError.bad_address(addr)
        return bytes(self.memory[start : start + length])

    def write_memory(self, tid: int, addr: int, data: bytes) -> None:
        start = addr - MEMORY_BASE
        if not (start >= 0 and start + len(data) <= len(self.memory)):
            raise TargetError.bad_address(addr)
        self.memory[start : start + len(data)] = data

    def resume(self, actions: dict[int, ResumeAction], default: ResumeAction | None) -> None:
        self.calls.append(("resume", dict(actions), default))

    def interrupt(self) -> None:
        self.calls.append(("interrupt",))
        if self.stop_on_interrupt:
            self.post_stop(StopEvent(thread=1, signal=2))

    def take_stop(self) -> StopEvent | None:
        if not self._stops:
            return None
        os.read(self._rfd, 1)
        stop = self._stops.pop(0)
        self._last = stop
        return stop

    def last_stop(self) -> StopEvent:
        return self._last

    def insert_breakpoint(self, kind: int, addr: int, length: int) -> None:
        if kind == 4:
            raise NotSupported
        self.breakpoints.add((kind, addr, length))

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> None:
        if (kind, addr, length) not in self.breakpoints:
            raise TargetError(0x01, "no such breakpoint")
        self.breakpoints.remove((kind, addr, length))

    def monitor(self, command: str) -> str:
        self.calls.append(("monitor", command))
        if command == "fail":
            raise TargetError(0x02, "monitor failed")
        return self.monitor_output

    def set_physical_memory_mode(self, on: bool) -> None:
        self.physical = on

    def set_step_flags(self, flags: int) -> None:
        self.sstep = flags

    def step_flags(self) -> int:
        return getattr(self, "sstep", 0x7)

    def detach(self) -> None:
        self.calls.append(("detach",))
        self.breakpoints.clear()

    def kill(self) -> None:
        self.calls.append(("kill",))

    def capabilities(self) -> frozenset[str]:
        return self.caps

    def host_info(self) -> dict[str, str]:
        return {"hostname": "fake"}
