"""The packet table: lookup, no shadowing, parsers, handler names."""

from __future__ import annotations

import pytest

from gdbstub import commands as c
from gdbstub.session import GdbSession
from gdbstub.target import ResumeAction

# One or more real packets per row, as gdb 13 / lldb 14 send them.
EXAMPLES: dict[bytes, list[bytes]] = {
    b"qSupported": [b"qSupported:multiprocess+;swbreak+;xmlRegisters=i386", b"qSupported"],
    b"vMustReplyEmpty": [b"vMustReplyEmpty"],
    b"QStartNoAckMode": [b"QStartNoAckMode"],
    b"?": [b"?"],
    b"g": [b"g", b"g;thread:0001;"],
    b"G": [b"G0011", b"G00;thread:1;"],
    b"p": [b"p10", b"p0;thread:0001;"],
    b"P": [b"P10=0010000000000000"],
    b"m": [b"m1000,10000", b"mfffffff000002010,8"],
    b"M": [b"M1000,2:abcd"],
    b"X": [b"X1000,0:", b"X1000,2:\x00\xff"],
    b"x": [b"x0,0"],
    b"c": [b"c", b"c1000"],
    b"C": [b"C02", b"C0b;1000"],
    b"s": [b"s", b"s2000"],
    b"S": [b"S05"],
    b"vCont?": [b"vCont?"],
    b"vCont;": [b"vCont;s:1;c", b"vCont;s:0001", b"vCont;c", b"vCont;r1000,1010:1;c"],
    b"H": [b"Hg0", b"Hc-1", b"Hg1"],
    b"T": [b"T1"],
    b"qC": [b"qC"],
    b"qfThreadInfo": [b"qfThreadInfo"],
    b"qsThreadInfo": [b"qsThreadInfo"],
    b"qThreadExtraInfo": [b"qThreadExtraInfo,1"],
    b"qAttached": [b"qAttached", b"qAttached:1"],
    b"qXfer:features:read:": [b"qXfer:features:read:target.xml:0,1000"],
    b"qSymbol": [b"qSymbol::"],
    b"qOffsets": [b"qOffsets"],
    b"qTStatus": [b"qTStatus"],
    b"qRcmd": [b"qRcmd,68656c70"],
    b"Qqemu.PhyMemMode:": [b"Qqemu.PhyMemMode:1"],
    b"qqemu.PhyMemMode": [b"qqemu.PhyMemMode"],
    b"qqemu.Supported": [b"qqemu.Supported"],
    b"Qqemu.sstep=": [b"Qqemu.sstep=5", b"Qqemu.sstep=7"],
    b"qqemu.sstepbits": [b"qqemu.sstepbits"],
    b"qqemu.sstep": [b"qqemu.sstep"],
    b"D": [b"D", b"D;1"],
    b"k": [b"k"],
    b"QThreadSuffixSupported": [b"QThreadSuffixSupported"],
    b"QListThreadsInStopReply": [b"QListThreadsInStopReply"],
    b"QEnableErrorStrings": [b"QEnableErrorStrings"],
    b"qHostInfo": [b"qHostInfo"],
    b"qProcessInfo": [b"qProcessInfo"],
    b"qGDBServerVersion": [b"qGDBServerVersion"],
    b"qThreadStopInfo": [b"qThreadStopInfo1"],
    b"qMemoryRegionInfo:": [b"qMemoryRegionInfo:1000"],
    b"jThreadsInfo": [b"jThreadsInfo"],
    b"jThreadExtendedInfo:": [b"jThreadExtendedInfo:", b'jThreadExtendedInfo:{"thread":1}'],
    b"qRegisterInfo": [b"qRegisterInfo0", b"qRegisterInfo4a"],
    b"qWatchpointSupportInfo": [b"qWatchpointSupportInfo", b"qWatchpointSupportInfo:"],
}
for _kind in range(5):
    EXAMPLES[b"Z%d" % _kind] = [b"Z%d,2000,1" % _kind]
    EXAMPLES[b"z%d" % _kind] = [b"z%d,2000,1" % _kind]


def test_prefixes_are_unique() -> None:
    prefixes = [row.prefix for row in c.COMMANDS]
    assert len(prefixes) == len(set(prefixes))


