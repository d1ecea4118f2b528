"""The wire codec: framing, checksums, escapes, RLE, splits, bounds, hex helpers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdbstub import rsp
from gdbstub.rsp import Ack, BadPacket, Decoder, Interrupt, Nak, Packet, encode


def feed_all(chunks: list[bytes], decoder: Decoder | None = None) -> list[rsp.Frame]:
    dec = decoder or Decoder()
    frames: list[rsp.Frame] = []
    for chunk in chunks:
        frames += dec.feed(chunk)
    return frames


def test_simple_packets_and_acks() -> None:
    frames = feed_all([b"$g#6", b"7+\x03$m0,4#fd", b"-"])
    assert frames == [Packet(b"g"), Ack(), Interrupt(), Packet(b"m0,4"), Nak()]


def test_encode_known_values() -> None:
    assert encode(b"OK") == b"$OK#9a"
    assert encode(b"") == b"$#00"


def test_checksum_mismatch_is_bad_packet() -> None:
    (frame,) = feed_all([b"$g#00"])
    assert isinstance(frame, BadPacket)
    (frame,) = feed_all([b"$g#zz"])
    assert isinstance(frame, BadPacket)


def test_junk_between_packets_is_ignored() -> None:
    assert feed_all([b"garbage\r\n$g#67junk"]) == [Packet(b"g")]


def test_interrupt_inside_packet_is_data() -> None:
    body = b"X0,1:\x03"
    assert feed_all([encode(body)]) == [Packet(body)]


def test_dollar_inside_body_restarts() -> None:
    assert feed_all([b"$m0,4$g#67"]) == [Packet(b"g")]


def test_escapes_are_undone() -> None:
    data = bytes([0x23, 0x24, 0x7D, 0x2A, 0x00])
    wire = encode(b"X0,5:" + data, rle=False)
    assert b"#" not in wire[1:-3] and b"$" not in wire[1:]
    assert feed_all([wire]) == [Packet(b"X0,5:" + data)]


def test_dangling_escape_is_bad() -> None:
    body = b"X}"
    (frame,) = feed_all([b"$%s#%02x" % (body, rsp.checksum(body))])
    assert isinstance(frame, BadPacket)


def test_rle_in_received_packets_is_expanded() -> None:
    body = b"0* "  # '0' then 3 more
    assert feed_all([b"$%s#%02x" % (body, rsp.checksum(body))]) == [Packet(b"0000")]


def test_rle_output_uses_counts() -> None:
    wire = encode(b"0" * 100)
    assert len(wire) < 20
    assert feed_all([wire]) == [Packet(b"0" * 100)]


@pytest.mark.parametrize("prefix", [b"", b"T05thread:1;06:", b"}$"], ids=["hex", "stop", "esc"])
@pytest.mark.parametrize("run", range(1, 200))
def test_rle_never_uses_forbidden_count_chars(run: int, prefix: bytes) -> None:
    payload = prefix + b"0" * run + b"b"
    wire = encode(payload)
    body = wire[1:-3]
    for i, byte in enumerate(body):
        if byte == ord("*"):
            assert body[i + 1] not in b"#$+-*}"
            assert 32 <= body[i + 1] <= 126
    if run >= 4:
        assert b"*" in body
    assert feed_all([wire]) == [Packet(payload)]


@given(st.text(alphabet="0f1aA", max_size=400))
def test_hex_replies_round_trip_through_rle(text: str) -> None:
    payload = text.encode()
    wire = encode(payload)
    assert feed_all([wire]) == [Packet(payload)]
    if "00000" in text:
        assert len(wire) < len(payload) + 4  # a run of zeros was compressed


def test_oversized_packet_is_refused_then_stream_recovers() -> None:
    dec = Decoder(max_packet=64)
    big = encode(b"M0,40:" + b"00" * 64, rle=False)
    frames = feed_all([big[:30], big[30:], encode(b"g")], dec)
    assert isinstance(frames[0], BadPacket)
    assert frames[1:] == [Packet(b"g")]


def test_oversized_packet_in_one_piece() -> None:
    dec = Decoder(max_packet=8)
    frames = dec.feed(encode(b"0123456789") + b"+")
    assert isinstance(frames[0], BadPacket) and frames[1:] == [Ack()]


def test_rle_expansion_is_bounded() -> None:
    dec = Decoder(max_packet=64)
    (frame,) = dec.feed(encode(b"0" * 100))
    assert isinstance(frame, BadPacket)


def test_default_limit_accepts_packet_size() -> None:
    payload = b"1" * rsp.PACKET_SIZE
    assert feed_all([encode(payload, rle=False)]) == [Packet(payload)]


def test_hex_helpers() -> None:
    assert rsp.hex_encode(b"\x01\xab") == b"01ab"
    assert rsp.hex_decode(b"01AB") == b"\x01\xab"
    assert rsp.parse_hex(b"fF") == 255
    for bad in (b"1", b"zz", b" 1", b"0x"):
        with pytest.raises(ValueError):
            rsp.hex_decode(bad)
    for bad in (b"", b"-1", b"0x10", b"1_0", b" 1"):
        with pytest.raises(ValueError):
            rsp.parse_hex(bad)


def test_binary_escape_round_trip() -> None:
    data = bytes(range(256))
    escaped = rsp.escape_binary(data)
    assert not any(c in escaped for c in b"$#*")
    assert rsp.unescape_binary(escaped) == data


@given(st.binary(max_size=600), st.booleans())
def test_encode_decode_round_trip(payload: bytes, rle: bool) -> None:
    wire = encode(payload, rle=rle)
    assert wire.startswith(b"$") and wire.count(b"#") == 1
    assert feed_all([wire]) == [Packet(payload)]


@settings(max_examples=200)
@given(
    st.lists(st.binary(max_size=80), min_size=1, max_size=6),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_arbitrary_splits(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"+".join(encode(p) for p in payloads) + b"\x03"
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    frames = feed_all(chunks)
    expected: list[rsp.Frame] = []
    for i, p in enumerate(payloads):
        if i:
            expected.append(Ack())
        expected.append(Packet(p))
    expected.append(Interrupt())
    assert frames == expected


@given(st.binary(max_size=300))
def test_decoder_never_raises_on_noise(noise: bytes) -> None:
    dec = Decoder(max_packet=128)
    frames = dec.feed(noise)
    assert all(isinstance(f, (Packet, Ack, Nak, Interrupt, BadPacket)) for f in frames)
    # After any noise a clean packet still comes through (possibly after closing a body).
    frames = dec.feed(b"#00" + encode(b"g"))
    assert frames[-1] == Packet(b"g")
