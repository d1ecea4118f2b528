"""The emu backend's code scanning: which instructions exit, found where code runs.

Theory of operation
-------------------
Some instructions must stop emulation *before* they execute (the framework's contract: RIP at
the instruction, nothing of it done): IN/OUT/INS/OUTS, HLT, RDMSR/WRMSR and CPUID, and, for
their canonical-address check, IRETQ/SYSRETQ. Each one found gets a code hook on its exact
address ("site"). Finding them:

* **Block hooks** (:class:`BlockHooks`) cover the guest-linear addresses not scanned yet. A
  block starting there calls into Python, which decodes that block exactly (capstone), so its
  own sites exit from the first run on.
* **Code the same in every address space** (paging off, or the upper half in long mode, such
  as a kernel) is then scanned a whole chunk at a time (``CHUNK`` bytes, aligned, only pages
  that are present and executable) and cut out of the block hooks, so that it runs at
  unicorn's own speed without a call into Python per block, and so that the block hooks stay
  few: unicorn walks its hook lists (all block hooks per translated block, all code hooks per
  translated instruction), so a thousand hooks make translation 30 times slower. A chunk is
  scanned without decoding, by byte patterns that do not depend on where instructions start:
  RDMSR, WRMSR, CPUID (0F xx), SYSRETQ (REX.W 0F 07) and IRETQ (REX.W CF) get a code hook at
  every match;
  one at a byte that is not an instruction start never fires, and a hook checks its bytes
  when it does. The one-byte opcodes (IN/OUT/INS/OUTS, HLT) would need instruction
  boundaries, which a linear sweep only guesses; the safety nets of ``emu_nets`` find them
  instead, precisely, the first time each one runs.
* **Other code** (a process's, at addresses that other processes use for other code) stays
  under the block hooks: each block is decoded as it is translated, and a block at an address
  scanned before with the same length is not decoded again (the nets catch what that misses).

The VMM and the debugger write guest RAM through their own buffers, which unicorn never sees:
every page of scanned code is watched for changes (``emu_codewatch``), which drop the sites
and translations of what changed and search it again (a page rewritten wholesale as a
whole). A code hook also checks that its instruction is still there.
"""

from __future__ import annotations

import bisect
import ctypes
import re
import struct
from collections.abc import Callable
from typing import Any

import capstone

