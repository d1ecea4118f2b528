"""The x86-64 register file as gdb and lldb see it, derived from the XML target description.

Theory of operation
-------------------
``gdbstub/xml/target.xml`` includes one file per feature (core, SSE, segments, system, AVX).
At import time this module parses those files in include order and builds ``REGISTERS``: one
``RegDef`` per ``<reg>``, with the number gdb and lldb use in ``p``/``P`` packets (the
``regnum`` attribute, or the previous number plus one, as gdb assigns them), its width and its
byte offset in the ``g`` packet.  Nothing else in the stub lists registers: the ``g`` layout,
register numbers and the XML served to clients all come from the same files.

gdb lays out the ``g`` packet as every register of the target description in register-number
order, each ``bitsize / 8`` bytes, little-endian.  Registers keep one width in every CPU mode
(eflags and segment selectors 32 bits, everything else at least 64), so the ``g`` blob never
changes size when the guest switches between real, protected and long mode.

Two descriptions are served: with the AVX feature (where the vCPU runs AVX instructions, as
probed when the VM starts: ``HvTarget.features.avx``; the machine's CPUID model offers AVX on
the same condition) and without.  The AVX feature comes last, so both variants share every
register number and offset; the variant without AVX is a prefix of the one with it.

Missing values: ``encode_g`` writes zeros for registers absent from the mapping it gets (the
``g`` reply here is raw bytes; the "unavailable" marker ``xx`` exists only in hex text, and lldb
14 handles it poorly).  A caller that wants to report a register as unavailable can hex-encode
the blob itself and replace that register's bytes with ``x`` characters (``RegDef.offset`` and
``RegDef.size`` locate it).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = [
    "AVX_FEATURE",
    "EXPEDITED",
    "EXPEDITED_REGNUMS",
    "FLAGS_REGNUM",
    "FP_REGNUM",
    "PC_REGNUM",
    "REGISTERS",
    "SP_REGNUM",
    "XML_DIR",
    "RegDef",
    "by_name",
    "by_num",
    "decode_g",
    "decode_register",
    "encode_g",
    "encode_register",
    "feature_xml",
    "g_layout",
    "g_size",
    "target_xml",
    "xml_annexes",
    "xml_file",
]

XML_DIR = Path(__file__).resolve().parent / "xml"
"""Directory holding ``target.xml`` and the feature files it includes."""

AVX_FEATURE = "org.gnu.gdb.i386.avx"
"""The feature left out of the description when the guest's XCR0 lacks AVX."""

_INCLUDE_RE = re.compile(r'[ \t]*<xi:include href="([^"]+)"/>\n?')
_PROLOG_RE = re.compile(r"\A\s*<\?xml[^>]*\?>\s*(?:<!DOCTYPE[^>]*>\s*)?")


@dataclass(frozen=True, slots=True)
class RegDef:
    """One register of the target description.

    ``offset`` is its byte offset in the ``g`` blob (the same in both variants, since the AVX
    feature is last); ``size`` is ``bitsize // 8``.
    """

    name: str
    regnum: int
    bitsize: int
    type: str
    group: str
    feature: str
    offset: int

    @property
    def size(self) -> int:
        """Width in bytes."""
        return self.bitsize // 8

    @property
    def mask(self) -> int:
        """All-ones value of the register's width."""
        return (1 << self.bitsize) - 1


def _read_text(name: str) -> str:
    return (XML_DIR / name).read_text(encoding="utf-8")


def _includes(target_text: str) -> list[str]:
    return _INCLUDE_RE.findall(target_text)


def _load() -> tuple[RegDef, ...]:
    regs: list[RegDef] = []
    next_num = 0
    offset = 0
    for annex in _includes(_read_text("target.xml")):
        root = ET.fromstring(_read_text(annex))
        if root.tag != "feature":
            raise ValueError(f"{annex}: root element is {root.tag}, not feature")
        feature = root.attrib["name"]
        for elem in root.iter("reg"):
            regnum = int(elem.attrib.get("regnum", next_num))
            bitsize = int(elem.attrib["bitsize"])
            if bitsize % 8:
                raise ValueError(f"{annex}: {elem.attrib['name']} bitsize {bitsize}")
            regs.append(
                RegDef(
                    name=elem.attrib["name"],
                    regnum=regnum,
                    bitsize=bitsize,
                    type=elem.attrib.get("type", "int"),
                    group=elem.attrib.get("group", "general"),
                    feature=feature,
                    offset=offset,
                )
            )
            next_num = regnum + 1
            offset += bitsize // 8
    nums = [r.regnum for r in regs]
    if nums != list(range(len(regs))):
        raise ValueError("register numbers must be dense and in include order")
    seen_avx = False
    for r in regs:
        if r.feature == AVX_FEATURE:
            seen_avx = True
        elif seen_avx:
            raise ValueError("the AVX feature must come last")
    return tuple(regs)


REGISTERS: tuple[RegDef, ...] = _load()
"""Every register of the full (AVX) description, in register-number order."""

