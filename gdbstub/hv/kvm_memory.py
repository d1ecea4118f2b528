"""Guest memory on the KVM backend: memory slots from the framework's regions, guest-linear
reads.

Theory of operation
-------------------
The framework maps regions with read, write and execute permissions; KVM has memory slots, which
are read-write or read-only. :meth:`GuestMemory._sync_map` merges adjacent regions with the same
KVM flags and diffs the result against the VM's slots (under the backend's lock, after every map,
unmap and protect). A region without read permission gets no slot: every access to it exits,
as an MMIO exit (reported as an EPT violation, kvm_exits).

The backend reads guest code (to locate and decode the instruction of an exit) at guest-linear
addresses through KVM_TRANSLATE. A translated page is cached per vCPU under (CR0, CR3, CR4,
page) and dropped with every change of the map or of the paging registers and by
``hv_vcpu_invalidate_tlb`` (:func:`~gdbstub.hv.kvm_state.forget_translations`, which also
drops the I/O sites whose code views rest on those translations).
"""

from __future__ import annotations

import ctypes

from . import common
from . import constants as C
from . import kvm_abi as K
from .errors import HvError
from .kvm_state import KvmState, Space, Vcpu, forget_translations
from .posix import ioctl


class GuestMemory(KvmState):
    """KVM memory slots and guest-linear reads (see the module docstring)."""

    # --- memory slots ---------------------------------------------------------------------------

    def _sync_map(self, space: Space, call: str) -> None:
        """Make KVM's memory slots match the region list (merge, then diff)."""
        wanted: list[tuple[int, int, int, int]] = []
        for region in space.regions:
            if not region.flags & C.HV_MEMORY_READ:
                continue  # no slot: every access exits (as an MMIO exit)
            kflags = 0 if region.flags & C.HV_MEMORY_WRITE else K.KVM_MEM_READONLY
            if wanted:
                g, s, u, f = wanted[-1]
                if g + s == region.gpa and u + s == region.uva and f == kflags:
                    wanted[-1] = (g, s + region.size, u, f)
                    continue
            wanted.append((region.gpa, region.size, region.uva, kflags))
        wanted_set = set(wanted)
        for key in [k for k in space.slots if k not in wanted_set]:
            self._set_slot(space, space.slots.pop(key), key[0], 0, 0, 0)
        for key in wanted:
            if key not in space.slots:
                slot = self._alloc_slot(space)
                try:
                    self._set_slot(space, slot, *key)
                except OSError as exc:
                    raise HvError(C.HV_ERROR, call, f"KVM memory slot: {exc.strerror}") from exc
                space.slots[key] = slot
        for vcpu in self._vcpus.values():
            forget_translations(vcpu)

    @staticmethod
    def _alloc_slot(space: Space) -> int:
        used = set(space.slots.values())
        slot = 0
        while slot in used:
            slot += 1
        return slot

    @staticmethod
    def _set_slot(space: Space, slot: int, gpa: int, size: int, uva: int, kflags: int) -> None:
        region = K.KvmUserspaceMemoryRegion()
        region.slot = slot
        region.flags = kflags
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = uva
        ioctl(space.vm_fd, K.KVM_SET_USER_MEMORY_REGION, region)

    def _host_address(self, space: Space, gpa: int) -> tuple[int, int] | None:
        """Host address of ``gpa`` and the bytes left in its region (any permission)."""
        region = common.region_at(space.regions, gpa)
        if region is None:
            return None
        return region.uva + (gpa - region.gpa), region.gpa + region.size - gpa

    def hv_vcpu_invalidate_tlb(self, vid: int) -> None:
        vcpu = self._vcpu(vid, "hv_vcpu_invalidate_tlb")
        # KVM flushes the guest TLB and resets its MMU context when the sregs are written.
        self._dirty(vcpu, "sregs")
        forget_translations(vcpu)

    # --- guest-linear addresses -------------------------------------------------------------------

    def _translate(self, vcpu: Vcpu, linear: int) -> int | None:
        """Guest-physical address of ``linear`` through KVM_TRANSLATE, None if not mapped."""
        translation = K.KvmTranslation(linear)
        try:
            ioctl(vcpu.fd, K.KVM_TRANSLATE, translation)
        except OSError:
            return None
        return int(translation.physical_address) if translation.valid else None

    def _linear_to_host(self, vcpu: Vcpu, linear: int) -> int | None:
        """Host address of guest-linear ``linear`` via KVM_TRANSLATE (cached per paging state)."""
        sregs = self._get(vcpu, "sregs")
        page = linear & ~0xFFF
        key = (sregs.cr0, sregs.cr3, sregs.cr4, page)
        gpa_page = vcpu.xlate_cache.get(key)
        if gpa_page is None:
            gpa = self._translate(vcpu, page)
            if gpa is None:
                return None
            gpa_page = gpa & ~0xFFF
            vcpu.xlate_cache[key] = gpa_page
        host = self._host_address(vcpu.space, gpa_page | (linear & 0xFFF))
        return None if host is None else host[0]

    def _read_linear(self, vcpu: Vcpu, linear: int, count: int) -> bytes:
        """Up to ``count`` guest bytes at guest-linear ``linear`` (stops at an unmapped page)."""
        out = b""
        while len(out) < count:
            address = (linear + len(out)) % (1 << 64)
            host = self._linear_to_host(vcpu, address)
            if host is None:
                break
            chunk = min(count - len(out), 0x1000 - (address & 0xFFF))
            out += ctypes.string_at(host, chunk)
        return out
