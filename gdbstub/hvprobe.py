"""What the host's vCPUs can do for a debugger, found out on a scratch vCPU when the VM starts.

Theory of operation
-------------------
Every debugger feature is chosen by what a tiny guest observes, never by the host's name: an
``int3`` with #BP intercepted, a DR0 execution breakpoint, a DR0 data write breakpoint, a
monitor-trap-flag step, and an AVX instruction that really executes. The scratch vCPU is set up
as a framework VMM must (``vmxsetup``: CR0.NE and CR4.VMXE behind masks and shadows, the
controls by cap2ctrl) in flat 32-bit protected mode, with a usable TR (busy 32-bit TSS, byte
limit 0x67) and an unusable LDTR, so that an entry on the real framework succeeds and each
probe measures the feature, not a set-up the processor refuses. A page of guest RAM lends the
probes their code and is restored afterwards.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from . import hv, vmxsetup
from .memory import GuestMemory

log = logging.getLogger(__name__)

# (selector, limit, access rights) of ES CS SS DS FS GS LDTR TR: flat 32-bit code and data, no
# LDT, a busy 32-bit TSS with a byte-granular limit (G=0 needs a limit below 1 MiB)
_FLAT32 = (
    (0x10, 0xFFFFFFFF, 0xC093),
    (0x08, 0xFFFFFFFF, 0xC09B),
    (0x10, 0xFFFFFFFF, 0xC093),
    (0x10, 0xFFFFFFFF, 0xC093),
    (0x10, 0xFFFFFFFF, 0xC093),
    (0x10, 0xFFFFFFFF, 0xC093),
    (0x00, 0, 0x10000),
    (0x18, 0x67, 0x8B),
)


@dataclass
class HostDebugFeatures:
    """What the host's vCPUs can do for a debugger, as probed when the VM starts."""

    int3: bool = True
    dr_exec: bool = True
    dr_data: bool = True
    step: bool = True
    avx: bool = True

    def describe(self) -> str:
        """One line per feature, for ``monitor info breakpoints`` and the log."""
        software = "int3" if self.int3 else "debug registers (int3 cannot be intercepted)"
        watch = (
            "debug registers"
            if self.dr_data
            else ("write-protected pages (DR data breakpoints do not fire)")
        )
        return (
            f"software breakpoints: {software}\n"
            f"watchpoints: {watch}\n"
            f"hardware breakpoints: {'debug registers' if self.dr_exec else 'unavailable'}\n"
            f"single-step: {'monitor trap flag' if self.step else 'unavailable'}"
        )


def probe_host(memory: GuestMemory) -> HostDebugFeatures:
    """Find out on a scratch vCPU what the host can do for a debugger.

    Runs tiny 32-bit programs in a page of guest RAM (restored afterwards): an ``int3`` with #BP
    intercepted, a DR0 execution breakpoint, a DR0 data write breakpoint, and an MTF step. Each
    feature is the observed exit, never the host's name.
    """
    scratch = 0x8000 if memory.contains(0x8000) else memory.ranges()[0][0] + 0x8000
    saved = memory.read(scratch, 0x2000)
    result: dict[str, bool] = {}

    def flat32(vcpu: int, code: bytes, cr4: int = 0) -> None:
        memory.write(scratch, code)
        for i, (selector, limit, ar) in enumerate(_FLAT32):
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES + 2 * i, selector)
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_BASE + 2 * i, 0)
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_LIMIT + 2 * i, limit)
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_AR + 2 * i, ar)
        vmxsetup.setup_vcpu(vcpu, cr0=hv.CR0_PE | hv.CR0_ET, cr4=cr4, efer=0)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, scratch)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RFLAGS, 2)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RBX, scratch + 0x1000)

    def run(vcpu: int) -> tuple[int, int, int]:
        hv.hv_vcpu_run_until(vcpu, hv.deadline_after_ns(500_000_000))
        return (
            hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON),
            hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_IRQ_INFO) & 0xFF,
            hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC),
        )

    def probes(vcpu: int) -> None:
        flat32(vcpu, b"\x90\xcc\xf4")  # nop; int3; hlt
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_BP)
        reason, vector, _ = run(vcpu)
        result["int3"] = (
            reason == hv.VMX_REASON_EXC_NMI
            and vector == hv.IDT_BP
            and hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == scratch + 1
        )
        flat32(vcpu, b"\x90\x90\xf4")  # nop; nop (DR0 here); hlt
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 1 << hv.IDT_DB)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR0, scratch + 1)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR7, 0x703)
        reason, vector, qual = run(vcpu)
        result["dr_exec"] = (
            reason == hv.VMX_REASON_EXC_NMI and vector == hv.IDT_DB and bool(qual & 1)
        )
        flat32(vcpu, b"\x88\x03\xf4")  # mov [ebx], al; hlt
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR0, scratch + 0x1000)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR7, 0x10703)  # write, 1 byte
        reason, vector, qual = run(vcpu)
        result["dr_data"] = (
            reason == hv.VMX_REASON_EXC_NMI and vector == hv.IDT_DB and bool(qual & 1)
        )
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_DR7, 0x400)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_EXC_BITMAP, 0)
        flat32(vcpu, b"\x90\x90\xf4")
        proc = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED)
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, proc | hv.CPU_BASED_MTF)
        reason, _, _ = run(vcpu)
        result["step"] = (
            reason == hv.VMX_REASON_MTF
            and hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP) == scratch + 1
        )
        hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_CTRL_CPU_BASED, proc & ~hv.CPU_BASED_MTF)
        try:  # AVX: XCR0 takes YMM and a VEX instruction really executes (emulators may lack it)
            avx_cr4 = hv.CR4_OSXSAVE | hv.CR4_OSXMMEXCPT | hv.CR4_OSFXSR
            flat32(vcpu, b"\xc5\xfd\xef\xc0\xf4", avx_cr4)  # vpxor ymm0, ymm0, ymm0; hlt
            hv.hv_vcpu_write_register(vcpu, hv.HV_X86_XCR0, 7)
            reason, _, _ = run(vcpu)
            result["avx"] = (
                reason == hv.VMX_REASON_HLT and hv.hv_vcpu_read_register(vcpu, hv.HV_X86_XCR0) == 7
            )
        except hv.HvError:
            result["avx"] = False

    errors: list[BaseException] = []

    def probe_thread() -> None:
        try:
            vcpu = hv.hv_vcpu_create(hv.HV_VCPU_DEFAULT)
        except hv.HvError as exc:
            errors.append(exc)
            return
        try:
            probes(vcpu)
        except hv.HvError as exc:
            errors.append(exc)
        finally:
            hv.hv_vcpu_destroy(vcpu)

    thread = threading.Thread(target=probe_thread, name="debug-probe")
    thread.start()
    thread.join()
    memory.write(scratch, saved)
    if errors:
        log.warning("debug feature probe failed: %s", errors[0])
    return HostDebugFeatures(
        **{k: result.get(k, False) for k in ("int3", "dr_exec", "dr_data", "step", "avx")}
    )
