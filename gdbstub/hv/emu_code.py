"""The emu backend's code scanning: which instructions exit, and code the host rewrites.

Theory of operation
-------------------
Code is scanned (capstone) the first time it runs for the instructions that exit or need the
backend (IN/OUT/INS/OUTS, HLT, RDMSR/WRMSR, CPUID; IRETQ/SYSRETQ for their canonical-address
check), and a code hook goes on exactly those addresses. Block hooks (:class:`BlockHooks`)
cover the guest-linear addresses not scanned yet: a block starting there calls into Python,
which scans it and on to where any block starting inside it ends (the first control transfer),
then cuts that span out of the hooked ranges and has it retranslated. Scanned code thus runs
at unicorn's own speed, without a Python call per block.

The VMM and the debugger write guest RAM through their own buffers, which unicorn never sees.
Every guest-physical page holding a scanned block is remembered with a copy of its bytes; each
entry compares them (runs of contiguous pages at once); in a changed page the differing bytes
are found, the blocks and instruction sites overlapping them are forgotten and the translated
blocks flushed. A code hook also checks that its instruction is still there.
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import capstone

from . import common
from . import constants as C
from .emu_state import M64, PAGE, CpuState, Space, Vcpu, X, flush_tlb, unicorn

# Instructions that exit (or may), found by scanning blocks: capstone id -> kind.
_SITE_KINDS = {
    capstone.x86.X86_INS_IN: "io",
    capstone.x86.X86_INS_OUT: "io",
    capstone.x86.X86_INS_INSB: "io",
    capstone.x86.X86_INS_INSW: "io",
    capstone.x86.X86_INS_INSD: "io",
    capstone.x86.X86_INS_OUTSB: "io",
    capstone.x86.X86_INS_OUTSW: "io",
    capstone.x86.X86_INS_OUTSD: "io",
    capstone.x86.X86_INS_HLT: "hlt",
    capstone.x86.X86_INS_RDMSR: "rdmsr",
    capstone.x86.X86_INS_WRMSR: "wrmsr",
    capstone.x86.X86_INS_CPUID: "cpuid",
    # returns that must fault on a non-canonical target (unicorn does not check)
    capstone.x86.X86_INS_IRETQ: "iretq",
    capstone.x86.X86_INS_SYSRETQ: "sysret",
}
# What a site's bytes must still be (after prefixes) for its hook to act on it.
_SITE_OPCODES = {
    "hlt": (b"\xf4",),
    "rdmsr": (b"\x0f\x32",),
    "wrmsr": (b"\x0f\x30",),
    "cpuid": (b"\x0f\xa2",),
    "iretq": (b"\xcf",),
    "sysret": (b"\x0f\x07",),
}
_PRIVILEGED = frozenset({"io", "hlt", "rdmsr", "wrmsr"})
UD_IDS = frozenset({capstone.x86.X86_INS_UD0, capstone.x86.X86_INS_UD1, capstone.x86.X86_INS_UD2})
_STRING_IO = frozenset({0x6C, 0x6D, 0x6E, 0x6F})

_DISASM: dict[int, Any] = {}

# Instructions that end a translated block (TCG ends blocks at every control transfer).
_BLOCK_ENDS = frozenset(
    getattr(capstone.x86, name)
    for name in dir(capstone.x86)
    if name.startswith("X86_INS_J")
    or name.startswith("X86_INS_LOOP")
    or name
    in (
        "X86_INS_CALL",
        "X86_INS_LCALL",
        "X86_INS_LJMP",
        "X86_INS_RET",
        "X86_INS_RETF",
        "X86_INS_RETFQ",
        "X86_INS_IRET",
        "X86_INS_IRETD",
        "X86_INS_IRETQ",
        "X86_INS_INT",
        "X86_INS_INT1",
        "X86_INS_INT3",
        "X86_INS_INTO",
        "X86_INS_SYSCALL",
        "X86_INS_SYSENTER",
        "X86_INS_SYSEXIT",
        "X86_INS_SYSRET",
        "X86_INS_HLT",
    )
)
# The most bytes one translated block can span from its first instruction: QEMU's x86
# translator ends a block once it is PAGE - 32 bytes long (plus the instruction that crossed).
_BLOCK_BYTES = PAGE - 32 + 15


def _load_memcmp() -> Callable[[int, bytes, int], int] | None:
    try:
        function: Any = ctypes.CDLL(None).memcmp
    except (OSError, TypeError, AttributeError):  # pragma: no cover - no C library to load
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_memcmp = _load_memcmp()
_SMALL_RUN = 8 * PAGE


def disassembler(bits: int) -> Any:
    md = _DISASM.get(bits)
    if md is None:
        mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
        md = capstone.Cs(capstone.CS_ARCH_X86, mode)
        _DISASM[bits] = md
    return md


@dataclass
class CodePage:
    """A guest-physical page holding scanned code, watched for writes by the host."""

    view: memoryview | None  # the page in the VMM's buffer (None: no longer mapped)
    saved: bytes  # its bytes when last checked
    blocks: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # key -> span
    sites: dict[int, tuple[int, int]] = field(default_factory=dict)  # linear address -> span


@dataclass
class CodeRun:
    """Watched pages contiguous in guest and host memory, compared in one go at each entry."""

    address: int  # host address (0: no longer mapped)
    view: memoryview | None
    saved: bytes  # their bytes when last checked
    pages: list[int]

    def changed(self) -> bool:
        if self.view is None:
            return True
        if len(self.saved) <= _SMALL_RUN or _memcmp is None:
            return bytes(self.view) != self.saved  # cheaper than a ctypes call when small
        return _memcmp(self.address, self.saved, len(self.saved)) != 0


class BlockHooks:
    """UC_HOOK_BLOCK hooks over the guest-linear addresses whose code is not scanned yet.

    unicorn decides when it translates a block whether the block calls a block hook (one whose
    range holds the block's first address). Code is scanned the first time it runs; its span
    is then cut out of these ranges and its translation dropped, so scanned code runs without
    a call into Python per block. The ranges are the gaps between scanned spans: disjoint,
    kept by first address."""

    def __init__(self, uc: Any, callback: Callable[..., None]) -> None:
        self.uc = uc
        self.callback = callback
        self.firsts: list[int] = []
        self.gaps: dict[int, tuple[int, Any]] = {}  # first address -> (last address, hook)
        self._add(0, M64)

    def _add(self, first: int, last: int) -> None:
        if first <= last:
            bisect.insort(self.firsts, first)
            hook = self.uc.hook_add(unicorn.UC_HOOK_BLOCK, self.callback, None, first, last)
            self.gaps[first] = (last, hook)

    def cut(self, lo: int, hi: int) -> None:
        """Take the scanned span ``[lo, hi)`` out of the hooked ranges."""
        overlapping = []
        i = bisect.bisect_right(self.firsts, hi - 1) - 1
        while i >= 0 and self.gaps[self.firsts[i]][0] >= lo:
            overlapping.append(self.firsts[i])
            i -= 1
        for first in overlapping:
            last, hook = self.gaps.pop(first)
            self.firsts.remove(first)
            self.uc.hook_del(hook)
            self._add(first, lo - 1)
            self._add(hi, last)
        # translated with the hook: translate again (page by page: unicorn translates the
        # first address of a range and takes the rest as physically contiguous)
        while overlapping and lo < hi:
            piece = min(hi, (lo | (PAGE - 1)) + 1)
            self.uc.ctl_remove_cache(lo, piece)
            lo = piece

    def uncover(self, lo: int, hi: int, still_scanned: list[tuple[int, int]]) -> None:
        """Hook ``[lo, hi)`` again (its code was forgotten), but for what other spans still
        scanned cover and what is hooked already."""
        holes = still_scanned + [
            (first, last + 1) for first, (last, _) in self.gaps.items() if first < hi and lo <= last
        ]
        pieces = [(lo, hi)]
        for a, b in holes:
            pieces = [
                piece
                for x, y in pieces
                for piece in ((x, min(y, a)), (max(x, b), y))
                if piece[0] < piece[1]
            ]
        for x, y in pieces:
            self._add(x, y - 1)


def changed_spans(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """The byte ranges in which two versions of a page differ (everything if one is missing)."""
    if len(old) != len(new):
        return [(0, PAGE)]
    spans: list[tuple[int, int]] = []
    for chunk in range(0, len(old), 64):
        if old[chunk : chunk + 64] == new[chunk : chunk + 64]:
            continue
        for i in range(chunk, chunk + 64):
            if old[i] != new[i]:
                if spans and spans[-1][1] == i:
                    spans[-1] = (spans[-1][0], i + 1)
                else:
                    spans.append((i, i + 1))
    return spans


class CodeScan(CpuState):
    """Scanning, instruction sites and host-written code (see the module docstring)."""

    @staticmethod
    def _uc_perms(flags: int) -> int:
        perms = 0
        if flags & C.HV_MEMORY_READ:
            perms |= unicorn.UC_PROT_READ
        if flags & C.HV_MEMORY_WRITE:
            perms |= unicorn.UC_PROT_WRITE
        if flags & (C.HV_MEMORY_EXEC | C.HV_MEMORY_UEXEC):
            perms |= unicorn.UC_PROT_EXEC
        return perms

    def _remap(self, vcpu: Vcpu) -> None:
        """Make the vCPU's unicorn memory map equal its space's regions (minus watched pages)."""
        self._quiet(vcpu, self._remap_now, vcpu)

    def _remap_now(self, vcpu: Vcpu) -> None:
        """_remap's work (unicorn may fault looking up the addresses it unmaps)."""
        uc = vcpu.uc
        for begin, end, _perms in list(uc.mem_regions()):
            uc.mem_unmap(begin, end - begin + 1)
        merged: list[list[int]] = []
        for region in vcpu.space.regions:
            if merged:
                g, s, u, f = merged[-1]
                if g + s == region.gpa and u + s == region.uva and f == region.flags:
                    merged[-1][1] += region.size
                    continue
            merged.append([region.gpa, region.size, region.uva, region.flags])
        for gpa, size, uva, flags in merged:
            uc.mem_map_ptr(gpa, size, self._uc_perms(flags), uva)
        for page, remove in vcpu.watch_pages.items():
            watched = common.region_at(vcpu.space.regions, page)
            if watched is not None:
                uc.mem_protect(page, PAGE, self._uc_perms(watched.flags) & ~remove)
        flush_tlb(uc)
        uc.ctl_flush_tb()
        for gpa, code in vcpu.code.items():  # the host buffers may have moved
            code.view = self._page_view(vcpu.space, gpa)
        vcpu.code_runs = None
        vcpu.uc_dirty_memory = False

    # --- guest-physical and linear memory --------------------------------------------------------

    def _scan_block(self, vcpu: Vcpu, address: int, size: int) -> None:
        key = (address, size)
        if key in vcpu.scanned:
            return
        vcpu.scanned.add(key)
        insns, end, complete = self._decode_block(vcpu, address, size)
        # The guest-physical pages under the code, watched for host writes.
        spans: list[tuple[CodePage, int, int, int]] = []  # (page, linear start, lo, hi)
        linear = address
        while linear < end:
            stop = min(end, (linear | 0xFFF) + 1)
            gpa = self._translate(vcpu, linear & M64)
            if gpa is not None:
                page = self._code_page(vcpu, gpa & ~0xFFF)
                if page is not None:
                    lo = linear & 0xFFF
                    page.blocks[key] = (lo, lo + stop - linear)
                    spans.append((page, linear, lo, lo + stop - linear))
            linear = stop
        found = False
        for insn in insns:
            kind = _SITE_KINDS.get(insn.id)
            if kind is None:
                continue
            for page, start, lo, hi in spans:
                first = lo + insn.address - start
                if lo <= first < hi:
                    page.sites[insn.address] = (first, first + insn.size)
            if insn.address not in vcpu.sites:
                vcpu.new_sites[insn.address] = kind
                found = True
        shared = self._shared_code(vcpu, address) if complete else None
        if shared is not None:
            vcpu.spans[key] = (address, end)
            vcpu.uncut.append((address, end))
            if shared == "unpaged":
                vcpu.unpaged_spans.add(key)
        if found or shared is not None:
            vcpu.uc.emu_stop()  # sites and block hooks change outside emulation

    def _shared_code(self, vcpu: Vcpu, address: int) -> str | None:
        """Whether code at guest-linear ``address`` is the code there in every address space,
        so that its span may leave the block hooks: "unpaged" (paging is off; such spans are
        forgotten when paging comes on) or "kernel" (the upper half of a long-mode address
        space, shared by every process). None for anything else: a process's code is
        scanned block by block as it is translated, so that another process at the same
        address gets scanned too."""
        if not vcpu.uc.reg_read(X.UC_X86_REG_CR0) & 1 << 31:
            return "unpaged"
        if self._cpu_bits(vcpu) == 64 and address >= 1 << 63:
            return "kernel"
        return None

    def _decode_block(self, vcpu: Vcpu, address: int, size: int) -> tuple[list[Any], int, bool]:
        """The instructions of the block unicorn translated at ``address`` (``size`` bytes),
        and on to where any block starting in it ends: the first control transfer or the end
        of readable code. ``(instructions, end, complete)``; not complete when the code runs
        on past the longest block or stops decoding (capstone and QEMU may disagree there):
        then the span stays under the block hooks and each of its blocks is scanned as it
        is translated, as everywhere before scanning.

        Decoded a piece at a time (capstone decodes all it is given at once): the block
        unicorn reported, which normally ends in a control transfer, then 64 bytes at a time."""
        md = disassembler(self._cpu_bits(vcpu))
        insns: list[Any] = []
        end, limit = address, address + _BLOCK_BYTES
        want = max(size, 1) + 15
        while end < limit:
            start = end
            code = self._read_linear(vcpu, start, min(want, limit - start))
            for insn in md.disasm(code, start):
                insns.append(insn)
                end = insn.address + insn.size
                if insn.id in _BLOCK_ENDS and end >= address + size:
                    return insns, end, True
            if end == start:  # nothing decoded: unreadable here, or bytes capstone rejects
                break
            want = 64
        complete = end < limit and not self._read_linear(vcpu, end, 1)  # readable code ended
        return insns, max(end, address + max(size, 1)), complete

    def _code_page(self, vcpu: Vcpu, gpa: int) -> CodePage | None:
        page = vcpu.code.get(gpa)
        if page is None:
            view = self._page_view(vcpu.space, gpa)
            if view is None:
                return None
            page = vcpu.code[gpa] = CodePage(view, bytes(view))
            vcpu.code_runs = None
        return page

    def _page_view(self, space: Space, gpa: int) -> memoryview | None:
        region = common.region_at(space.regions, gpa)
        if region is None:
            return None
        array = (ctypes.c_char * PAGE).from_address(region.uva + (gpa - region.gpa))
        return memoryview(array).cast("B")

    def _code_runs(self, vcpu: Vcpu) -> list[CodeRun]:
        """The watched pages as runs contiguous in guest and host memory."""
        groups: list[tuple[int, list[int]]] = []
        runs: list[CodeRun] = []
        for gpa in sorted(vcpu.code):
            region = common.region_at(vcpu.space.regions, gpa)
            if region is None or vcpu.code[gpa].view is None:
                runs.append(CodeRun(0, None, b"", [gpa]))
                continue
            uva = region.uva + (gpa - region.gpa)
            if groups:
                start, pages = groups[-1]
                if pages[-1] + PAGE == gpa and start + PAGE * len(pages) == uva:
                    pages.append(gpa)
                    continue
            groups.append((uva, [gpa]))
        for start, pages in groups:
            array = (ctypes.c_char * (PAGE * len(pages))).from_address(start)
            saved = b"".join(vcpu.code[gpa].saved for gpa in pages)
            runs.append(CodeRun(start, memoryview(array).cast("B"), saved, pages))
        return runs

    def _check_code(self, vcpu: Vcpu) -> None:
        """See what the host wrote into scanned code since the last entry (the VMM and the
        debugger write guest RAM through their own buffers, behind unicorn's back): forget the
        scans and instruction sites of the changed bytes and drop the translated blocks.

        Per entry: one compare per run of contiguous watched pages (about 1 us, plus 0.2 us a
        page); a changed page is diffed, so that data written next to code costs no
        retranslation."""
        if vcpu.code_runs is None:
            vcpu.code_runs = self._code_runs(vcpu)
        suspects = [gpa for run in vcpu.code_runs if run.changed() for gpa in run.pages]
        if not suspects:
            return
        vcpu.code_runs = None
        stale = False
        for gpa in suspects:
            page = vcpu.code[gpa]
            if page.view is None:
                current = b""
            else:
                current = bytes(page.view)
                if current == page.saved:
                    continue
            changed = changed_spans(page.saved, current)
            page.saved = current
            for key, (lo, hi) in list(page.blocks.items()):
                if any(a < hi and lo < b for a, b in changed):
                    del page.blocks[key]
                    vcpu.scanned.discard(key)
                    span = vcpu.spans.pop(key, None)
                    if span is not None:
                        vcpu.forgotten.append(span)
                    stale = True
            for address, (lo, hi) in list(page.sites.items()):
                if any(a < hi and lo < b for a, b in changed):
                    del page.sites[address]
                    vcpu.sites.pop(address, None)
                    hook = vcpu.site_hooks.pop(address, None)
                    if hook is not None:
                        self._quiet(vcpu, vcpu.uc.hook_del, hook)
                    stale = True
            if page.view is None or not page.blocks:
                del vcpu.code[gpa]
        if stale:
            vcpu.uc.ctl_flush_tb()

    def _add_sites(self, vcpu: Vcpu) -> None:
        uc = vcpu.uc
        for address, kind in vcpu.new_sites.items():
            vcpu.sites[address] = kind

            def on_site(uc_: Any, addr: int, size: int, _data: Any, kind: str = kind) -> None:
                self._on_site(vcpu, addr, kind)

            vcpu.site_hooks[address] = uc.hook_add(
                unicorn.UC_HOOK_CODE, on_site, None, address, address
            )
            uc.ctl_remove_cache(address, address + 1)
        vcpu.new_sites.clear()

    def _on_site(self, vcpu: Vcpu, address: int, kind: str) -> None:
        if vcpu.exit_recorded:
            return
        uc = vcpu.uc
        if kind in _SITE_OPCODES and not self._site_intact(vcpu, address, kind):
            return  # rewritten by the guest since the scan (I/O is decoded again below)
        if kind in _PRIVILEGED and self._faults_first(vcpu, kind):
            return  # QEMU raises the #GP (or, for I/O, consults the TSS I/O bitmap)
        if kind == "io":
            self._exit_io(vcpu, address)
        elif kind == "hlt":
            if vcpu.controls[C.VMCS_CTRL_CPU_BASED] & C.CPU_BASED_HLT:
                self._stop(vcpu, C.VMX_REASON_HLT, length=1)
            else:
                vcpu.halted = True
                uc.emu_stop()
        elif kind in ("rdmsr", "wrmsr"):
            msr = uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF
            bit = C.HV_MSR_WRITE if kind == "wrmsr" else C.HV_MSR_READ
            if not vcpu.msr.access.get(msr, 0) & bit:
                reason = C.VMX_REASON_WRMSR if kind == "wrmsr" else C.VMX_REASON_RDMSR
                self._stop(vcpu, reason, length=2)
            elif msr in (C.MSR_EFER, C.MSR_TSC):
                # emulated here: unicorn's own handling would miss our EFER/TSC model
                vcpu.emulate_msr = kind
                uc.emu_stop()
        elif kind == "cpuid":
            self._stop(vcpu, C.VMX_REASON_CPUID, length=2)
        elif kind in ("iretq", "sysret"):
            self._check_return(vcpu, address, kind)

    def _faults_first(self, vcpu: Vcpu, kind: str) -> bool:
        """Whether the privileged instruction at a site faults before it would exit, as on
        hardware: HLT, RDMSR, WRMSR above CPL0, I/O above IOPL (in protected mode)."""
        if not vcpu.uc.reg_read(X.UC_X86_REG_CS) & 3:
            return False  # CPL0 (CS.RPL is CPL in protected mode), the common case
        state = self._snapshot(vcpu)
        if not state.cpl:
            return False  # real mode
        if kind != "io":
            return True
        iopl = (int(vcpu.uc.reg_read(X.UC_X86_REG_RFLAGS)) >> 12) & 3
        return state.cpl > iopl

    def _check_return(self, vcpu: Vcpu, address: int, kind: str) -> None:
        """Before an IRETQ/SYSRETQ: fault if its target is not canonical (emu_events)."""
        raise NotImplementedError

    def _site_intact(self, vcpu: Vcpu, address: int, kind: str) -> bool:
        code = self._read_linear(vcpu, address, 6)
        i = 0
        while i < min(len(code), 4) and (code[i] in common.PREFIXES or 0x40 <= code[i] <= 0x4F):
            i += 1
        return any(code.startswith(op, i) for op in _SITE_OPCODES[kind])

    def _exit_io(self, vcpu: Vcpu, address: int) -> None:
        uc = vcpu.uc
        code = self._read_linear(vcpu, address, 15)
        length, op, imm = common.decode_io(code)
        if op is None:
            return
        port = imm if op in common.IMM_OPCODES else uc.reg_read(X.UC_X86_REG_RDX) & 0xFFFF
        prefixes = code[: length - 1]
        if op in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E):
            opsize = 1
        elif self._cpu_bits(vcpu) == 16:
            opsize = 4 if 0x66 in prefixes else 2
        else:
            opsize = 2 if 0x66 in prefixes else 4
        qual = (opsize - 1) | port << C.EXIT_QUAL_IO_PORT_SHIFT
        if op in common.IN_OPCODES:
            qual |= C.EXIT_QUAL_IO_IN
        if op in _STRING_IO:
            qual |= C.EXIT_QUAL_IO_STRING
            if any(b in (0xF2, 0xF3) for b in code[: length - 1]):
                qual |= C.EXIT_QUAL_IO_REP
        self._stop(vcpu, C.VMX_REASON_IO, qual=qual, length=length)
        vcpu.exit[C.VMCS_RO_IO_RCX] = int(uc.reg_read(X.UC_X86_REG_RCX))
        vcpu.exit[C.VMCS_RO_IO_RSI] = int(uc.reg_read(X.UC_X86_REG_RSI))
        vcpu.exit[C.VMCS_RO_IO_RDI] = int(uc.reg_read(X.UC_X86_REG_RDI))
        vcpu.exit[C.VMCS_RO_IO_RIP] = int(uc.reg_read(X.UC_X86_REG_RIP))

    @staticmethod
    def _forget_unpaged(vcpu: Vcpu) -> None:
        """Paging is on: code scanned with paging off is scanned again where it runs now
        (linear addresses mean other memory from here on)."""
        for key in vcpu.unpaged_spans:
            span = vcpu.spans.pop(key, None)
            if span is not None:
                vcpu.forgotten.append(span)
            vcpu.scanned.discard(key)
        vcpu.unpaged_spans.clear()
        vcpu.uc.ctl_flush_tb()

    @staticmethod
    def _cut_scanned(vcpu: Vcpu) -> None:
        """Update the block hooks: hook forgotten code again, cut out newly scanned spans (the
        translations were flushed when code was forgotten)."""
        hooks = vcpu.block_hooks
        assert hooks is not None
        if vcpu.forgotten:
            for lo, hi in vcpu.forgotten:
                still = [(a, b) for a, b in vcpu.spans.values() if a < hi and lo < b]
                hooks.uncover(lo, hi, still)
            vcpu.forgotten.clear()
        live = set(vcpu.spans.values())
        for span in vcpu.uncut:
            if span in live:
                hooks.cut(*span)
        vcpu.uncut.clear()