from . import common
from . import constants as C
from .emu_codewatch import CodePage, CodeWatch, merge_spans
from .emu_state import M64, PAGE, Vcpu, X, flush_tlb, unicorn

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
    # system instructions VMX may exit on (emu_sys); the frequent ones by name, so that their
    # hook can look at the controls before it decodes anything
    capstone.x86.X86_INS_RDTSC: "rdtsc",
    capstone.x86.X86_INS_RDPMC: "rdpmc",
    capstone.x86.X86_INS_PAUSE: "pause",
    capstone.x86.X86_INS_INVLPG: "invlpg",
    # far JMP/CALL with a pointer and IRET outside 64-bit code: task switches (emu_task; the
    # memory forms are JMP and CALL to capstone: far_indirect)
    **dict.fromkeys(
        (getattr(capstone.x86, "X86_INS_" + name) for name in ("LJMP", "LCALL", "IRET", "IRETD")),
        "task",
    ),
    **{
        getattr(capstone.x86, "X86_INS_" + name): "sys"
        for name in [
            "CLTS",
            "LMSW",
            "SMSW",
            "XSETBV",
            "VMCALL",
            "VMLAUNCH",
            "VMRESUME",
            "VMXOFF",
            "VMXON",
            "VMCLEAR",
            "VMPTRLD",
            "VMPTRST",
            "VMREAD",
            "VMWRITE",
            "INVEPT",
            "INVVPID",
            "VMFUNC",
            "INVD",
            "WBINVD",
            "GETSEC",
            "RDTSCP",
            "MWAIT",
            "MONITOR",
        ]
    },
}
SYS_KINDS = frozenset({"sys", "rdtsc", "rdpmc", "pause", "invlpg"})
# What a site's bytes must still be (after prefixes) for its hook to act on it.
_SITE_OPCODES = {
    "hlt": (b"\xf4",),
    "rdmsr": (b"\x0f\x32",),
    "wrmsr": (b"\x0f\x30",),
    "cpuid": (b"\x0f\xa2",),
    "iretq": (b"\xcf",),
    "sysret": (b"\x0f\x07",),
}
# Sites found in chunks by their bytes alone (anywhere, instruction start or not).
_PATTERN = re.compile(rb"(?=(\x0f[\x30\x32\xa2]|[\x48-\x4f](?:\xcf|\x0f\x07)))", re.DOTALL)
_START = re.compile(rb"[\x0f\x48-\x4f]")
_PATTERN_KINDS = {0x30: "wrmsr", 0x32: "rdmsr", 0xA2: "cpuid", 0x0F: "sysret", 0xCF: "iretq"}
# System instructions (emu_sys): MOV CR/DR, CLTS, INVD, WBINVD, RDTSC, RDPMC, GETSEC, VMREAD,
# VMWRITE; 0F 01 with VMCALL..VMXOFF, MONITOR, MWAIT, XSETBV, VMFUNC, RDTSCP, SMSW, LMSW and
# INVLPG (a memory operand); VMPTRLD/VMCLEAR/VMXON/VMPTRST; INVEPT/INVVPID; PAUSE.
_MODRM_REG = {r: bytes(m for m in range(256) if m >> 3 & 7 == r) for r in (4, 6, 7)}
_SYS_START = re.compile(rb"[\x0f\xf3]")  # candidates first: the full pattern is slow on zeros
_SYS_PATTERN = re.compile(
    rb"(\x0f[\x20-\x23\x06\x08\x09\x31\x33\x37\x78\x79]"
    rb"|\x0f\x01[\xc1-\xc4\xc8\xc9\xd1\xd4\xf9"
    + re.escape(_MODRM_REG[4] + _MODRM_REG[6] + bytes(m for m in _MODRM_REG[7] if m < 0xC0))
    + rb"]|\x0f\xc7[\x30-\x3f\x70-\x7f\xb0-\xbf]|\x0f\x38[\x80\x81]|\xf3\x90)",
    re.DOTALL,
)
_SYS_PATTERN_KINDS = {0x31: "rdtsc", 0x33: "rdpmc", 0x90: "pause"}
# far JMP/CALL outside 64-bit code: EA/9A with a pointer, FF /3 and FF /5 with a memory operand
_FAR_MODRM = bytes(m for m in range(0xC0) if m >> 3 & 7 in (3, 5))
_FAR_PATTERN = re.compile(rb"[\xea\x9a]|\xff[" + re.escape(_FAR_MODRM) + rb"]", re.DOTALL)
_LONG_ONLY = frozenset({"sysret", "iretq"})
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
CHUNK = 64 * PAGE  # shared code is scanned and cut this much at a time (aligned)
_PTE_NX = 1 << 63


def _mov_cr_dr(code: bytes) -> bool:
    """Whether a MOV's bytes are MOV to/from a control or debug register (0F 20..23)."""
    i = 0
    while i < len(code) and (code[i] in common.PREFIXES or 0x40 <= code[i] <= 0x4F):
        i += 1
    return len(code) > i + 1 and code[i] == 0x0F and 0x20 <= code[i + 1] <= 0x23


_NEAR_OR_FAR = frozenset({capstone.x86.X86_INS_JMP, capstone.x86.X86_INS_CALL})


def far_indirect(code: bytes) -> int | None:
    """For the bytes of a far JMP (FF /5) or CALL (FF /3) through memory (capstone names them
    JMP and CALL) in 16- or 32-bit code: ModRM.reg, 5 or 3; else None."""
    i = 0
    while i < len(code) and code[i] in common.PREFIXES:
        i += 1
    if len(code) < i + 2 or code[i] != 0xFF or code[i + 1] >> 6 == 3:
        return None
    reg = code[i + 1] >> 3 & 7
    return reg if reg in (3, 5) else None


def disassembler(bits: int) -> Any:
    md = _DISASM.get(bits)
    if md is None:
        mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
        md = capstone.Cs(capstone.CS_ARCH_X86, mode)
        _DISASM[bits] = md
    return md


