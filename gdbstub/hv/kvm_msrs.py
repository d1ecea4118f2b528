"""MSRs on the KVM backend: the framework's MSR calls, the MSR filter and the guest TSC.

Theory of operation
-------------------
* ``hv_vcpu_read_msr`` / ``hv_vcpu_write_msr`` take the framework's MSRs only
  (``common.check_framework_msr``). EFER, FS.base and GS.base live in kvm_sregs and go through
  the register cache; the others through KVM_GET_MSRS / KVM_SET_MSRS.
* **Permissions.** Each VM runs with KVM_CAP_X86_USER_SPACE_MSR, so that every guest
  RDMSR/WRMSR KVM does not complete itself exits to user space, and a default-deny KVM MSR
  filter that lets KVM handle natively only what every vCPU of the space may access
  (:meth:`Msrs._update_msr_filter`, redone whenever a permission, a vCPU or its space
  changes). kvm_exits completes the accesses this vCPU may make and reports the others as exits
  31/32, as the framework does.
* **TSC.** ``hv_vm_sync_tsc`` records the value and the time; each vCPU writes it, advanced by
  the time elapsed at KVM's TSC frequency, before its next entry or its next read of IA32_TSC.
  Where the host probe shows that a written TSC never reaches the guest (kvm_pvm) it raises
  HV_UNSUPPORTED.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

from . import common
from . import constants as C
from . import kvm_abi as K
from .errors import HvError
from .kvm_memory import GuestMemory
from .kvm_state import Space, Vcpu
from .posix import ioctl

# MSRs that live in kvm_sregs; reads and writes go through the register cache (the APIC base
# is no framework MSR: only a state transfer between spaces skips it).
SREGS_MSRS = {C.MSR_EFER, C.MSR_FSBASE, C.MSR_GSBASE, C.MSR_IA32_APIC_BASE}
# MSR ranges covered by the filter bitmaps (base, count).
_FILTER_BLOCKS = ((0x00000000, 0x2000), (0xC0000000, 0x2000), (0xC0010000, 0x2000))


class Msrs(GuestMemory):
    """MSR calls, the MSR filter and the TSC (see the module docstring)."""

    _msr_index: list[int]  # the MSRs KVM lists (KVM_GET_MSR_INDEX_LIST)

    def _enable_msr_exits(self, vm_fd: int) -> None:
        """Send the guest RDMSR/WRMSR KVM does not complete itself to user space (where KVM can
        filter MSRs)."""
        if ioctl(self._kvm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_X86_USER_SPACE_MSR) and ioctl(
            self._kvm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_X86_MSR_FILTER
        ):
            cap = K.KvmEnableCap()
            cap.cap = K.KVM_CAP_X86_USER_SPACE_MSR
            # every guest RDMSR/WRMSR KVM does not complete itself comes here: filtered ones,
            # and those KVM would answer with #GP or does not know (the x2APIC range, which
            # the filter cannot cover, without KVM's APIC): on the framework they all exit
            cap.args[0] = (
                K.KVM_MSR_EXIT_REASON_FILTER
                | K.KVM_MSR_EXIT_REASON_INVAL
                | K.KVM_MSR_EXIT_REASON_UNKNOWN
            )
            ioctl(vm_fd, K.KVM_ENABLE_CAP, cap)

    def _msr_changed(self, vcpu: Vcpu) -> None:
        with self._lock:
            self._update_msr_filter(vcpu.space)

    # --- MSRs -------------------------------------------------------------------------------------

    def _get_msr(self, vcpu: Vcpu, index: int) -> int:
        msrs: Any = K.kvm_msrs(1)
        msrs.entries[0].index = index
        if ioctl(vcpu.fd, K.KVM_GET_MSRS, msrs) != 1:
            raise common.bad("hv_vcpu_read_msr", f"MSR 0x{index:x} is not readable")
        return int(msrs.entries[0].data)

    def _set_msr(self, vcpu: Vcpu, index: int, value: int) -> None:
        msrs: Any = K.kvm_msrs(1)
        msrs.entries[0].index = index
        msrs.entries[0].data = value
        if ioctl(vcpu.fd, K.KVM_SET_MSRS, msrs) != 1:
            raise common.bad("hv_vcpu_write_msr", f"MSR 0x{index:x} refused value 0x{value:x}")

    def _apply_pending_tsc(self, vcpu: Vcpu) -> None:
        if vcpu.pending_tsc is not None:
            tsc, when = vcpu.pending_tsc
            vcpu.pending_tsc = None
            if not self._tsc_khz:
                try:
                    self._tsc_khz = ioctl(vcpu.fd, K.KVM_GET_TSC_KHZ)
                except OSError:
                    self._tsc_khz = 1_000_000
            elapsed = time.monotonic_ns() - when
            self._set_msr(vcpu, C.MSR_TSC, (tsc + elapsed * self._tsc_khz // 1_000_000) % (1 << 64))

    def hv_vcpu_read_msr(self, vid: int, msr: int) -> int:
        vcpu = self._vcpu(vid, "hv_vcpu_read_msr")
        common.check_framework_msr("hv_vcpu_read_msr", msr)
        if msr in SREGS_MSRS:
            sregs = self._get(vcpu, "sregs")
            return int(
                {
                    C.MSR_EFER: sregs.efer,
                    C.MSR_FSBASE: sregs.fs.base,
                    C.MSR_GSBASE: sregs.gs.base,
                }[msr]
            )
        if msr == C.MSR_TSC:
            self._apply_pending_tsc(vcpu)
        return self._get_msr(vcpu, msr)

    def hv_vcpu_write_msr(self, vid: int, msr: int, value: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_write_msr")
        if not 0 <= value < 1 << 64:
            raise common.bad("hv_vcpu_write_msr", f"MSR {msr:#x}: value out of range")
        common.check_framework_msr("hv_vcpu_write_msr", msr)
        if vcpu.gate is not None:
            vcpu.gate.touch_msr(msr)
        if msr in SREGS_MSRS:
            sregs = self._dirty(vcpu, "sregs")
            if msr == C.MSR_EFER:
                sregs.efer = value
            elif msr == C.MSR_FSBASE:
                sregs.fs.base = value
            else:
                sregs.gs.base = value
            return
        if msr == C.MSR_TSC:
            vcpu.pending_tsc = None
        self._set_msr(vcpu, msr, value)

    def _update_msr_filter(self, space: Space) -> None:
        """Allow natively only what every vCPU of the space may access; deny the rest."""
        members = [v for v in self._vcpus.values() if v.space is space and not v.destroyed]
        flt = K.KvmMsrFilter()
        flt.flags = K.KVM_MSR_FILTER_DEFAULT_DENY
        bitmaps: list[Any] = []
        index = 0
        for base, count in _FILTER_BLOCKS:
            for kind, bit in (
                (K.KVM_MSR_FILTER_READ, C.HV_MSR_READ),
                (K.KVM_MSR_FILTER_WRITE, C.HV_MSR_WRITE),
            ):
                bitmap = (ctypes.c_uint8 * (count // 8))()
                any_set = False
                if members:
                    for msr in members[0].msr.access:
                        if base <= msr < base + count and all(
                            v.msr.access.get(msr, 0) & bit for v in members
                        ):
                            offset = msr - base
                            bitmap[offset // 8] |= 1 << (offset % 8)
                            any_set = True
                if not any_set:
                    continue
                rng = flt.ranges[index]
                rng.flags = kind
                rng.nmsrs = count
                rng.base = base
                rng.bitmap = ctypes.cast(bitmap, ctypes.c_void_p)
                bitmaps.append(bitmap)
                index += 1
        if index == 0:
            # KVM rejects a default-deny filter without ranges (EINVAL): add one that allows
            # nothing (a one-MSR range with a clear bitmap).
            bitmap = (ctypes.c_uint8 * 8)()
            rng = flt.ranges[0]
            rng.flags = K.KVM_MSR_FILTER_READ | K.KVM_MSR_FILTER_WRITE
            rng.nmsrs = 1
            rng.base = 0
            rng.bitmap = ctypes.cast(bitmap, ctypes.c_void_p)
            bitmaps.append(bitmap)
        try:
            ioctl(space.vm_fd, K.KVM_X86_SET_MSR_FILTER, flt)
        except OSError:
            return  # host without MSR filtering: guest MSR accesses are KVM's
        space.filter_bitmaps = bitmaps

    def _read_all_msrs(self, vcpu: Vcpu) -> list[tuple[int, int]]:
        values: list[tuple[int, int]] = []
        for index in self._msr_index:
            try:
                values.append((index, self._get_msr(vcpu, index)))
            except HvError:
                continue
        return values

    # --- TSC and time -----------------------------------------------------------------------------

    def hv_vm_sync_tsc(self, tsc: int) -> None:
        if not 0 <= tsc < 1 << 64:
            raise common.bad("hv_vm_sync_tsc", "TSC value out of range")
        self._space0("hv_vm_sync_tsc")
        if not self._completes_before_exit("tsc"):
            raise HvError(
                C.HV_UNSUPPORTED,
                "hv_vm_sync_tsc",
                "this host's KVM ignores writes of the guest TSC",
            )
        now = time.monotonic_ns()
        with self._lock:
            for vcpu in self._vcpus.values():
                if not vcpu.destroyed:
                    vcpu.pending_tsc = (tsc, now)
                    vcpu.plain_entry = False
