"""The Remote Serial Protocol wire codec, sans I/O: bytes in, typed frames out, and back.

Theory of operation
-------------------
On the wire a packet is ``$<body>#<two hex digits>``, the digits being the modulo-256 sum of
the body bytes as sent. Outside a packet a peer may send ``+`` (ack), ``-`` (nak, "send it
again") and a raw 0x03 (Ctrl-C, "interrupt the running target"); anything else between packets
is line noise and is dropped. Inside a body:

* ``}`` escapes the next byte, which is sent XOR 0x20. ``$``, ``#``, ``}`` and ``*`` must be
  escaped when they occur in data; so a raw ``#`` always ends a body and a raw ``$`` inside a
  body means the sender gave up on it and started a new packet.
* ``*`` is run-length encoding: ``c*N`` stands for ``c`` followed by ``ord(N) - 29`` more
  copies of ``c``. Count characters that would read as ``#``, ``$`` (or confuse a reader:
  ``+``, ``-``, ``*``, ``}``) are never produced; a run is split instead.

``Decoder.feed`` keeps the unfinished tail of the stream between calls, so TCP may split or
merge packets at any byte. Only replies are run-length encoded: a stub's decoder is made with
``expand_rle=False`` and reads a ``*`` in a request as the byte it is (as gdbserver does), so
``m0* ,4`` is a malformed ``m`` packet, not ``m0000,4``. It checks each checksum and returns
``Packet`` with the body already unescaped and expanded (binary ``X`` data included), or
``BadPacket`` when the checksum is wrong, the escaping is broken or the body is longer than
``PACKET_SIZE`` (the size the stub advertises); the caller answers ``BadPacket`` with a nak.
``encode`` builds the bytes of one packet with escaping, optional RLE and the checksum.

The scanning uses ``bytes.find`` and regular expressions so big packets (64 KiB memory
transfers) cost a few C-level passes, not a Python loop per byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

__all__ = [
    "PACKET_SIZE",
    "Ack",
    "BadPacket",
    "Decoder",
    "Frame",
    "Interrupt",
    "Nak",
    "Packet",
    "checksum",
    "encode",
    "escape_binary",
    "hex_decode",
    "hex_encode",
    "parse_hex",
    "unescape_binary",
]

PACKET_SIZE = 0x20000
"""The largest packet body the stub accepts, advertised as ``PacketSize=20000`` (hex)."""

ACK = b"+"
NAK = b"-"
INTERRUPT_BYTE = 0x03
_ESCAPE = 0x7D  # '}'
_RLE = 0x2A  # '*'
_SPECIAL = frozenset(b"$#}*")


@dataclass(frozen=True, slots=True)
class Packet:
    """A packet whose checksum was right; ``payload`` is unescaped and RLE-expanded."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """``+``: the peer received our last packet."""


@dataclass(frozen=True, slots=True)
class Nak:
    """``-``: the peer wants our last packet again."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    """A raw 0x03 outside a packet: Ctrl-C."""


@dataclass(frozen=True, slots=True)
class BadPacket:
    """A packet that could not be accepted (checksum, escaping, size); answer with a nak."""

    reason: str


Frame: TypeAlias = Packet | Ack | Nak | Interrupt | BadPacket
"""What ``Decoder.feed`` returns."""


def checksum(body: bytes) -> int:
    """The RSP checksum of ``body`` as sent on the wire: the sum of its bytes modulo 256."""
    return sum(body) & 0xFF


class Decoder:
    """Turns a byte stream from the peer into frames; keeps partial input between feeds."""

    def __init__(self, max_packet: int = PACKET_SIZE, *, expand_rle: bool = True) -> None:
        self._max = max_packet
        self._rle = expand_rle
        self._buf = bytearray()
        self._in_packet = False
        self._scan = 0  # how much of _buf (inside a packet) is known to hold no '#' or '$'
        self._overflow = False

    @property
    def in_packet(self) -> bool:
        """True while the decoder holds the start of a packet it has not finished."""
        return self._in_packet

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` to the stream and return every frame it completes, in order."""
        frames: list[Frame] = []
        buf = self._buf
        buf += data
        while buf:
            if not self._in_packet:
                start = buf.find(b"$")
                outside = buf if start < 0 else buf[:start]
                for byte in outside:
                    if byte == 0x2B:
                        frames.append(Ack())
                    elif byte == 0x2D:
                        frames.append(Nak())
                    elif byte == INTERRUPT_BYTE:
                        frames.append(Interrupt())
                if start < 0:
                    buf.clear()
                    break
                del buf[: start + 1]
                self._in_packet = True
                self._scan = 0
                self._overflow = False
                continue
            # buf[:_scan] is known to hold neither '#' nor '$' (both were searched there)
            end = buf.find(b"#", self._scan)
            restart = buf.find(b"$", self._scan, len(buf) if end < 0 else end)
            if restart >= 0:
                # A raw '$' inside a body: the sender abandoned this packet; start over there.
                del buf[: restart + 1]
                self._scan = 0
                self._overflow = False
                continue
            if end < 0:
                if len(buf) > self._max:
                    # Too long: drop what we have but stay inside the packet until its '#'.
                    self._overflow = True
                    buf.clear()
                self._scan = len(buf)
                break
            if len(buf) < end + 3:
                self._scan = end
                break
            body = bytes(buf[:end])
            sent = bytes(buf[end + 1 : end + 3])
            del buf[: end + 3]
            self._in_packet = False
            frames.append(self._finish(body, sent))
        return frames

    def _finish(self, body: bytes, sent: bytes) -> Frame:
        if self._overflow or len(body) > self._max:
            self._overflow = False
            return BadPacket("packet longer than PacketSize")
        try:
            expected = int(sent, 16) if _HEX2.fullmatch(sent) else -1
        except ValueError:
            expected = -1
        if expected != checksum(body):
            return BadPacket(f"checksum mismatch (sent {sent!r})")
        try:
            payload = _unpack_body(body, self._max, self._rle)
        except ValueError as exc:
            return BadPacket(str(exc))
        if len(payload) > self._max:  # run-length encoding can expand a short body
            return BadPacket("packet longer than PacketSize")
        return Packet(payload)


