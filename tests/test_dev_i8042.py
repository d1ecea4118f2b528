"""Tests for the i8042 keyboard controller (gdbstub.machine.devices.i8042)."""

from __future__ import annotations

import pytest

from gdbstub.machine.bus import GuestReset
from gdbstub.machine.devices.i8042 import I8042

DATA, CMD = 0x60, 0x64
OBF, IBF, SYS, AUXDATA = 0x01, 0x02, 0x04, 0x20


class Line:
    def __init__(self) -> None:
        self.levels: list[bool] = []
        self.level = False

    def __call__(self, level: bool) -> None:
        self.levels.append(level)
        self.level = level

    @property
    def rising(self) -> int:
        prev, n = False, 0
        for v in self.levels:
            n += v and not prev
            prev = v
        return n


def make(**kw: object) -> tuple[I8042, Line, Line]:
    irq1, irq12 = Line(), Line()
    return I8042(irq1, irq12, **kw), irq1, irq12  # type: ignore[arg-type]


def status(kbc: I8042) -> int:
    return kbc.read(CMD, 1)


def command(kbc: I8042, cmd: int, params: bytes = b"", replies: int = 0) -> list[int]:
    """What Linux's __i8042_command does: command, parameters, then poll for replies."""
    assert not status(kbc) & IBF
    kbc.write(CMD, 1, cmd)
    for p in params:
        assert not status(kbc) & IBF
        kbc.write(DATA, 1, p)
    out = []
    for _ in range(replies):
        assert status(kbc) & OBF
        out.append(kbc.read(DATA, 1))
    return out


def drain(kbc: I8042) -> list[tuple[int, bool]]:
    got = []
    while status(kbc) & OBF:
        aux = bool(status(kbc) & AUXDATA)
        got.append((kbc.read(DATA, 1), aux))
    return got


def test_power_on_state() -> None:
    kbc, irq1, irq12 = make()
    assert status(kbc) & (OBF | IBF) == 0
    assert status(kbc) & SYS
    assert kbc.a20
    assert irq1.levels == [] and irq12.levels == []


def test_linux_probe_sequence() -> None:
    kbc, irq1, irq12 = make()
    assert drain(kbc) == []  # i8042_flush
    assert command(kbc, 0xAA, replies=1) == [0x55]  # i8042_controller_selftest
    assert status(kbc) & SYS
    ctr = command(kbc, 0x20, replies=1)[0]  # i8042_controller_init reads CTR twice
    assert command(kbc, 0x20, replies=1) == [ctr]
    ctr &= ~0x03  # no interrupts during the probe
    ctr &= ~0x10
    command(kbc, 0x60, bytes([ctr]))
    assert command(kbc, 0x20, replies=1) == [ctr]
    kbd_edges = irq1.rising  # the replies before this raised IRQ1 (KBDINT was on)
    assert kbd_edges == 3
    # i8042_check_aux: the loopback must come back flagged as AUX data
    kbc.write(CMD, 1, 0xD3)
    kbc.write(DATA, 1, 0x5A)
    assert status(kbc) & (OBF | AUXDATA) == OBF | AUXDATA
    assert kbc.read(DATA, 1) == 0x5A
    # i8042_toggle_aux
    command(kbc, 0xA7)
    assert command(kbc, 0x20, replies=1)[0] & 0x20
    command(kbc, 0xA8)
    assert not command(kbc, 0x20, replies=1)[0] & 0x20
    # the AUX IRQ test: AUXINT on, a loopback byte raises IRQ12
    ctr = command(kbc, 0x20, replies=1)[0] | 0x02
    command(kbc, 0x60, bytes([ctr]))
    before = irq12.rising
    command(kbc, 0xD3, b"\xa5")
    assert irq12.rising == before + 1 and irq12.level
    assert kbc.read(DATA, 1) == 0xA5
    assert not irq12.level
    assert command(kbc, 0xA9, replies=1) == [0x00]  # aux interface test
    assert command(kbc, 0xAB, replies=1) == [0x00]  # keyboard interface test
    assert irq1.rising == kbd_edges  # KBDINT was off since


def test_config_byte_and_controller_ram() -> None:
    kbc, _, _ = make()
    command(kbc, 0x60, b"\x47")
    assert command(kbc, 0x20, replies=1) == [0x47]
    assert status(kbc) & SYS
    command(kbc, 0x60, b"\x40")
    assert not status(kbc) & SYS  # the status SYS flag is configuration bit 2
    command(kbc, 0x65, b"\x3c")
    assert command(kbc, 0x25, replies=1) == [0x3C]
    command(kbc, 0xAD)
    assert command(kbc, 0x20, replies=1) == [0x50]
    command(kbc, 0xAE)
    assert command(kbc, 0x20, replies=1) == [0x40]


def test_controller_replies_raise_irq1_when_enabled() -> None:
    kbc, irq1, _ = make()
    command(kbc, 0x60, b"\x01")
    command(kbc, 0x20)
    assert irq1.level
    assert kbc.read(DATA, 1) == 0x01
    assert not irq1.level


def test_reset_via_fe_raises() -> None:
    kbc, _, _ = make()
    with pytest.raises(GuestReset) as info:
        kbc.write(CMD, 1, 0xFE)
    assert info.value.how == "i8042"


