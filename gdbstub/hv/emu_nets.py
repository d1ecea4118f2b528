"""The emu backend's safety nets: instruction sites that ran without their code hook.

Theory of operation
-------------------
Chunks of shared code are scanned by byte patterns only (``emu_code``), so the one-byte
opcodes that must exit (IN/OUT/INS/OUTS, HLT) get no code hook there, and neither does CPUID
in code that another address space maps at a scanned address. They are caught here the first
time they run, precisely, and get their code hook; from then on they exit like any site.

* **IN/OUT/INS/OUTS and CPUID** reach unicorn's UC_HOOK_INSN hooks from inside the
  instruction's helper, after unicorn has synchronised the CPU state to the instruction (RIP
  at it, the flags computed) and before the instruction has any effect. The hook saves a
  context there, watches the writes to memory (a UC_HOOK_MEM_WRITE hook, which receives the
  guest-physical address before the store; the old bytes are saved) and asks unicorn to stop.
  unicorn cannot leave a translated block in the middle, so the rest of the block still runs;
  when ``emu_start`` returns, the memory it wrote is put back, the saved context restored,
  whatever it raised (faults, exits, other sites) discarded, and a code hook put on the
  instruction. The next entry stops at the hook: the exit is the one the framework makes.
  An I/O instruction whose hook let it run because it faults first (CPL above IOPL) raises
  #GP(0) instead (unicorn would perform it; the TSS I/O bitmap is not consulted).
* **HLT** ends unicorn's run (EXCP_HLT) with RIP past it and nothing else changed. A run that
  stops for none of the backend's reasons (no exit, event, kick or deadline) with an F4 byte
  just before RIP, or a single step over an F4, was a HLT: RIP goes back to it and it gets
  its code hook.

RDMSR/WRMSR/SYSRET/IRETQ have no such hook in unicorn, which is why chunks are searched for
their two-byte opcodes wherever they occur.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import constants as C
from .emu_code import CodeScan
from .emu_state import PAGE, Guard, Vcpu, X, unicorn


@dataclass
class Recovery:
    """An instruction caught by a net: where, what, and how to undo the rest of its block."""

    address: int  # guest-linear
    kind: str  # "io" or "cpuid"
    context: Any  # unicorn context saved at the instruction
    fault: bool  # raise #GP(0) at it instead of giving it a code hook
    writes: list[tuple[int, bytes]]  # (gpa, old bytes) of the stores that followed


class SafetyNets(CodeScan):
    """Sites caught when they run without a code hook (see the module docstring)."""

    def _install_nets(self, vcpu: Vcpu) -> None:
        uc = vcpu.uc

        def on_in(uc_: Any, port: int, size: int, _data: Any) -> int:
            self._on_unhooked(vcpu, "io")
            return 0

        def on_out(uc_: Any, port: int, size: int, value: int, _data: Any) -> None:
            self._on_unhooked(vcpu, "io")

        def on_cpuid(uc_: Any, _data: Any) -> int:
            self._on_unhooked(vcpu, "cpuid")
            return 0

        uc.hook_add(unicorn.UC_HOOK_INSN, on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(unicorn.UC_HOOK_INSN, on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(unicorn.UC_HOOK_INSN, on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)

    def _on_unhooked(self, vcpu: Vcpu, kind: str) -> None:
        """Inside an IN/OUT/CPUID: the state is the instruction's, nothing of it done yet."""
        if vcpu.recovery is not None or vcpu.exit_recorded:
            return  # the rest of a block being undone, or a block stopping anyway
        uc = vcpu.uc
        address = self._linear_rip(vcpu)
        fault = False
        if address in vcpu.site_hooks:  # its hook let it run
            if kind != "io" or not self._faults_first(vcpu, kind):
                return
            fault = True
        vcpu.recovery = Recovery(address, kind, uc.context_save(), fault, [])

        def on_write(uc_: Any, access: int, gpa: int, size: int, value: int, _data: Any) -> None:
            recovery = vcpu.recovery
            if recovery is not None:
                try:
                    recovery.writes.append((gpa, self._phys_read(vcpu, gpa, size)))
                except Guard:
                    pass

        vcpu.write_hook = uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, on_write)
        uc.emu_stop()

    def _finish_recovery(self, vcpu: Vcpu) -> None:
        """After the run: undo the rest of the block, then give the instruction its code hook
        (the next entry exits there) or raise its #GP."""
        recovery = vcpu.recovery
        assert recovery is not None
        vcpu.recovery = None
        uc = vcpu.uc
        if vcpu.write_hook is not None:
            uc.hook_del(vcpu.write_hook)
            vcpu.write_hook = None
        for gpa, old in reversed(recovery.writes):
            self._phys_write(vcpu, gpa, old)
        uc.context_restore(recovery.context)
        vcpu.pending_event = None
        vcpu.mem_fault = None
        vcpu.halted = False
        vcpu.emulate_msr = None
        vcpu.emulate = None
        vcpu.after_emulate = None
        vcpu.system_insn = None
        vcpu.stale_fault = True
        if recovery.fault:
            vcpu.pending_event = (C.IDT_GP, C.IRQ_INFO_HARD_EXC, 0)
        else:
            self._new_site(vcpu, recovery.address, recovery.kind)

    def _new_site(self, vcpu: Vcpu, address: int, kind: str) -> None:
        """A site found by a net: a code hook at the next entry, forgotten with its bytes."""
        gpa = self._translate(vcpu, address)
        page = None if gpa is None else self._code_page(vcpu, gpa & ~0xFFF)
        if page is not None:
            offset = address & (PAGE - 1)
            page.sites[address] = (offset, offset + 1)
        vcpu.new_sites[address] = kind

    def _missed_hlt(self, vcpu: Vcpu, start: int | None, stepping: bool) -> bool:
        """Whether the run that began at guest-linear ``start`` ended because a HLT without a
        code hook ran (see the module docstring); if so, RIP is back at it."""
        after = self._linear_rip(vcpu)
        address = after - 1
        if stepping and start != address:
            return False
        if address in vcpu.site_hooks or self._read_linear(vcpu, address, 1) != b"\xf4":
            return False
        uc = vcpu.uc
        uc.reg_write(X.UC_X86_REG_RIP, uc.reg_read(X.UC_X86_REG_RIP) - 1)
        self._new_site(vcpu, address, "hlt")
        return True