def pattern_sites(data: bytes, base: int, long_mode: bool) -> list[tuple[int, str]]:
    """The pattern sites in ``data`` (at guest-linear ``base``): (address, kind)."""
    found = []
    for start in _START.finditer(data):  # (the lookahead pattern alone is slow on zeros)
        offset = start.start()
        if not _PATTERN.match(data, offset):
            continue
        kind = _PATTERN_KINDS[data[offset + 1]]  # (SYSRETQ and IRETQ from their REX.W)
        if long_mode or kind not in _LONG_ONLY:
            found.append((base + offset, kind))
    for start in _SYS_START.finditer(data):
        offset = start.start()
        if not _SYS_PATTERN.match(data, offset):
            continue
        kind = _SYS_PATTERN_KINDS.get(data[offset + 1], "sys")
        modrm = data[offset + 2] if offset + 2 < len(data) else 0xC0
        if data[offset + 1] == 0x01 and modrm < 0xC0 and modrm >> 3 & 7 == 7:
            kind = "invlpg"
        found.append((base + offset, kind))
    if not long_mode:
        found.extend((base + m.start(), "task") for m in _FAR_PATTERN.finditer(data))
    return found


class BlockHooks:
    """UC_HOOK_BLOCK hooks over the guest-linear addresses whose code is not scanned yet.

    unicorn decides when it translates a block whether the block calls a block hook (one whose
    range holds the block's first address). Shared code is scanned a chunk at a time; its span
    is then cut out of these ranges, so scanned code runs without a call into Python per
    block. Deleting a hook makes unicorn drop every block translated while the hook covered it
    (its "hooked regions"), so the blocks of a cut span are translated again without the hook.
    The ranges are the gaps between scanned spans: disjoint, kept by first address."""

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
            self.uc.hook_del(hook)  # drops the blocks translated with it
            self._add(first, lo - 1)
            self._add(hi, last)

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