def test_reset_callbacks_pulse_lines_and_output_port() -> None:
    resets: list[bool] = []
    kbc, _, _ = make(on_reset=lambda: resets.append(True))
    kbc.write(CMD, 1, 0xFF)  # pulse nothing
    kbc.write(CMD, 1, 0xF1)  # line 0 stays high
    assert resets == []
    kbc.write(CMD, 1, 0xFE)
    assert len(resets) == 1
    out = command(kbc, 0xD0, replies=1)[0]
    assert out & 0x03 == 0x03  # reset line high, A20 on
    command(kbc, 0xD1, bytes([out & ~0x02]))  # A20 off, no reset
    assert not kbc.a20 and len(resets) == 1
    command(kbc, 0xD1, bytes([out | 0x02]))
    assert kbc.a20
    command(kbc, 0xD1, bytes([out & ~0x01]))  # bit 0 clear: reset
    assert len(resets) == 2
    assert command(kbc, 0xD0, replies=1)[0] & 0x01


def test_reset_via_output_port_raises() -> None:
    kbc, _, _ = make()
    kbc.write(CMD, 1, 0xD1)
    with pytest.raises(GuestReset):
        kbc.write(DATA, 1, 0xFE)


def test_keyboard_reset_identify_and_friends() -> None:
    kbc, irq1, _ = make()
    command(kbc, 0x60, b"\x45")  # KBDINT, SYS, XLATE
    kbc.write(DATA, 1, 0xFF)
    assert irq1.level
    assert drain(kbc) == [(0xFA, False), (0xAA, False)]
    kbc.write(DATA, 1, 0xF2)
    assert drain(kbc) == [(0xFA, False), (0xAB, False), (0x41, False)]  # translated ID
    command(kbc, 0x60, b"\x05")  # no translation
    kbc.write(DATA, 1, 0xF2)
    assert [b for b, _ in drain(kbc)] == [0xFA, 0xAB, 0x83]
    for cmd, arg in ((0xED, 0x07), (0xF3, 0x20), (0xF0, 0x02)):
        kbc.write(DATA, 1, cmd)
        kbc.write(DATA, 1, arg)
        assert [b for b, _ in drain(kbc)] == [0xFA, 0xFA]
    kbc.write(DATA, 1, 0xF0)
    kbc.write(DATA, 1, 0x00)
    assert [b for b, _ in drain(kbc)] == [0xFA, 0xFA, 0x02]
    kbc.write(DATA, 1, 0xEE)
    assert [b for b, _ in drain(kbc)] == [0xEE]
    kbc.write(DATA, 1, 0xF5)
    kbc.write(DATA, 1, 0xF4)
    assert [b for b, _ in drain(kbc)] == [0xFA, 0xFA]
    kbc.write(DATA, 1, 0x12)  # not a command
    assert [b for b, _ in drain(kbc)] == [0xFE]
    # every byte was its own rising edge on IRQ1
    assert irq1.rising == 2 + 3 + 3 + 6 + 3 + 1 + 2 + 1


def test_keyboard_write_reenables_its_port() -> None:
    kbc, _, _ = make()
    command(kbc, 0xAD)
    kbc.write(DATA, 1, 0xF4)
    assert not command(kbc, 0x20, replies=2)[1] & 0x10  # ACK first, then the CTR
    assert drain(kbc) == []


def test_aux_device_present() -> None:
    kbc, irq1, irq12 = make()
    command(kbc, 0x60, b"\x47")  # both interrupts, aux enabled
    for cmd, expect in (
        (0xFF, [0xFA, 0xAA, 0x00]),
        (0xF2, [0xFA, 0x00]),
        (0xF6, [0xFA]),
        (0xE6, [0xFA]),
        (0xF4, [0xFA]),
        (0xE9, [0xFA, 0x20, 0x02, 100]),
        (0xF5, [0xFA]),
        (0x42, [0xFE]),
    ):
        command(kbc, 0xD4, bytes([cmd]))
        got = drain(kbc)
        assert [b for b, _ in got] == expect, hex(cmd)
        assert all(aux for _, aux in got)
    command(kbc, 0xD4, b"\xf3")
    command(kbc, 0xD4, b"\xc8")  # sample rate 200
    assert drain(kbc) == [(0xFA, True), (0xFA, True)]
    assert irq12.rising == 3 + 2 + 1 + 1 + 1 + 4 + 1 + 1 + 2
    assert irq1.rising == 0


def test_disabled_port_holds_its_bytes() -> None:
    kbc, irq1, _ = make()
    command(kbc, 0xAD)
    kbc.feed_scancodes(b"\x1c\x9c")
    assert not status(kbc) & OBF
    assert not irq1.level
    command(kbc, 0xAE)
    assert irq1.level
    assert drain(kbc) == [(0x1C, False), (0x9C, False)]
    assert irq1.rising == 2


def test_feed_scancodes_dropped_while_keyboard_disabled() -> None:
    kbc, _, _ = make()
    kbc.write(DATA, 1, 0xF5)
    drain(kbc)
    kbc.feed_scancodes(b"\x1e")
    assert drain(kbc) == []
    kbc.write(DATA, 1, 0xF4)
    drain(kbc)
    kbc.feed_scancodes(b"\x1e")
    assert drain(kbc) == [(0x1E, False)]


def test_d2_writes_keyboard_output_and_input_port() -> None:
    kbc, _, _ = make()
    command(kbc, 0xD2, b"\x55")
    assert drain(kbc) == [(0x55, False)]
    assert command(kbc, 0xC0, replies=1)[0] & 0x80
    assert "i8042" in kbc.describe()
