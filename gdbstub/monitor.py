"""``monitor`` commands (gdb's ``monitor ...``, lldb's ``process plugin packet monitor``).

One table: command words -> (handler, usage, help). Handlers take the target and the argument
words and return the text gdb prints. Errors are answered with a line of text, never raised.

gdb sends the command text as typed, without evaluating anything, so addresses are read here:
``monitor disas $pc``, ``monitor disas rip+16 4`` and ``monitor translate &ticks`` take
expressions (``_Expressions``) of numbers (C notation), register names (gdb's, with or without
``$``, and ``pc``/``sp``/``fp``, ``eax``-style low halves), the kernel's symbols (``&sym``
is the same), ``+ - * / ( )``. Several expressions follow each other: the first token that
cannot continue an expression starts the next one (``rip + 16 4`` is ``rip+16`` and ``4``).

Monitor commands write to the host only where the command line allowed it: ``dump-guest-memory``
writes into the folder given with ``gdbstub run --dump-dir`` (``allow_dumps``), and nowhere
without it (``gdbstub.coredump.open_in`` keeps the file inside that folder).
"""

from __future__ import annotations

import difflib
import re
import shlex
import textwrap
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import coredump, hv, paging

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


_TOKEN = re.compile(r"\s*(?:(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)\b|(\$?[A-Za-z_.][\w.$@]*)|(.))")
_ALIASES = {"pc": "rip", "sp": "rsp", "fp": "rbp", "rflags": "eflags", "flags": "eflags"}
_LOW32 = {f"e{n}": f"r{n}" for n in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip")}


class _Expressions:
    """A recursive-descent reader of the monitor's address expressions (module docstring)."""

    def __init__(self, target: HvTarget, text: str) -> None:
        self.target = target
        self.tokens: list[tuple[str, str]] = []
        for match in _TOKEN.finditer(text.strip()):
            number, name, other = match.groups()
            if number is not None:
                self.tokens.append(("num", number))
            elif name is not None:
                self.tokens.append(("name", name))
            elif other is not None and not other.isspace():
                if other not in "+-*/()&~":
                    raise MonitorError(f"cannot read {other!r} in {text.strip()!r}")
                self.tokens.append(("op", other))
        self.pos = 0
        self._regs: dict[str, int] | None = None

    def values(self) -> list[int]:
        """Every expression of the text, in order."""
        out = []
        while self.pos < len(self.tokens):
            out.append(self._sum() & 0xFFFF_FFFF_FFFF_FFFF)
        return out

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take_op(self, ops: str) -> str | None:
        token = self._peek()
        if token is not None and token[0] == "op" and token[1] in ops:
            self.pos += 1
            return token[1]
        return None

    def _sum(self) -> int:
        value = self._product()
        while (op := self._take_op("+-")) is not None:
            rhs = self._product()
            value = value + rhs if op == "+" else value - rhs
        return value

    def _product(self) -> int:
        value = self._unary()
        while (op := self._take_op("*/")) is not None:
            rhs = self._unary()
            if op == "/" and rhs == 0:
                raise MonitorError("division by zero")
            value = value * rhs if op == "*" else value // rhs
        return value

    def _unary(self) -> int:
        op = self._take_op("-~&+")
        if op == "-":
            return -self._unary()
        if op == "~":
            return ~self._unary()
        if op in ("&", "+"):
            return self._unary()  # &symbol is the symbol's address, as in gdb
        token = self._peek()
        if token is None:
            raise MonitorError("an expression ends too early")
        self.pos += 1
        kind, text = token
        if kind == "num":
            if text[:2] in ("0x", "0X"):
                return int(text, 16)
            return int(text, 8) if text.startswith("0") else int(text)  # C: 017 is octal
        if kind == "name":
            return self._name(text)
        if text == "(":
            value = self._sum()
            if self._take_op(")") is None:
                raise MonitorError("missing ')'")
            return value
        raise MonitorError(f"unexpected {text!r}")

    def _name(self, text: str) -> int:
        if text in self.target.symbols:
            return self.target.symbols[text]
        name = text.lstrip("$").lower()
        name = _ALIASES.get(name, name)
        if self._regs is None:
            self._regs = self.target.registers(_tid(self.target))
        if name in self._regs:
            return self._regs[name]
        if name in _LOW32:
            return self._regs[_LOW32[name]] & 0xFFFF_FFFF
        raise MonitorError(f"{text}: not a register or a symbol of the kernel")


def _addresses(target: HvTarget, args: list[str], most: int, usage: str) -> list[int]:
    """The expressions of ``args`` (at most ``most``)."""
    values = _Expressions(target, " ".join(args)).values()
    if len(values) > most:
        raise MonitorError(f"usage: {usage}")
    return values


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


def _vmcs_field(text: str) -> int:
    """A VMCS field by number or name (``VMCS_GUEST_RIP``, ``guest_rip``, ``GUEST_RIP``)."""
    if text[:1].isdigit():
        return _int(text)
    by_name = {name: field for field, name in hv.VMCS_FIELD_NAMES.items()}
    name = text.upper()
    for candidate in (name, "VMCS_" + name):
        if candidate in by_name:
            return by_name[candidate]
    short = [n.removeprefix("VMCS_") for n in by_name]
    close = difflib.get_close_matches(name.removeprefix("VMCS_"), short, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    known = textwrap.fill(" ".join(sorted(short)), 96, initial_indent="  ", subsequent_indent="  ")
    raise MonitorError(
        f"unknown VMCS field {text!r}; {hint}'monitor vmcs' lists every field by name "
        f"(the VMCS_ prefix is optional, numbers are field encodings). Known fields:\n{known}"
    )


def _vmcs(target: HvTarget, args: list[str]) -> str:
    fields = [_vmcs_field(a) for a in args] if args else sorted(hv.VMCS_FIELD_NAMES)
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
    values = _addresses(target, args, 1, "translate ADDR")
    if not values:
        raise MonitorError("usage: translate ADDR")
    address = values[0]
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

    values = _addresses(target, args, 2, "disas [ADDR [N]]")
    address = values[0] if values else target.registers(_tid(target))["rip"]
    count = values[1] if len(values) > 1 else 10
    if not 0 < count <= 1000:
        raise MonitorError(f"disas: {count} instructions? (1 to 1000)")
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


_STOP_WHY = {
    "swbreak": "at a breakpoint",
    "hwbreak": "at a hardware breakpoint",
    "watch": "by a watchpoint",
    "rwatch": "by a read watchpoint",
    "awatch": "by an access watchpoint",
}
_SIGNALS = {2: "SIGINT", 4: "SIGILL", 5: "SIGTRAP", 7: "SIGBUS", 8: "SIGFPE", 11: "SIGSEGV"}


def _where(target: HvTarget, tid: int) -> str:
    rip = target.registers(tid)["rip"]
    symbolize = getattr(target.vmm, "symbolize", None)
    return f"rip {rip:#x}{symbolize(rip) if symbolize is not None else ''}"


def _system_reset(target: HvTarget, args: list[str]) -> str:
    reset = getattr(target.vmm, "reset", None)
    if reset is None:
        raise MonitorError("this VMM cannot reset its machine")
    if target.is_running():
        raise MonitorError("stop the guest first (Ctrl-C)")
    tid = _tid(target)
    target.on_vcpu(tid, reset)
    target.invalidate_registers()
    return (
        "the machine was reset: the guest starts again at its entry point on continue\n"
        "(gdb keeps its register cache: maintenance flush register-cache)\n"
    )


def _quit(target: HvTarget, args: list[str]) -> str:
    target.quit_requested = True
    return "gdbstub: quitting (the VM ends)\n"


_DUMP_DIRS: weakref.WeakKeyDictionary[HvTarget, Path] = weakref.WeakKeyDictionary()
_DUMP_USAGE = "usage: dump-guest-memory FILE (an ELF core of guest RAM, as QEMU's without -p)"
# selector, limit, access rights, base: the VMCS fields of each segment in QEMU's note
_SEGMENT_FIELDS = {
    name: tuple(getattr(hv, f"VMCS_GUEST_{vmcs}{part}") for part in ("", "_LIMIT", "_AR", "_BASE"))
    for name, vmcs in (("cs", "CS"), ("ds", "DS"), ("es", "ES"), ("fs", "FS"), ("gs", "GS"),
                       ("ss", "SS"), ("ldt", "LDTR"), ("tr", "TR"))
}  # fmt: skip


def allow_dumps(target: HvTarget, directory: Path) -> None:
    """Let ``dump-guest-memory`` write into ``directory`` (``gdbstub run --dump-dir DIR``)."""
    _DUMP_DIRS[target] = directory


def _segments(target: HvTarget, tid: int) -> dict[str, coredump.Segment]:
    def read(vcpu: int) -> dict[str, coredump.Segment]:
        vmcs = hv.hv_vmx_vcpu_read_vmcs
        out = {
            name: coredump.Segment.from_vmx(*(vmcs(vcpu, f) for f in fields))
            for name, fields in _SEGMENT_FIELDS.items()
        }
        for name, table in (("gdt", "GDTR"), ("idt", "IDTR")):
            limit = vmcs(vcpu, getattr(hv, f"VMCS_GUEST_{table}_LIMIT"))
            out[name] = coredump.Segment(
                limit=limit, base=vmcs(vcpu, getattr(hv, f"VMCS_GUEST_{table}_BASE"))
            )
        return out

    try:
        return dict(target.on_vcpu(tid, read))
    except hv.HvError:
        return {}  # the note then has the selectors only


def _dump_guest_memory(target: HvTarget, args: list[str]) -> str:
    if len(args) != 1 or args[0].startswith("-"):
        raise MonitorError(_DUMP_USAGE)
    directory = _DUMP_DIRS.get(target)
    if directory is None:
        raise MonitorError(
            "dump-guest-memory writes only into a folder you allow: "
            "start gdbstub run with --dump-dir DIR"
        )
    if target.is_running():
        raise MonitorError("stop the guest first (Ctrl-C)")
    cpus = [
        coredump.CpuState(target.registers(tid), _segments(target, tid))
        for tid in target.thread_ids()
    ]
    try:
        out, path = coredump.open_in(directory, args[0])
    except coredump.DumpPathError as exc:
        raise MonitorError(f"dump-guest-memory: {exc}") from exc
    ranges = target.memory.ranges()
    with out:
        size = coredump.write_core(out, ranges, target.memory.read, cpus)
    ram = sum(length for _, length in ranges)
    return (
        f"guest RAM ({ram >> 20} MiB in {len(ranges)} region{'s' * (len(ranges) != 1)}) and "
        f"{len(cpus)} vCPU{'s' * (len(cpus) != 1)} dumped to {path} ({size} bytes, ELF core); "
        f"gdb -ex 'target core {path}'\n"
    )


def _status(target: HvTarget, args: list[str]) -> str:
    """Per vCPU: running, or stopped for the debugger (and why), or halted in HLT; then
    what the machine says when it is more than "running" (a fault, an exit)."""
    lines = [f"backend {hv.backend_name()}"]
    stop = target.last_stop()
    what = str(getattr(target.vmm, "what", "running"))
    for tid in target.thread_ids():
        state = target.thread_state(tid)
        name = f"vCPU {tid - 1}"
        if state == "running":
            lines.append(f"{name}: running")
            continue
        if stop.exit_status is not None:
            lines.append(f"{name}: stopped: the guest exited with status {stop.exit_status}")
            continue
        if state == "halted":
            how = what if what.startswith("halted") else "halted in HLT"
            lines.append(f"{name}: {how} (waiting for an interrupt), at {_where(target, tid)}")
            continue
        why = ""
        if stop.thread == tid:
            why = _STOP_WHY.get(stop.reason or "", "")
            if stop.reason in ("watch", "rwatch", "awatch") and stop.address is not None:
                why += f" on {stop.address:#x}"
            if not why:
                why = {2: "by Ctrl-C", 5: "by a step or at start-up"}.get(
                    stop.signal, f"by {_SIGNALS.get(stop.signal, f'signal {stop.signal}')}"
                )
        lines.append(f"{name}: stopped {why or 'with the others'}, at {_where(target, tid)}")
    unexpected = stop.exit_status is not None or stop.signal not in (2, 5)
    if unexpected and what != "running" and not what.startswith("halted"):
        lines.append(f"guest: {what}")
    return "\n".join(lines) + "\n"


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
    Command(
        ("system_reset",),
        _system_reset,
        "system_reset",
        "reset the PC (as QEMU's): images reloaded, gdb's breakpoints planted again",
    ),
    Command(("quit",), _quit, "quit", "end the VM and the stub (as QEMU's quit)"),
    Command(
        ("dump-guest-memory",),
        _dump_guest_memory,
        "dump-guest-memory FILE",
        "ELF core of guest RAM into the --dump-dir folder (gdb: target core FILE)",
    ),
    Command(("status",), _status, "status", "backend, each vCPU's state, what happened"),
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
