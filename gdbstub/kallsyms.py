"""Symbols of a Linux kernel image that has no symbol table, from its own ``kallsyms`` tables.

Theory of operation
-------------------
Distribution kernels ship stripped (Debian's ``System.map`` is a placeholder pointing at the
``-dbg`` package), but every kernel built with ``CONFIG_KALLSYMS`` carries the table that
``/proc/kallsyms`` prints, in ``.rodata``, written by ``scripts/kallsyms.c`` as labels aligned
to 8 bytes (x86-64, ``CONFIG_KALLSYMS_BASE_RELATIVE``; Debian 12's 6.1 in this order)::

    kallsyms_offsets        s32[n]
    kallsyms_relative_base  u64      a kernel address (high half all ones)
    kallsyms_num_syms       u32      n
    kallsyms_names          n entries: a length (one byte; two, ULEB128, in newer kernels)
                            and that many token numbers
    kallsyms_markers        u32[ceil(n / 256)]: offset in names of entries 0, 256, 512...
    (kallsyms_seqs_of_names, 3 bytes per symbol, in kernels that have it)
    kallsyms_token_table    256 NUL-terminated strings
    kallsyms_token_index    u16[256]: offset of each string in the token table

Nothing names these labels in a stripped image, so they are found by their shape. A byte that
symbols use stands for itself in the token table, so the digits appear there as
``"0\\0" "1\\0" ... "9\\0"`` (tokens 0x30-0x39): walking back 48 strings gives the table's
start, and the u16 index after its 256 strings must hold exactly their offsets. Before the
table, ``num_syms`` is the word after a kernel address whose count of name entries parses
and is followed by markers that point at every 256th entry. A candidate that fails any check
is dropped, so a wrong match is never misread. The first character of an expanded name is
its type letter (``T``, ``t``, ``D``...), as in ``/proc/kallsyms``.

Addresses: an offset >= 0 is absolute (per-CPU symbols, ``CONFIG_KALLSYMS_ABSOLUTE_PERCPU``),
a negative one is ``relative_base - 1 - offset``. They are link-time addresses: right for a
kernel booted with ``nokaslr``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

DIGITS_RUN = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
ALIGN = 8
TOKENS = 256
BASE_HIGH = b"\xff" * 4  # the high half of kallsyms_relative_base, a kernel address
SEARCH_BACK = 64 << 20  # how far before the token table the names may start
MIN_SYMBOLS, MAX_SYMBOLS = 1000, 1 << 22


@dataclass(frozen=True)
class KernelSymbol:
    """One ``/proc/kallsyms`` line: the address, the type letter and the name."""

    address: int
    kind: str
    name: str


def _align(value: int) -> int:
    return (value + ALIGN - 1) & ~(ALIGN - 1)


def _token_table(data: bytes, digits: int) -> tuple[list[bytes], int] | None:
    """The 256 tokens and the table's start, given the position of the token ``"0"``."""
    start = digits
    for _ in range(ord("0")):  # walk back over the 48 strings before "0"
        end = start - 1  # the NUL that ends the previous string
        if end <= 0 or data[end] != 0:
            return None
        start = data.rfind(b"\0", 0, end) + 1
        if start >= end:  # an empty string: not a token table
            return None
    tokens, pos = [], start
    for _ in range(TOKENS):
        end = data.find(b"\0", pos)
        if end <= pos:
            return None
        tokens.append(data[pos:end])
        pos = end + 1
    index_at = _align(pos)
    index = struct.unpack_from(f"<{TOKENS}H", data, index_at)
    offset = 0
    for i, token in enumerate(tokens):
        if index[i] != offset:
            return None
        offset += len(token) + 1
    return tokens, start


def _entry_spans(data: bytes, start: int, count: int, wide: bool) -> list[tuple[int, int]] | None:
    """(first token byte, length) of ``count`` name entries from ``start``, or None."""
    spans, pos, size = [], start, len(data)
    for _ in range(count):
        if pos >= size:
            return None
        length = data[pos]
        pos += 1
        if wide and length & 0x80:
            length = (length & 0x7F) | data[pos] << 7
            pos += 1
        if length == 0:
            return None
        spans.append((pos, length))
        pos += length
    return spans


