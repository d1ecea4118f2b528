"""The Hypervisor.framework API on Linux KVM.

Theory of operation
-------------------
KVM *is* the framework here: same calls, same return codes, exits described through
``hv_vmx_vcpu_read_vmcs``. What KVM lacks, the backend builds, one job per module. Each module
below holds one base class of :class:`KvmBackend`, derived from the one above it, and imports
only the modules above it (at run time; kvm_emufail and kvm_exits name ``KvmBackend`` in types):

================  ===========================================================================
``kvm_state``     the address-space and vCPU records; the register cache (KVM state fetched
                  once per exit and written back once, regs/sregs in kvm_run's sync area)
``kvm_memory``    KVM memory slots from the framework's regions; guest-linear reads
``kvm_msrs``      the framework's MSR calls, the MSR filter that sends guest RDMSR/WRMSR to
                  the VMM, the guest TSC
``kvm_regs``      registers, FP state and VMCS fields as views of KVM's state
``kvm_entry``     what an entry hands KVM: owed completions, events, guest debug, the VMX
                  entry checks (kvm_gate)
``kvm_emufail``   instructions KVM failed to emulate that the backend executes (INT3, INT n,
                  XGETBV, VEX as #UD, fetches from non-RAM); the rest goes to kvm_complete
``kvm_exits``     KVM's exits as the framework's (instruction exits, I/O sites, MMIO, MSRs,
                  debug, failures)
``kvm_run``       the run loop: kicks, deadlines, the common entry and I/O exit inlined
``kvm``           this module: the VM, address spaces and the vCPU lifecycle
================  ===========================================================================

Beside them: kvm_abi (the ABI), kvm_probes (what this host's KVM does, learned once per
process), kvm_gate (the VMX entry checks), kvm_exitinfo (the guest-linear address of an MMIO
exit), kvm_complete, kvm_softcpu and kvm_xsave (instructions completed in software).

* **Threads.** A vCPU belongs to the thread that created it. Owner-only calls from another
  thread raise ``HvError(HV_BAD_ARGUMENT)``: on the framework a vCPU id is resolved in the
  calling thread's context, so from any other thread it names no vCPU, exactly like an unknown
  id. ``hv_vcpu_interrupt`` is the one cross-thread call.
* **Address spaces.** Each space is its own KVM VM; ``hv_vcpu_set_space`` moves a vCPU by
  creating it in the other VM on the owner thread and transferring its whole state. KVM frees a
  vCPU only with its VM, so the KVM vCPU left behind is parked and reused when the vCPU returns.
* **Host habits.** ``kvm_probes.probe_habits`` runs a scratch guest once per process to learn
  what this host's KVM does: whether OUT/IN/HLT are completed before the exit, whether RIP is past a
  RDMSR/WRMSR sent to user space, and whether the guest TSC can be written at all
  (``hv_vm_sync_tsc`` raises HV_UNSUPPORTED where it cannot, as on kvm_pvm).
* **AVX in guest kernels.** ``kvm_probes.probe_cpl0_avx`` checks that CPL0 code can execute a
  VEX instruction. Where it cannot (kvm_pvm's emulator), the AVX family is taken out of the
  vCPUs' CPUID table (and kvm_emufail turns such an instruction into #UD). kvm_pvm ignores
  KVM_SET_CPUID2 all the same: a guest sees the host's CPUID, AVX-512 and XSAVEC included,
  whatever the table says.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import struct
import threading
from typing import Any

from ..buffers import buffer_address
from . import common, kvm_gate, kvm_probes
from . import constants as C
from . import kvm_abi as K
from .errors import HvError
from .kvm_msrs import SREGS_MSRS
from .kvm_run import KICK_SIGNAL as KICK_SIGNAL
from .kvm_run import Runner
from .kvm_state import PAGE as PAGE
from .kvm_state import Space, Vcpu, forget_translations, words
from .posix import ioctl

_Vcpu = Vcpu  # the name kvm_complete, kvm_exitinfo and kvm_xsave import


class KvmBackend(Runner):
    """``gdbstub.hv`` on /dev/kvm (see the module docstring)."""

    name = "kvm"
    _capabilities = common.vmx_capabilities(C.CPU_BASED2_INVPCID | C.CPU_BASED2_XSAVES_XRSTORS)
    use_sync_regs = True
    """Use KVM_CAP_SYNC_REGS where KVM has it (False: registers by ioctl, as on KVMs without)."""

    def __init__(self) -> None:
        try:
            self._kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise HvError(C.HV_NO_DEVICE, "hv_vm_create", f"/dev/kvm: {exc.strerror}") from exc
        if ioctl(self._kvm, K.KVM_GET_API_VERSION) != 12:
            raise HvError(C.HV_UNSUPPORTED, "hv_vm_create", "KVM API version is not 12")
        self._run_size = ioctl(self._kvm, K.KVM_GET_VCPU_MMAP_SIZE)
        self._cpuid = K.KvmCpuid2()
        self._cpuid.nent = K.CPUID_MAX_ENTRIES
        ioctl(self._kvm, K.KVM_GET_SUPPORTED_CPUID, self._cpuid)
        self.cpl0_avx = kvm_probes.probe_cpl0_avx(self._cpuid)
        if not self.cpl0_avx:
            kvm_probes.hide_avx(
                self._cpuid
            )  # this host cannot run AVX in guest kernels: do not offer it
        self._xsave_size = self._compute_xsave_size()
        self._msr_index = self._read_msr_index_list()
        self._lock = threading.RLock()
        self._spaces: dict[int, Space] = {}
        self._vcpus: dict[int, Vcpu] = {}
        self._live: dict[int, Vcpu] = {}  # not destroyed
        self._next_vcpu = 0
        self._next_space = 1
        self._tsc_khz = 0
        self._habits: dict[str, bool] | None = None
        self._int3: bool | None = None

    # --- helpers ----------------------------------------------------------------------------

    def _compute_xsave_size(self) -> int:
        for i in range(self._cpuid.nent):
            entry = self._cpuid.entries[i]
            if entry.function == 0xD and entry.index == 0:
                return max(int(entry.ecx), 576)
        return 512

    def _read_msr_index_list(self) -> list[int]:
        class _List(ctypes.Structure):
            _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * 1024)]

        lst = _List()
        lst.nmsrs = 1024
        try:
            ioctl(self._kvm, K.KVM_GET_MSR_INDEX_LIST, lst)
        except OSError:
            return []
        return [int(lst.indices[i]) for i in range(lst.nmsrs)]

    def _new_vm(self) -> int:
        vm_fd = ioctl(self._kvm, K.KVM_CREATE_VM, 0)
        try:
            ioctl(vm_fd, K.KVM_SET_TSS_ADDR, 0xFFFBD000)
        except OSError:
            pass
        self._enable_msr_exits(vm_fd)
        return vm_fd

    # --- VM ------------------------------------------------------------------------------------

    def hv_capability(self, cap: int) -> int:
        if cap == C.HV_CAP_VCPUMAX:
            value = ioctl(self._kvm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_MAX_VCPUS)
            return value or ioctl(self._kvm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_NR_VCPUS) or 4
        if cap == C.HV_CAP_ADDRSPACEMAX:
            return 8
        raise common.bad("hv_capability", f"unknown capability {cap}")

    def hv_vm_create(self, flags: int) -> None:
        with self._lock:
            if self._spaces:
                raise HvError(C.HV_BUSY, "hv_vm_create", "this process already has a VM")
            if flags & ~0x7FF:
                raise common.bad("hv_vm_create", f"unknown flags 0x{flags:x}")
            self._spaces[0] = Space(0, self._new_vm())
            self._update_msr_filter(self._spaces[0])
            self._next_vcpu = 0
            self._next_space = 1

    # --- address spaces ---------------------------------------------------------------------------

    def hv_vm_space_create(self) -> int:
        with self._lock:
            self._space0("hv_vm_space_create")
            if len(self._spaces) >= self.hv_capability(C.HV_CAP_ADDRSPACEMAX):
                raise HvError(C.HV_NO_RESOURCES, "hv_vm_space_create", "too many address spaces")
            asid = self._next_space
            self._next_space += 1
            self._spaces[asid] = Space(asid, self._new_vm())
            self._update_msr_filter(self._spaces[asid])
            return asid

    def _close_space(self, space: Space) -> None:
        for fd, run in space.parked.values():
            run.close()
            os.close(fd)
        space.parked.clear()
        os.close(space.vm_fd)

    def hv_vcpu_set_space(self, vcpu_id: int, asid: int) -> None:
        vcpu = self._vcpu(vcpu_id, "hv_vcpu_set_space")
        with self._lock:
            target = self._space(asid, "hv_vcpu_set_space")
        if target is vcpu.space:
            return
        self._flush(vcpu)
        state = self._save_state(vcpu)
        parked = target.parked.pop(vcpu.vid, None)
        fd, run = parked if parked is not None else self._create_kvm_vcpu(target, vcpu.vid)
        vcpu.space.parked[vcpu.vid] = (vcpu.fd, vcpu.run)
        old = vcpu.space
        vcpu.fd, vcpu.run, vcpu.space = fd, run, target
        self._setup_kvm_vcpu(vcpu)
        self._restore_state(vcpu, state)
        forget_translations(vcpu)
        if vcpu.gate is not None:
            vcpu.gate.touch_all()
        with self._lock:
            self._update_msr_filter(old)
            self._update_msr_filter(target)

    def _save_state(self, vcpu: Vcpu) -> dict[str, Any]:
        xsave = K.KvmXsave()
        ioctl(vcpu.fd, K.KVM_GET_XSAVE, xsave)
        xcrs = K.KvmXcrs()
        ioctl(vcpu.fd, K.KVM_GET_XCRS, xcrs)
        events = K.KvmVcpuEvents()
        ioctl(vcpu.fd, K.KVM_GET_VCPU_EVENTS, events)
        msrs = self._read_all_msrs(vcpu)
        return {"xsave": xsave, "xcrs": xcrs, "events": events, "msrs": msrs}

    def _restore_state(self, vcpu: Vcpu, state: dict[str, Any]) -> None:
        for index, value in state["msrs"]:
            if index not in SREGS_MSRS:
                try:
                    self._set_msr(vcpu, index, value)
                except HvError:
                    pass
        ioctl(vcpu.fd, K.KVM_SET_XCRS, state["xcrs"])
        ioctl(vcpu.fd, K.KVM_SET_XSAVE, state["xsave"])
        ioctl(vcpu.fd, K.KVM_SET_SREGS, vcpu.sregs)
        ioctl(vcpu.fd, K.KVM_SET_REGS, vcpu.regs)
        ioctl(vcpu.fd, K.KVM_SET_DEBUGREGS, vcpu.dregs)
        ioctl(vcpu.fd, K.KVM_SET_VCPU_EVENTS, state["events"])
        vcpu.guest_debug_dirty = True
        vcpu.plain_entry = False

    # --- vCPU lifecycle ---------------------------------------------------------------------------

    def _create_kvm_vcpu(self, space: Space, vid: int) -> tuple[int, mmap.mmap]:
        fd = ioctl(space.vm_fd, K.KVM_CREATE_VCPU, vid)
        run = mmap.mmap(fd, self._run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        ioctl(fd, K.KVM_SET_CPUID2, self._cpuid)
        return fd, run

    def _setup_kvm_vcpu(self, vcpu: Vcpu) -> None:
        """Signal mask for kicks: KICK_SIGNAL blocked in the thread, open inside KVM_RUN.
        With KVM_CAP_SYNC_REGS, KVM stores regs and sregs in kvm_run at every exit and loads
        the dirty ones at entry, which saves GET/SET_REGS and GET/SET_SREGS per exit."""
        vcpu.sync = self.use_sync_regs and bool(
            ioctl(self._kvm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_SYNC_REGS) & 3 == 3
        )
        vcpu.run_address = buffer_address(vcpu.run)[0]
        if vcpu.sync:
            struct.pack_into(
                "<Q", vcpu.run, K.RUN_VALID_REGS, K.KVM_SYNC_X86_REGS | K.KVM_SYNC_X86_SREGS
            )
            # The register cache *is* kvm_run's sync area: KVM stores regs/sregs there at every
            # exit and loads the ones flagged in kvm_dirty_regs at entry, so nothing is copied.
            # The cached values carry over (set_space moves a vCPU to another kvm_run).
            regs = K.KvmRegs.from_address(vcpu.run_address + K.RUN_SYNC_REGS)
            sregs = K.KvmSregs.from_address(vcpu.run_address + K.RUN_SYNC_SREGS)
            if ctypes.addressof(regs) != ctypes.addressof(vcpu.regs):
                ctypes.memmove(ctypes.addressof(regs), ctypes.addressof(vcpu.regs),
                               ctypes.sizeof(regs))  # fmt: skip
                ctypes.memmove(ctypes.addressof(sregs), ctypes.addressof(vcpu.sregs),
                               ctypes.sizeof(sregs))  # fmt: skip
                vcpu.regs, vcpu.sregs, vcpu.regs_q = regs, sregs, words(regs)
        current = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        mask = 0
        for sig in current:
            if sig != KICK_SIGNAL:
                mask |= 1 << (int(sig) - 1)

        class _SigMask(ctypes.Structure):
            _fields_ = [("len", ctypes.c_uint32), ("sigset", ctypes.c_uint64)]

        ioctl(vcpu.fd, K.KVM_SET_SIGNAL_MASK, _SigMask(8, mask))

    def hv_vcpu_create(self, flags: int) -> int:
        if flags & ~(C.HV_VCPU_ACCEL_RDPMC | C.HV_VCPU_TSC_RELATIVE):
            raise common.bad("hv_vcpu_create", f"unknown flags 0x{flags:x}")
        with self._lock:
            space = self._space0("hv_vcpu_create")
            vid = self._next_vcpu
            try:
                fd, run = self._create_kvm_vcpu(space, vid)
            except OSError as exc:
                raise HvError(C.HV_NO_RESOURCES, "hv_vcpu_create", exc.strerror or "") from exc
            self._next_vcpu += 1
            vcpu = Vcpu(vid, space, fd, run)
            vcpu.gate = kvm_gate.new_gate(self._capabilities)
            self._adopt(vid, vcpu)
        self._setup_kvm_vcpu(vcpu)
        with self._lock:
            self._update_msr_filter(space)
        return vid

    def hv_vcpu_destroy(self, vid: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_destroy")
        vcpu.destroyed = True
        self._disown(vid)
        if vcpu.timer is not None:
            vcpu.timer.close()
        # no views of the closed kvm_run
        vcpu.regs, vcpu.sregs = K.KvmRegs(), K.KvmSregs()
        vcpu.regs_q = words(vcpu.regs)
        vcpu.soft = None
        vcpu.run.close()
        os.close(vcpu.fd)
        with self._lock:
            self._update_msr_filter(vcpu.space)
