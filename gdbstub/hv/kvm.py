"""The Hypervisor.framework API on Linux KVM.

Theory of operation
-------------------
KVM *is* the framework here: same calls, same return codes, exits described through
``hv_vmx_vcpu_read_vmcs``. What KVM lacks, this module builds:

* **Threads.** A vCPU belongs to the thread that created it. Owner-only calls from another
  thread raise ``HvError(HV_BAD_ARGUMENT)``: on the framework a vCPU id is resolved in the
  calling thread's context, so from any other thread it names no vCPU, exactly like an unknown
  id. ``hv_vcpu_interrupt`` is the one cross-thread call.
* **Kicks.** Each owner thread blocks ``KICK_SIGNAL``; ``KVM_SET_SIGNAL_MASK`` unblocks it only
  inside ``KVM_RUN``. A kick sets the vCPU's stop flag and sends the signal to the thread: inside
  the guest, KVM_RUN returns EINTR; outside, the signal stays pending and the next KVM_RUN returns
  at once. Either way no kick is lost. The flag is checked before each entry as well.
* **Deadlines.** ``hv_vcpu_run_until`` arms a per-thread ``timer_create`` timer that sends the same
  signal at the deadline; mach_absolute_time is CLOCK_MONOTONIC in nanoseconds (timebase 1/1).
* **VMCS.** Guest-state fields are views of KVM's register state, cached once per exit
  (``KVM_GET_REGS``/``SREGS``/``DEBUGREGS``/``VCPU_EVENTS``) and written back once before the next
  entry. Where KVM has KVM_CAP_SYNC_REGS, the regs/sregs cache is ``kvm_run``'s sync area
  itself (no ioctl and no copy per exit; dirty ones are flagged in kvm_dirty_regs);
  ``hv_vcpu_flush`` still commits them by ioctl. I/O exit sites are decoded once and
  revalidated by their code bytes (docs/performance.md). Controls are kept here and turned
  into KVM settings: the exception bitmap (#BP, #DB) and MTF become ``KVM_SET_GUEST_DEBUG``,
  interrupt-window exiting becomes ``request_interrupt_window``, the entry interruption info
  becomes ``KVM_INTERRUPT``, ``KVM_NMI`` or an injected exception.
  Exit fields are computed from ``kvm_run``.
* **The exit path.** ``_run`` inlines the common entry: when nothing is owed to KVM and nothing
  is to be injected (``vcpu.plain_entry``, dropped by every exit but an OUT exit and by the
  calls that can create such work), an entry is the dirty-regs flags and one KVM_RUN. Where
  KVM has completed an OUT and the VMM moves RIP back to where KVM is (``vcpu.kvm_rip``)
  without writing another register, no registers are loaded. Guest time
  (``hv_vcpu_get_exec_time``) is the monotonic clock around KVM_RUN.
* **The framework's instruction-exit contract.** On I/O, HLT, RDMSR and WRMSR exits RIP points at
  the instruction and VMCS_RO_VMEXIT_INSTR_LEN gives its length; the VMM writes results and
  advances RIP. Where KVM would complete the instruction itself on re-entry, this module rewinds
  or feeds KVM so that the net effect is exactly what the VMM asked for.
* **MMIO.** KVM decodes accesses to unmapped or read-only memory. Such exits are reported as
  exit 48 with GPA and access bits, plus the extension fields GDBSTUB_VMCS_MMIO_DECODED /
  _SIZE / _DATA: KVM completes the instruction, the VMM supplies the value of a read.
* **MSR permissions.** A KVM MSR filter (default deny) sends every guest RDMSR/WRMSR that is not
  native on all vCPUs of a space to user space; the backend completes the ones this vCPU may
  access and reports the others as exits 31/32, as the framework does.
* **Address spaces.** Each space is its own KVM VM; ``hv_vcpu_set_space`` moves a vCPU by
  creating it in the other VM on the owner thread and transferring its whole state. KVM frees a
  vCPU only with its VM, so the KVM vCPU left behind is parked and reused when the vCPU returns.
* **Software events.** An injected software interrupt/exception (entry interruption types 4-6,
  except #BP) advances RIP by VMCS_CTRL_VMENTRY_INSTR_LEN here and is handed to KVM as an event
  that pushes RIP as it is, so the guest sees the return address VMX would push.
* **INT3 where KVM cannot run it.** On kvm_pvm a guest INT3 (or INT n) at CPL0 ends in
  KVM_EXIT_INTERNAL_ERROR / emulation failure with RIP at the instruction and the vCPU intact.
  ``kvm_probes.probe_int3`` (a scratch 32-bit guest, once per process) learns whether this happens
  and whether the vCPU runs on afterwards; if so the backend does what VMX does: INT3 with #BP
  in the exception bitmap is exit 0 (soft exception 3, length 1, RIP at the INT3), otherwise
  (and for INT n, which the bitmap does not intercept) RIP moves past the instruction and the
  event is injected through KVM_SET_VCPU_EVENTS, so the guest's IDT handler returns after it.
  A VMM's re-injection of #BP (entry info soft exception 3, length 1) takes the same route
  there; where KVM intercepts INT3 itself (VMX/SVM: KVM_EXIT_DEBUG) it stays
  KVM_GUESTDBG_USE_SW_BP / KVM_GUESTDBG_INJECT_BP. XGETBV, which kvm_pvm's emulator lacks,
  is executed the same way (EDX:EAX from KVM_GET_XCRS).
* **Host habits.** ``kvm_probes.probe_habits`` runs a scratch guest once per process to learn
  what this host's KVM does: whether OUT/IN/HLT are completed before the exit, whether RIP is past a
  RDMSR/WRMSR sent to user space, and whether the guest TSC can be written at all
  (``hv_vm_sync_tsc`` raises HV_UNSUPPORTED where it cannot, as on kvm_pvm).
* **AVX in guest kernels.** ``kvm_probes.probe_cpl0_avx`` checks that CPL0 code can execute a
  VEX instruction. Where it cannot (kvm_pvm's emulator), the AVX family is taken out of the
  vCPUs' CPUID table and a VEX instruction KVM fails to emulate raises #UD in the guest, as on
  a CPU without usable AVX, instead of killing the vCPU.
* **Fetches from non-RAM.** An instruction fetch KVM cannot satisfy (the guest jumped to a
  guest-physical address that is not RAM) is exit 48 with the fetch bit, as VMX reports it.
* **Other instructions KVM cannot emulate** (kvm_pvm: IRET in protected mode, POPCNT, CRC32,
  x87 and SSE arithmetic, FWAIT, XSAVE/XRSTOR, CMPXCHG16B, RDTSCP...) are completed in
  software by ``kvm_complete``: one instruction on a per-vCPU unicorn CPU over the same guest
  RAM, its result written back (faults delivered, accesses outside RAM reported as exit 48);
  the XSAVE family, RDTSCP, CLAC and STAC by hand. Without unicorn (``gdbstub[emu]``) the
  run stops with HvError naming the instruction. (kvm_pvm ignores KVM_SET_CPUID2: a guest
  sees the host's CPUID, AVX-512 and XSAVEC included, whatever the table says.)

The register cache, guest memory, MSRs, registers and VMCS fields are base classes of
:class:`KvmBackend` in kvm_state, kvm_memory, kvm_msrs and kvm_regs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from ..buffers import buffer_address
from . import common, kvm_complete, kvm_exitinfo, kvm_gate, kvm_probes
from . import constants as C
from . import kvm_abi as K
from .errors import HvError
from .kvm_msrs import SREGS_MSRS
from .kvm_regs import RIP_INDEX, Registers
from .kvm_state import MASK64, NO_CODE, PAGE, IoSite, Space, Vcpu, forget_translations, words
from .posix import ThreadTimer, ioctl, ioctl_plain

_Vcpu = Vcpu  # the name kvm_complete, kvm_exitinfo and kvm_xsave import

KICK_SIGNAL = signal.SIGRTMIN + 4
"""Signal used to kick a vCPU thread out of KVM_RUN (blocked outside KVM_RUN)."""

_FOREVER = C.HV_DEADLINE_FOREVER

_get_ident = threading.get_ident
# Guest time is wall time inside KVM_RUN (the thread CPU clock is a system call, the
# monotonic clock is not).
_now_ns = time.monotonic_ns
_ioctl_plain = ioctl_plain
_ACTIVITY = C.VMCS_GUEST_ACTIVITY_STATE
_ENTRY_INFO = C.VMCS_CTRL_VMENTRY_IRQ_INFO


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
_KVM_EXIT_IO = K.KVM_EXIT_IO
_IN_OWED = ("in", 0)


class KvmBackend(Registers):
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

    # --- running ----------------------------------------------------------------------------------

    def hv_vcpu_interrupt(self, vids: list[int]) -> None:
        for vcpu in self._kick_targets(vids):
            vcpu.kicked = True
            try:
                signal.pthread_kill(vcpu.owner, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def hv_vcpu_run(self, vid: int) -> None:
        vcpu = self._live.get(vid)
        if vcpu is None or vcpu.owner != _get_ident():
            vcpu = self._vcpu(vid, "hv_vcpu_run")  # raises
        gate = vcpu.gate
        if gate is not None and gate.dirty and self._entry_fails(vcpu, "hv_vcpu_run"):
            return
        self._run(vcpu, None, True)

    def hv_vcpu_run_until(self, vid: int, deadline: int) -> None:
        vcpu = self._live.get(vid)
        if vcpu is None or vcpu.owner != _get_ident():
            vcpu = self._vcpu(vid, "hv_vcpu_run_until")  # raises
        gate = vcpu.gate
        if gate is not None and gate.dirty and self._entry_fails(vcpu, "hv_vcpu_run_until"):
            return
        if deadline == _FOREVER:
            self._run(vcpu, None, False)
            return
        if not 0 <= deadline <= _FOREVER:
            raise common.bad("hv_vcpu_run_until", "deadline out of range")
        self._run(vcpu, deadline, False)

    def _entry_fails(self, vcpu: Vcpu, call: str) -> bool:
        """The VMX entry checks the VMM's writes call for (kvm_gate): True when the entry
        failed on the guest state (the exit is recorded); raises for invalid controls. An
        entry that passes loads IA32_EFER as VMX does (kvm_gate.entry_efer)."""
        gate = vcpu.gate
        assert gate is not None
        dirty = gate.dirty
        # the virtual TPR only for the checks on the controls (the TPR threshold)
        vtpr = int(self._get(vcpu, "sregs").cr8) << 4 if dirty & 1 else None
        view = kvm_gate.entry_view(partial(self._state_field, vcpu), vtpr)
        failure = gate.check(view)
        if failure is None:
            efer = kvm_gate.entry_efer(view, dirty)
            if efer is not None:
                self._dirty(vcpu, "sregs").efer = efer
            return False
        vcpu.exit, error = kvm_gate.outcome(failure, vcpu.exit, call)
        if error is not None:
            raise error
        return True

    def _prepare_entry(self, vcpu: Vcpu) -> None:
        """Turn cached state, controls and owed completions into KVM state before KVM_RUN."""
        run = vcpu.run
        controls = vcpu.controls
        if (
            vcpu.pending is None
            and vcpu.pending_tsc is None
            and not vcpu.guest_debug_dirty
            and not controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO] & C.IRQ_INFO_VALID
        ):  # the common case: nothing owed, nothing to inject
            self._flush(vcpu, entering=True)
            run[K.RUN_REQUEST_INTERRUPT_WINDOW] = (
                1 if controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_IRQ_WND else 0
            )
            return
        if vcpu.pending is not None:
            kind, value = vcpu.pending
            vcpu.pending = None
            if kind == "msr":
                regs = self._get(vcpu, "regs")
                if vcpu.exit.get(C.VMCS_RO_EXIT_REASON) == C.VMX_REASON_RDMSR:
                    data = (regs.rdx & 0xFFFFFFFF) << 32 | (regs.rax & 0xFFFFFFFF)
                    struct.pack_into("<Q", run, K.RUN_MSR_DATA, data)
                info = vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO]
                if info & C.IRQ_INFO_VALID and info & 0xFF == C.IDT_GP:
                    run[K.RUN_MSR_ERROR] = 1  # KVM injects the #GP the VMM asked for
                    vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO] = 0
                else:
                    run[K.RUN_MSR_ERROR] = 0
                    if not value:
                        # KVM skips the instruction on re-entry: rewind what the VMM advanced.
                        self._dirty(vcpu, "regs").rip = (regs.rip - 2) % (1 << 64)
            elif kind == "in":
                if vcpu.state["regs"]:
                    size = run[K.RUN_IO_SIZE]
                    offset = struct.unpack_from("<Q", run, K.RUN_IO_DATA_OFFSET)[0]
                    rax = self._get(vcpu, "regs").rax
                    run[offset : offset + size] = (rax & ((1 << (8 * size)) - 1)).to_bytes(
                        size, "little"
                    )
            elif kind == "mmio":
                size = struct.unpack_from("<I", run, K.RUN_MMIO_LEN)[0]
                if not run[K.RUN_MMIO_IS_WRITE] and 0 < size <= 8:
                    data = vcpu.exit.get(C.GDBSTUB_VMCS_MMIO_DATA, 0) & ((1 << (8 * size)) - 1)
                    run[K.RUN_MMIO_DATA : K.RUN_MMIO_DATA + size] = data.to_bytes(size, "little")
        self._apply_pending_tsc(vcpu)
        info = vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO]
        if info & C.IRQ_INFO_VALID:
            self._inject(vcpu, info)
            vcpu.controls[C.VMCS_CTRL_VMENTRY_IRQ_INFO] = info & ~C.IRQ_INFO_VALID
        if vcpu.guest_debug_dirty:
            self._apply_guest_debug(vcpu)
        self._flush(vcpu, entering=True)
        run[K.RUN_REQUEST_INTERRUPT_WINDOW] = (
            1 if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_IRQ_WND else 0
        )

    def _inject(self, vcpu: Vcpu, info: int) -> None:
        vector, kind = info & 0xFF, info & C.IRQ_INFO_TYPE_MASK
        if kind == C.IRQ_INFO_EXT_IRQ:
            self._flush(vcpu)
            ioctl(vcpu.fd, K.KVM_INTERRUPT, ctypes.c_uint32(vector))
        elif kind == C.IRQ_INFO_NMI:
            ioctl(vcpu.fd, K.KVM_NMI)
        elif kind == C.IRQ_INFO_SOFT_EXC and vector == C.IDT_BP and not self._emulates_int3():
            # KVM pushes RIP + the length of the #BP it intercepted: RIP stays at the INT3.
            self._apply_guest_debug(vcpu, extra=K.KVM_GUESTDBG_INJECT_BP)
            vcpu.guest_debug_dirty = True
            vcpu.plain_entry = False
        else:
            events = self._dirty(vcpu, "events")
            if kind in (C.IRQ_INFO_SOFT_IRQ, C.IRQ_INFO_SOFT_EXC, C.IRQ_INFO_PRIV_SOFT_EXC):
                # VMX pushes RIP + VM-entry instruction length for software events. KVM would
                # use the length of its own last exit (or none, when it emulates): move RIP
                # here and inject an event that pushes RIP as it is.
                length = vcpu.controls[C.VMCS_CTRL_VMENTRY_INSTR_LEN] & 0xF
                regs = self._dirty(vcpu, "regs")
                regs.rip = (regs.rip + length) % (1 << 64)
            if kind == C.IRQ_INFO_SOFT_IRQ:
                events.interrupt.injected = 1
                events.interrupt.nr = vector
                events.interrupt.soft = 0
            else:
                events.exception.injected = 1
                events.exception.nr = vector
                events.exception.has_error_code = 1 if info & C.IRQ_INFO_ERROR_VALID else 0
                events.exception.error_code = (
                    vcpu.controls[C.VMCS_CTRL_VMENTRY_EXC_ERROR] & 0xFFFFFFFF
                )

    def _apply_guest_debug(self, vcpu: Vcpu, extra: int = 0) -> None:
        dbg = K.KvmGuestDebug()
        bitmap = vcpu.controls[C.VMCS_CTRL_EXC_BITMAP]
        control = extra
        if bitmap & 1 << C.IDT_BP:
            control |= K.KVM_GUESTDBG_USE_SW_BP
        if bitmap & 1 << C.IDT_DB:
            dregs = self._get(vcpu, "dregs")
            control |= K.KVM_GUESTDBG_USE_HW_BP
            for i in range(4):
                dbg.debugreg[i] = dregs.db[i]
            dbg.debugreg[7] = dregs.dr7
        if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_MTF:
            control |= K.KVM_GUESTDBG_SINGLESTEP
        if control:
            control |= K.KVM_GUESTDBG_ENABLE
        dbg.control = control
        ioctl(vcpu.fd, K.KVM_SET_GUEST_DEBUG, dbg)
        vcpu.guest_debug_dirty = False

    def _drain_kick_signal(self) -> None:
        while signal.sigtimedwait({KICK_SIGNAL}, 0) is not None:
            pass

    def _run(self, vcpu: Vcpu, deadline: int | None, any_exit: bool) -> None:
        """Enter the guest until an exit for the caller is recorded in ``vcpu.exit``.

        The common entry (nothing owed to KVM, nothing to inject, regs/sregs in kvm_run) and
        the I/O exit at a known site are inlined here: an I/O loop costs one KVM_RUN and a
        few dictionary lookups per exit."""
        vcpu.entry_written = False
        if vcpu.kicked:
            vcpu.kicked = False
            if vcpu.kick.is_set():
                vcpu.kick.clear()
                self._drain_kick_signal()
                self._set_exit(vcpu, C.VMX_REASON_IRQ)
                return
        if deadline is not None:
            if time.monotonic_ns() >= deadline:
                self._set_exit(vcpu, C.VMX_REASON_VMX_TIMER_EXPIRED)
                return
            if vcpu.timer is None:
                vcpu.timer = ThreadTimer(KICK_SIGNAL)
            vcpu.timer.arm(deadline)
        controls, state, run, fd = vcpu.controls, vcpu.state, vcpu.run, vcpu.fd
        io_cache, sync = vcpu.io_cache, vcpu.sync
        try:
            while True:
                if vcpu.plain_entry or self._plain_entry(vcpu):
                    # the common entry: dirty regs/sregs are flagged, KVM loads them
                    if state["regs"] == 2:
                        state["regs"] = 1
                        if vcpu.regs_q[RIP_INDEX] != vcpu.kvm_rip:
                            run[K.RUN_DIRTY_REGS] |= K.KVM_SYNC_X86_REGS
                    if state["sregs"] == 2:
                        state["sregs"] = 1
                        run[K.RUN_DIRTY_REGS] |= K.KVM_SYNC_X86_SREGS
                else:
                    if controls[_ACTIVITY] == C.GUEST_ACTIVITY_HLT:
                        if not controls[_ENTRY_INFO] & C.IRQ_INFO_VALID:
                            self._halt_wait(vcpu, deadline)
                            return
                        controls[_ACTIVITY] = C.GUEST_ACTIVITY_ACTIVE
                    self._prepare_entry(vcpu)
                start = _now_ns()
                result = _ioctl_plain(fd, K.KVM_RUN, None)
                vcpu.exec_ns += _now_ns() - start
                state["regs"] = state["sregs"] = 1 if sync else 0
                state["dregs"] = state["events"] = 0
                snapshot = EXIT_SNAPSHOT(run)
                if result >= 0 and snapshot[0] == _KVM_EXIT_IO:
                    # I/O exit 30 with RIP at the IN/OUT. A loop exits at the same place again
                    # and again: a known site whose code bytes are unchanged is used as it is.
                    if not sync:
                        snapshot = self._io_key(vcpu, snapshot)
                    site = io_cache.get(snapshot)
                    if (
                        site is None
                        or site.code.raw != site.window
                        or (site.code2 is not None and site.code2.raw != site.window2)
                    ):
                        site = self._io_site(vcpu, snapshot)
                    rip = snapshot[4]
                    if site.completed:
                        start = (rip - site.back) & MASK64
                        vcpu.regs_q[RIP_INDEX] = start  # the framework reports RIP at the insn
                        state["regs"] = 2
                        vcpu.kvm_rip = rip if sync else None
                    else:
                        start = rip
                        vcpu.kvm_rip = None
                    if site.is_in:
                        vcpu.pending = _IN_OWED
                        vcpu.plain_entry = False
                    vcpu.exit = site.fields
                    vcpu.io_exit_rip = start
                    return
                vcpu.plain_entry = False  # the handlers below may leave work for the entry
                vcpu.kvm_rip = None
                if self._exit(vcpu, result, snapshot[0], deadline, any_exit):
                    return
        finally:
            if deadline is not None and vcpu.timer is not None:
                vcpu.timer.disarm()

    @staticmethod
    def _plain_entry(vcpu: Vcpu) -> bool:
        """Whether the next entry needs nothing but the dirty regs/sregs flags: nothing owed
        to KVM, no TSC to set, no debug settings, event, debug registers or halt to apply.
        The answer is kept in ``vcpu.plain_entry`` until something may change it: every exit
        but an I/O exit, an IN exit, ``_dirty`` of dregs/events, and the calls that write
        VMCS fields, non-GPR registers, MSRs, the TSC or the space."""
        controls, state = vcpu.controls, vcpu.state
        plain = (
            vcpu.sync
            and vcpu.pending is None
            and vcpu.pending_tsc is None
            and not vcpu.guest_debug_dirty
            and controls[_ACTIVITY] == C.GUEST_ACTIVITY_ACTIVE
            and not controls[_ENTRY_INFO] & C.IRQ_INFO_VALID
            and state["dregs"] != 2
            and state["events"] != 2
        )
        if plain:  # kvm_run keeps it: a control write makes the next entry not plain
            vcpu.run[K.RUN_REQUEST_INTERRUPT_WINDOW] = (
                1 if controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_IRQ_WND else 0
            )
        vcpu.plain_entry = plain
        return plain

    def _halt_wait(self, vcpu: Vcpu, deadline: int | None) -> None:
        """A halted vCPU without HLT exiting waits for a kick or its deadline (no guest time)."""
        timeout = None if deadline is None else max(0.0, (deadline - time.monotonic_ns()) / 1e9)
        if vcpu.kick.wait(timeout):
            vcpu.kick.clear()
            self._drain_kick_signal()
            self._set_exit(vcpu, C.VMX_REASON_IRQ)
        else:
            self._set_exit(vcpu, C.VMX_REASON_VMX_TIMER_EXPIRED)

    def _exit(
        self, vcpu: Vcpu, result: int, reason: int, deadline: int | None, any_exit: bool
    ) -> bool:
        """Handle what one KVM_RUN returned (``result``: the ioctl's; ``reason``: kvm_run's);
        True when an exit for the caller has been recorded."""
        interrupted = False
        if result < 0:
            errno = ctypes.get_errno()
            if errno not in (4, 11):  # EINTR, EAGAIN
                self._invalidate(vcpu)
                self._set_exit(
                    vcpu,
                    C.VMX_EXIT_REASON_FAILED_ENTRY | C.VMX_REASON_VMENTRY_GUEST,
                    qual=errno,
                )
                return True
            interrupted = True
        if interrupted or reason == K.KVM_EXIT_INTR:
            self._drain_kick_signal()
            return self._end_without_exit(vcpu, deadline, any_exit)
        handler = EXIT_HANDLERS.get(reason)
        if handler is None:
            self._set_exit(
                vcpu, C.VMX_EXIT_REASON_FAILED_ENTRY | C.VMX_REASON_VMENTRY_GUEST, qual=reason
            )
            return True
        return handler(self, vcpu)

    # --- exit decoding ----------------------------------------------------------------------------

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
        gla = kvm_exitinfo.access_linear(self, vcpu, gpa)
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

    def _complete_failed_emulation(self, vcpu: Vcpu) -> bool | None:
        """KVM failed to emulate the instruction at RIP (kvm_pvm emulates all CPL0 code and
        its emulator lacks a few instructions): execute the ones the backend knows as the CPU
        would. INT3 (CC) and INT n (CD nn), where the int3 probe shows KVM cannot, and XGETBV.
        Returns the exit handler's answer, or None for an instruction it does not know."""
        regs = self._get(vcpu, "regs")
        sregs = self._get(vcpu, "sregs")
        long64 = sregs.efer & C.EFER_LMA and sregs.cs.l
        linear = (regs.rip if long64 else sregs.cs.base + regs.rip) % (1 << 64)
        code = self._read_linear(vcpu, linear, 15)
        if not code:
            return self._fetch_violation(vcpu, linear)
        prefixes = common.PREFIXES | _REX if long64 else common.PREFIXES
        i = 0
        while i < len(code) - 1 and code[i] in prefixes:
            i += 1
        op = code[i : i + 1]
        if op == b"\xcc" and self._emulates_int3():
            return self._software_interrupt(vcpu, C.IDT_BP, i + 1, exception=True)
        if op == b"\xcd" and i + 1 < len(code) and self._emulates_int3():
            return self._software_interrupt(vcpu, code[i + 1], i + 2, exception=False)
        if code[i : i + 3] == b"\x0f\x01\xd0":
            return self._xgetbv(vcpu, i + 3)
        if op in (b"\xc4", b"\xc5") and not self.cpl0_avx:
            return self._undefined_opcode(vcpu)
        bits = 64 if long64 else 32 if sregs.cs.db else 16
        return kvm_complete.complete(self, vcpu, linear, code, bits)

    def _fetch_violation(self, vcpu: Vcpu, linear: int) -> bool | None:
        """KVM could not fetch the instruction: the guest executes from guest-physical memory
        that is not RAM. On VMX that is an EPT violation on an instruction fetch (exit 48,
        RIP at the instruction, nothing decoded)."""
        sregs = self._get(vcpu, "sregs")
        gpa: int | None = linear & 0xFFFFFFFF if not sregs.cr0 & (1 << 31) else None
        if gpa is None:
            host_page = self._linear_to_host(vcpu, linear)
            if host_page is not None:
                return None  # the page is RAM after all: not a fetch violation
            gpa = self._translate(vcpu, linear)
            if gpa is None:
                return None  # not mapped by the guest: KVM would have raised #PF itself
        self._set_exit(
            vcpu,
            C.VMX_REASON_EPT_VIOLATION,
            gpa=gpa,
            gla=linear,
            qual=C.EPT_VIOLATION_INST_FETCH
            | C.EPT_VIOLATION_GLA_VALID
            | C.EPT_VIOLATION_XLAT_VALID,
        )
        return True

    def _undefined_opcode(self, vcpu: Vcpu) -> bool:
        """A VEX (AVX) instruction where the probe showed CPL0 AVX cannot run: #UD, as a CPU
        without usable AVX raises. Intercepted #UD exits like any exception; otherwise the
        guest's handler runs (RIP stays at the instruction: #UD is a fault)."""
        if vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & 1 << C.IDT_UD:
            self._set_exit(
                vcpu,
                C.VMX_REASON_EXC_NMI,
                irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_HARD_EXC | C.IDT_UD,
            )
            return True
        events = self._dirty(vcpu, "events")
        events.exception.injected = 1
        events.exception.nr = C.IDT_UD
        events.exception.has_error_code = 0
        events.exception.error_code = 0
        return False

    def _software_interrupt(self, vcpu: Vcpu, vector: int, length: int, exception: bool) -> bool:
        """INT3 with #BP in the exception bitmap is an exception exit (RIP at the INT3, its
        length, soft exception 3), as on VMX. Otherwise the event is delivered through the
        guest's IDT with the return address after the instruction. INT n is a software
        interrupt: the exception bitmap does not apply to it on VMX."""
        if exception and vcpu.controls[C.VMCS_CTRL_EXC_BITMAP] & 1 << C.IDT_BP:
            self._set_exit(
                vcpu,
                C.VMX_REASON_EXC_NMI,
                length=length,
                irq_info=C.IRQ_INFO_VALID | C.IRQ_INFO_SOFT_EXC | C.IDT_BP,
            )
            return True
        regs = self._dirty(vcpu, "regs")
        regs.rip = (regs.rip + length) % (1 << 64)
        events = self._dirty(vcpu, "events")
        if exception:
            events.exception.injected = 1
            events.exception.nr = vector
            events.exception.has_error_code = 0
            events.exception.error_code = 0
        else:
            events.interrupt.injected = 1
            events.interrupt.nr = vector
            events.interrupt.soft = 0
        return False

    def _xgetbv(self, vcpu: Vcpu, length: int) -> bool:
        """XGETBV: EDX:EAX = XCR[ECX]; #UD without CR4.OSXSAVE, #GP(0) for an unknown XCR."""
        regs = self._dirty(vcpu, "regs")
        if not self._get(vcpu, "sregs").cr4 & 1 << 18:
            fault: tuple[int, int] | None = (6, -1)
        else:
            xcrs = K.KvmXcrs()
            ioctl(vcpu.fd, K.KVM_GET_XCRS, xcrs)
            index = regs.rcx & 0xFFFFFFFF
            values = {int(xcrs.xcrs[n].xcr): int(xcrs.xcrs[n].value) for n in range(xcrs.nr_xcrs)}
            fault = None if index in values else (13, 0)
            if fault is None:
                regs.rax = values[index] & 0xFFFFFFFF
                regs.rdx = values[index] >> 32
                regs.rip = (regs.rip + length) % (1 << 64)
                if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_MTF:
                    self._set_exit(vcpu, C.VMX_REASON_MTF)  # single-stepping: it is done
                    return True
        if fault is not None:
            events = self._dirty(vcpu, "events")
            events.exception.injected = 1
            events.exception.nr = fault[0]
            events.exception.has_error_code = 1 if fault[1] >= 0 else 0
            events.exception.error_code = max(fault[1], 0)
        return False

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


_REX = frozenset(range(0x40, 0x50))


EXIT_HANDLERS: dict[int, Callable[[KvmBackend, Vcpu], bool]] = {
    K.KVM_EXIT_HLT: KvmBackend._exit_hlt,
    K.KVM_EXIT_MMIO: KvmBackend._exit_mmio,
    K.KVM_EXIT_DEBUG: KvmBackend._exit_debug,
    K.KVM_EXIT_EXCEPTION: KvmBackend._exit_exception,
    K.KVM_EXIT_SHUTDOWN: KvmBackend._exit_shutdown,
    K.KVM_EXIT_FAIL_ENTRY: KvmBackend._exit_fail_entry,
    K.KVM_EXIT_INTERNAL_ERROR: KvmBackend._exit_internal,
    K.KVM_EXIT_IRQ_WINDOW_OPEN: KvmBackend._exit_irq_window,
    K.KVM_EXIT_X86_RDMSR: KvmBackend._exit_msr,
    K.KVM_EXIT_X86_WRMSR: KvmBackend._exit_msr,
    K.KVM_EXIT_SYSTEM_EVENT: KvmBackend._exit_system_event,
}
