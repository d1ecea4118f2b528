"""The vCPU worker thread (gdbstub/vcpu.py) on a real vCPU: a run's ``prepare`` step."""

from __future__ import annotations

import queue

import pytest
from hvguest import CODE, Vm, asm, hv_vm, setup_real_mode

from gdbstub import hv
from gdbstub.vcpu import Stop, VcpuWorker

__all__ = ["hv_vm"]

ELSEWHERE = CODE + 0x100


def _worker(stops: queue.SimpleQueue[Stop]) -> VcpuWorker:
    return VcpuWorker(
        0, lambda worker, stop: stops.put(stop), setup=lambda vcpu: setup_real_mode(vcpu)
    )


def _report_port(vcpu: int) -> Stop:
    """The exit handler: every exit ends the run, reporting the port of an I/O exit."""
    if hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON) != hv.VMX_REASON_IO:
        return Stop("fault", message="not an I/O exit")
    qualification = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC)
    return Stop("debug", address=qualification >> 16)


def _move_to_elsewhere(vcpu: int) -> None:
    hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, ELSEWHERE)


def test_prepare_runs_on_the_owner_thread_before_the_first_entry(hv_vm: Vm) -> None:
    hv_vm.mem.write(CODE, asm("out 0x80, al\njmp $"))
    hv_vm.mem.write(ELSEWHERE, asm("out 0x81, al\njmp $", org=ELSEWHERE))
    stops: queue.SimpleQueue[Stop] = queue.SimpleQueue()
    worker = _worker(stops)
    try:
        # hv_vcpu_write_register is owner-only: from this thread it would raise
        with pytest.raises(hv.HvError):
            hv.hv_vcpu_write_register(worker.vcpu, hv.HV_X86_RIP, ELSEWHERE)
        worker.resume(_report_port, prepare=_move_to_elsewhere)
        stop = stops.get(timeout=30)
        assert (stop.kind, stop.address) == ("debug", 0x81)
        # without prepare the run starts where the last one stopped: the OUT at ELSEWHERE
        worker.resume(_report_port)
        assert stops.get(timeout=30).address == 0x81
    finally:
        worker.close()


def test_a_failing_prepare_ends_the_run_as_a_fault(hv_vm: Vm) -> None:
    hv_vm.mem.write(CODE, asm("out 0x80, al\njmp $"))
    stops: queue.SimpleQueue[Stop] = queue.SimpleQueue()
    worker = _worker(stops)
    try:
        worker.resume(
            _report_port, prepare=lambda vcpu: hv.hv_vmx_vcpu_write_vmcs(vcpu, 0x7FFFFFFF, 0)
        )
        stop = stops.get(timeout=30)
        assert stop.kind == "fault" and "hv_vmx_vcpu_write_vmcs" in stop.message
        assert not worker.running
        worker.resume(_report_port)  # the worker serves the next run
        assert stops.get(timeout=30).address == 0x80
    finally:
        worker.close()