_HEX2 = re.compile(rb"[0-9a-fA-F]{2}")
_ESCAPED = re.compile(rb"\}(.)", re.DOTALL)


def _unpack_body(body: bytes, limit: int = PACKET_SIZE, rle: bool = True) -> bytes:
    """Undo ``}`` escapes and ``*`` run-length encoding in a received body.

    One left-to-right pass, as gdb's reader does: ``}`` takes the next byte as data, ``*``
    takes the next byte as a count, whatever either byte is. So ``a*}}`` is ``a`` repeated
    and then a dangling escape (an error), not ``a*`` and an escaped ``}``. Expansion stops
    with an error once the payload exceeds ``limit``. Without ``rle`` a ``*`` is a byte like
    any other."""
    if not rle or b"*" not in body:
        if b"}" not in body:
            return body
        if _trailing_escape(body):
            raise ValueError("packet ends inside an escape")
        return unescape_binary(body)
    out = bytearray()
    i = 0
    n = len(body)
    while i < n:
        byte = body[i]
        if byte == _ESCAPE:
            if i + 1 >= n:
                raise ValueError("packet ends inside an escape")
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif byte == _RLE:
            if not out or i + 1 >= n:
                raise ValueError("run-length count without a character")
            count = body[i + 1] - 29
            if count < 0:
                raise ValueError("bad run-length count")
            out += bytes((out[-1],)) * count
            if len(out) > limit:
                raise ValueError("packet longer than PacketSize")
            i += 2
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def _trailing_escape(body: bytes) -> bool:
    """True if the final ``}`` of ``body`` (which has no ``*``) is a dangling escape."""
    run = len(body) - len(body.rstrip(b"}"))
    return run % 2 == 1


