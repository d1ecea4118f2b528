"""The session state machine, driven in memory through the codec (no sockets)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_target import PC, TARGET_XML, FakeTarget
from hypothesis import given, settings
from hypothesis import strategies as st

from gdbstub import rsp
from gdbstub.session import (
    CloseConnection,
    GdbSession,
    Output,
    SendBytes,
    SessionState,
    Shutdown,
)
from gdbstub.target import ResumeAction, StopEvent


class Client:
    """A scripted debugger: sends packets into a session, decodes what comes back."""

    def __init__(self, target: FakeTarget) -> None:
        self.target = target
        self.session = GdbSession(target)
        self.decoder = rsp.Decoder()
        self.acks = 0
        self.naks = 0
        self.others: list[Output] = []

    def _collect(self, outputs: list[Output]) -> list[bytes]:
        replies: list[bytes] = []
        for out in outputs:
            if isinstance(out, SendBytes):
                for frame in self.decoder.feed(out.data):
                    if isinstance(frame, rsp.Packet):
                        replies.append(frame.payload)
                    elif isinstance(frame, rsp.Ack):
                        self.acks += 1
                    elif isinstance(frame, rsp.Nak):
                        self.naks += 1
            else:
                self.others.append(out)
        return replies

    def raw(self, data: bytes) -> list[bytes]:
        replies: list[bytes] = []
        for frame in rsp.Decoder().feed(data):
            replies += self._collect(self.session.on_frame(frame))
        return replies

    def send(self, payload: bytes) -> list[bytes]:
        return self._collect(self.session.on_frame(rsp.Packet(payload)))

    def ask(self, payload: bytes) -> bytes:
        replies = self.send(payload)
        assert len(replies) == 1, (payload, replies)
        return replies[0]

    def stop(self, stop: StopEvent) -> list[bytes]:
        return self._collect(self.session.on_stop(stop))


@pytest.fixture
def target() -> Iterator[FakeTarget]:
    t = FakeTarget()
    yield t
    t.close()


@pytest.fixture
def client(target: FakeTarget) -> Client:
    return Client(target)


def test_ack_mode_then_no_ack(client: Client) -> None:
    assert client.ask(b"vMustReplyEmpty") == b""
    assert client.acks == 1
    assert client.ask(b"QStartNoAckMode") == b"OK"
    assert client.acks == 2  # the QStartNoAckMode packet itself is still acked
    assert client.ask(b"qAttached") == b"1"
    assert client.acks == 2
    assert not client.session.ack_mode


def test_nak_resends_last_packet(client: Client) -> None:
    assert client.ask(b"qC") == b"QC1"
    assert client.raw(b"-") == [b"QC1"]
    client.ask(b"QStartNoAckMode")
    assert client.raw(b"-") == []


def test_bad_checksum_gets_nak_without_exception(client: Client) -> None:
    assert client.raw(b"$g#00") == []
    assert client.naks == 1
    client.ask(b"QStartNoAckMode")
    assert client.raw(b"$g#00") == []  # no acks at all in no-ack mode
    assert client.naks == 1


def test_qsupported_follows_capabilities(target: FakeTarget) -> None:
    reply = Client(target).ask(b"qSupported:swbreak+;hwbreak+")
    items = reply.split(b";")
    assert b"PacketSize=20000" in items
    assert {b"qXfer:features:read+", b"QStartNoAckMode+", b"vContSupported+"} <= set(items)
    assert b"swbreak+" in items and b"hwbreak+" in items
    assert not any(i.startswith(b"multiprocess") for i in items)
    target.caps = frozenset({"step"})
    reply = Client(target).ask(b"qSupported")
    assert b"swbreak+" not in reply and b"hwbreak+" not in reply


def test_vcont_query_follows_capabilities(target: FakeTarget) -> None:
    assert Client(target).ask(b"vCont?") == b"vCont;c;C;s;S;t"
    target.caps = frozenset({"step", "range_step"})
    assert Client(target).ask(b"vCont?") == b"vCont;c;C;s;S;t;r"
    target.caps = frozenset()
    assert Client(target).ask(b"vCont?") == b"vCont;c;C;t"
    assert Client(target).ask(b"s") == b""  # gated off: "unsupported"


def test_unknown_packets_get_empty_reply(client: Client) -> None:
    for packet in (b"vFile:open:", b"qCRC:0,10", b"!", b"qXfer:threads:read::0,100"):
        assert client.ask(packet) == b""


def test_registers(client: Client, target: FakeTarget) -> None:
    blob = client.ask(b"g")
    assert len(blob) == 2 * (17 * 8 + 4)
    assert client.ask(b"p10") == (0x1001).to_bytes(8, "little").hex().encode()
    assert client.ask(b"P10=0020000000000000") == b"OK"
    assert target.regs[1][PC] == 0x2000
    assert client.ask(b"Hg2") == b"OK"
    assert client.ask(b"p10") == (0x1002).to_bytes(8, "little").hex().encode()
    assert client.ask(b"p10;thread:0001;") == (0x2000).to_bytes(8, "little").hex().encode()
    assert client.ask(b"G" + blob) == b"OK"  # thread 2 now has thread 1's old registers
    assert target.regs[2][PC] == 0x1001
    assert client.ask(b"p99") == b"E01"
    assert client.ask(b"Hg9") == b"E01"


def test_memory(client: Client, target: FakeTarget) -> None:
    assert client.ask(b"m1000,4") == b"00010203"
    assert client.ask(b"m1ffe,10") == b"feff"  # short read at the end of memory
    assert client.ask(b"m0,4") == b"E14"
    assert client.ask(b"M1000,2:abcd") == b"OK"
    assert target.memory[:2] == b"\xab\xcd"
    assert client.ask(b"X1000,0:") == b"OK"
    data = b"#$}*\x03"
    assert client.raw(rsp.encode(b"X1002,5:" + data, rle=False)) == [b"OK"]
    assert bytes(target.memory[2:7]) == data
    assert client.ask(b"M1000,3:abcd") == b"E01"
    assert client.ask(b"M0,1:00") == b"E14"
    big = client.ask(b"m1000,100000")
    assert 0 < len(big) <= rsp.PACKET_SIZE


def test_continue_and_stop_reply(client: Client, target: FakeTarget) -> None:
    client.ask(b"qSupported:swbreak+")
    assert client.send(b"c") == []
    assert client.session.state is SessionState.RUNNING
    assert target.calls[-1] == ("resume", {}, ResumeAction("c"))
    assert client.ask(b"qC") == b"E10"  # busy while running
    replies = client.stop(
        StopEvent(1, 5, reason="swbreak", expedite=((16, b"\x00\x20\0\0\0\0\0\0"),))
    )
    assert replies == [b"T05thread:1;10:0020000000000000;swbreak:;"]
    assert client.session.state is SessionState.IDLE


def test_swbreak_reason_only_when_negotiated(client: Client) -> None:
    client.send(b"c")
    assert client.stop(StopEvent(1, 5, reason="swbreak")) == [b"T05thread:1;"]


def test_watch_reason_and_exit(client: Client) -> None:
    client.send(b"vCont;c")
    assert client.stop(StopEvent(2, 5, reason="awatch", address=0x1234)) == [
        b"T05thread:2;awatch:1234;"
    ]
    client.send(b"c")
    assert client.stop(StopEvent(1, 0, exit_status=3)) == [b"W03"]


def test_stop_while_idle_is_kept_for_question_mark(client: Client) -> None:
    assert client.ask(b"?") == b"T05thread:1;"
    assert client.stop(StopEvent(2, 11)) == []
    assert client.ask(b"?") == b"T0bthread:2;"
    assert client.ask(b"qC") == b"QC2"


def test_interrupt(client: Client, target: FakeTarget) -> None:
    assert client.raw(b"\x03") == []
    assert ("interrupt",) not in target.calls  # ignored while idle
    client.send(b"c")
    assert client.raw(b"\x03") == []
    assert target.calls[-1] == ("interrupt",)
    assert client.stop(StopEvent(1, 2)) == [b"T02thread:1;"]


def test_legacy_step_and_continue_with_address(client: Client, target: FakeTarget) -> None:
    client.send(b"s3000")
    assert target.regs[1][PC] == 0x3000
    assert target.calls[-1] == ("resume", {1: ResumeAction("s")}, None)
    client.stop(StopEvent(1, 5))
    client.ask(b"Hc2")
    client.send(b"C0b;4000")
    assert target.regs[2][PC] == 0x4000
    assert target.calls[-1] == ("resume", {2: ResumeAction("c", signal=11)}, None)


def test_vcont_actions(client: Client, target: FakeTarget) -> None:
    client.send(b"vCont;s:1;c")
    assert target.calls[-1] == ("resume", {1: ResumeAction("s")}, ResumeAction("c"))
    client.stop(StopEvent(1, 5))
    client.send(b"vCont;s:0002")
    assert target.calls[-1] == ("resume", {2: ResumeAction("s")}, None)
    client.stop(StopEvent(2, 5))
    client.send(b"vCont;c;s:1")  # the default matches thread 1 first
    assert target.calls[-1] == ("resume", {}, ResumeAction("c"))
    client.stop(StopEvent(2, 5))
    assert client.ask(b"vCont;r1000,1010:1") == b"E01"  # range_step not offered
    assert client.ask(b"vCont;x") == b"E01"


def test_breakpoints(client: Client, target: FakeTarget) -> None:
    assert client.ask(b"Z0,1000,1") == b"OK"
    assert client.ask(b"Z2,1004,4") == b"OK"
    assert target.breakpoints == {(0, 0x1000, 1), (2, 0x1004, 4)}
    assert client.ask(b"z0,1000,1") == b"OK"
    assert client.ask(b"z0,1000,1") == b"E01"
    assert client.ask(b"Z4,1000,1") == b""  # NotSupported
    target.caps = frozenset()
    assert Client(target).ask(b"Z0,1000,1") == b""


def test_threads(client: Client) -> None:
    assert client.ask(b"qfThreadInfo") == b"m1,2"
    assert client.ask(b"qsThreadInfo") == b"l"
    assert client.ask(b"qThreadExtraInfo,2") == b"vCPU 1".hex().encode()
    assert client.ask(b"T2") == b"OK"
    assert client.ask(b"T3") == b"E01"
    assert client.ask(b"Hc-1") == b"OK"
    assert client.ask(b"Hg0") == b"OK"


def test_xfer_chunks(client: Client) -> None:
    first = client.ask(b"qXfer:features:read:target.xml:0,10")
    assert first == b"m" + TARGET_XML[:0x10]
    rest = client.ask(b"qXfer:features:read:target.xml:10,ffff")
    assert rest == b"l" + TARGET_XML[0x10:]
    assert client.ask(b"qXfer:features:read:nope.xml:0,10") == b"E00"


def test_monitor(client: Client, target: FakeTarget) -> None:
    replies = client.send(b"qRcmd," + b"info".hex().encode())
    assert replies == [b"O" + b"hello\n".hex().encode(), b"OK"]
    assert target.calls[-1] == ("monitor", "info")
    target.monitor_output = ""
    assert client.send(b"qRcmd," + b"x".hex().encode()) == [b"OK"]
    assert client.ask(b"qRcmd," + b"fail".hex().encode()) == b"E02"


def test_misc_queries(client: Client, target: FakeTarget) -> None:
    assert client.ask(b"qSymbol::") == b"OK"
    assert client.ask(b"qOffsets") == b""
    assert client.ask(b"qTStatus") == b""
    assert client.ask(b"Qqemu.PhyMemMode:1") == b"OK"
    assert target.physical
    assert client.ask(b"qqemu.PhyMemMode") == b"1"


def test_qemu_single_step_flags(client: Client, target: FakeTarget) -> None:
    """QEMU's sstep packets: gdb's ``maintenance packet Qqemu.sstep=N`` works as with QEMU."""
    assert b"sstep" in client.ask(b"qqemu.Supported").split(b";")
    assert client.ask(b"qqemu.sstepbits") == b"ENABLE=1,NOIRQ=2,NOTIMER=4"
    assert client.ask(b"qqemu.sstep") == b"7"
    assert client.ask(b"Qqemu.sstep=1") == b"OK"
    assert target.sstep == 1
    assert client.ask(b"qqemu.sstep") == b"1"
    assert client.ask(b"Qqemu.sstep=10") == b"E22"
    assert client.ask(b"Qqemu.sstep=zz").startswith(b"E")


def test_lldb_extensions(client: Client, target: FakeTarget) -> None:
    assert client.ask(b"QThreadSuffixSupported") == b"OK"
    assert client.ask(b"QListThreadsInStopReply") == b"OK"
    host = dict(f.split(b":", 1) for f in client.ask(b"qHostInfo").split(b";") if f)
    assert bytes.fromhex(host[b"triple"].decode()) == b"x86_64-unknown-none"
    assert host[b"ptrsize"] == b"8" and host[b"endian"] == b"little"
    assert bytes.fromhex(host[b"hostname"].decode()) == b"fake"
    proc = client.ask(b"qProcessInfo")
    assert proc.startswith(b"pid:1;") and b"triple:" in proc and b"hostname" not in proc
    assert client.ask(b"qGDBServerVersion").startswith(b"name:gdbstub;")
    assert client.ask(b"QEnableErrorStrings") == b"OK"
    assert client.ask(b"qMemoryRegionInfo:1000") == b""  # the fake has no page tables
    assert client.ask(b"jThreadsInfo").startswith(b'[{"tid":1,')  # tests/test_lldb_native*
    client.send(b"vCont;s:0001")
    reply = client.stop(StopEvent(1, 5, lldb_reason="trace"))[0]
    assert b"threads:1,2;" in reply and b"thread-pcs:1001,1002;" in reply
    assert reply.endswith(b"reason:trace;")
    assert client.ask(b"qThreadStopInfo1") == reply
    assert client.ask(b"qThreadStopInfo2").startswith(b"T00thread:2;")


def test_detach(client: Client, target: FakeTarget) -> None:
    client.ask(b"Z0,1000,1")
    assert client.send(b"D") == [b"OK"]
    assert client.others == [CloseConnection()]
    assert target.calls[-1] == ("detach",)
    assert client.session.state is SessionState.DETACHED
    assert client.send(b"g") == []  # finished: nothing more


def test_kill(client: Client, target: FakeTarget) -> None:
    assert client.send(b"k") == [b"X09"]  # lldb waits for it; gdb ignores it
    assert client.others == [Shutdown()]
    assert target.calls[-1] == ("kill",)
    assert client.session.state is SessionState.KILLED


def test_target_crash_becomes_error_reply(client: Client, target: FakeTarget) -> None:
    def boom(tid: int) -> bytes:
        raise RuntimeError("bug")

    target.read_registers = boom  # type: ignore[method-assign]
    assert client.ask(b"g") == b"E79"


@settings(max_examples=300)
@given(st.binary(max_size=60))
def test_random_packets_never_raise(payload: bytes) -> None:
    target = FakeTarget()
    try:
        client = Client(target)
        client.send(payload)
        client.raw(rsp.encode(payload))
        client.raw(payload)
    finally:
        target.close()


@settings(max_examples=200)
@given(
    st.sampled_from(
        [
            b"g",
            b"p",
            b"P",
            b"m",
            b"M",
            b"X",
            b"c",
            b"C",
            b"s",
            b"S",
            b"Z0",
            b"z1",
            b"H",
            b"T",
            b"vCont;",
            b"qXfer:features:read:",
            b"qRcmd,",
            b"D",
            b"G",
            b"qThreadExtraInfo,",
            b"qThreadStopInfo",
            b"Qqemu.PhyMemMode:",
        ]
    ),
    st.binary(max_size=30),
)
def test_random_arguments_get_replies(prefix: bytes, args: bytes) -> None:
    target = FakeTarget()
    try:
        client = Client(target)
        replies = client.send(prefix + args)
        # Either an answer, or the guest was resumed / the session ended (no reply owed now).
        assert len(replies) <= (2 if prefix == b"qRcmd," else 1)  # monitor output + OK
        if not replies:
            assert client.session.state is not SessionState.IDLE
    finally:
        target.close()
