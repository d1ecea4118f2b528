"""How the emu backend reports QEMU's segment caches as VMCS access rights (what VM entry
checks): loaded code/data segments are accessed, a loaded TR is busy."""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

from gdbstub.hv.emu_state import DESC_P, flags_to_ar


def qemu_flags(type_: int, s: bool, dpl: int = 0, g: bool = False, l64: bool = False) -> int:
    """QEMU's SegmentCache.flags: the descriptor's second dword as QEMU keeps it."""
    return type_ << 8 | int(s) << 12 | dpl << 13 | DESC_P | int(l64) << 21 | int(g) << 23


def test_a_loaded_code_segment_is_accessed() -> None:
    assert flags_to_ar(qemu_flags(0xA, True, l64=True, g=True)) == 0xA09B


def test_ltr_leaves_tr_busy_whatever_type_the_cache_kept() -> None:
    assert flags_to_ar(qemu_flags(9, False), tr=True) == 0x8B  # 64-bit TSS, available -> busy
    assert flags_to_ar(qemu_flags(1, False), tr=True) == 0x83  # 16-bit TSS
    assert flags_to_ar(qemu_flags(0xB, False), tr=True) == 0x8B  # already busy
    assert flags_to_ar(qemu_flags(9, False)) == 0x89  # not TR: as the descriptor says


def test_an_unusable_segment() -> None:
    assert flags_to_ar(0) == 0x10000
