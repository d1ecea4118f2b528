"""The i8042 keyboard controller with a PS/2 keyboard and mouse behind it (no VM calls).

Theory of operation
-------------------
Port 0x64 reads the status register and takes controller commands; port 0x60 reads the output
buffer and takes data (the argument of a pending controller command, else a byte for the
keyboard).  The controller's one-byte output buffer is fed from three queues, in this order:
controller replies (command answers, 0xD2/0xD3 echoes), the keyboard's bytes (while the keyboard
port is enabled, configuration bit 4 clear) and the mouse's bytes (while the aux port is enabled,
bit 5 clear).  Bytes from a disabled port wait in its queue.  The input buffer is never busy:
every write is handled at once, so IBF reads 0.

IRQ1 is high while the output buffer holds a keyboard-side byte and configuration bit 0 is set;
IRQ12 likewise for an aux byte and bit 1.  Reading port 0x60 takes the byte out and loads the
next one, so each byte is a fresh rising edge.

The keyboard and the mouse answer the commands Linux's atkbd and psmouse probes send (reset,
identify, enable/disable, LEDs, scancode set, typematic, echo; for the mouse sample rate,
resolution, scaling, status) with the minimal well-formed replies, so probes finish quickly.
:meth:`I8042.feed_scancodes` queues keyboard bytes exactly as the guest is to read them.

A reset (command 0xFE or any 0xF0-0xFF command pulsing output line 0, or an output-port write
with bit 0 clear) calls ``on_reset`` or raises :class:`GuestReset`.  Output-port bit 1 is A20.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from ..bus import GuestReset, size_mask
from ..firmware.layout import I8042_CMD, I8042_DATA

Line = Callable[[bool], None]

# status register
STAT_OBF, STAT_IBF, STAT_SYS, STAT_CMD, STAT_UNLOCKED, STAT_AUX_OBF = 1, 2, 4, 8, 0x10, 0x20
# configuration byte ("command byte")
CFG_KBD_INT, CFG_AUX_INT, CFG_SYS, CFG_KBD_DIS, CFG_AUX_DIS, CFG_XLATE = 1, 2, 4, 0x10, 0x20, 0x40
# output port
OUT_RESET, OUT_A20, OUT_KBD_OBF, OUT_AUX_OBF = 1, 2, 0x10, 0x20
OUT_ONES = 0xCC  # keyboard/aux clock and data lines, idle high

ACK, RESEND, BAT_OK, ECHO = 0xFA, 0xFE, 0xAA, 0xEE

# controller commands that take a data byte on port 0x60
_WITH_ARG = {0x60, 0xD1, 0xD2, 0xD3, 0xD4}


class _Keyboard:
    """A PS/2 keyboard: answers commands, queues scan codes while scanning is enabled."""

    def __init__(self) -> None:
        self.out: deque[int] = deque()
        self.scanning = True
        self.scancode_set = 2
        self.leds = 0
        self.typematic = 0x2B
        self._pending: int | None = None  # a command waiting for its argument

    def reset(self) -> None:
        self.scanning = True
        self.scancode_set = 2
        self.leds = 0
        self.typematic = 0x2B
        self._pending = None

    def command(self, value: int, translated: bool) -> None:
        if self._pending is not None:
            cmd, self._pending = self._pending, None
            if cmd == 0xED:
                self.leds = value & 7
            elif cmd == 0xF3:
                self.typematic = value & 0x7F
            elif cmd == 0xF0:
                if value == 0:
                    current = self.scancode_set
                    self.out.extend(
                        (ACK, {1: 0x43, 2: 0x41, 3: 0x3F}[current] if translated else current)
                    )
                    return
                if value in (1, 2, 3):
                    self.scancode_set = value
            self.out.append(ACK)
            return
        if value in (0xED, 0xF0, 0xF3):
            self._pending = value
            self.out.append(ACK)
        elif value == 0xEE:
            self.out.append(ECHO)
        elif value == 0xF2:
            self.out.extend((ACK, 0xAB, 0x41 if translated else 0x83))
        elif value == 0xF4:
            self.scanning = True
            self.out.append(ACK)
        elif value == 0xF5:
            self.reset()
            self.scanning = False
            self.out.append(ACK)
        elif value == 0xF6:
            self.reset()
            self.out.append(ACK)
        elif 0xF7 <= value <= 0xFD:  # scan code set 3 key modes
            self.out.append(ACK)
        elif value == 0xFF:
            self.reset()
            self.out.clear()
            self.out.extend((ACK, BAT_OK))
        else:
            self.out.append(RESEND)


class _Mouse:
    """A PS/2 mouse (plain 3-byte protocol, ID 0) that never moves."""

    def __init__(self) -> None:
        self.out: deque[int] = deque()
        self.reset()
        self._pending: int | None = None

    def reset(self) -> None:
        self.reporting = False
        self.remote = False
        self.scaling21 = False
        self.resolution = 2
        self.sample_rate = 100
        self._pending = None

    def command(self, value: int) -> None:
        if self._pending is not None:
            cmd, self._pending = self._pending, None
            if cmd == 0xE8:
                self.resolution = value & 3
            elif cmd == 0xF3:
                self.sample_rate = value
            self.out.append(ACK)
            return
        if value in (0xE8, 0xF3):
            self._pending = value
            self.out.append(ACK)
        elif value in (0xE6, 0xE7):
            self.scaling21 = value == 0xE7
            self.out.append(ACK)
        elif value == 0xE9:
            status = (
                (0x40 if self.remote else 0)
                | (0x20 if self.reporting else 0)
                | (0x10 if self.scaling21 else 0)
            )
            self.out.extend((ACK, status, self.resolution, self.sample_rate))
        elif value in (0xEA, 0xF0):
            self.remote = value == 0xF0
            self.out.append(ACK)
        elif value == 0xEB:
            self.out.extend((ACK, 0x08, 0x00, 0x00))  # no buttons, no motion
        elif value in (0xEC, 0xEE):
            self.out.append(ACK)  # wrap mode is accepted but not emulated
        elif value == 0xF2:
            self.out.extend((ACK, 0x00))
        elif value in (0xF4, 0xF5):
            self.reporting = value == 0xF4
            self.out.append(ACK)
        elif value == 0xF6:
            self.reset()
            self.out.append(ACK)
        elif value == 0xFF:
            self.reset()
            self.out.clear()
            self.out.extend((ACK, BAT_OK, 0x00))
        else:
            self.out.append(RESEND)


class I8042:
    """The PC keyboard controller at 0x60 (data) and 0x64 (status/command)."""

    def __init__(
        self, irq1: Line, irq12: Line, *, on_reset: Callable[[], None] | None = None
    ) -> None:
        self._irq1 = irq1
        self._irq12 = irq12
        self.on_reset = on_reset
        self._lock = threading.Lock()
        # as left by a BIOS: self-test passed, keyboard interrupt and translation on, aux off
        self.config = CFG_KBD_INT | CFG_SYS | CFG_AUX_DIS | CFG_XLATE
        self.ram = bytearray(32)  # controller RAM 0x01-0x1F (0x00 is the configuration byte)
        self.outport = OUT_ONES | OUT_RESET | OUT_A20
        self._last_was_command = False
        self._pending_cmd: int | None = None  # controller command waiting for its data byte
        self._replies: deque[tuple[int, bool]] = deque()  # (byte, from aux)
        self._obf: tuple[int, bool] | None = None  # the output buffer
        self.kbd = _Keyboard()
        self.mouse = _Mouse()
        self._last_byte = 0
        self._irq1_level = False
        self._irq12_level = False
        self._lines_fall = False
        self.resets = 0

    # -- public
    @property
    def a20(self) -> bool:
        """Output port bit 1: the A20 gate."""
        return bool(self.outport & OUT_A20)

    def feed_scancodes(self, data: bytes) -> None:
        """Queue keyboard bytes (as the guest reads them) if the keyboard is scanning."""
        with self._lock:
            if not self.kbd.scanning:
                return
            self.kbd.out.extend(data)
            self._refill()
        self._update_lines()

    def status(self) -> int:
        """The status register (port 0x64) without side effects."""
        with self._lock:
            return self._status()

    # -- port I/O
    def read(self, port: int, size: int) -> int:
        """``in`` from port 0x60 (output buffer) or 0x64 (status); higher bytes all ones."""
        high = size_mask(size) & ~0xFF
        with self._lock:
            if port == I8042_CMD:
                return high | self._status()
            if port != I8042_DATA:
                return size_mask(size)
            value = self._pop()
        self._update_lines()
        return high | value

    def write(self, port: int, size: int, value: int) -> None:
        """``out`` to port 0x60 (data) or 0x64 (command); the low byte counts."""
        value &= 0xFF
        reset = False
        with self._lock:
            if port == I8042_CMD:
                self._last_was_command = True
                reset = self._command(value)
            elif port == I8042_DATA:
                self._last_was_command = False
                reset = self._data(value)
            self._refill()
        self._update_lines()
        if reset:
            self._reset_system()

    # -- internals (called with the lock held)
    def _status(self) -> int:
        status = STAT_UNLOCKED | (self.config & CFG_SYS)
        if self._last_was_command:
            status |= STAT_CMD
        if self._obf is not None:
            status |= STAT_OBF | (STAT_AUX_OBF if self._obf[1] else 0)
        return status

    def _pop(self) -> int:
        if self._obf is None:
            return self._last_byte  # an empty buffer reads the last byte again
        value = self._obf[0]
        self._obf = None
        self._lines_fall = True  # the next byte makes a fresh rising edge
        self._refill()
        return value

    def _refill(self) -> None:
        if self._obf is None:
            if self._replies:
                self._obf = self._replies.popleft()
            elif self.kbd.out and not self.config & CFG_KBD_DIS:
                self._obf = (self.kbd.out.popleft(), False)
            elif self.mouse.out and not self.config & CFG_AUX_DIS:
                self._obf = (self.mouse.out.popleft(), True)
            if self._obf is not None:
                self._last_byte = self._obf[0]

    def _reply(self, value: int, aux: bool = False) -> None:
        self._replies.append((value & 0xFF, aux))

    def _command(self, cmd: int) -> bool:
        """A controller command; True if it resets the machine."""
        self._pending_cmd = None
        if cmd == 0x20 or 0x21 <= cmd <= 0x3F:
            self._reply(self.config if cmd == 0x20 else self.ram[cmd & 0x1F])
        elif cmd in _WITH_ARG or 0x61 <= cmd <= 0x7F:
            self._pending_cmd = cmd
        elif cmd == 0xA7:
            self.config |= CFG_AUX_DIS
        elif cmd == 0xA8:
            self.config &= ~CFG_AUX_DIS
        elif cmd == 0xA9 or cmd == 0xAB:
            self._reply(0x00)  # interface test passed
        elif cmd == 0xAA:
            self.config |= CFG_SYS
            self._reply(0x55)
        elif cmd == 0xAD:
            self.config |= CFG_KBD_DIS
        elif cmd == 0xAE:
            self.config &= ~CFG_KBD_DIS
        elif cmd == 0xC0:
            self._reply(0x80)  # input port: keyboard not inhibited
        elif cmd == 0xD0:
            out = self.outport & ~(OUT_KBD_OBF | OUT_AUX_OBF)
            if self._obf is not None:
                out |= OUT_AUX_OBF if self._obf[1] else OUT_KBD_OBF
            self._reply(out)
        elif cmd == 0xDD:
            self.outport &= ~OUT_A20
        elif cmd == 0xDF:
            self.outport |= OUT_A20
        elif cmd >= 0xF0:
            return not cmd & 1  # pulse output lines: line 0 is the reset
        return False

    def _data(self, value: int) -> bool:
        """A byte written to port 0x60; True if it resets the machine."""
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd is None:
            self.config &= ~CFG_KBD_DIS  # talking to the keyboard enables its port
            self.kbd.command(value, bool(self.config & CFG_XLATE))
        elif cmd == 0x60:
            self.config = value & 0x77
        elif 0x61 <= cmd <= 0x7F:
            self.ram[cmd & 0x1F] = value
        elif cmd == 0xD1:
            self.outport = value | OUT_RESET  # bit 0 clear resets; the line comes back up
            return not value & OUT_RESET
        elif cmd == 0xD2:
            self._reply(value)
        elif cmd == 0xD3:
            self._reply(value, aux=True)
        elif cmd == 0xD4:
            self.config &= ~CFG_AUX_DIS  # talking to the mouse enables its port
            self.mouse.command(value)
        return False

    def _reset_system(self) -> None:
        self.resets += 1
        if self.on_reset is not None:
            self.on_reset()
        else:
            raise GuestReset("i8042")

    # -- interrupt lines (called without the lock)
    def _update_lines(self) -> None:
        changes: list[tuple[Line, bool]] = []
        with self._lock:
            obf = self._obf
            level1 = obf is not None and not obf[1] and bool(self.config & CFG_KBD_INT)
            level12 = obf is not None and obf[1] and bool(self.config & CFG_AUX_INT)
            fall, self._lines_fall = self._lines_fall, False
            if fall and self._irq1_level:
                changes.append((self._irq1, False))
                self._irq1_level = False
            if fall and self._irq12_level:
                changes.append((self._irq12, False))
                self._irq12_level = False
            if level1 != self._irq1_level:
                changes.append((self._irq1, level1))
                self._irq1_level = level1
            if level12 != self._irq12_level:
                changes.append((self._irq12, level12))
                self._irq12_level = level12
        for line, level in changes:
            line(level)

    def describe(self) -> str:
        """A few lines of state for ``monitor info irq``."""
        with self._lock:
            status = self._status()
            obf = (
                "empty"
                if self._obf is None
                else f"{self._obf[0]:#04x}{' aux' if self._obf[1] else ''}"
            )
            return (
                f"i8042: status={status:#04x} config={self.config:#04x} "
                f"outport={self.outport:#04x} (A20 {'on' if self.outport & OUT_A20 else 'off'}) "
                f"output buffer {obf}, queued kbd {len(self.kbd.out)} aux {len(self.mouse.out)}"
                f" replies {len(self._replies)}\n"
                f"i8042: IRQ1 {'high' if self._irq1_level else 'low'}, "
                f"IRQ12 {'high' if self._irq12_level else 'low'}, keyboard "
                f"{'scanning' if self.kbd.scanning else 'disabled'} set {self.kbd.scancode_set}, "
                f"mouse {'reporting' if self.mouse.reporting else 'idle'}, resets {self.resets}"
            )
