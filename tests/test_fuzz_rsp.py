"""Property tests from the protocol's grammar: the codec against a reference reader, and the
packet table through a session over the fake target (scripts/fuzz runs the same for hours)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import ModuleType

import pytest
from fake_target import FakeTarget
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdbstub import rsp
from gdbstub.rsp import Ack, BadPacket, Decoder, Interrupt, Nak, Packet
from gdbstub.session import GdbSession, SendBytes

ROOT = Path(__file__).resolve().parent.parent


def _load_fuzz() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gdbstub_fuzz", str(ROOT / "scripts" / "fuzz"))
    spec = importlib.util.spec_from_loader("gdbstub_fuzz", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


fuzz = _load_fuzz()


def wire(body: bytes) -> bytes:
    return b"$%s#%02x" % (body, rsp.checksum(body))


# --- the grammar as hypothesis strategies ----------------------------------------------------

escape = st.sampled_from(fuzz.ESCAPED_BYTES).map(lambda b: b"}" + bytes([b]))
count = st.sampled_from(fuzz.COUNT_BYTES).map(lambda b: b"*" + bytes([b]))
special = st.sampled_from([bytes([c]) for c in fuzz.SPECIAL])
token = st.one_of(
    st.sampled_from(fuzz.WORDS),
    escape,
    count,
    special,
    st.sampled_from([b"}", b"*"]),
    st.binary(min_size=1, max_size=5),
)
bodies = st.lists(token, max_size=8).map(b"".join)


def _packet(body: bytes, style: str, delta: int) -> bytes:
    good = b"%02x" % rsp.checksum(body)
    tails = {
        "good": b"#" + good,
        "upper": b"#" + good.upper(),
        "bad": b"#%02x" % ((rsp.checksum(body) + delta) % 256),
        "one digit": b"#" + good[:1],
        "not hex": b"#zz",
        "none": b"",
    }
    return b"$" + body + tails[style]


packets = st.builds(
    _packet,
    bodies,
    st.sampled_from(["good", "good", "good", "upper", "bad", "one digit", "not hex", "none"]),
    st.integers(1, 255),
)
noise = st.one_of(st.sampled_from([b"+", b"-", b"\x03"]), st.binary(min_size=1, max_size=8))
streams = st.lists(st.one_of(packets, packets, noise), min_size=1, max_size=5).map(b"".join)
limits = st.sampled_from([rsp.PACKET_SIZE, 300, 64, 16])


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# --- the codec ---------------------------------------------------------------------------------


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(streams, st.lists(st.integers(0, 10_000), max_size=6), limits, st.booleans())
def test_decoder_agrees_with_a_byte_at_a_time_reader(
    data: bytes, cuts: list[int], limit: int, rle: bool
) -> None:
    fuzz.check_codec(data, _cut(data, cuts), limit, rle)


def test_the_fuzzers_crash_is_a_nak_not_an_exception() -> None:
    # 'a', a run of 96 more, then a dangling escape: the IndexError of issue 13
    frames = Decoder().feed(wire(b"a*}}") + wire(b"g"))
    assert isinstance(frames[0], BadPacket) and frames[1:] == [Packet(b"g")]


@pytest.mark.parametrize(
    "body, payload",
    [
        (b"a*}", b"a" * 97),  # '}' as a count (96): nothing dangles
        (b"}}a", b"]a"),  # an escaped '}' at the start
        (b"a}}", b"a]"),
        (b"a}**!", b"a\x0a\x0a\x0a\x0a\x0a"),  # an escaped '*' (0x0a) then its run of 4
        (b"a* }]", b"aaaa}"),
        (b"a**", b"a" * 14),  # a "*" count (13) is a count like any other
        (b"\x03a\x03", b"\x03a\x03"),  # 0x03 inside a body is data
        (b"}\x03", b"#"),  # an escaped '#' (0x03 ^ 0x20)
    ],
)
def test_escapes_and_counts_meeting(body: bytes, payload: bytes) -> None:
    assert Decoder().feed(wire(body)) == [Packet(payload)]
    assert fuzz.reference_frames(wire(body)) == [Packet(payload)]


@pytest.mark.parametrize(
    "body",
    [b"}", b"*", b"*a", b"a*", b"a}", b"a*}}", b"}}}", b"a*\x1c", b"0*~}"],
)
def test_broken_bodies_are_naks(body: bytes) -> None:
    frames = Decoder().feed(wire(body) + b"+")
    assert isinstance(frames[0], BadPacket) and frames[1:] == [Ack()]


def test_a_stub_reads_run_lengths_in_requests_as_bytes() -> None:
    # gdb never compresses requests; as for gdbserver, '*' is a plain byte there
    assert Decoder(expand_rle=False).feed(wire(b"m0* ,4")) == [Packet(b"m0* ,4")]
    assert Decoder(expand_rle=False).feed(wire(b"a*}}")) == [Packet(b"a*]")]
    frames = Decoder(expand_rle=False).feed(wire(b"a*}"))
    assert isinstance(frames[0], BadPacket)  # the escape dangles either way


def test_raw_dollar_and_hash_edges() -> None:
    # '$' at the end of a body restarts; '#' right after '$' is an empty body; a body cut off
    # by a new '$' never produces a frame; a lone checksum digit swallows the next byte
    assert Decoder().feed(b"$abc$" + wire(b"g")) == [Packet(b"g")]
    assert Decoder().feed(b"$#00") == [Packet(b"")]
    frames = Decoder().feed(b"$g#6+" + wire(b"?"))
    assert isinstance(frames[0], BadPacket) and frames[1:] == [Packet(b"?")]
    assert Decoder().feed(b"\x03-+") == [Interrupt(), Nak(), Ack()]


def test_slow_trickle_of_a_big_packet_is_linear() -> None:
    # one byte at a time: each feed scans only the new byte (a quadratic rescan of 128 KiB
    # would take minutes)
    body = b"1" * rsp.PACKET_SIZE
    data = wire(body)
    decoder = Decoder()
    frames = []
    for i in range(0, len(data), 7):
        frames += decoder.feed(data[i : i + 7])
    assert frames == [Packet(body)]


# --- the packet table ----------------------------------------------------------------------------

numbers = st.sampled_from(fuzz.NUMBERS)
arguments = st.lists(
    st.one_of(
        numbers,
        st.sampled_from(fuzz.SEPARATORS),
        st.sampled_from(fuzz.ARG_WORDS),
        st.integers(0, (1 << 64) - 1).map(lambda n: b"%x" % n),
        st.binary(min_size=1, max_size=8),
    ),
    max_size=6,
).map(b"".join)
payloads = st.builds(lambda p, a: p + a, st.sampled_from(fuzz.PREFIXES), arguments)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payloads, min_size=1, max_size=4))
def test_packet_table_through_a_session(sequence: list[bytes]) -> None:
    harness = fuzz.SessionHarness()
    try:
        for payload in sequence:
            harness.run(payload)
    finally:
        harness.close()


def ask(session: GdbSession, payload: bytes) -> bytes:
    replies = []
    for output in session.on_frame(Packet(payload)):
        assert isinstance(output, SendBytes)
        replies += [f.payload for f in Decoder().feed(output.data) if isinstance(f, Packet)]
    (reply,) = replies
    return reply


@pytest.mark.parametrize(
    "payload",
    [
        b"m0,ffffffffffffffff",
        b"m1000,ffffffffffffffffffffffffffff",
        b"qXfer:features:read:target.xml:0,ffffffffffffffff",
        b"qXfer:features:read:target.xml:ffffffffffffffff,ffffffffffffffff",
    ],
)
def test_absurd_lengths_do_not_allocate(payload: bytes) -> None:
    target = FakeTarget(memory_size=0x1000)
    session = GdbSession(target)
    tracemalloc.start()
    try:
        reply = ask(session, payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        target.close()
    assert peak < 2 * rsp.PACKET_SIZE * 4, peak
    assert len(reply) <= rsp.PACKET_SIZE


@pytest.mark.parametrize(
    "payload",
    [
        b"M1000,ffffffffffffffff:00",
        b"X1000,10:\x01",
        b"G00",
        b"G" + b"00" * 1000,
        b"Gzz",
        b"P10=00",
        b"Hg99",
        b"g;thread:99;",
        b"T99",
        b"mzz,4",
        b"m1000",
        b"Z0,1000",
    ],
)
def test_malformed_requests_get_errors_and_change_nothing(payload: bytes) -> None:
    target = FakeTarget()
    session = GdbSession(target)
    memory, regs = bytes(target.memory), {t: list(r) for t, r in target.regs.items()}
    try:
        reply = ask(session, payload)
        assert reply.startswith(b"E"), reply
        assert ask(session, b"?").startswith(b"T")
        assert bytes(target.memory) == memory and target.regs == regs
    finally:
        target.close()


def test_scripts_fuzz_runs_and_counts() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz"), "--inputs", "3000", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3000 inputs" in result.stdout and "no failure" in result.stdout
