"""Real gdb against ``gdbstub run`` on our own test kernels, on every backend this machine has."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gdbdrive import ROOT, Gdb, Stub, backends, session
from guestbuild import build

pytestmark = pytest.mark.gdb

KVMA = 0xFFFFFFFF80000000
BACKENDS = backends()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def kernel() -> Path:
    return build("pvh_kernel")


def to_main(gdb: Gdb, mode: int | None = None) -> None:
    """Run to main64 (higher-half code, paging still off when the breakpoint is set)."""
    out = gdb.cmd("break main64")
    assert "Breakpoint 1" in out
    out = gdb.cmd("continue")
    assert "Breakpoint 1," in out and "main64" in out, out
    gdb.cmd("delete 1")
    if mode is not None:
        gdb.cmd(f"set var *(long*)&mode = {mode}")


def test_connect_wait_stops_before_first_instruction(
    kernel: Path, backend: str, tmp_path: Path
) -> None:
    with session(kernel, backend, tmp_path) as (stub, gdb):
        first_line = stub.log.read_text().splitlines()[0]
        assert f"backend {backend.removesuffix('-shim')}" in first_line, first_line
        assert gdb.value("$rip") == gdb.value("&pvh_start32")
        assert gdb.value("$cr0") & 0x80000000 == 0  # paging still off
        assert stub.serial_text() == ""  # nothing ran yet


def test_break_in_higher_half_continue_and_registers(
    kernel: Path, backend: str, tmp_path: Path
) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=0)
        out = gdb.cmd("break add_numbers")
        assert "Breakpoint 2" in out
        out = gdb.cmd("continue")
        assert "Breakpoint 2," in out and "add_numbers" in out
        assert gdb.value("$rip") == gdb.value("&add_numbers") > KVMA
        assert gdb.value("$rdi") == 1 and gdb.value("$rsi") == 2
        info = gdb.cmd("info registers")
        for name in ("rax", "rip", "eflags", "cs", "fs_base", "gs_base", "cr3", "efer"):
            assert re.search(rf"^{name}\s+0x", info, re.M), name
        assert gdb.value("$fs_base") == 0x0000123456789ABC
        assert gdb.value("$gs_base") == 0xFFFF800012345000
        assert gdb.value("$efer") & 0x500 == 0x500  # LME | LMA
        out = gdb.cmd("continue")
        assert "Breakpoint 2," in out
        assert gdb.value("$rdi") == 3


def test_all_registers_xmm_ymm_control(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=0)
        gdb.cmd("break add_numbers")
        gdb.cmd("continue")
        out = gdb.cmd("info all-registers")
        for name in ("xmm0", "mxcsr", "st0", "cr0", "cr3", "cr4", "efer", "dr7", "k_gs_base"):
            assert re.search(rf"^{name}\s", out, re.M), name
        assert gdb.value("$xmm0.uint128") == int.from_bytes(bytes(range(16)), "little")
        if gdb.value("*(long*)&avx_enabled"):
            assert re.search(r"^ymm1\s", out, re.M)
            assert gdb.value("$ymm1.v2_int128[1]") == int.from_bytes(
                bytes(range(0x30, 0x40)), "little"
            )


def test_memory_virtual_and_physical(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=0)
        gdb.cmd("break add_numbers")
        gdb.cmd("continue")
        virtual = gdb.value("&xmm0_value")
        out = gdb.cmd(f"x/16xb {virtual:#x}")
        expected = " ".join(f"0x{b:02x}" for b in range(8))
        assert expected in re.sub(r"\s+", " ", out)
        assert "Physical" not in gdb.cmd("monitor phys on")
        out = gdb.cmd(f"x/16xb {virtual - KVMA:#x}")
        assert expected in re.sub(r"\s+", " ", out)
        gdb.cmd("monitor phys off")
        out = gdb.cmd(f"monitor translate {virtual:#x}")
        assert f"physical {virtual - KVMA:#x}" in out
        assert "Cannot access memory" in gdb.cmd("x/4xb 0x7fff00000000")


def test_memory_follows_the_page_tables_gdb_sets(
    kernel: Path, backend: str, tmp_path: Path
) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=0)
        gdb.cmd("stepi")
        virtual = gdb.value("&xmm0_value")
        assert gdb.value(f"*(unsigned char*){virtual + 1:#x}") == 1
        cr3 = gdb.value("$cr3")
        gdb.cmd("set $cr3 = 0xfffff000")  # tables outside guest RAM: nothing translates
        assert "Cannot access memory" in gdb.cmd(f"x/1xb {virtual:#x}")
        gdb.cmd(f"set $cr3 = {cr3:#x}")
        assert gdb.value(f"*(unsigned char*){virtual + 1:#x}") == 1
        gdb.cmd("stepi")  # and the guest runs on with its own tables
        assert gdb.value(f"*(unsigned char*){virtual + 1:#x}") == 1


def test_set_var_stepi_nexti(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=0)
        gdb.cmd("break *call_add_1")
        assert "Breakpoint 2," in gdb.cmd("continue")
        assert gdb.value("$rip") == gdb.value("&call_add_1")
        gdb.cmd("set var *(long*)&counter = 41")
        assert gdb.value("*(long*)&counter") == 41
        call = gdb.value("$rip")
        # call_add_1: mov edi,1 ; mov esi,2 ; call add_numbers
        gdb.cmd("stepi")
        gdb.cmd("stepi")
        at_call = gdb.value("$rip")
        assert at_call > call
        gdb.cmd("stepi")
        assert gdb.value("$rip") == gdb.value("&add_numbers")
        gdb.cmd("finish")
        before = gdb.value("*(long*)&add_calls")
        gdb.cmd("break *call_add_2")
        gdb.cmd("continue")
        gdb.cmd("stepi")
        gdb.cmd("stepi")
        pc = gdb.value("$rip")
        gdb.cmd("nexti")
        assert gdb.value("$rip") > pc and gdb.value("$rip") < gdb.value("&call_add_3") + 16
        assert gdb.value("*(long*)&add_calls") == before + 1


SHIM_MMIO = (
    "hvf-shim forwards to KVM, which decodes and retires MMIO accesses itself; the framework "
    "reports them undecoded at the instruction, which the shim cannot model"
)


def test_watch_hbreak(kernel: Path, backend: str, tmp_path: Path) -> None:
    if backend == "hvf-shim":
        pytest.skip(SHIM_MMIO)
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=0)
        out = gdb.cmd("watch *(long*)&counter")
        assert "watchpoint 2" in out.lower()
        out = gdb.cmd("continue")
        assert "Old value = 0" in out and "New value = 1" in out, out
        # trap-after, exactly: the stop is at the instruction after the 7-byte inc that wrote
        assert gdb.value("$rip") == gdb.value("&demo_loop") + 7
        out = gdb.cmd("continue")
        assert "Old value = 1" in out and "New value = 2" in out, out
        gdb.cmd("delete")
        assert "Hardware assisted breakpoint 3" in gdb.cmd("hbreak demo_done")
        out = gdb.cmd("continue")
        assert "demo_done" in out
        assert gdb.value("*(long*)&counter") == 100
        out = gdb.cmd("monitor info breakpoints")
        assert "breakpoint" in out
        if backend == "emu":  # the framework's normal paths: int3 and DR data breakpoints
            assert "software breakpoints: int3" in out and "watchpoints: debug registers" in out


def test_ctrl_c_while_spinning_and_halted(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=1)
        gdb.child.sendline("continue")
        gdb.child.expect("Continuing")
        time.sleep(1.0)
        out = gdb.interrupt()
        assert "SIGINT" in out
        first = gdb.value("*(long*)&counter")
        assert first > 0
        assert gdb.value("$rip") in range(gdb.value("&spin_loop"), gdb.value("&spin_loop") + 16)
        gdb.child.sendline("continue")
        gdb.child.expect("Continuing")
        time.sleep(0.5)
        gdb.interrupt()
        assert gdb.value("*(long*)&counter") > first


def test_halt_with_interrupts_off_waits_for_ctrl_c(
    kernel: Path, backend: str, tmp_path: Path
) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=4)
        gdb.child.sendline("continue")
        gdb.child.expect("Continuing")
        time.sleep(1.0)
        assert gdb.child.isalive()
        out = gdb.interrupt()
        assert "SIGINT" in out
        rip = gdb.value("$rip")
        assert rip in range(gdb.value("&halt_forever"), gdb.value("&halt_forever") + 8)
        assert "halted with interrupts disabled" in gdb.cmd("monitor status")


def test_guest_own_int3_and_exit_status(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (stub, gdb):
        to_main(gdb, mode=2)
        out = gdb.cmd("continue")
        assert "exited with code 045" in out, out  # status 0x25
        assert "int3 handled" in stub.serial_text()
        assert stub.wait_exit() == 0x25


def test_exit_status_reaches_gdb(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (stub, gdb):
        out = gdb.cmd("continue")
        assert "exited with code 041" in out, out  # (0x10 << 1) | 1 = 0x21
        assert "hello from pvh" in stub.serial_text() and "done" in stub.serial_text()
        assert stub.wait_exit() == 0x21


def test_triple_fault_is_a_stop(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=3)
        out = gdb.cmd("continue")
        assert "SIGSEGV" in out, out
        assert "triple fault" in gdb.cmd("monitor status")
        assert gdb.value("$rip") > KVMA  # gdb still reads the vCPU


def test_mode_switch_32_to_64(backend: str, tmp_path: Path) -> None:
    elf = build("mode_switch")
    with session(elf, backend, tmp_path) as (_stub, gdb):
        gdb.cmd("break loop32")
        assert "loop32" in gdb.cmd("continue")
        assert gdb.value("$efer") & 0x400 == 0  # 32-bit protected mode: no LMA
        assert gdb.value("$rip") == gdb.value("&loop32") < 0x100000000
        gdb.cmd("delete")
        gdb.cmd("break work64_done")
        assert "work64_done" in gdb.cmd("continue")
        assert gdb.value("$efer") & 0x400  # LMA: the g packet kept its size across the switch
        assert gdb.value("*(long*)&count64") == 10
        out = gdb.cmd("continue")
        assert "exited with code 041" in out


def test_detach_then_reconnect_then_kill(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (stub, gdb):
        to_main(gdb, mode=1)
        gdb.cmd("break spin_loop")
        gdb.cmd("continue")
        assert "Detaching" in gdb.cmd("detach") or True
        time.sleep(0.5)
        assert stub.proc.poll() is None  # the guest lives on
        gdb.connect(stub.port)
        before = gdb.value("*(long*)&counter")
        assert before > 1  # it ran without the breakpoint while nobody was attached
        gdb.cmd("kill")
        assert stub.wait_exit() == 0


def test_client_dies_without_detach(kernel: Path, backend: str, tmp_path: Path) -> None:
    stub = Stub(kernel, backend, tmp=tmp_path)
    try:
        gdb = Gdb(kernel, stub.port)
        to_main(gdb, mode=1)
        gdb.cmd("break spin_loop")
        pc = gdb.value("$pc")
        gdb.child.kill(9)
        time.sleep(0.5)
        # as with QEMU: the guest stays where gdb left it, without gdb's breakpoints
        gdb2 = Gdb(kernel, stub.port)
        assert gdb2.value("$pc") == pc
        assert gdb2.value("*(long*)&counter") == 0
        assert "no breakpoints" in gdb2.cmd("monitor info breakpoints")
        gdb2.cmd("break spin_loop")
        assert "spin_loop" in gdb2.cmd("continue", timeout=60)
        gdb2.close()
    finally:
        stub.stop()


def test_no_wait_runs_at_once_and_attach_later(kernel: Path, backend: str, tmp_path: Path) -> None:
    stub = Stub(kernel, backend, wait=False, tmp=tmp_path)
    try:
        assert stub.wait_exit(60) == 0x21  # mode 0 runs to its exit without a debugger
        assert "done" in stub.serial_text()
    finally:
        stub.stop()


def test_malformed_packets_get_answers(kernel: Path, backend: str, tmp_path: Path) -> None:
    stub = Stub(kernel, backend, tmp=tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", stub.port), timeout=10) as sock:
            sock.sendall(b"$m0,4#00")  # bad checksum
            assert sock.recv(1) == b"-"
            sock.sendall(b"$mzz#%02x" % (sum(b"mzz") & 0xFF))
            reply = sock.recv(100)
            assert reply.startswith(b"+$E")
            sock.sendall(b"+$m7fff00000000,4#%02x" % (sum(b"m7fff00000000,4") & 0xFF))
            assert b"$E14#" in sock.recv(100)
        assert stub.proc.poll() is None
    finally:
        stub.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run"], "the following arguments are required"),
        (["run", "/nonexistent/kernel"], "cannot read kernel"),
        (["run", "{kernel}", "--memory", "lots"], "--memory"),
        (["run", "{kernel}", "--listen", "nowhere"], "--listen"),
        (["run", "{kernel}", "--serial", "printer"], "--serial"),
        (["run", "{self}"], ""),
    ],
)
def test_bad_command_lines(args: list[str], message: str, kernel: Path) -> None:
    argv = [a.format(kernel=kernel, self=ROOT / "pyproject.toml") for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "gdbstub", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gdbstub: ") and message in lines[0]


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gdbstub", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 0 and result.stdout.startswith("gdbstub ")


def test_rwatch_awatch(kernel: Path, backend: str, tmp_path: Path) -> None:
    if backend == "hvf-shim":
        pytest.skip(SHIM_MMIO)
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=0)
        # set after main64's lgdt/lidt: a protected page (the fallback where DR data
        # breakpoints never fire) must not hold a descriptor-table operand when it is loaded
        gdb.cmd("break *call_add_1")
        gdb.cmd("continue")
        gdb.cmd("delete")
        out = gdb.cmd("rwatch *(long*)&add_calls")
        assert "read watchpoint" in out, out
        out = gdb.cmd("continue")  # add_numbers reads add_calls (inc qword [add_calls])
        assert "Value = 1" in out, out  # trap-after: the inc that read it has completed
        assert gdb.value("$rip") in range(gdb.value("&add_numbers"), gdb.value("&add_numbers") + 64)
        gdb.cmd("delete")
        out = gdb.cmd("awatch *(long*)&sum_total")
        assert "acc watchpoint" in out.lower() or "access" in out.lower(), out
        out = gdb.cmd("continue")
        assert "sum_total" in out and ("Value = " in out or "New value" in out), out
        gdb.cmd("delete")
        assert "exited with code 041" in gdb.cmd("continue")


@pytest.mark.parametrize(
    "image, greeting",
    [
        ("mb_kernel", "hello from multiboot"),
        ("mb_kernel.bin", "hello from multiboot"),
        ("elf64_kernel", "hello from elf64"),
        ("pvh_kernel", "hello from pvh"),
    ],
)
def test_boot_protocols_run_to_exit(
    image: str, greeting: str, backend: str, tmp_path: Path
) -> None:
    stub = Stub(build(image), backend, "--cmdline", "console=ttyS0", wait=False, tmp=tmp_path)
    try:
        assert stub.wait_exit(90) == 0x21, stub.log.read_text()
        serial = stub.serial_text()
        assert greeting in serial
        if image != "pvh_kernel":
            assert "console=ttyS0" in serial  # the command line reached the kernel
    finally:
        stub.stop()


def test_monitor_commands(kernel: Path, backend: str, tmp_path: Path) -> None:
    with session(kernel, backend, tmp_path) as (_stub, gdb):
        to_main(gdb, mode=0)
        gdb.cmd("break add_numbers")
        gdb.cmd("continue")
        out = gdb.cmd("monitor help")
        for word in (
            "registers",
            "msr",
            "vmcs",
            "translate",
            "page-table",
            "tlb flush",
            "exec-time",
            "sync-tsc",
            "disas",
            "phys",
            "info breakpoints",
        ):
            assert word in out, word
        out = gdb.cmd("monitor registers")
        assert re.search(r"rip=ffffffff801", out) and "4-level" in out, out
        assert "0x0000123456789abc" in gdb.cmd("monitor msr read 0xc0000100")
        gdb.cmd("monitor msr write 0xc0000102 0x4242")
        assert gdb.value("$k_gs_base") == 0x4242
        assert "VMCS_GUEST_CR3" in gdb.cmd("monitor vmcs VMCS_GUEST_CR3")
        assert "0xffffffff80000000" in gdb.cmd("monitor page-table")
        assert "invalidated" in gdb.cmd("monitor tlb flush")
        assert "s in the guest" in gdb.cmd("monitor exec-time")
        out = gdb.cmd("monitor sync-tsc")
        assert "every vCPU's TSC set" in out or "cannot set the guest TSC" in out, out
        out = gdb.cmd("monitor disas add_numbers 3")
        assert "push" in out or "mov" in out, out
        assert "unknown monitor command" in gdb.cmd("monitor frobnicate")


@pytest.mark.parametrize(
    "setup, signal",
    [
        ("set $pc = 0xf0000000", "SIGSEGV"),  # fetch from guest-physical memory that is not RAM
        ("set var *(unsigned short*)$pc = 0x0b0f", "SIGSEGV"),  # ud2 with no IDT: triple fault
        # at 0x100000: inc byte [0x100009]; jmp $+2; mov al, imm8 (rewritten); jmp 0x100000:
        # a loop rewriting its own code forever, interrupted by Ctrl-C
        (
            "set var *(unsigned long long*)$pc = 0xeb0010000905fe\n"
            "set var *(unsigned int*)($pc + 8) = 0xf4eb00b0",
            "SIGINT",
        ),
    ],
    ids=["unmapped-fetch", "undefined-instruction", "self-modifying-loop"],
)
def test_faulty_guests_stop_with_a_signal(
    setup: str, signal: str, kernel: Path, backend: str, tmp_path: Path
) -> None:
    with session(kernel, backend, tmp_path) as (stub, gdb):
        for line in setup.splitlines():
            gdb.cmd(line)  # at pvh_start32 (0x100000): 32-bit, paging off, no IDT
        if signal == "SIGINT":
            gdb.child.sendline("continue")
            gdb.child.expect("Continuing")
            time.sleep(1.0)
            out = gdb.interrupt()
        else:
            out = gdb.cmd("continue")
        assert signal in out, out
        assert stub.proc.poll() is None
        gdb.cmd("info registers rip")  # the stub still answers


def test_backend_auto_picks_the_first_available_and_says_so(kernel: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from gdbstub import hv

    expected = hv.available_backends()[0]  # hvf, then kvm, then emu
    stub = Stub(kernel, "auto", tmp=tmp_path)
    try:
        assert stub.log.read_text().splitlines()[0].endswith(f"backend {expected}")
    finally:
        stub.stop()
