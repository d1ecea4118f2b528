"""Tests for gdbstub.machine.devices: the 16550 UART, debug exit, debugcon and the port bus."""

from __future__ import annotations

import logging

import pytest

from gdbstub.machine.bus import GuestExit, PortBus
from gdbstub.machine.devices.debugport import DebugCon, DebugExit
from gdbstub.machine.devices.uart import Uart16550
from gdbstub.machine.platform import standard_bus

COM1 = 0x3F8


def make_uart() -> tuple[Uart16550, list[bytes]]:
    out: list[bytes] = []
    return Uart16550(out.append), out


def test_uart_transmit_and_lsr() -> None:
    uart, out = make_uart()
    for ch in b"hi\n":
        assert uart.read(COM1 + 5, 1) & 0x60 == 0x60  # THRE | TEMT always
        uart.write(COM1, 1, ch)
    assert b"".join(out) == b"hi\n"
    assert uart.read(COM1 + 5, 1) & 1 == 0  # no data ready


def test_uart_receive() -> None:
    uart, _ = make_uart()
    assert uart.read(COM1, 1) == 0  # empty RBR reads 0
    uart.feed_input(b"ab")
    assert uart.rx_pending == 2
    assert uart.read(COM1 + 5, 1) & 1
    assert uart.read(COM1, 1) == ord("a")
    assert uart.read(COM1, 1) == ord("b")
    assert uart.read(COM1 + 5, 1) & 1 == 0


def test_uart_divisor_latch_and_scratch() -> None:
    uart, out = make_uart()
    uart.write(COM1 + 3, 1, 0x80)  # DLAB
    uart.write(COM1, 1, 0x01)
    uart.write(COM1 + 1, 1, 0x02)
    assert uart.divisor == 0x0201
    assert uart.read(COM1, 1) == 0x01 and uart.read(COM1 + 1, 1) == 0x02
    uart.write(COM1 + 3, 1, 0x03)
    assert uart.read(COM1 + 3, 1) == 0x03
    assert out == []  # divisor writes are not data
    uart.write(COM1 + 1, 1, 0x00)
    assert uart.read(COM1 + 1, 1) == 0  # IER again
    uart.write(COM1 + 7, 1, 0x5A)
    assert uart.read(COM1 + 7, 1) == 0x5A


def test_uart_loopback_like_linux_probe() -> None:
    uart, out = make_uart()
    uart.write(COM1 + 4, 1, 0x10 | 0x0A)  # LOOP | RTS | OUT2
    assert uart.read(COM1 + 6, 1) & 0xF0 == 0x90
    uart.write(COM1, 1, 0x42)
    assert out == [] and uart.read(COM1, 1) == 0x42
    uart.write(COM1 + 4, 1, 0x03)
    assert uart.read(COM1 + 6, 1) == 0xB0  # DCD | DSR | CTS


def test_uart_iir() -> None:
    uart, _ = make_uart()
    assert uart.read(COM1 + 2, 1) == 0x01
    uart.write(COM1 + 2, 1, 0xC7)  # FIFO enable
    assert uart.read(COM1 + 2, 1) == 0xC1
    uart.write(COM1 + 1, 1, 0x01)  # RDA interrupt
    uart.feed_input(b"x")
    assert uart.read(COM1 + 2, 1) == 0xC4
    uart.write(COM1 + 2, 1, 0x03)  # clear RX FIFO
    assert uart.rx_pending == 0
    uart.write(COM1 + 1, 1, 0x03)  # + THRE interrupt: pending once
    assert uart.read(COM1 + 2, 1) == 0xC2
    assert uart.read(COM1 + 2, 1) == 0xC1
    uart.write(COM1 + 4, 1, 0x08)  # OUT2 gates the line
    uart.write(COM1, 1, ord("z"))
    assert uart.irq_pending()


def test_uart_wide_access() -> None:
    uart, out = make_uart()
    uart.write(COM1 + 3, 2, 0x0300)  # 16-bit at LCR: LCR = 0, MCR = 3
    assert uart.read(COM1 + 3, 2) == 0x0300
    assert out == []


def test_debug_exit_raises() -> None:
    dev = DebugExit()
    with pytest.raises(GuestExit) as exc:
        dev.write(0xF4, 1, 0x10)
    assert exc.value.status == 0x21
    with pytest.raises(GuestExit) as exc:
        dev.write(0xF4, 4, 0)
    assert exc.value.status == 1


def test_debug_exit_callback() -> None:
    seen: list[int] = []
    dev = DebugExit(seen.append)
    dev.write(0xF4, 1, 0x12)
    assert seen == [0x25]


def test_debugcon() -> None:
    out: list[bytes] = []
    dev = DebugCon(out.append)
    dev.write(0xE9, 1, ord("A"))
    assert out == [b"A"]
    assert dev.read(0xE9, 1) == 0xE9


def test_bus_unknown_ports(caplog: pytest.LogCaptureFixture) -> None:
    bus = PortBus()
    with caplog.at_level(logging.INFO, logger="gdbstub.machine.bus"):
        assert bus.read(0x80, 1) == 0xFF
        assert bus.read(0x80, 2) == 0xFFFF
        assert bus.read(0x80, 4) == 0xFFFFFFFF
        bus.write(0x80, 1, 1)
        bus.write(0x81, 1, 1)
    assert len([r for r in caplog.records if "0x80" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "0x81" in r.getMessage()]) == 1
    with pytest.raises(ValueError):
        bus.read(0x80, 3)


def test_bus_dispatch_and_overlap() -> None:
    out: list[bytes] = []
    bus, uart = standard_bus(out.append)
    bus.write(COM1, 1, ord("x"))
    bus.write(0xE9, 1, ord("y"))
    assert out == [b"x", b"y"]
    uart.feed_input(b"q")
    assert bus.read(COM1, 1) == ord("q")
    assert bus.device_at(0x3FF) is uart and bus.device_at(0x400) is None
    with pytest.raises(GuestExit) as exc:
        bus.write(0xF4, 4, 0x10)
    assert exc.value.status == 0x21
    with pytest.raises(ValueError):
        bus.register(0x3FC, 8, DebugCon(out.append))


def test_separate_debugcon_sink_and_exit_callback() -> None:
    serial: list[bytes] = []
    con: list[bytes] = []
    exits: list[int] = []
    bus, _ = standard_bus(serial.append, debugcon_sink=con.append, on_exit=exits.append)
    bus.write(0xE9, 1, ord("c"))
    bus.write(COM1, 1, ord("s"))
    bus.write(0xF4, 1, 3)
    assert (serial, con, exits) == ([b"s"], [b"c"], [7])
