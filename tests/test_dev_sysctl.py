"""Tests for system control port A, port 0x92 (gdbstub.machine.devices.sysctl)."""

from __future__ import annotations

import pytest

from gdbstub.machine.bus import GuestReset
from gdbstub.machine.devices.sysctl import Port92


def test_fast_a20_reads_back() -> None:
    port = Port92()
    assert port.read(0x92, 1) == 0x02 and port.a20
    port.write(0x92, 1, 0x00)
    assert port.read(0x92, 1) == 0x00 and not port.a20
    port.write(0x92, 1, 0x02)
    assert port.read(0x92, 1) == 0x02 and port.a20
    assert Port92(a20=False).read(0x92, 1) == 0


def test_rising_bit0_resets() -> None:
    port = Port92()
    with pytest.raises(GuestReset) as info:
        port.write(0x92, 1, 0x03)
    assert info.value.how == "port 0x92"
    assert port.read(0x92, 1) == 0x02  # the reset cleared bit 0


def test_only_a_transition_resets() -> None:
    calls: list[bool] = []
    port = Port92(on_reset=lambda: calls.append(True))
    port.value = 0x03  # bit 0 already 1 (as a firmware might leave it)
    port.write(0x92, 1, 0x03)
    assert calls == []
    port.write(0x92, 1, 0x02)
    port.write(0x92, 1, 0x03)
    assert calls == [True]
    assert port.resets == 1
    assert "A20 on" in port.describe()
