"""What this host's KVM really does, learned from throwaway guests (never from the host's name).

The KVM backend keeps the framework's contract on top of whatever KVM does. Where KVMs differ
(KVM on VMX/SVM hardware, or kvm_pvm, which runs guest kernel code through KVM's instruction
emulator) each probe runs a few instructions in a ``ScratchGuest`` (its own KVM VM with 8 KiB
of RAM and one vCPU) and reports the observed behaviour:

* ``probe_habits``: whether KVM has already executed an OUT, IN or HLT when it exits to user
  space, whether RIP is still at a RDMSR sent to user space by the MSR filter, and whether a
  host write of IA32_TSC moves the guest's TSC;
* ``probe_int3``: whether a guest ``int3`` ends in an emulation failure the backend can take
  over (RIP at the int3, the vCPU runs on once RIP is moved);
* ``probe_cpl0_avx``: whether guest kernel code can execute AVX instructions.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from types import TracebackType
from typing import Any

from ..buffers import buffer_address
from . import constants as C
from . import kvm_abi as K
from .posix import ioctl

CODE_GPA = 0x1000


class ScratchGuest:
    """A throwaway KVM VM: 8 KiB of RAM, ``code`` at 0x1000, one vCPU about to run it.

    ``flat32`` starts the vCPU in flat 32-bit protected mode (paging off); otherwise in real
    mode with CS base 0. ``cpuid`` is given to the vCPU when set.
    """

    def __init__(
        self, code: bytes, *, flat32: bool = False, cpuid: K.KvmCpuid2 | None = None
    ) -> None:
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm = self.vcpu = -1
        self.memory = mmap.mmap(-1, 0x2000)
        self.run: Any = None
        try:
            self.vm = ioctl(self.kvm, K.KVM_CREATE_VM, 0)
            address = buffer_address(self.memory)[0]
            region = K.KvmUserspaceMemoryRegion(0, 0, 0, 0x2000, address)
            ioctl(self.vm, K.KVM_SET_USER_MEMORY_REGION, region)
            self.memory[CODE_GPA : CODE_GPA + len(code)] = code
            self.vcpu = ioctl(self.vm, K.KVM_CREATE_VCPU, 0)
            size = ioctl(self.kvm, K.KVM_GET_VCPU_MMAP_SIZE)
            self.run = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            if cpuid is not None:
                ioctl(self.vcpu, K.KVM_SET_CPUID2, cpuid)
            self.sregs = K.KvmSregs()
            ioctl(self.vcpu, K.KVM_GET_SREGS, self.sregs)
            if flat32:
                for name, selector, kind in (
                    ("cs", 8, 0xB),
                    ("ds", 16, 3),
                    ("es", 16, 3),
                    ("ss", 16, 3),
                    ("fs", 16, 3),
                    ("gs", 16, 3),
                ):
                    seg = getattr(self.sregs, name)
                    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, kind
                    seg.present, seg.dpl, seg.db, seg.s = 1, 0, 1, 1
                    seg.l, seg.g, seg.unusable = 0, 1, 0
                self.sregs.cr0 = (self.sregs.cr0 | 1) & ~(1 << 31)
            else:
                self.sregs.cs.base, self.sregs.cs.selector = 0, 0
            ioctl(self.vcpu, K.KVM_SET_SREGS, self.sregs)
            self.regs = K.KvmRegs()
            self.regs.rip, self.regs.rflags, self.regs.rsp = CODE_GPA, 2, 0x1F00
            ioctl(self.vcpu, K.KVM_SET_REGS, self.regs)
        except BaseException:
            self.close()
            raise

    def enter(self) -> int:
        """One KVM_RUN; the KVM exit reason. ``regs`` is refreshed."""
        ioctl(self.vcpu, K.KVM_RUN)
        ioctl(self.vcpu, K.KVM_GET_REGS, self.regs)
        return int(struct.unpack_from("<I", self.run, K.RUN_EXIT_REASON)[0])

    def set_rip(self, rip: int) -> None:
        """Move RIP."""
        self.regs.rip = rip
        ioctl(self.vcpu, K.KVM_SET_REGS, self.regs)

    def close(self) -> None:
        """Release the VM."""
        if self.run is not None:
            self.run.close()
            self.run = None
        for fd in (self.vcpu, self.vm, self.kvm):
            if fd >= 0:
                os.close(fd)
        self.vcpu = self.vm = self.kvm = -1
        self.memory.close()

    def __enter__(self) -> ScratchGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def probe_habits() -> dict[str, bool]:
    """Whether KVM finishes OUT, IN and HLT before exiting to user space ("out", "in", "hlt"),
    whether it leaves RIP *past* a RDMSR sent to user space ("msr"; VMX and kvm_pvm leave it at
    the instruction and skip it when user space completes it), and whether a host write of
    IA32_TSC moves the guest TSC ("tsc"; kvm_pvm ignores it)."""
    # out 0x80,al; in al,0x80; hlt; mov ecx,0x174; rdmsr; hlt  (real mode)
    code = bytes([0xE6, 0x80, 0xE4, 0x80, 0xF4, 0x66, 0xB9, 0x74, 0x01, 0, 0, 0x0F, 0x32, 0xF4])
    habits: dict[str, bool] = {}
    try:
        with ScratchGuest(code) as guest:
            for kind, start, length in (("out", 0x1000, 2), ("in", 0x1002, 2), ("hlt", 0x1004, 1)):
                guest.enter()
                habits[kind] = guest.regs.rip == start + length
            habits["msr"] = _probe_msr(guest)
            msrs: Any = K.kvm_msrs(1)
            msrs.entries[0].index = C.MSR_TSC
            msrs.entries[0].data = 1 << 62
            ioctl(guest.vcpu, K.KVM_SET_MSRS, msrs)
            msrs.entries[0].data = 0
            ioctl(guest.vcpu, K.KVM_GET_MSRS, msrs)
            habits["tsc"] = msrs.entries[0].data >= 1 << 62
    except OSError:
        pass
    return habits


def _probe_msr(guest: ScratchGuest) -> bool:
    """Deny every MSR through the filter, run the RDMSR at 0x100b, and look at RIP."""
    if not (
        ioctl(guest.kvm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_X86_USER_SPACE_MSR)
        and ioctl(guest.kvm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_X86_MSR_FILTER)
    ):
        return False
    cap = K.KvmEnableCap()
    cap.cap = K.KVM_CAP_X86_USER_SPACE_MSR
    cap.args[0] = K.KVM_MSR_EXIT_REASON_FILTER
    ioctl(guest.vm, K.KVM_ENABLE_CAP, cap)
    flt = K.KvmMsrFilter()
    flt.flags = K.KVM_MSR_FILTER_DEFAULT_DENY
    bitmap = (ctypes.c_uint8 * 8)()
    flt.ranges[0].flags = K.KVM_MSR_FILTER_READ | K.KVM_MSR_FILTER_WRITE
    flt.ranges[0].nmsrs = 1
    flt.ranges[0].bitmap = ctypes.cast(bitmap, ctypes.c_void_p)
    ioctl(guest.vm, K.KVM_X86_SET_MSR_FILTER, flt)
    guest.set_rip(0x1005)
    if guest.enter() != K.KVM_EXIT_X86_RDMSR:
        return False
    return bool(guest.regs.rip == 0x100B + 2)


def probe_int3() -> bool:
    """Whether a guest ``int3`` fails in a way the backend can build on.

    A flat 32-bit guest runs ``int3; hlt`` with KVM_GUESTDBG_USE_SW_BP. On VMX/SVM KVM reports
    KVM_EXIT_DEBUG (exception 3) itself: False. Where KVM's emulator cannot execute it
    (kvm_pvm), the exit is an emulation failure with RIP at the int3; True when the vCPU then
    runs on once user space moves RIP past it (it reaches the HLT)."""
    try:
        with ScratchGuest(bytes([0xCC, 0xF4]), flat32=True) as guest:
            dbg = K.KvmGuestDebug()
            dbg.control = K.KVM_GUESTDBG_ENABLE | K.KVM_GUESTDBG_USE_SW_BP
            ioctl(guest.vcpu, K.KVM_SET_GUEST_DEBUG, dbg)
            reason = guest.enter()
            suberror = struct.unpack_from("<I", guest.run, K.RUN_INTERNAL_SUBERROR)[0]
            if not (
                reason == K.KVM_EXIT_INTERNAL_ERROR
                and suberror == K.KVM_INTERNAL_ERROR_EMULATION
                and guest.regs.rip == 0x1000
            ):
                return False
            guest.set_rip(0x1001)
            return guest.enter() == K.KVM_EXIT_HLT and guest.regs.rip in (0x1001, 0x1002)
    except OSError:
        return False


def probe_cpl0_avx(cpuid: K.KvmCpuid2) -> bool:
    """Whether guest kernel code can execute AVX: a flat 32-bit guest with CR4.OSXSAVE and
    XCR0 = 7 runs ``vpxor ymm0, ymm0, ymm0; hlt``; True when it reaches the HLT (kvm_pvm's
    emulator has no AVX, so a kernel that believes CPUID would die)."""
    try:
        with ScratchGuest(bytes([0xC5, 0xFD, 0xEF, 0xC0, 0xF4]), flat32=True, cpuid=cpuid) as guest:
            guest.sregs.cr4 |= (1 << 18) | (1 << 9) | (1 << 10)  # OSXSAVE, OSFXSR, OSXMMEXCPT
            ioctl(guest.vcpu, K.KVM_SET_SREGS, guest.sregs)
            xcrs = K.KvmXcrs()
            xcrs.nr_xcrs = 1
            xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, 7
            ioctl(guest.vcpu, K.KVM_SET_XCRS, xcrs)
            return guest.enter() == K.KVM_EXIT_HLT
    except OSError:
        return False


# CPUID bits of the AVX family: (leaf, subleaf, register, mask)
_AVX_CPUID_BITS = (
    (1, 0, "ecx", (1 << 12) | (1 << 28) | (1 << 29)),  # FMA, AVX, F16C
    (7, 0, "ebx", (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (0xF << 26) | (3 << 30)),
    (7, 0, "ecx", (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14)),
    (7, 0, "edx", (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23)),
    (7, 1, "eax", (1 << 4) | (1 << 5)),
    (0xD, 0, "eax", 0xE4),  # XCR0 components AVX, opmask, ZMM_Hi256, Hi16_ZMM
)


def hide_avx(cpuid: K.KvmCpuid2) -> None:
    """Take the AVX family out of the CPUID table given to vCPUs (XSAVE itself stays)."""
    for i in range(cpuid.nent):
        entry = cpuid.entries[i]
        for leaf, subleaf, register, mask in _AVX_CPUID_BITS:
            if entry.function == leaf and entry.index == subleaf:
                setattr(entry, register, getattr(entry, register) & ~mask)
        if entry.function == 0xD and entry.index == 0:
            entry.ebx = entry.ecx = 576  # legacy area + XSAVE header
        if entry.function == 0xD and 2 <= entry.index <= 7:
            entry.eax = entry.ebx = entry.ecx = entry.edx = 0
