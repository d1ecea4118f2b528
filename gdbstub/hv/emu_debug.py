"""The emu backend's debug registers: DR0-DR3/DR7 as code hooks and watched pages.

Theory of operation
-------------------
Execution breakpoints are code hooks on the exact linear addresses (fault-like, RIP at the
instruction, RFLAGS.RF suppresses one hit). Data breakpoints write-protect (or, for read/write,
access-protect) the guest-physical page; the run loop single-steps an access to such a page
with the page opened and raises a trap-like #DB (RIP after the instruction) when the access
overlaps a DR range (``EmuBackend._watch_step``).

unicorn checks a page's read permission only on its slow path, when a load misses its
software TLB; the TLB entry of a page holds read, write and fetch at once, filled from the
guest's page tables whatever the page's unicorn permissions. So once a fetch from the page
(code next to the data), a write to it, or a translation drop there (``ctl_remove_cache``)
has filled the entry, loads from an access-protected page run unchecked. While a read/write
watch is armed, a UC_HOOK_MEM_READ hook that never matches is installed: with any such hook
unicorn sends every load through the slow path (loads cost more while it is there).
Writes need nothing: stores to a page that holds translated code, or that was never written,
take the slow path anyway, and a watched page is dropped from the TLB when it is closed.
"""

from __future__ import annotations

from typing import Any

from . import constants as C
from .emu_nets import SafetyNets
from .emu_state import M64, Vcpu, X, unicorn


def _never(*_args: Any) -> None:
    """The read hook of an armed read watch (bound to no address: never called)."""


class DebugRegs(SafetyNets):
    """DR0-DR3/DR7 (see the module docstring)."""

    def _apply_debug(self, vcpu: Vcpu) -> None:
        """Turn DR0-DR3/DR7 into code hooks (execution) and protected pages (data)."""
        uc = vcpu.uc
        vcpu.dr_dirty = False
        dr7 = uc.reg_read(X.UC_X86_REG_DR7)
        exec_bps: dict[int, int] = {}
        watch: list[tuple[int, int, int, bool]] = []
        pages: dict[int, int] = {}
        for i in range(4):
            if not dr7 >> (2 * i) & 3:
                continue
            address = int(uc.reg_read(X.UC_X86_REG_DR0 + i))
            rw = dr7 >> (16 + 4 * i) & 3
            length = {0: 1, 1: 2, 2: 8, 3: 4}[dr7 >> (18 + 4 * i) & 3]
            if rw == 0:
                exec_bps[address] = exec_bps.get(address, 0) | 1 << i
            elif rw in (1, 3):
                lo = address & ~(length - 1)
                watch.append((1 << i, lo, lo + length, rw == 3))
                for linear in {lo & ~0xFFF, (lo + length - 1) & ~0xFFF}:
                    gpa = self._translate(vcpu, linear)
                    if gpa is not None:
                        remove = unicorn.UC_PROT_WRITE
                        if rw == 3:
                            remove |= unicorn.UC_PROT_READ
                        pages[gpa & ~0xFFF] = pages.get(gpa & ~0xFFF, 0) | remove
        for address in [a for a in vcpu.dr_exec_hooks if a not in exec_bps]:
            uc.hook_del(vcpu.dr_exec_hooks.pop(address))
            uc.ctl_remove_cache(address, address + 1)
        for address in exec_bps:
            if address not in vcpu.dr_exec_hooks:

                def on_exec(uc_: Any, addr: int, size: int, _data: Any) -> None:
                    self._on_exec_breakpoint(vcpu, addr)

                vcpu.dr_exec_hooks[address] = uc.hook_add(
                    unicorn.UC_HOOK_CODE, on_exec, None, address, address
                )
                uc.ctl_remove_cache(address, address + 1)
        vcpu.dr_exec = exec_bps
        vcpu.watch = watch
        self._checked_loads(vcpu, any(reads for *_, reads in watch))
        if pages != vcpu.watch_pages:
            vcpu.watch_pages = pages
            self._remap(vcpu)

    @staticmethod
    def _checked_loads(vcpu: Vcpu, on: bool) -> None:
        """Send every load through unicorn's slow path, where read protection is checked, or
        let them take the fast path again (see the module docstring)."""
        if on == (vcpu.read_hook is not None):
            return
        uc = vcpu.uc
        if on:
            vcpu.read_hook = uc.hook_add(unicorn.UC_HOOK_MEM_READ, _never, None, M64, M64)
        else:
            uc.hook_del(vcpu.read_hook)
            vcpu.read_hook = None
        uc.ctl_flush_tb()  # the slow path is chosen when a block is translated

    def _on_exec_breakpoint(self, vcpu: Vcpu, address: int) -> None:
        if vcpu.exit_recorded or vcpu.pending_event is not None or vcpu.recovery is not None:
            return
        if vcpu.skip_rip == address:
            vcpu.skip_rip = None
            return
        bits = vcpu.dr_exec.get(address, 0)
        if not bits:
            return
        if vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & (1 << C.IDT_DB):
            self._stop(
                vcpu,
                C.VMX_REASON_EXC_NMI,
                qual=bits,
                irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | C.IDT_DB,
            )
        else:
            self._set_dr6(vcpu, bits)
            vcpu.pending_event = (C.IDT_DB, C.IRQ_INFO_HARD_EXC, None)
            vcpu.uc.emu_stop()

    def _set_dr6(self, vcpu: Vcpu, bits: int) -> None:
        dr6 = vcpu.uc.reg_read(X.UC_X86_REG_DR6)
        vcpu.uc.reg_write(X.UC_X86_REG_DR6, (dr6 & ~0x400F) | bits | 0xFFFF0FF0)

    def _access_linear(self, vcpu: Vcpu, gpa: int) -> int | None:
        """A linear address of the watch list whose page maps to ``gpa``'s page, if any."""
        for _bit, lo, _hi, _reads in vcpu.watch:
            phys = self._translate(vcpu, lo)
            if phys is not None and phys & ~0xFFF == gpa & ~0xFFF:
                return (lo & ~0xFFF) | (gpa & 0xFFF)
        return None