def _markers_fit(data: bytes, start: int, spans: list[tuple[int, int]], wide: bool) -> bool:
    """Whether ``kallsyms_markers`` follows the names: the offset of every 256th entry."""
    last_pos, last_len = spans[-1]
    markers_at = _align(last_pos + last_len)
    count = (len(spans) + 255) // 256
    if markers_at + 4 * count > len(data):
        return False
    markers = struct.unpack_from(f"<{count}I", data, markers_at)
    for i, marker in enumerate(markers):
        pos, length = spans[i * 256]
        header = 2 if wide and length > 0x7F else 1
        if pos - header - start != marker:
            return False
    return True


def _names(data: bytes, table_start: int) -> tuple[int, list[tuple[int, int]]] | None:
    """The ``kallsyms_num_syms`` position and the names' spans. ``num_syms`` follows the
    relative base (a kernel address: its high half is all ones) and precedes the names, which
    the markers follow; the search runs back from the token table."""
    floor = max(0, table_start - SEARCH_BACK)
    pos = data.rfind(BASE_HIGH, floor, table_start)
    while pos >= floor:
        num_syms_at = pos + 4
        if num_syms_at % ALIGN == 0 and data[num_syms_at + 4 : num_syms_at + 8] == b"\0" * 4:
            (count,) = struct.unpack_from("<I", data, num_syms_at)
            if MIN_SYMBOLS <= count <= MAX_SYMBOLS:
                start = num_syms_at + ALIGN
                for wide in (True, False):
                    spans = _entry_spans(data, start, count, wide)
                    if spans is not None and _markers_fit(data, start, spans, wide):
                        return num_syms_at, spans
        pos = data.rfind(BASE_HIGH, floor, pos + 3)
    return None


def _addresses(data: bytes, num_syms_at: int, count: int) -> list[int]:
    base_at = num_syms_at - ALIGN
    (base,) = struct.unpack_from("<Q", data, base_at)
    offsets_at = base_at - _align(4 * count)
    offsets = struct.unpack_from(f"<{count}i", data, offsets_at)
    return [off if off >= 0 else base - 1 - off for off in offsets]


def kernel_symbols(data: bytes) -> list[KernelSymbol]:
    """Every symbol of the kernel image ``data`` (a ``vmlinux`` ELF or its raw bytes), in
    table order; ``[]`` when no kallsyms table is found."""
    for digits in _find_all(data, DIGITS_RUN):
        found = _token_table(data, digits)
        if found is None:
            continue
        tokens, table_start = found
        names = _names(data, table_start)
        if names is None:
            continue
        num_syms_at, spans = names
        addresses = _addresses(data, num_syms_at, len(spans))
        symbols = []
        for address, (pos, length) in zip(addresses, spans, strict=True):
            text = b"".join(tokens[b] for b in data[pos : pos + length]).decode("ascii", "replace")
            symbols.append(KernelSymbol(address, text[:1], text[1:]))
        return symbols
    return []


def _find_all(data: bytes, pattern: bytes) -> Iterator[int]:
    pos = data.find(pattern)
    while pos >= 0:
        yield pos
        pos = data.find(pattern, pos + 1)


def symbol_map(data: bytes, kinds: str = "TtWwDdBbRrVv") -> dict[str, int]:
    """Name -> address of the image's symbols of the type letters ``kinds`` (by default all
    but the absolute ones: per-CPU offsets are no addresses); a global symbol wins over a
    local one of the same name."""
    result: dict[str, int] = {}
    for symbol in kernel_symbols(data):
        if symbol.kind in kinds and (symbol.kind.isupper() or symbol.name not in result):
            result[symbol.name] = symbol.address
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m gdbstub.kallsyms KERNEL``: the kernel's symbols as ``System.map`` lines
    (address, type, name), for a stripped ``vmlinux`` or a bzImage."""
    import sys

    from .machine.boot.common import BootError
    from .machine.boot.linux import is_bzimage
    from .machine.boot.payload import vmlinux_of_bzimage

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gdbstub.kallsyms KERNEL  (a vmlinux or a bzImage)", file=sys.stderr)
        return 2
    try:
        with open(args[0], "rb") as f:
            data = f.read()
        if is_bzimage(data):
            data = vmlinux_of_bzimage(data)
    except (OSError, BootError) as exc:
        print(f"gdbstub.kallsyms: {args[0]}: {exc}", file=sys.stderr)
        return 1
    found = kernel_symbols(data)
    if not found:
        print(f"gdbstub.kallsyms: {args[0]}: no kallsyms table found", file=sys.stderr)
        return 1
    out = "".join(f"{s.address:016x} {s.kind} {s.name}\n" for s in found)
    try:
        sys.stdout.write(out)
    except BrokenPipeError:  # `| head`
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