def unescape_binary(data: bytes) -> bytes:
    """Undo the ``}`` escaping of binary data (``X`` packets, ``qXfer`` replies)."""
    return _ESCAPED.sub(lambda m: bytes((m.group(1)[0] ^ 0x20,)), data)


_NEEDS_ESCAPE = re.compile(rb"[$#}*]")


def escape_binary(data: bytes) -> bytes:
    """Escape ``$``, ``#``, ``}`` and ``*`` in binary data as ``}`` + (byte XOR 0x20)."""
    return _NEEDS_ESCAPE.sub(lambda m: bytes((_ESCAPE, m.group(0)[0] ^ 0x20)), data)


# Repeat counts whose count character (count + 29) must not appear: '#', '$' would end or
# restart a packet; '*', '+', '-' and '}' are avoided so no reader can misparse them.
_FORBIDDEN_COUNTS = frozenset(c - 29 for c in b"#$*+-}")
_MAX_COUNT = 126 - 29  # the count character stays printable ASCII


def _encode_run(run: bytes) -> bytes:
    """``run`` (one byte repeated) as the byte plus ``*N`` repeat groups."""
    char = run[:1]
    out = bytearray(char)
    remaining = len(run) - 1
    while remaining > 0:
        if remaining < 3:
            out += char * remaining
            break
        count = min(remaining, _MAX_COUNT)
        while count in _FORBIDDEN_COUNTS:
            count -= 1
        out += b"*" + bytes((count + 29,))
        remaining -= count
    return bytes(out)


_ZEROS = re.compile(b"0+")


@lru_cache(maxsize=1024)
def _encode_zero_run(length: int) -> bytes:
    return _encode_run(b"0" * length)


def _compress_zeros(body: bytes) -> bytes:
    """RLE of an (escaped) packet body: runs of ``0`` only (escaping never yields a ``0``).

    Zeros are the runs that matter in register and memory dumps and stop replies (cleared
    registers, BSS, padding, the upper halves of small values); runs of other characters are
    rare and short, and RLE is optional for the sender. Runs are found with ``bytes.find``, at
    C speed: about 20 us for a ``g`` reply and a fraction of a millisecond for 64 KiB of memory
    (a regex with a backreference, or one scan per digit, cost several times that;
    docs/performance.md)."""
    start = body.find(b"0000")
    if start < 0:
        return body
    pieces: list[bytes] = []
    position = 0
    while start >= 0:
        match = _ZEROS.match(body, start)
        end = match.end() if match else start + 4  # (always a match: "0000" is there)
        pieces.append(body[position:start])
        pieces.append(_encode_zero_run(end - start))
        position = end
        start = body.find(b"0000", end)
    pieces.append(body[position:])
    return b"".join(pieces)


def encode(payload: bytes, *, rle: bool = True) -> bytes:
    """One complete packet ``$body#cc`` carrying ``payload`` (escaped, optionally RLE'd)."""
    body = escape_binary(payload) if _NEEDS_ESCAPE.search(payload) else payload
    if rle:
        body = _compress_zeros(body)
    return b"$%s#%02x" % (body, checksum(body))


_HEX_DIGITS = re.compile(rb"[0-9a-fA-F]+")


def hex_encode(data: bytes) -> bytes:
    """Lower-case hex of ``data`` (two digits per byte)."""
    return data.hex().encode("ascii")


def hex_decode(text: bytes) -> bytes:
    """Bytes from hex digit pairs; raises ValueError on odd length or a non-hex character."""
    if not text:
        return b""
    if len(text) % 2 or not _HEX_DIGITS.fullmatch(text):
        raise ValueError(f"not hex data: {text[:40]!r}")
    return bytes.fromhex(text.decode("ascii"))


def parse_hex(text: bytes) -> int:
    """A non-negative hex number; raises ValueError for anything but hex digits."""
    if not _HEX_DIGITS.fullmatch(text):
        raise ValueError(f"not a hex number: {text[:40]!r}")
    return int(text, 16)
