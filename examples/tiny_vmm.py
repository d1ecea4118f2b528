"""A VMM in a page, on gdbstub.hv, with the gdb stub in front of it.

Its own memory map (1 MiB of RAM at 0), its own devices (a console at port 0xE9, an exit
port at 0xF4), its own exit handling; the debug target and the server come from gdbstub.

    python examples/tiny_vmm.py [--port 1234]
    gdb -ex 'set architecture i386:x86-64' -ex 'target remote :1234' -ex 'break *0x1010'
"""

from __future__ import annotations

import argparse
import sys

from gdbstub import hv, vmxsetup
from gdbstub.hvtarget import HvTarget
from gdbstub.memory import GuestMemory
from gdbstub.server import GdbServer
from gdbstub.vcpu import Stop

# 32-bit guest at 0x1000: print a string on port 0xE9, count to 1000 in [0x2000], exit 0x15.
GUEST = (
    bytes.fromhex(
        "be 30100000"  # 1000: mov esi, message
        "ac"  # 1005: lodsb
        "84 c0"  # 1006: test al, al
        "74 04"  # 1008: jz 100e
        "e6 e9"  # 100a: out 0xe9, al
        "eb f7"  # 100c: jmp 1005
        "31 c9"  # 100e: xor ecx, ecx
        "41"  # 1010: inc ecx            <- count
        "89 0d 00200000"  # 1011: mov [0x2000], ecx
        "81 f9 e8030000"  # 1017: cmp ecx, 1000
        "75 f1"  # 101d: jne 1010
        "b0 15"  # 101f: mov al, 0x15
        "e6 f4"  # 1021: out 0xf4, al      <- exit with status 0x15
        "f4"  # 1023: hlt
    ).ljust(0x30, b"\x90")
    + b"tiny vmm says hi\n\0"
)

# ES CS SS DS FS GS LDTR TR: (selector, limit, access rights): flat code and data, no LDT, a busy
# 32-bit TSS with a byte-granular limit (VMX refuses a limit above 1 MiB without G)
FLAT = (0x10, 0xFFFFFFFF, 0xC093)
SEGMENTS = (
    FLAT,
    (0x08, 0xFFFFFFFF, 0xC09B),
    FLAT,
    FLAT,
    FLAT,
    FLAT,
    (0, 0, 0x10000),
    (0x18, 0x67, 0x8B),
)


class TinyVmm:
    """RAM, two ports and the exit handler: what HvTarget needs (``gdbstub.hvtarget.Vmm``)."""

    def __init__(self) -> None:
        hv.hv_vm_create(hv.HV_VM_DEFAULT)
        self.memory = GuestMemory()
        self.memory.allocate(0, 0x100000)
        self.memory.write(0x1000, GUEST)
        self.console = bytearray()

    def setup_vcpu(self, vcpu: int) -> None:
        """Flat 32-bit protected mode at 0x1000, set up as the framework needs it (vmxsetup:
        HLT exiting and TPR shadow by cap2ctrl, CR0.NE and CR4.VMXE behind masks)."""
        for i, (selector, limit, ar) in enumerate(SEGMENTS):
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES + 2 * i, selector)
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_BASE + 2 * i, 0)
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_LIMIT + 2 * i, limit)
            hv.hv_vmx_vcpu_write_vmcs(vcpu, hv.VMCS_GUEST_ES_AR + 2 * i, ar)
        vmxsetup.setup_vcpu(vcpu, cr0=0x11)  # PE | ET, as a boot loader leaves it
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, 0x1000)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RFLAGS, 0x2)

    def handle_exit(self, vcpu: int) -> Stop | None:
        """I/O: the console and the exit port; anything else stops the run."""
        reason = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_REASON)
        vmxsetup.reinject_event(vcpu)  # an event this exit interrupted goes on
        if reason == hv.VMX_REASON_MOV_CR:  # the guest changed a CR bit the VMM owns
            vmxsetup.handle_cr_access(vcpu, self.memory)
            return None
        if reason != hv.VMX_REASON_IO:
            return Stop("fault", signal=6, message=f"exit {reason}")
        port = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_EXIT_QUALIFIC) >> 16
        value = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RAX) & 0xFF
        rip = hv.hv_vcpu_read_register(vcpu, hv.HV_X86_RIP)
        length = hv.hv_vmx_vcpu_read_vmcs(vcpu, hv.VMCS_RO_VMEXIT_INSTR_LEN)
        hv.hv_vcpu_write_register(vcpu, hv.HV_X86_RIP, rip + length)
        if port == 0xF4:
            return Stop("exited", exit_status=value)
        self.console.append(value)
        if value == 10:
            sys.stdout.write(f"guest: {self.console.decode()}")
            sys.stdout.flush()
            self.console.clear()
        return None


def main() -> int:
    """Boot the tiny guest stopped and serve it to gdb until it exits or gdb kills it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1234)
    args = parser.parse_args()
    vmm = TinyVmm()
    target = HvTarget(vmm)
    with GdbServer(target, "127.0.0.1", args.port) as server:
        print(f"tiny_vmm: gdb -ex 'target remote 127.0.0.1:{server.address[1]}'", flush=True)
        server.serve_forever()
    target.close()
    return target.exit_status or 0


if __name__ == "__main__":
    sys.exit(main())
