"""lldb's packets in the session, in memory: binary reads in the client's dialect, register
info that is the target description, thread JSON, stop reasons."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fake_target import MEMORY_BASE, FakeTarget
from test_session import Client

from gdbstub import regs
from gdbstub.target import StopEvent


@pytest.fixture
def target() -> Iterator[FakeTarget]:
    t = FakeTarget()
    yield t
    t.close()


def test_binary_read_lldb_dialect(target: FakeTarget) -> None:
    client = Client(target)
    client.ask(b"qSupported:xmlRegisters=i386,arm,mips,arc;multiprocess+")
    assert client.ask(b"x0,0") == b"OK"  # lldb 14's probe
    # bytes 0x20..0x2f hold '#', '$', '*' (and 0x7d '}' further on): escaped on the wire
    assert client.ask(b"x%x,10" % (MEMORY_BASE + 0x20)) == bytes(range(0x20, 0x30))
    assert client.ask(b"x%x,4" % (MEMORY_BASE + 0x7B)) == bytes(range(0x7B, 0x7F))
    assert client.ask(b"x10,4") == b"E14"


def test_binary_read_gdb_dialect(target: FakeTarget) -> None:
    client = Client(target)
    reply = client.ask(b"qSupported:multiprocess+;swbreak+;binary-upload+")
    assert b"binary-upload+" in reply.split(b";")
    assert client.ask(b"x%x,8" % MEMORY_BASE) == b"b" + bytes(range(8))
    assert client.ask(b"x%x,0" % MEMORY_BASE) == b"b"
    assert client.ask(b"x10,4") == b"E14"
    # without the feature offered, the stub does not offer it either
    assert b"binary-upload" not in Client(target).ask(b"qSupported:swbreak+")


@pytest.mark.parametrize("avx", [False, True])
def test_register_info_is_the_target_description(target: FakeTarget, avx: bool) -> None:
    target.xml = {name: regs.xml_file(name, with_avx=avx) or b"" for name in regs.xml_annexes()}
    client = Client(target)
    layout = regs.g_layout(avx)
    for reg in layout:
        fields = dict(
            f.split(":", 1)
            for f in client.ask(b"qRegisterInfo%x" % reg.regnum).decode().split(";")
            if f
        )
        assert fields["name"] == reg.name
        assert int(fields["bitsize"]) == reg.bitsize and int(fields["offset"]) == reg.offset
        assert fields["set"] == reg.group
    assert client.ask(b"qRegisterInfo%x" % len(layout)) == b"E45"
    rip = client.ask(b"qRegisterInfo10").decode()
    assert "generic:pc;" in rip and "alt-name:pc;" in rip and "dwarf:16;" in rip
    assert "encoding:vector;format:vector-uint8;" in client.ask(b"qRegisterInfo28").decode()


def _threads_info(client: Client) -> list[dict[str, object]]:
    value = json.loads(client.ask(b"jThreadsInfo"))
    assert isinstance(value, list)
    return value


def test_threads_info_and_stop_reasons(target: FakeTarget) -> None:
    client = Client(target)
    client.ask(b"QThreadSuffixSupported")
    client.ask(b"QListThreadsInStopReply")
    client.send(b"c")
    reply = client.stop(StopEvent(1, 5, reason="swbreak", expedite=((16, bytes(8)),)))[0]
    assert reply.endswith(b"reason:breakpoint;")
    first, second = _threads_info(client)
    assert first == {
        "tid": 1,
        "name": "vCPU 0",
        "signal": 5,
        "reason": "breakpoint",
        "registers": {"16": "00" * 8},
    }
    assert second["tid"] == 2 and second["signal"] == 0 and "reason" not in second
    assert second["registers"] == {"16": (0x1002).to_bytes(8, "little").hex()}

    client.send(b"vCont;s:1")
    assert client.stop(StopEvent(1, 5))[0].endswith(b"reason:trace;")
    assert _threads_info(client)[0]["reason"] == "trace"
    client.send(b"c")
    assert b"reason" not in client.stop(StopEvent(1, 5))[0]  # a plain SIGTRAP stays a signal

    client.send(b"c")
    watch = client.stop(StopEvent(1, 5, reason="watch", address=0x104000))[0]
    assert b"watch:104000;" in watch and b"reason" not in watch  # lldb reads the watch key
    entry = _threads_info(client)[0]
    assert entry["reason"] == "watchpoint" and entry["description"] == str(0x104000)


def test_thread_extended_info_and_watchpoint_count(target: FakeTarget) -> None:
    client = Client(target)
    assert client.ask(b"jThreadExtendedInfo:") == b"OK"  # lldb's probe
    info = json.loads(client.ask(b'jThreadExtendedInfo:{"thread":2}'))
    assert info["name"] == "vCPU 1" and info["state"] == "vCPU 1"
    assert client.ask(b'jThreadExtendedInfo:{"thread":9}') == b"E01"
    assert client.ask(b"jThreadExtendedInfo:{nope").startswith(b"E")
    assert client.ask(b"qWatchpointSupportInfo:") == b"num:4;"
    supported = client.ask(b"qSupported").split(b";")
    assert b"QThreadSuffixSupported+" in supported and b"QListThreadsInStopReply+" in supported