by_name: Mapping[str, RegDef] = {r.name: r for r in REGISTERS}
"""Register definitions keyed by name (``"rip"``, ``"ymm3h"``...)."""

by_num: Mapping[int, RegDef] = {r.regnum: r for r in REGISTERS}
"""Register definitions keyed by register number (the ``p``/``P`` number)."""

PC_REGNUM: int = by_name["rip"].regnum
SP_REGNUM: int = by_name["rsp"].regnum
FP_REGNUM: int = by_name["rbp"].regnum
FLAGS_REGNUM: int = by_name["eflags"].regnum
EXPEDITED: tuple[str, ...] = ("rbp", "rsp", "rip")
"""Registers sent in stop replies, as gdbserver does."""
EXPEDITED_REGNUMS: tuple[int, ...] = tuple(by_name[n].regnum for n in EXPEDITED)
"""Their numbers: 6, 7, 16."""

_LAYOUT_AVX = REGISTERS
_LAYOUT_NO_AVX = tuple(r for r in REGISTERS if r.feature != AVX_FEATURE)
# (name, size, mask) per register of each variant: the blob is these pieces back to back
# (offsets are cumulative, _load), so encode_g joins them without properties or slicing.
_G_PIECES = {
    avx: tuple((r.name, r.size, r.mask) for r in layout)
    for avx, layout in ((True, _LAYOUT_AVX), (False, _LAYOUT_NO_AVX))
}


def g_layout(with_avx: bool) -> tuple[RegDef, ...]:
    """The registers of the ``g`` packet, in order, for the description variant served."""
    return _LAYOUT_AVX if with_avx else _LAYOUT_NO_AVX


def g_size(with_avx: bool) -> int:
    """Size in bytes of the ``g`` blob (912 with AVX, 656 without)."""
    last = g_layout(with_avx)[-1]
    return last.offset + last.size


def encode_register(name: str, value: int) -> bytes:
    """``value`` as the register's little-endian bytes (negative values in two's complement)."""
    reg = by_name[name]
    return (value & reg.mask).to_bytes(reg.size, "little")


def decode_register(name: str, data: bytes) -> int:
    """The unsigned value of register ``name`` from its little-endian bytes."""
    reg = by_name[name]
    if len(data) != reg.size:
        raise ValueError(f"{name} is {reg.size} bytes, got {len(data)}")
    return int.from_bytes(data, "little")


def encode_g(values: Mapping[str, int], with_avx: bool) -> bytes:
    """The raw ``g`` blob; registers absent from ``values`` encode as zeros.

    Names in ``values`` that are not in this variant's layout are ignored.
    """
    get = values.get
    return b"".join(
        (get(name, 0) & mask).to_bytes(size, "little") for name, size, mask in _G_PIECES[with_avx]
    )


def decode_g(blob: bytes, with_avx: bool) -> dict[str, int]:
    """Every register's value from a raw ``G`` blob, which must be exactly ``g_size`` bytes."""
    size = g_size(with_avx)
    if len(blob) != size:
        raise ValueError(f"g blob is {size} bytes, got {len(blob)}")
    return {
        reg.name: int.from_bytes(blob[reg.offset : reg.offset + reg.size], "little")
        for reg in g_layout(with_avx)
    }


@cache
def target_xml(with_avx: bool, *, flat: bool = False) -> bytes:
    """The ``target.xml`` annex to serve.

    Without AVX the avx include is dropped.  With ``flat`` the features are inlined, so a client
    needs one ``qXfer`` transfer instead of one per feature (both gdb and lldb accept either).
    """
    text = _read_text("target.xml")
    if not with_avx:
        text = text.replace('  <xi:include href="64bit-avx.xml"/>\n', "")
        if "64bit-avx.xml" in text:
            raise AssertionError("target.xml: avx include not found in the expected form")
    if flat:

        def inline(match: re.Match[str]) -> str:
            return _PROLOG_RE.sub("", _read_text(match.group(1)))

        text = _INCLUDE_RE.sub(inline, text)
    return text.encode("utf-8")


@cache
def xml_annexes() -> tuple[str, ...]:
    """Names of every annex served: ``target.xml`` and the feature files."""
    return ("target.xml", *_includes(_read_text("target.xml")))


@cache
def feature_xml(annex: str) -> bytes | None:
    """The annex ``qXfer:features:read:<annex>`` asks for, or None if there is no such annex.

    ``target.xml`` here is the AVX variant; use ``target_xml`` to pick the variant.
    """
    if annex == "target.xml":
        return target_xml(True)
    if annex not in xml_annexes():
        return None
    return _read_text(annex).encode("utf-8")


def xml_file(annex: str, *, with_avx: bool) -> bytes | None:
    """What to serve for ``qXfer:features:read:<annex>``: the ``target.xml`` variant for
    ``with_avx``, a feature file, or None for an unknown annex."""
    if annex == "target.xml":
        return target_xml(with_avx)
    return feature_xml(annex)
