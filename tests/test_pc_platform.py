"""The PC platform under ``gdbstub run``: QEMU-style test kernels of our own on every backend.

``tests/guests/pc_kernel.asm`` is a 32-bit PVH kernel that prints on the 0xE9 debug console.
With the command line ``quick`` it powers off through ACPI at once; otherwise it reads its
command line, initrd and the RTC, counts PIT ticks through the 8259 and local APIC timer
ticks for half a second of ACPI PM-timer time, measures the APIC timer's count rate, and
powers off. The same kernel under QEMU prints ``pit ticks: 50``, ``lapic ticks: 499`` and an
APIC count rate of 62.5 MHz (a 1 GHz APIC bus divided by 16).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from gdbdrive import Stub, backends
from guestbuild import build

BACKENDS = [b for b in backends() if b != "hvf-shim"]


def _run(tmp_path: Path, backend: str, *extra: str, timeout: float = 60) -> tuple[int, str]:
    stub = Stub(build("pc_kernel"), backend, *extra, wait=False, tmp=tmp_path)
    try:
        status = stub.wait_exit(timeout)
    finally:
        stub.stop()
    return status, stub.serial_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_acpi_soft_off_ends_the_process_with_status_0(tmp_path: Path, backend: str) -> None:
    status, out = _run(tmp_path, backend, "--cmdline", "quick")
    assert out == "pc_kernel\nbye\n"
    assert status == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_timers_rtc_cmdline_and_initrd(tmp_path: Path, backend: str) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd-payload-0123456789")
    before = time.gmtime()
    status, out = _run(
        tmp_path, backend, "--append", "hello platform", "--initrd", str(initrd), timeout=120
    )
    after = time.gmtime()
    assert status == 0, out
    assert "cmdline: hello platform\n" in out
    assert "initrd: initrd-payload-0\n" in out
    rtc = re.search(r"rtc: (\d\d)-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)", out)
    assert rtc is not None, out
    year, month, day = (int(rtc.group(i)) for i in (1, 2, 3))
    assert (year, month, day) in {
        (t.tm_year % 100, t.tm_mon, t.tm_mday) for t in (before, after)
    }, "the RTC shows the host's date (UTC, BCD)"
    pattern = r"(pit ticks|lapic ticks|lapic count|pm ticks): (\d+)"
    numbers = {k: int(v) for k, v in re.findall(pattern, out)}
    # 100 Hz and 1 kHz for 0.5 s: a tick the guest cannot take in time (a slow or loaded
    # host) is dropped, never doubled
    assert 10 <= numbers["pit ticks"] <= 51, out
    assert 50 <= numbers["lapic ticks"] <= 501, out
    # the APIC timer counts at 1 GHz / 16 = 62.5 MHz, measured against the 3.579545 MHz PM timer
    rate = numbers["lapic count"] * 3_579_545 / numbers["pm ticks"]
    assert abs(rate - 62_500_000) < 0.05 * 62_500_000, (rate, out)
    assert out.endswith("bye\n")


MB_BOOT = "ebda: 9FC0\nbasemem: 027F\n"  # what QEMU's BIOS leaves: EBDA at 0x9fc00, 639 KiB


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiboot_kernel_reads_bda_cmos_pit_and_reboots(tmp_path: Path, backend: str) -> None:
    """tests/guests/mb_pc_kernel.asm behaves as under QEMU: BDA, CMOS clock, PIT read-back,
    an i8042 reset that restarts the machine (CMOS NVRAM survives), then ACPI power-off."""
    stub = Stub(build("mb_pc_kernel"), backend, wait=False, tmp=tmp_path)
    try:
        status = stub.wait_exit(60)
    finally:
        stub.stop()
    out = stub.serial_text()
    assert status == 0, out
    assert out.count(MB_BOOT) == 2 and out.count("pit: out\npanic\n") == 2, out
    assert out.startswith("boot 0000\n") and "\nboot 0001\n" in out, out
    assert "the guest reset (i8042); restarting" in stub.log.read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_reboot_ends_the_process_on_a_reset(tmp_path: Path, backend: str) -> None:
    stub = Stub(build("mb_pc_kernel"), backend, "--no-reboot", wait=False, tmp=tmp_path)
    try:
        status = stub.wait_exit(60)
    finally:
        stub.stop()
    out = stub.serial_text()
    assert status == 0
    assert out.count("boot ") == 1 and out.endswith("panic\n"), out
    log = stub.log.read_text()
    assert "the guest reset (i8042); --no-reboot: exiting" in log
