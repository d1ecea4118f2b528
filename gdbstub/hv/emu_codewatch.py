"""The emu backend's watch on scanned code: bytes that change behind unicorn's back.

Theory of operation
-------------------
The VMM and the debugger write guest RAM through their own buffers, which unicorn never sees,
so a translation of code the host rewrote would run on. Every guest-physical page holding
scanned code (``emu_code``) is remembered with a copy of its bytes (:class:`CodePage`) and
compared at entries, by ``memcmp`` over runs of pages contiguous in guest and host memory
(:class:`CodeRun`): all of them while they are few (``FULL_PAGES``) or when the vCPU stayed
out of emulation for a while (``HOST_PAUSE_NS``: a debugger stop), else a rotating share
(``PAGE_BUDGET`` pages an entry), so that a kernel's thousands of code pages do not cost a
compare of megabytes at each of thousands of entries a second (a host write into one of many
code pages while the guest runs is seen within a rotation, a few hundred entries).

A compare also sees what the guest wrote (unicorn drops the translations of those bytes
itself, but the sites found in them are stale). What happens to a changed page depends on how
much changed:

* **A few bytes** (at most ``WHOLESALE_PIECES`` of its 64-byte pieces differ: a breakpoint, a
  patched instruction, a stack page next to code): the differing bytes are found; the sites
  there are dropped, a chunk-scanned page is searched again there (new pattern sites) and its
  translations of those bytes are removed.
* **Rewritten wholesale** (more pieces differ: data that happened to share a scanned chunk with
  code, such as the bzImage decompressor's heap, written at every entry, or a kernel page whose
  alternatives were patched): no byte-by-byte diff and no search per changed span (hundreds of
  them, 25 ms an entry on the decompressor's heap); all its sites are dropped, the whole page is
  searched again in one go and every translation of it removed with one call. (Forgetting such
  pages instead, back under the block hooks until code runs there, split the block hooks into
  hundreds of ranges during a kernel's boot, which unicorn walks at every block.)

Either way, blocks scanned one by one on a changed page are forgotten and every translation is
flushed (their addresses may belong to another address space now). A code hook also checks that
its instruction is still there.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import common
from .emu_state import PAGE, CpuState, Space, Vcpu

FULL_PAGES = 256  # up to this many code pages, all are compared at every entry
PAGE_BUDGET = 16  # else this many (in whole runs), in rotation
HOST_PAUSE_NS = 50_000_000  # out of emulation this long: the host may have written code
PIECE = 64  # a changed page is compared this many bytes at a time first
WHOLESALE_PIECES = 4  # more differing pieces than this: the page is forgotten, not searched


def _load_memcmp() -> Callable[[int, bytes, int], int] | None:
    try:
        function: Any = ctypes.CDLL(None).memcmp
    except (OSError, TypeError, AttributeError):  # pragma: no cover - no C library to load
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_memcmp = _load_memcmp()


@dataclass
class CodePage:
    """A guest-physical page holding scanned code, watched for writes by the host."""

    view: memoryview | None  # the page in the VMM's buffer (None: no longer mapped)
    saved: bytes  # its bytes when last checked
    blocks: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # key -> span
    sites: dict[int, tuple[int, int]] = field(default_factory=dict)  # linear address -> span
    # where it was scanned as part of a chunk: guest-linear page -> scanned in 64-bit mode
    # (IRETQ/SYSRETQ patterns); one physical page can be code at several addresses (paging
    # off, then the upper half)
    aliases: dict[int, bool] = field(default_factory=dict)


@dataclass
class CodeRun:
    """Watched pages contiguous in guest and host memory, compared in one go."""

    address: int  # host address (0: no longer mapped)
    view: memoryview | None
    saved: bytes  # their bytes when last checked
    pages: list[int]

    def changed(self) -> bool:
        if self.view is None:
            return True
        if _memcmp is None:  # pragma: no cover - no C library
            return bytes(self.view) != self.saved
        return _memcmp(self.address, self.saved, len(self.saved)) != 0


def changed_spans(old: bytes, new: bytes) -> list[tuple[int, int]] | None:
    """The byte ranges in which two versions of a page differ; None when the page was
    rewritten wholesale (more than ``WHOLESALE_PIECES`` pieces differ, or one is missing)."""
    if len(old) != len(new):
        return None
    pieces: list[int] = []
    for piece in range(0, len(old), PIECE):
        if old[piece : piece + PIECE] != new[piece : piece + PIECE]:
            if len(pieces) == WHOLESALE_PIECES:
                return None
            pieces.append(piece)
    spans: list[tuple[int, int]] = []
    for piece in pieces:
        for i in range(piece, piece + PIECE):
            if old[i] != new[i]:
                if spans and spans[-1][1] == i:
                    spans[-1] = (spans[-1][0], i + 1)
                else:
                    spans.append((i, i + 1))
    return spans


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with touching and overlapping spans joined."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


class CodeWatch(CpuState):
    """Scanned code pages, compared at entries (see the module docstring)."""

    def _code_page(self, vcpu: Vcpu, gpa: int) -> CodePage | None:
        page = vcpu.code.get(gpa)
        if page is None:
            view = self._page_view(vcpu.space, gpa)
            if view is None:
                return None
            page = vcpu.code[gpa] = CodePage(view, bytes(view))
            vcpu.code_runs = None
        return page

    @staticmethod
    def _page_view(space: Space, gpa: int) -> memoryview | None:
        region = common.region_at(space.regions, gpa)
        if region is None:
            return None
        array = (ctypes.c_char * PAGE).from_address(region.uva + (gpa - region.gpa))
        return memoryview(array).cast("B")

    def _rescan(self, vcpu: Vcpu, page: CodePage, linear: int, data: bytes, lo: int) -> None:
        """Search ``data`` (bytes of ``page`` from offset ``lo``, scanned at guest-linear page
        ``linear``) for pattern sites again (emu_code)."""
        raise NotImplementedError

    @staticmethod
    def _code_runs(vcpu: Vcpu) -> list[CodeRun]:
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
                contiguous = pages[-1] + PAGE == gpa and start + PAGE * len(pages) == uva
                if contiguous and len(pages) < PAGE_BUDGET:  # runs fit the budget
                    pages.append(gpa)
                    continue
            groups.append((uva, [gpa]))
        for start, pages in groups:
            array = (ctypes.c_char * (PAGE * len(pages))).from_address(start)
            saved = b"".join(vcpu.code[gpa].saved for gpa in pages)
            runs.append(CodeRun(start, memoryview(array).cast("B"), saved, pages))
        return runs

    def _check_code(self, vcpu: Vcpu) -> None:
        """See what was written into scanned code since the last entry (see the module
        docstring for which pages are compared and what a change does)."""
        if vcpu.code_runs is None:
            vcpu.code_runs = self._code_runs(vcpu)
        runs = vcpu.code_runs
        if not runs:
            return
        if len(vcpu.code) <= FULL_PAGES or time.monotonic_ns() - vcpu.left_ns > HOST_PAUSE_NS:
            changed = [run for run in runs if run.changed()]
        else:
            changed = []
            budget, index = PAGE_BUDGET, vcpu.check_cursor % len(runs)
            for _ in range(len(runs)):
                run = runs[index]
                index = (index + 1) % len(runs)
                if run.changed():
                    changed.append(run)
                budget -= len(run.pages)
                if budget <= 0:
                    break
            vcpu.check_cursor = index
        if changed:
            self._code_changed(vcpu, [gpa for run in changed for gpa in run.pages])
            for run in changed:
                if run.view is None or any(gpa not in vcpu.code for gpa in run.pages):
                    vcpu.code_runs = None
                else:
                    run.saved = bytes(run.view)

    def _code_changed(self, vcpu: Vcpu, suspects: list[int]) -> None:
        stale = False
        removals: list[tuple[int, int]] = []
        for gpa in suspects:
            page = vcpu.code.get(gpa)
            if page is None:
                continue
            current = b"" if page.view is None else bytes(page.view)
            if current == page.saved:
                continue
            if page.view is None:  # unmapped: scanned again once mapped and run
                stale |= self._forget_page(vcpu, gpa, page)
                continue
            changed = changed_spans(page.saved, current)
            page.saved = current
            if changed is None:
                stale |= self._rewritten(vcpu, gpa, page, current, removals)
                continue
            for key, (lo, hi) in list(page.blocks.items()):
                if any(a < hi and lo < b for a, b in changed):
                    del page.blocks[key]
                    vcpu.scanned.discard(key)
                    stale = True
            for address, (lo, hi) in list(page.sites.items()):
                if any(a < hi and lo < b for a, b in changed):
                    del page.sites[address]
                    self._drop_site(vcpu, address)
            for linear in page.aliases:
                for lo, hi in changed:
                    a, b = max(0, lo - 1), min(PAGE, hi + 1)
                    self._rescan(vcpu, page, linear, current[a:b], a)
                    removals.append((linear + lo, linear + hi))
            if not page.blocks and not page.aliases:
                del vcpu.code[gpa]
                vcpu.code_runs = None
        if stale:
            vcpu.uc.ctl_flush_tb()
        else:
            for lo, hi in merge_spans(removals):
                self._quiet(vcpu, vcpu.uc.ctl_remove_cache, lo, hi)

    def _drop_site(self, vcpu: Vcpu, address: int) -> None:
        vcpu.sites.pop(address, None)
        vcpu.new_sites.pop(address, None)
        hook = vcpu.site_hooks.pop(address, None)
        if hook is not None:
            self._quiet(vcpu, vcpu.uc.hook_del, hook)

    def _rewritten(
        self,
        vcpu: Vcpu,
        gpa: int,
        page: CodePage,
        current: bytes,
        removals: list[tuple[int, int]],
    ) -> bool:
        """A page rewritten wholesale: search it again as a whole (its translations go with
        ``removals``). Whether every translation must be flushed (it held blocks)."""
        for address in page.sites:
            self._drop_site(vcpu, address)
        page.sites.clear()
        for key in page.blocks:
            vcpu.scanned.discard(key)
        stale = bool(page.blocks)
        page.blocks.clear()
        for linear in page.aliases:
            self._rescan(vcpu, page, linear, current + self._read_linear(vcpu, linear + PAGE, 1), 0)
            removals.append((linear, linear + PAGE))
        if not page.aliases:
            del vcpu.code[gpa]
            vcpu.code_runs = None
        return stale

    def _forget_page(self, vcpu: Vcpu, gpa: int, page: CodePage) -> bool:
        """Forget a page no longer mapped: its sites, its blocks and its chunk spans (hooked
        again at the next entry). Whether every translation must be flushed."""
        for address in page.sites:
            self._drop_site(vcpu, address)
        for key in page.blocks:
            vcpu.scanned.discard(key)
        for linear in page.aliases:
            span = vcpu.spans.pop(linear, None)
            if span is not None:
                vcpu.forgotten.append(span)
            vcpu.unpaged_spans.discard(linear)
            vcpu.low_spans.discard(linear)
        del vcpu.code[gpa]
        vcpu.code_runs = None
        return True

    def _forget_unpaged(self, vcpu: Vcpu, keys: set[int]) -> None:
        """Paging is on (``unpaged_spans``), or CR3 changed (``low_spans``): that code is
        scanned again where it runs now (its linear addresses may mean other memory)."""
        for key in keys:
            span = vcpu.spans.pop(key, None)
            if span is not None:
                vcpu.forgotten.append(span)
        for gpa, page in list(vcpu.code.items()):
            for key in keys & page.aliases.keys():
                del page.aliases[key]
            if not page.aliases and not page.blocks:
                for address in page.sites:
                    self._drop_site(vcpu, address)
                del vcpu.code[gpa]
                vcpu.code_runs = None
        keys.clear()
        vcpu.uc.ctl_flush_tb()
