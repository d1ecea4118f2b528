"""What KVM_RUN returned, as the framework's exits (the KVM backend's exit handlers).

Theory of operation
-------------------
* **The instruction-exit contract.** On I/O, HLT, RDMSR and WRMSR exits RIP points at the
  instruction and VMCS_RO_VMEXIT_INSTR_LEN gives its length; the VMM writes results and
  advances RIP. KVM has already executed some of them when it exits (kvm_pvm emulates CPL0
  code: OUT, IN, HLT): :meth:`Exits._locate_instruction` finds the instruction at RIP or just
  before it (the host's probed habit decides when both fit), RIP is reported at the
  instruction, and the next entry (kvm_entry) rewinds or feeds KVM so that the net effect is
  exactly what the VMM asked for.
* **I/O sites.** A loop exits at the same place again and again. An I/O exit is keyed by one
  unpack of kvm_run (:data:`EXIT_SNAPSHOT`: exit reason, io header, RIP, CS base, CR0, CR3,
  CR4) and its decoded :class:`~gdbstub.hv.kvm_state.IoSite` is used again while the code bytes
  around RIP are unchanged (docs/performance.md); the run loop (kvm_run) does that inline and
  calls :meth:`Exits._io_site` only for a new or changed site.
* **MMIO.** KVM decodes accesses to unmapped or read-only memory: exit 48 with the GPA, the
  access and permission bits, the guest-linear address (kvm_exitinfo) and the extension fields
  GDBSTUB_VMCS_MMIO_DECODED / _SIZE / _DATA. KVM completes the instruction; the VMM supplies the
  value of a read (kvm_entry hands it over).
* **MSRs.** A guest RDMSR/WRMSR that KVM sends to user space (kvm_msrs) is completed here when
  this vCPU may access the MSR natively, and is exit 31/32 otherwise.
* **Debug and exceptions.** KVM_EXIT_DEBUG is MTF (a single step), exit 0 for #BP (soft
  exception, length 1) or exit 0 for #DB with the DR6 bits in the qualification.
* **Failures.** KVM's failures are failed entries (0x80000021) with KVM's reason in the
  qualification, except emulation failures the backend completes (kvm_emufail). A shutdown or a
  system event is a triple fault.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from . import common, kvm_exitinfo
from . import constants as C
from . import kvm_abi as K
from .errors import HvError
from .kvm_emufail import EmulationFailures
from .kvm_state import MASK64, NO_CODE, PAGE, IoSite, Vcpu

if TYPE_CHECKING:
    from .kvm import KvmBackend


def _layout(*fields: tuple[int, str]) -> struct.Struct:
    """A little-endian struct reading ``(offset, format)`` fields (ascending) and skipping the
    bytes between them."""
    fmt, at = "<", 0
    for offset, code in fields:
        fmt += f"{offset - at}x{code}" if offset > at else code
        at = offset + struct.calcsize("<" + code)
    return struct.Struct(fmt)


# What an exit is about, in one unpack of kvm_run: the exit reason, the io header (direction,
# size, port), then with sync regs rip, cs.base, cr0, cr3, cr4. For an I/O exit it identifies the
# exit site: the same place, instruction and paging state.
EXIT_SNAPSHOT = _layout(
    (K.RUN_EXIT_REASON, "I"),
    (K.RUN_IO_DIRECTION, "BBH"),
    (K.RUN_SYNC_REGS + 128, "Q"),  # rip
    (K.RUN_SYNC_SREGS, "Q"),  # cs.base
    (K.RUN_SYNC_SREGS + 224, "Q"),  # cr0
    (K.RUN_SYNC_SREGS + 240, "QQ"),  # cr3, cr4
).unpack_from


class Exits(EmulationFailures):
    """Exit handlers (see the module docstring)."""

    # --- where the instruction is -----------------------------------------------------------------

    def _locate_instruction(
        self, vcpu: Vcpu, matches: Callable[[bytes], int], kind: str, key: int = 0
    ) -> tuple[int, int, bool]:
        """Find the instruction an exit is about: ``(start rip, length, completed by KVM)``.

        KVM leaves RIP at the instruction on VMX but has already executed some instructions
        (OUT, HLT...) when it emulated them. ``matches(code)`` returns the length of the
        instruction at the start of ``code`` if it is one that could cause this exit, else 0.
        When both "at RIP" and "just before RIP" fit, the host's probed habit decides.
        """
        regs = self._get(vcpu, "regs")
        linear = (self._get(vcpu, "sregs").cs.base + regs.rip) % (1 << 64)
        window = self._read_linear(vcpu, linear - 15, 30) if linear >= 15 else b""
        # A loop exits at the same place again and again: the answer for the same code bytes
        # around the same linear RIP (and the same port/direction, ``key``) is the same.
        cache_key = (linear, kind, key)
        cached = vcpu.insn_cache.get(cache_key)
        if cached is not None and cached[0] == window and window:
            start_offset, length, completed = cached[1]
            return (regs.rip - start_offset) % (1 << 64), length, completed
        result = self._locate_uncached(regs.rip, linear, window, vcpu, matches, kind)
        if window:
            if len(vcpu.insn_cache) > 256:
                vcpu.insn_cache.clear()
            offset = (regs.rip - result[0]) % (1 << 64)
            vcpu.insn_cache[cache_key] = (window, (offset, result[1], result[2]))
        return result

    def _locate_uncached(
        self,
        rip: int,
        linear: int,
        window: bytes,
        vcpu: Vcpu,
        matches: Callable[[bytes], int],
        kind: str,
    ) -> tuple[int, int, bool]:
        at_code = window[15:] if len(window) == 30 else self._read_linear(vcpu, linear, 15)
        at_len = matches(at_code)
        before = [n for n in range(1, 16) if len(window) == 30 and matches(window[15 - n :]) == n]
        if at_len and (not before or not self._completes_before_exit(kind)):
            return int(rip), at_len, False
        if before:
            return (rip - before[0]) % (1 << 64), before[0], True
        return int(rip), at_len or 1, False

    def _io_key(self, vcpu: Vcpu, snapshot: tuple[int, ...]) -> tuple[int, ...]:
        """The I/O site key of an exit without sync regs: ``snapshot`` (EXIT_SNAPSHOT of
        kvm_run) holds stale registers then, the real ones come from KVM."""
        regs, sregs = self._get(vcpu, "regs"), self._get(vcpu, "sregs")
        return (*snapshot[:4], regs.rip, sregs.cs.base, sregs.cr0, sregs.cr3, sregs.cr4)

    def _io_site(self, vcpu: Vcpu, key: tuple[int, ...]) -> IoSite:
        """Decode the I/O instruction of this exit and remember it under ``key`` (the exit's
        snapshot: reason, direction, size, port, rip, cs.base, cr0, cr3, cr4) when the code
        around it lies in one page (its bytes then validate the entry at the next exit)."""
        _, direction, size, port, rip_at_exit, cs_base = key[:6]
        is_in_exit = direction == K.KVM_EXIT_IO_IN
        linear = (cs_base + rip_at_exit) & MASK64
        regs = self._get(vcpu, "regs")
        dx = regs.rdx & 0xFFFF

        def matches(code: bytes) -> int:
            length, op, operand = common.decode_io(code)
            if op is None or (op in common.IN_OPCODES) != is_in_exit:
                return 0
            return length if (operand if op in common.IMM_OPCODES else dx) == port else 0

        rip, length, completed = self._locate_instruction(
            vcpu, matches, "in" if is_in_exit else "out", port << 1 | is_in_exit
        )
        back = (regs.rip - rip) & MASK64
        code = self._read_linear(vcpu, (linear - back) & MASK64, length)
        _, op, _ = common.decode_io(code)
        qual = (size - 1) | port << C.EXIT_QUAL_IO_PORT_SHIFT
        if is_in_exit:
            qual |= C.EXIT_QUAL_IO_IN
        if op in (0x6C, 0x6D, 0x6E, 0x6F):
            qual |= C.EXIT_QUAL_IO_STRING
            if any(b in (0xF2, 0xF3) for b in code[: length - 1]):
                qual |= C.EXIT_QUAL_IO_REP
        fields = {
            C.VMCS_RO_EXIT_REASON: C.VMX_REASON_IO,
            C.VMCS_RO_EXIT_QUALIFIC: qual,
            C.VMCS_RO_VMEXIT_INSTR_LEN: length,
        }
        first = linear - 15
        split = min(30, PAGE - (first & 0xFFF))
        host = host2 = None
        if first >= 0:
            host = self._linear_to_host(vcpu, first)
            host2 = self._linear_to_host(vcpu, first + split) if split < 30 else 0
        if host is None or host2 is None:
            return IoSite(NO_CODE, b"", None, b"", back, completed, is_in_exit, fields)
        view = (ctypes.c_char * split).from_address(host)
        view2 = (ctypes.c_char * (30 - split)).from_address(host2) if host2 else None
        window2 = view2.raw if view2 is not None else b""
        site = IoSite(view, view.raw, view2, window2, back, completed, is_in_exit, fields)
        if len(vcpu.io_cache) > 256:
            vcpu.io_cache.clear()
        vcpu.io_cache[key] = site
        return site

    # --- exit handlers ----------------------------------------------------------------------------

    def _exit_hlt(self, vcpu: Vcpu) -> bool:
        rip, _, completed = self._locate_instruction(
            vcpu, lambda code: 1 if code[:1] == b"\xf4" else 0, "hlt"
        )
        if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_HLT:
            if completed:
                self._dirty(vcpu, "regs").rip = rip  # the framework reports RIP at the HLT
            self._set_exit(vcpu, C.VMX_REASON_HLT, length=1)
            return True
        if not completed:
            self._dirty(vcpu, "regs").rip = (rip + 1) % (1 << 64)
        vcpu.controls[C.VMCS_GUEST_ACTIVITY_STATE] = C.GUEST_ACTIVITY_HLT
        return False

    def _exit_mmio(self, vcpu: Vcpu) -> bool:
        run = vcpu.run
        gpa = struct.unpack_from("<Q", run, K.RUN_MMIO_PHYS_ADDR)[0]
        size = struct.unpack_from("<I", run, K.RUN_MMIO_LEN)[0]
        is_write = run[K.RUN_MMIO_IS_WRITE]
        region = None
        if self._host_address(vcpu.space, gpa) is not None:
            region = common.region_at(vcpu.space.regions, gpa)
        qual = C.EPT_VIOLATION_DATA_WRITE if is_write else C.EPT_VIOLATION_DATA_READ
        qual |= common.ept_permission_bits(region.flags if region is not None else 0)
        data = (
            int.from_bytes(bytes(run[K.RUN_MMIO_DATA : K.RUN_MMIO_DATA + min(size, 8)]), "little")
            if is_write
            else 0
        )
        # what VMX adds and KVM_EXIT_MMIO lacks: the guest-linear address
        extra: dict[str, int] = {}
        gla = kvm_exitinfo.access_linear(cast("KvmBackend", self), vcpu, gpa)
        if gla is not None:
            qual |= C.EPT_VIOLATION_GLA_VALID | C.EPT_VIOLATION_XLAT_VALID
            extra["gla"] = gla
        self._set_exit(
            vcpu,
            C.VMX_REASON_EPT_VIOLATION,
            qual=qual,
            gpa=gpa,
            mmio_size=size,
            mmio_data=data,
            mmio_decoded=1,
            **extra,
        )
        vcpu.pending = ("mmio", 0)
        return True

    def _exit_debug(self, vcpu: Vcpu) -> bool:
        run = vcpu.run
        exception = struct.unpack_from("<I", run, K.RUN_DEBUG_EXCEPTION)[0]
        dr6 = struct.unpack_from("<Q", run, K.RUN_DEBUG_DR6)[0]
        stepping = vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_MTF
        if exception == C.IDT_DB and stepping and dr6 & C.DR6_BS and not dr6 & 0xF:
            self._set_exit(vcpu, C.VMX_REASON_MTF)
            return True
        if exception == C.IDT_BP:
            self._set_exit(
                vcpu,
                C.VMX_REASON_EXC_NMI,
                length=1,
                irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_SOFT_EXC | C.IDT_BP,
            )
            return True
        self._set_exit(
            vcpu,
            C.VMX_REASON_EXC_NMI,
            qual=dr6 & (0xF | C.DR6_BD | C.DR6_BS),
            irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | exception,
        )
        return True

    def _exit_exception(self, vcpu: Vcpu) -> bool:
        exception = struct.unpack_from("<I", vcpu.run, K.RUN_UNION)[0]
        error = struct.unpack_from("<I", vcpu.run, K.RUN_UNION + 4)[0]
        self._set_exit(
            vcpu,
            C.VMX_REASON_EXC_NMI,
            irq_error=error,
            irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | (exception & 0xFF),
        )
        return True

    def _exit_shutdown(self, vcpu: Vcpu) -> bool:
        self._set_exit(vcpu, C.VMX_REASON_TRIPLE_FAULT)
        return True

    def _exit_fail_entry(self, vcpu: Vcpu) -> bool:
        hw = struct.unpack_from("<Q", vcpu.run, K.RUN_FAIL_ENTRY_REASON)[0]
        self._set_exit(
            vcpu, C.VMX_EXIT_REASON_FAILED_ENTRY | (hw & 0xFFFF or C.VMX_REASON_VMENTRY_GUEST)
        )
        return True

    def _exit_internal(self, vcpu: Vcpu) -> bool:
        # KVM could not go on (for example it failed to emulate an instruction): reported as a
        # failed entry (invalid guest state) with KVM's suberror in the qualification, unless
        # the instruction is an INT3 / INT n the backend executes itself.
        suberror = struct.unpack_from("<I", vcpu.run, K.RUN_INTERNAL_SUBERROR)[0]
        if suberror == K.KVM_INTERNAL_ERROR_EMULATION:
            handled = self._complete_failed_emulation(vcpu)
            if handled is not None:
                return handled
        self._set_exit(
            vcpu, C.VMX_EXIT_REASON_FAILED_ENTRY | C.VMX_REASON_VMENTRY_GUEST, qual=suberror
        )
        return True

    def _exit_irq_window(self, vcpu: Vcpu) -> bool:
        self._set_exit(vcpu, C.VMX_REASON_IRQ_WND)
        return True

    def _exit_msr(self, vcpu: Vcpu) -> bool:
        run = vcpu.run
        reason = struct.unpack_from("<I", run, K.RUN_EXIT_REASON)[0]
        index = struct.unpack_from("<I", run, K.RUN_MSR_INDEX)[0]
        is_write = reason == K.KVM_EXIT_X86_WRMSR
        allowed = vcpu.msr.access.get(index, 0) & (C.HV_MSR_WRITE if is_write else C.HV_MSR_READ)
        if allowed:
            try:
                if is_write:
                    value = struct.unpack_from("<Q", run, K.RUN_MSR_DATA)[0]
                    self._set_msr(vcpu, index, value)
                else:
                    struct.pack_into("<Q", run, K.RUN_MSR_DATA, self._get_msr(vcpu, index))
                run[K.RUN_MSR_ERROR] = 0
            except HvError:
                run[K.RUN_MSR_ERROR] = 1
            return False
        completed = self._completes_before_exit("msr")
        if completed:  # the framework reports RIP at the RDMSR/WRMSR
            regs = self._dirty(vcpu, "regs")
            regs.rip = (regs.rip - 2) % (1 << 64)
        self._set_exit(vcpu, C.VMX_REASON_WRMSR if is_write else C.VMX_REASON_RDMSR, length=2)
        vcpu.pending = ("msr", 1 if completed else 0)
        return True

    def _exit_system_event(self, vcpu: Vcpu) -> bool:
        self._set_exit(vcpu, C.VMX_REASON_TRIPLE_FAULT)
        return True


EXIT_HANDLERS: dict[int, Callable[[Exits, Vcpu], bool]] = {
    K.KVM_EXIT_HLT: Exits._exit_hlt,
    K.KVM_EXIT_MMIO: Exits._exit_mmio,
    K.KVM_EXIT_DEBUG: Exits._exit_debug,
    K.KVM_EXIT_EXCEPTION: Exits._exit_exception,
    K.KVM_EXIT_SHUTDOWN: Exits._exit_shutdown,
    K.KVM_EXIT_FAIL_ENTRY: Exits._exit_fail_entry,
    K.KVM_EXIT_INTERNAL_ERROR: Exits._exit_internal,
    K.KVM_EXIT_IRQ_WINDOW_OPEN: Exits._exit_irq_window,
    K.KVM_EXIT_X86_RDMSR: Exits._exit_msr,
    K.KVM_EXIT_X86_WRMSR: Exits._exit_msr,
    K.KVM_EXIT_SYSTEM_EVENT: Exits._exit_system_event,
}
"""KVM exit reason -> handler: True when it recorded an exit for the caller."""