def test_every_row_has_examples() -> None:
    assert {row.prefix for row in c.COMMANDS} == set(EXAMPLES)


@pytest.mark.parametrize("row", c.COMMANDS, ids=lambda r: r.prefix.decode())
def test_no_row_shadows_another(row: c.Row) -> None:
    """Every example of a row reaches that row and parses, whatever other rows exist."""
    for packet in EXAMPLES[row.prefix]:
        found = c.lookup(packet)
        assert found is not None, packet
        assert found[0] is row, (packet, found[0].prefix)
        assert isinstance(row.parse(found[1]), c.Command)


@pytest.mark.parametrize("row", c.COMMANDS, ids=lambda r: r.prefix.decode())
def test_handler_exists(row: c.Row) -> None:
    assert callable(getattr(GdbSession, "_h_" + row.handler, None)), row.handler


def test_capabilities_are_known() -> None:
    from gdbstub.target import CAPABILITIES

    assert {row.needs for row in c.COMMANDS if row.needs} <= CAPABILITIES


def test_unknown_packets_have_no_row() -> None:
    for packet in (b"", b"vFile:open:", b"qXfer:threads:read::0,100", b"!", b"bc", b"R00"):
        assert c.lookup(packet) is None, packet


def test_bare_rows_refuse_longer_names() -> None:
    row, rest = c.lookup(b"qCRC:1000,10") or (None, b"")
    assert row is not None and row.prefix == b"qC"
    with pytest.raises(c.UnknownPacket):
        row.parse(rest)


def parse(packet: bytes) -> c.Command:
    found = c.lookup(packet)
    assert found is not None
    return found[0].parse(found[1])


def test_parse_values() -> None:
    assert parse(b"p0;thread:0001;") == c.ReadRegister(0, 1)
    assert parse(b"P10=0100") == c.WriteRegister(16, b"\x01\x00", None)
    assert parse(b"m10,20") == c.ReadMemory(0x10, 0x20)
    assert parse(b"X10,2:}]a") == c.WriteMemory(0x10, 2, b"}]a")  # decoder unescapes first
    assert parse(b"C0b;1000") == c.Continue(11, 0x1000)
    assert parse(b"s") == c.Step(None, None)
    assert parse(b"Z1,ffff800000001000,1") == c.Breakpoint(True, 1, 0xFFFF800000001000, 1)
    assert parse(b"z0,2000,1;X2,0a") == c.Breakpoint(False, 0, 0x2000, 1)
    assert parse(b"Hc-1") == c.SetThread("c", c.ALL_THREADS)
    assert parse(b"Hgp1.2") == c.SetThread("g", 2)
    assert parse(b"qXfer:features:read:64bit-sse.xml:10,20") == c.XferFeatures(
        "64bit-sse.xml", 0x10, 0x20
    )
    assert parse(b"qRcmd,6869") == c.Monitor("hi")
    assert parse(b"D;1") == c.Detach(1)
    assert parse(b"Qqemu.PhyMemMode:0") == c.SetPhysicalMode(False)


def test_parse_vcont() -> None:
    assert parse(b"vCont;s:1;c") == c.VCont(((ResumeAction("s"), 1), (ResumeAction("c"), None)))
    assert parse(b"vCont;C02:2;t:-1") == c.VCont(
        ((ResumeAction("c", signal=2), 2), (ResumeAction("t"), None))
    )
    assert parse(b"vCont;r1000,1010:1") == c.VCont(
        ((ResumeAction("r", range=(0x1000, 0x1010)), 1),)
    )


@pytest.mark.parametrize(
    "packet",
    [
        b"pzz",
        b"P1",
        b"P1=abc",
        b"m10",
        b"m10,zz",
        b"M10,2",
        b"M10,2:zz",
        b"X10",
        b"Cxx",
        b"vCont;",
        b"vCont;q",
        b"vCont;c:zz",
        b"vCont;r10",
        b"Z0",
        b"Z0,10",
        b"Hx1",
        b"Hgzz",
        b"Tzz",
        b"qXfer:features:read:target.xml",
        b"Qqemu.PhyMemMode:2",
        b"D1",
        b"G0",
        b"qRcmd,6",
        b"g1",
    ],
)
def test_malformed_packets_raise_packet_error(packet: bytes) -> None:
    with pytest.raises(c.PacketError):
        parse(packet)