class CodeScan(CodeWatch):
    """Scanning and instruction sites (see the module docstring)."""

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
        self._hook_bad_memory(vcpu)
        flush_tlb(uc)
        uc.ctl_flush_tb()
        for gpa, code in vcpu.code.items():  # the host buffers may have moved
            code.view = self._page_view(vcpu.space, gpa)
        vcpu.code_runs = None
        vcpu.uc_dirty_memory = False

    def _hook_bad_memory(self, vcpu: Vcpu) -> None:
        """Hook failed accesses only where they can happen: outside the mapped regions, in
        regions without every permission and on watched pages. unicorn never lets a store to a
        page back onto its fast path while any memory hook (of these kinds too) covers it, so
        one hook over all memory made every guest store take the slow path."""
        uc = vcpu.uc
        for hook in vcpu.bad_memory_hooks:
            uc.hook_del(hook)
        vcpu.bad_memory_hooks = []
        if vcpu.bad_memory is None:
            return
        spans: list[tuple[int, int]] = []
        end = 0
        for region in sorted(vcpu.space.regions, key=lambda r: r.gpa):
            if region.gpa > end:
                spans.append((end, region.gpa))
            if self._uc_perms(region.flags) != unicorn.UC_PROT_ALL:
                spans.append((region.gpa, region.gpa + region.size))
            end = max(end, region.gpa + region.size)
        spans.append((end, M64 + 1))
        spans.extend((page, page + PAGE) for page in vcpu.watch_pages)
        for lo, hi in merge_spans(spans):
            hook = uc.hook_add(unicorn.UC_HOOK_MEM_INVALID, vcpu.bad_memory, None, lo, hi - 1)
            vcpu.bad_memory_hooks.append(hook)

    # --- scanning --------------------------------------------------------------------------------

    def _scan_block(self, vcpu: Vcpu, address: int, size: int) -> None:
        """A block hook fired: decode the block; shared code is then scanned by chunk and cut
        out of the block hooks at the next entry."""
        shared = self._shared_code(vcpu, address)
        if shared is None:
            key = (address, size)
            if key in vcpu.scanned:
                return
            vcpu.scanned.add(key)
            if self._decode_sites(vcpu, address, size, key):
                vcpu.uc.emu_stop()  # sites change outside emulation
            return
        if address & ~0xFFF in vcpu.spans:
            return  # translated before its chunk was cut
        self._decode_sites(vcpu, address, size, None)
        self._scan_chunk(vcpu, address, shared)
        vcpu.uc.emu_stop()  # sites and block hooks change outside emulation

    def _decode_sites(
        self, vcpu: Vcpu, address: int, size: int, key: tuple[int, int] | None
    ) -> bool:
        """Decode the block at ``address`` and record its sites (and, with ``key``, the block
        on its code pages); whether new sites were found."""
        insns, end, _complete = self._decode_block(vcpu, address, size)
        spans: list[tuple[CodePage, int, int, int]] = []  # (page, linear start, lo, hi)
        linear = address
        while linear < end:
            stop = min(end, (linear | 0xFFF) + 1)
            gpa = self._translate(vcpu, linear & M64)
            if gpa is not None:
                page = self._code_page(vcpu, gpa & ~0xFFF)
                if page is not None:
                    lo = linear & 0xFFF
                    if key is not None:
                        page.blocks[key] = (lo, lo + stop - linear)
                    spans.append((page, linear, lo, lo + stop - linear))
            linear = stop
        found = False
        for insn in insns:
            kind = _SITE_KINDS.get(insn.id)
            if kind is None and insn.id == capstone.x86.X86_INS_MOV and _mov_cr_dr(insn.bytes):
                kind = "sys"
            if kind is None and insn.id in _NEAR_OR_FAR and far_indirect(insn.bytes):
                kind = "task"
            if kind is None:
                continue
            for page, start, lo, hi in spans:
                first = lo + insn.address - start
                if lo <= first < hi:
                    page.sites[insn.address] = (first, first + insn.size)
            if insn.address not in vcpu.sites:
                vcpu.new_sites[insn.address] = kind
                found = True
        return found

    def _scan_chunk(self, vcpu: Vcpu, address: int, shared: str) -> None:
        """Scan the present, executable, not yet scanned pages of the chunk around ``address``
        for pattern sites and mark them to be cut out of the block hooks."""
        long_mode = self._cpu_bits(vcpu) == 64
        first = address & ~(CHUNK - 1)
        for linear, gpa in self._code_pages(vcpu, first, CHUNK // PAGE):
            if linear in vcpu.spans:
                continue
            page = self._code_page(vcpu, gpa)
            if page is None or page.view is None:
                continue
            page.aliases[linear] = long_mode
            data = bytes(page.view) + self._read_linear(vcpu, linear + PAGE, 1)
            for site, kind in pattern_sites(data, linear, long_mode):
                self._pattern_site(vcpu, page, linear, site, kind)
            vcpu.spans[linear] = (linear, linear + PAGE)
            vcpu.uncut.append((linear, linear + PAGE))
            if shared == "unpaged":
                vcpu.unpaged_spans.add(linear)
            elif shared == "low":
                vcpu.low_spans.add(linear)

    def _rescan(self, vcpu: Vcpu, page: CodePage, linear: int, data: bytes, lo: int) -> None:
        for site, kind in pattern_sites(data, linear + lo, page.aliases[linear]):
            self._pattern_site(vcpu, page, linear, site, kind)

    @staticmethod
    def _pattern_site(vcpu: Vcpu, page: CodePage, base: int, address: int, kind: str) -> None:
        offset = address - base
        page.sites[address] = (offset, offset + 2)
        if address not in vcpu.sites:
            vcpu.new_sites[address] = kind

    def _code_pages(self, vcpu: Vcpu, first: int, count: int) -> list[tuple[int, int]]:
        """(linear, gpa) of the pages from ``first`` on that are present and executable."""
        uc = vcpu.uc
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        if not cr0 & (1 << 31):
            return [
                (linear, linear & 0xFFFFFFFF)
                for linear in range(first, first + count * PAGE, PAGE)
                if common.region_at(vcpu.space.regions, linear & 0xFFFFFFFF) is not None
            ]
        efer = self._efer(vcpu)
        if not efer & C.EFER_LMA:  # 32-bit paging: the common walk, no NX tracked here
            pages = []
            for linear in range(first, first + count * PAGE, PAGE):
                gpa = self._translate(vcpu, linear & 0xFFFFFFFF)
                if gpa is not None:
                    pages.append((linear, gpa & ~0xFFF))
            return pages
        nxe = bool(efer & C.EFER_NXE)
        root = uc.reg_read(X.UC_X86_REG_CR3) & 0x000FFFFFFFFFF000
        pages = []
        for linear in range(first, first + count * PAGE, PAGE):
            gpa = self._walk64(vcpu, root, linear & M64, nxe)
            if gpa is not None:
                pages.append((linear & M64, gpa))
        return pages

    def _walk64(self, vcpu: Vcpu, table: int, linear: int, nxe: bool) -> int | None:
        """The gpa of the 4-level-paged page at ``linear`` if present and executable."""
        for level, shift in enumerate((39, 30, 21, 12)):
            address = table + ((linear >> shift) & 0x1FF) * 8
            region = common.region_at(vcpu.space.regions, address)
            if region is None:
                return None
            raw = ctypes.string_at(region.uva + (address - region.gpa), 8)
            entry = int(struct.unpack("<Q", raw)[0])
            if not entry & 1 or (nxe and entry & _PTE_NX):
                return None
            if level in (1, 2) and entry & 0x80:
                mask = (1 << shift) - 1
                return int(entry & 0x000FFFFFFFFFF000 & ~mask) | (linear & mask & ~0xFFF)
            table = entry & 0x000FFFFFFFFFF000
        return table

    def _shared_code(self, vcpu: Vcpu, address: int) -> str | None:
        """Whether code at guest-linear ``address`` may leave the block hooks: "unpaged"
        (paging is off; such spans are forgotten when paging comes on), "kernel" (the upper
        half of a long-mode address space, shared by every process) or "low" (64-bit code at
        CPL0 in the lower half, such as the bzImage decompressor or a kernel's early
        identity-mapped code; forgotten at the first entry with another CR3). None for
        anything else: a process's code is scanned block by block as it is translated, so that
        another process at the same address gets scanned too."""
        uc = vcpu.uc
        if not uc.reg_read(X.UC_X86_REG_CR0) & 1 << 31:
            return "unpaged"
        if self._cpu_bits(vcpu) != 64:
            return None
        if address >= 1 << 63:
            return "kernel"
        if uc.reg_read(X.UC_X86_REG_CS) & 3:
            return None
        cr3 = int(uc.reg_read(X.UC_X86_REG_CR3))
        if vcpu.low_spans and vcpu.low_cr3 != cr3:
            return None  # forgotten at the next entry
        vcpu.low_cr3 = cr3
        return "low"

    def _decode_block(self, vcpu: Vcpu, address: int, size: int) -> tuple[list[Any], int, bool]:
        """The instructions of the block unicorn translated at ``address`` (``size`` bytes),
        and on to where any block starting in it ends: the first control transfer or the end
        of readable code. ``(instructions, end, complete)``; not complete when the code runs
        on past the longest block or stops decoding (capstone and QEMU may disagree there).

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

    # --- instruction sites -----------------------------------------------------------------------

    def _add_sites(self, vcpu: Vcpu) -> None:
        uc = vcpu.uc
        for address, kind in vcpu.new_sites.items():
            if address in vcpu.site_hooks:
                vcpu.sites[address] = kind
                continue
            vcpu.sites[address] = kind

            def on_site(uc_: Any, addr: int, size: int, _data: Any, kind: str = kind) -> None:
                self._on_site(vcpu, addr, kind)

            vcpu.site_hooks[address] = uc.hook_add(
                unicorn.UC_HOOK_CODE, on_site, None, address, address
            )
            uc.ctl_remove_cache(address, address + 1)
        vcpu.new_sites.clear()

    def _on_site(self, vcpu: Vcpu, address: int, kind: str) -> None:
        if vcpu.exit_recorded or vcpu.recovery is not None:
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
        elif kind in SYS_KINDS:
            self._sys_site(vcpu, address, kind)
        elif kind == "task":
            self._task_site(vcpu, address)

    def _sys_site(self, vcpu: Vcpu, address: int, kind: str) -> None:
        """A system instruction VMX may exit on (emu_sys)."""
        raise NotImplementedError

    def _task_site(self, vcpu: Vcpu, address: int) -> None:
        """A far JMP/CALL or IRET that may switch tasks (emu_task)."""
        raise NotImplementedError

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
    def _cut_scanned(vcpu: Vcpu) -> None:
        """Update the block hooks: hook forgotten code again, cut out newly scanned spans
        (adjacent pages in one go; the translations of forgotten code were flushed)."""
        hooks = vcpu.block_hooks
        assert hooks is not None
        if vcpu.forgotten:
            for lo, hi in merge_spans(vcpu.forgotten):
                still = [(a, b) for a, b in vcpu.spans.values() if a < hi and lo < b]
                hooks.uncover(lo, hi, still)
            vcpu.forgotten.clear()
        live = [span for span in vcpu.uncut if vcpu.spans.get(span[0]) == span]
        for lo, hi in merge_spans(live):
            hooks.cut(lo, hi)
        vcpu.uncut.clear()
