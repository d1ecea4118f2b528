"""The KVM backend's run loop: kicks, deadlines, the common entry and the I/O exit inlined.

Theory of operation
-------------------
* **Kicks.** Each owner thread blocks ``KICK_SIGNAL``; ``KVM_SET_SIGNAL_MASK`` unblocks it only
  inside ``KVM_RUN``. A kick sets the vCPU's stop flag and sends the signal to the thread: inside
  the guest, KVM_RUN returns EINTR; outside, the signal stays pending and the next KVM_RUN returns
  at once. Either way no kick is lost. The flag is checked before each entry as well.
* **Deadlines.** ``hv_vcpu_run_until`` arms a per-thread ``timer_create`` timer that sends the same
  signal at the deadline; mach_absolute_time is CLOCK_MONOTONIC in nanoseconds (timebase 1/1). A
  halted vCPU without HLT exiting waits for a kick or its deadline without entering.
* **The exit path.** ``_run`` inlines the common entry: when nothing is owed to KVM and nothing
  is to be injected (``vcpu.plain_entry``, dropped by every exit but an OUT exit and by the
  calls that can create such work, kvm_entry), an entry is the dirty-regs flags and one KVM_RUN.
  Where KVM has completed an OUT and the VMM moves RIP back to where KVM is (``vcpu.kvm_rip``)
  without writing another register, no registers are loaded. An I/O exit at a known site
  (kvm_exits) is recorded inline too; every other exit goes to the handlers of kvm_exits. Guest
  time (``hv_vcpu_get_exec_time``) is the monotonic clock around KVM_RUN (the thread CPU clock
  is a system call, the monotonic clock is not).
"""

from __future__ import annotations

import ctypes
import signal
import threading
import time

from . import common
from . import constants as C
from . import kvm_abi as K
from .kvm_exits import EXIT_HANDLERS, EXIT_SNAPSHOT, Exits
from .kvm_regs import RIP_INDEX
from .kvm_state import MASK64, Vcpu
from .posix import ThreadTimer, ioctl_plain

KICK_SIGNAL = signal.SIGRTMIN + 4
"""Signal used to kick a vCPU thread out of KVM_RUN (blocked outside KVM_RUN)."""

_FOREVER = C.HV_DEADLINE_FOREVER

_get_ident = threading.get_ident
_now_ns = time.monotonic_ns
_ioctl_plain = ioctl_plain
_ACTIVITY = C.VMCS_GUEST_ACTIVITY_STATE
_ENTRY_INFO = C.VMCS_CTRL_VMENTRY_IRQ_INFO
_KVM_EXIT_IO = K.KVM_EXIT_IO
_IN_OWED = ("in", 0)


class Runner(Exits):
    """hv_vcpu_run, hv_vcpu_run_until and hv_vcpu_interrupt (see the module docstring)."""

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
