"""Breakpoint and watchpoint bookkeeping: which mechanism serves each, and the DR7 encoding.

The debug target asks for breakpoints by gdb kind (Z0 software, Z1 hardware, Z2 write, Z3 read,
Z4 access watchpoint). This module decides the mechanism from what the host can do (probed when
the VM starts, never by the host's name) and keeps the books:

* ``int3``: the byte at the breakpoint is replaced by 0xCC and #BP is intercepted;
* ``dr``: one of the four debug-register slots (execution or data breakpoint), #DB intercepted;
* ``page``: the guest-physical page is write-protected (or made execute-only for read/access
  watchpoints: code on the page still runs) with ``hv_vm_protect``; the faulting access is
  completed by the target and reported, after it, when it touches the watched range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KIND_NAMES = {
    0: "breakpoint",
    1: "hw breakpoint",
    2: "watchpoint",
    3: "read watchpoint",
    4: "acc watchpoint",
}
STOP_REASONS = {0: "swbreak", 1: "hwbreak", 2: "watch", 3: "rwatch", 4: "awatch"}

DR7_RW_EXEC, DR7_RW_WRITE, DR7_RW_ACCESS = 0b00, 0b01, 0b11
_DR7_LEN = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}


@dataclass
class Breakpoint:
    """One breakpoint or watchpoint as gdb set it, and how it is served."""

    kind: int  # gdb Z kind 0..4
    address: int  # guest-virtual (or physical in physical mode)
    length: int
    mechanism: str  # "int3", "dr", "page"
    slot: int = -1  # DR slot for "dr"
    physical: list[tuple[int, int]] = field(default_factory=list)  # (gpa, len) pieces
    saved: bytes = b""  # original byte for "int3"
    hits: int = 0

    def describe(self) -> str:
        """One line for ``monitor info breakpoints``."""
        where = f"{self.address:#x}" + (f" len {self.length}" if self.kind >= 2 else "")
        how = {
            "int3": "int3 in guest memory, #BP intercepted",
            "dr": f"debug register DR{self.slot}, #DB intercepted"
            + (" (software breakpoint: int3 not possible here)" if self.kind == 0 else ""),
            "page": "write-protected guest page (hv_vm_protect)"
            if self.kind == 2
            else "execute-only guest page (hv_vm_protect)",
        }[self.mechanism]
        return f"{KIND_NAMES[self.kind]:<15} {where:<26} {how}; hits {self.hits}"


def dr7_value(slots: list[Breakpoint | None]) -> int:
    """DR7 for the used slots: L and G enable bits, RW and LEN per slot, GE/LE set."""
    value = 0
    for index, bp in enumerate(slots):
        if bp is None:
            continue
        rw = DR7_RW_EXEC if bp.kind in (0, 1) else DR7_RW_WRITE if bp.kind == 2 else DR7_RW_ACCESS
        length = 0 if bp.kind in (0, 1) else _DR7_LEN[bp.length]
        value |= 0b11 << (2 * index)
        value |= (rw | length << 2) << (16 + 4 * index)
    if value:
        value |= 0x300  # LE | GE: exact breakpoints
    return value | 0x400  # bit 10 reads as one


def dr_length_ok(address: int, length: int) -> bool:
    """Whether a data breakpoint of ``length`` at ``address`` fits one debug register."""
    return length in _DR7_LEN and address % length == 0
