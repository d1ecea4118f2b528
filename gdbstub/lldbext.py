"""lldb's extensions of the remote protocol: the reply payloads the session sends lldb.

Theory of operation
-------------------
lldb works with a plain gdbserver, but it asks for more, as debugserver and lldb-server serve
it (lldb's docs/resources/lldbgdbremote.md): register descriptions one register at a time
(``qRegisterInfoN``), every thread's stop state in one JSON reply (``jThreadsInfo``), a stop
reason richer than a signal (``reason:`` in stop replies), and memory regions
(``qMemoryRegionInfo``). This module builds those payloads from what the session already has;
it keeps no state.

* ``register_infos`` reads the target description the session serves (``target.xml`` and its
  ``xi:include`` files, fetched through the target), so ``qRegisterInfo`` and ``qXfer`` can
  never disagree: same names, numbers, widths and ``g`` offsets (cumulative in register-number
  order, as gdb and lldb lay out ``g``), groups as register sets, and the lldb attributes the
  XML carries (``dwarf_regnum``, ``generic``, ``altname``, ``encoding``, ``format``). gdb types
  lldb shows as byte vectors (x87, SSE, AVX halves) get ``encoding:vector``.
* ``stop_reason`` turns a ``StopEvent`` into lldb's ``reason`` (and ``description``): a
  breakpoint is ``breakpoint``, a watchpoint ``watchpoint`` with the watched address, a
  SIGTRAP after a step ``trace``; anything else stays a plain signal.
* ``threads_info`` is the JSON array of ``jThreadsInfo``: per thread its id, name, signal,
  reason and expedited registers (keys are decimal register numbers, values little-endian hex).
  The session's encoder escapes ``}``, ``#``, ``$`` and ``*`` as for any binary payload.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import Any

from .target import StopEvent

__all__ = ["json_payload", "region_reply", "register_infos", "register_numbers", "stop_reason"]

_XINCLUDE = "{http://www.w3.org/2001/XInclude}include"
_VECTOR_TYPES = ("i387_ext", "uint128", "vec")
_FLOAT_TYPES = ("ieee_single", "ieee_double")


def _parse(document: bytes) -> ET.Element:
    try:
        return ET.fromstring(document)
    except ET.ParseError as exc:
        raise ValueError(f"target description: {exc}") from None


def _features(fetch: Callable[[str], bytes | None]) -> Iterable[ET.Element]:
    """The ``<feature>`` elements of the served description, in document order (ValueError
    for a document that does not parse)."""
    document = fetch("target.xml")
    if document is None:
        return
    for child in _parse(document):
        if child.tag == "feature":
            yield child
        elif child.tag == _XINCLUDE:
            included = fetch(child.attrib["href"])
            if included is not None:
                yield _parse(included)


def _encoding(reg: ET.Element) -> tuple[str, str]:
    gdb_type = reg.attrib.get("type", "int")
    if gdb_type.startswith(_VECTOR_TYPES):
        default = ("vector", "vector-uint8")
    elif gdb_type in _FLOAT_TYPES:
        default = ("ieee754", "float")
    else:
        default = ("uint", "hex")
    return reg.attrib.get("encoding", default[0]), reg.attrib.get("format", default[1])


def _registers(fetch: Callable[[str], bytes | None]) -> list[ET.Element]:
    """The ``<reg>`` elements of the served description, indexed by register number."""
    found: list[tuple[int, ET.Element]] = []
    next_num = 0
    for feature in _features(fetch):
        for reg in feature.iter("reg"):
            regnum = int(reg.attrib.get("regnum", next_num))
            found.append((regnum, reg))
            next_num = regnum + 1
    found.sort(key=lambda item: item[0])
    if [n for n, _ in found] != list(range(len(found))):
        raise ValueError("register numbers of the description are not dense")
    return [reg for _, reg in found]


def register_numbers(fetch: Callable[[str], bytes | None]) -> dict[str, int]:
    """Register name -> number in the served description (ValueError if it does not parse)."""
    return {reg.attrib["name"]: n for n, reg in enumerate(_registers(fetch))}


def register_infos(fetch: Callable[[str], bytes | None]) -> tuple[bytes, ...]:
    """The ``qRegisterInfo`` answers, indexed by register number (see the module docstring).

    ``fetch(annex)`` returns a description document as the session serves it, or None.
    Raises ValueError for a description that does not parse or numbers registers sparsely.
    """
    replies = []
    offset = 0
    for reg in _registers(fetch):
        a = reg.attrib
        bits = int(a["bitsize"])
        encoding, fmt = _encoding(reg)
        fields = [f"name:{a['name']}"]
        if "altname" in a:
            fields.append(f"alt-name:{a['altname']}")
        fields += [
            f"bitsize:{bits}",
            f"offset:{offset}",
            f"encoding:{encoding}",
            f"format:{fmt}",
            f"set:{a.get('group', 'general')}",
        ]
        if "dwarf_regnum" in a:
            fields += [f"ehframe:{a['dwarf_regnum']}", f"dwarf:{a['dwarf_regnum']}"]
        if "generic" in a:
            fields.append(f"generic:{a['generic']}")
        replies.append("".join(f"{field};" for field in fields).encode("ascii"))
        offset += bits // 8
    return tuple(replies)


_WATCH_REASONS = ("watch", "rwatch", "awatch")


def stop_reason(stop: StopEvent, stepping: bool) -> tuple[str | None, str | None]:
    """lldb's ``reason`` and ``description`` (plain text) for ``stop``, or (None, None)."""
    if stop.lldb_reason:
        return stop.lldb_reason, None
    if stop.reason in ("swbreak", "hwbreak"):
        return "breakpoint", None
    if stop.reason in _WATCH_REASONS:
        return "watchpoint", f"{stop.address or 0}"
    if stop.signal == 5 and stepping and stop.reason is None:
        return "trace", None
    return None, None


def json_payload(value: Any) -> bytes:
    """Compact JSON, as lldb's packets carry it."""
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def region_reply(start: int, size: int, permissions: str) -> bytes:
    """A ``qMemoryRegionInfo`` answer; no ``permissions`` key means nothing is mapped."""
    reply = b"start:%x;size:%x;" % (start, size)
    return reply + (b"permissions:%s;" % permissions.encode("ascii") if permissions else b"")
