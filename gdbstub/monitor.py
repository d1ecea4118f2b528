"""``monitor`` commands (gdb's ``monitor ...``, lldb's ``process plugin packet monitor``).

One table: command words -> (handler, usage, help). Handlers take the target and the argument
words and return the text gdb prints. Errors are answered with a line of text, never raised.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import hv, paging

if TYPE_CHECKING:
    from .hvtarget import HvTarget


class MonitorError(Exception):
    """A monitor command failed; the message is shown to the user."""


@dataclass(frozen=True)
class Command:
    """One monitor command."""

    words: tuple[str, ...]
    handler: Callable[[HvTarget, list[str]], str]
    usage: str
    help: str


def _int(text: str, target: HvTarget | None = None) -> int:
    if target is not None and text in target.symbols:
        return target.symbols[text]
    try:
        return int(text, 0)
    except ValueError as exc:
        raise MonitorError(f"not a number: {text}") from exc


def _tid(target: HvTarget) -> int:
    return getattr(target, "selected_thread", 0) or target.thread_ids()[0]


def _help(target: HvTarget, args: list[str]) -> str:
    width = max(len(c.usage) for c in COMMANDS)
    return "".join(f"{c.usage:<{width}}  {c.help}\n" for c in COMMANDS)


def _registers(target: HvTarget, args: list[str]) -> str:
    r = target.registers(_tid(target))
    rows = [
        ("rax", "rbx", "rcx", "rdx"),
        ("rsi", "rdi", "rbp", "rsp"),
        ("r8", "r9", "r10", "r11"),
        ("r12", "r13", "r14", "r15"),
        ("rip", "eflags", "cr0", "cr2"),
        ("cr3", "cr4", "cr8", "efer"),
        ("fs_base", "gs_base", "k_gs_base", "dr7"),
        ("dr0", "dr1", "dr2", "dr3"),
    ]
    out = "".join("  ".join(f"{n:>9}={r.get(n, 0):016x}" for n in row) + "\n" for row in rows)
    segs = "  ".join(f"{n}={r.get(n, 0):04x}" for n in ("cs", "ss", "ds", "es", "fs", "gs"))
    mode = paging.describe_mode(
        paging.PagingState(cr0=r["cr0"], cr3=r["cr3"], cr4=r["cr4"], efer=r["efer"])
    )
    return out + segs + f"\npaging: {mode}\n"


def _msr(target: HvTarget, args: list[str]) -> str:
    if (
        len(args) < 2
        or args[0] not in ("read", "write")
        or (args[0] == "write") != (len(args) == 3)
    ):
        raise MonitorError("usage: msr read MSR | msr write MSR VALUE")
    msr = _int(args[1])
    if args[0] == "read":
        value = target.on_vcpu(_tid(target), lambda v: hv.hv_vcpu_read_msr(v, msr))
        return f"MSR {msr:#x} = {value:#018x}\n"
    value = _int(args[2])
    target.on_vcpu(_tid(target), lambda v: hv.hv_vcpu_write_msr(v, msr, value))
    target.invalidate_registers()
    return f"MSR {msr:#x} <- {value:#x}\n"


def _vmcs(target: HvTarget, args: list[str]) -> str:
    fields = (
        [int(a, 0) if a[0].isdigit() else getattr(hv, a.upper(), -1) for a in args]
        if args
        else sorted(hv.VMCS_FIELD_NAMES)
    )
    lines = []

    def read_all(vcpu: int) -> None:
        for field in fields:
            name = hv.VMCS_FIELD_NAMES.get(field, f"{field:#x}")
            try:
                lines.append(f"{name:<32} {hv.hv_vmx_vcpu_read_vmcs(vcpu, field):#x}")
            except hv.HvError as exc:
                if args:
                    lines.append(f"{name:<32} ({exc.name})")

    target.on_vcpu(_tid(target), read_all)
    return "\n".join(lines) + "\n"


def _translate(target: HvTarget, args: list[str]) -> str:
    if len(args) != 1:
        raise MonitorError("usage: translate ADDR")
    address = _int(args[0], target)
    r = target.registers(_tid(target))
    state = paging.PagingState(cr0=r["cr0"], cr3=r["cr3"], cr4=r["cr4"], efer=r["efer"])
    result = paging.translate(target.memory.read, *state, address)
    lines = [f"{address:#x} ({paging.describe_mode(state)})"]
    walk = (
        result.steps
        if result is not None
        else paging.walk_steps(target.memory.read, state, address)
    )
    lines += [f"  {step}" for step in walk]
    if result is None:
        lines.append("  -> not mapped")
    else:
        lines.append(f"  -> physical {result.paddr:#x} ({result.describe()})")
    return "\n".join(lines) + "\n"


def _page_tables(target: HvTarget, args: list[str]) -> str:
    r = target.registers(_tid(target))
    state = paging.PagingState(cr0=r["cr0"], cr3=r["cr3"], cr4=r["cr4"], efer=r["efer"])
    maps = paging.dump_mappings(target.memory.read, *state)
    if not maps:
        return f"no mappings ({paging.describe_mode(state)})\n"
    return "".join(f"{m}\n" for m in maps)


def _tlb_flush(target: HvTarget, args: list[str]) -> str:
    for tid in target.thread_ids():
        target.on_vcpu(tid, hv.hv_vcpu_invalidate_tlb)
    return "guest TLBs invalidated (hv_vcpu_invalidate_tlb)\n"


def _exec_time(target: HvTarget, args: list[str]) -> str:
    lines = []
    for tid in target.thread_ids():
        ns = target.on_vcpu(tid, hv.hv_vcpu_get_exec_time)
        lines.append(f"vCPU {tid - 1}: {ns / 1e9:.6f} s in the guest ({ns} ns)")
    return "\n".join(lines) + "\n"


def _sync_tsc(target: HvTarget, args: list[str]) -> str:
    value = (
        _int(args[0])
        if args
        else target.on_vcpu(_tid(target), lambda v: hv.hv_vcpu_read_msr(v, hv.MSR_TSC))
    )
    try:
        hv.hv_vm_sync_tsc(value)
    except hv.HvError as exc:
        if exc.code != hv.HV_UNSUPPORTED:
            raise
        return f"this host cannot set the guest TSC ({exc})\n"
    return f"every vCPU's TSC set to {value:#x} (hv_vm_sync_tsc)\n"


def _disas(target: HvTarget, args: list[str]) -> str:
    import capstone

    address = _int(args[0], target) if args else target.registers(_tid(target))["rip"]
    count = _int(args[1]) if len(args) > 1 else 10
    code = target.read_memory(_tid(target), address, 15 * count)
    cs = capstone.Cs(capstone.CS_ARCH_X86, target.code_mode(_tid(target)))
    lines = [
        f"{i.address:#018x}: {i.bytes.hex():<20} {i.mnemonic} {i.op_str}"
        for i in list(cs.disasm(code, address))[:count]
    ]
    return "\n".join(lines or ["(no instructions decoded)"]) + "\n"


def _phys(target: HvTarget, args: list[str]) -> str:
    if args not in (["on"], ["off"]):
        raise MonitorError("usage: phys on|off")
    target.set_physical_memory_mode(args[0] == "on")
    return f"memory addresses are now guest-{'physical' if args[0] == 'on' else 'virtual'}\n"


def _info_breakpoints(target: HvTarget, args: list[str]) -> str:
    return target.breakpoint_report()


def _info_irq(target: HvTarget, args: list[str]) -> str:
    describe = getattr(target.vmm, "describe_interrupts", None)
    if describe is None:
        raise MonitorError("this VMM has no interrupt controllers")
    return f"{describe()}\n"


def _info_timers(target: HvTarget, args: list[str]) -> str:
    describe = getattr(target.vmm, "describe_timers", None)
    if describe is None:
        raise MonitorError("this VMM has no timers")
    return f"{describe()}\n"


def _step_irqs(target: HvTarget, args: list[str]) -> str:
    if args not in (["on"], ["off"]):
        raise MonitorError("usage: step-irqs on|off")
    flags = target.step_flags()
    target.set_step_flags(flags & ~0x6 if args[0] == "on" else flags | 0x6)
    if args[0] == "on":
        return "single steps deliver pending interrupts (and may enter their handlers)\n"
    return "single steps keep interrupts pending (QEMU's default sstep flags)\n"


def _status(target: HvTarget, args: list[str]) -> str:
    what = getattr(target.vmm, "what", "running")
    return f"backend {hv.backend_name()}; {what}\n"


COMMANDS: tuple[Command, ...] = (
    Command(("help",), _help, "help", "list the monitor commands"),
    Command(("registers",), _registers, "registers", "every register on one screen"),
    Command(
        ("msr",), _msr, "msr read|write MSR [VALUE]", "read or write a model-specific register"
    ),
    Command(("vmcs",), _vmcs, "vmcs [FIELD...]", "VMCS fields the backend exposes"),
    Command(("translate",), _translate, "translate ADDR", "walk the page tables for ADDR"),
    Command(("page-table",), _page_tables, "page-table", "dump the guest's virtual mappings"),
    Command(("tlb", "flush"), _tlb_flush, "tlb flush", "hv_vcpu_invalidate_tlb on every vCPU"),
    Command(("exec-time",), _exec_time, "exec-time", "time each vCPU spent in the guest"),
    Command(("sync-tsc",), _sync_tsc, "sync-tsc [VALUE]", "hv_vm_sync_tsc (default: vCPU 0's TSC)"),
    Command(("disas",), _disas, "disas [ADDR [N]]", "disassemble N instructions (capstone)"),
    Command(("phys",), _phys, "phys on|off", "gdb addresses are physical / virtual"),
    Command(
        ("info", "breakpoints"),
        _info_breakpoints,
        "info breakpoints",
        "breakpoints and the mechanism each one uses",
    ),
    Command(("info", "irq"), _info_irq, "info irq", "PIC, I/O APIC and local APIC state"),
    Command(("info", "timers"), _info_timers, "info timers", "PIT, RTC, PM timer, APIC timers"),
    Command(
        ("step-irqs",),
        _step_irqs,
        "step-irqs on|off",
        "whether single steps may enter interrupt handlers (default off)",
    ),
    Command(("status",), _status, "status", "backend, and what happened to the guest"),
)


def run_monitor_command(target: HvTarget, line: str) -> str:
    """Run one monitor command line and return its output text."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return f"monitor: {exc}\n"
    if not words:
        return _help(target, [])
    for command in sorted(COMMANDS, key=lambda c: -len(c.words)):
        n = len(command.words)
        if tuple(words[:n]) == command.words:
            try:
                return command.handler(target, words[n:])
            except MonitorError as exc:
                return f"{exc}\n"
            except Exception as exc:  # a monitor command never takes the stub down
                return f"monitor {' '.join(command.words)} failed: {exc}\n"
    return f"unknown monitor command {words[0]!r}; try 'monitor help'\n"
