"""The register layout derived from gdbstub/xml: numbering, g packet layout, served XML."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdbstub import regs

XML = regs.XML_DIR


def _xml_registers(with_avx: bool) -> list[tuple[str, int, int]]:
    """(name, regnum, bitsize) straight from the files, independently of gdbstub.regs."""
    target = ET.fromstring(regs.target_xml(with_avx))
    out: list[tuple[str, int, int]] = []
    for inc in target.iter("{http://www.w3.org/2001/XInclude}include"):
        feature = ET.parse(XML / inc.attrib["href"]).getroot()
        for reg in feature.iter("reg"):
            out.append((reg.attrib["name"], int(reg.attrib["regnum"]), int(reg.attrib["bitsize"])))
    return out


@pytest.mark.parametrize("with_avx", [True, False])
def test_layout_matches_xml(with_avx: bool) -> None:
    layout = [(r.name, r.regnum, r.bitsize) for r in regs.g_layout(with_avx)]
    assert layout == _xml_registers(with_avx)


def test_gdb_standard_numbering() -> None:
    expect = {
        "rax": 0, "rbx": 1, "rcx": 2, "rdx": 3, "rsi": 4, "rdi": 5, "rbp": 6, "rsp": 7,
        "r8": 8, "r15": 15, "rip": 16, "eflags": 17, "cs": 18, "ss": 19, "ds": 20, "es": 21,
        "fs": 22, "gs": 23, "st0": 24, "st7": 31, "fctrl": 32, "fstat": 33, "ftag": 34,
        "fiseg": 35, "fioff": 36, "foseg": 37, "fooff": 38, "fop": 39, "xmm0": 40,
        "xmm15": 55, "mxcsr": 56, "fs_base": 57, "gs_base": 58, "k_gs_base": 59, "cr0": 60,
        "cr2": 61, "cr3": 62, "cr4": 63, "cr8": 64, "efer": 65, "dr0": 66, "dr3": 69,
        "dr6": 70, "dr7": 71, "ymm0h": 72, "ymm15h": 87,
    }  # fmt: skip
    for name, num in expect.items():
        assert regs.by_name[name].regnum == num, name
        assert regs.by_num[num].name == name
    assert regs.PC_REGNUM == 16
    assert regs.EXPEDITED_REGNUMS == (6, 7, 16)
    assert regs.by_name["st0"].bitsize == 80
    assert regs.by_name["xmm3"].bitsize == 128
    assert regs.by_name["ymm3h"].bitsize == 128
    assert regs.by_name["eflags"].bitsize == 32
    assert regs.by_name["cs"].bitsize == 32
    assert regs.by_name["cr3"].bitsize == 64


def test_every_register_fully_described_for_lldb() -> None:
    for annex in regs.xml_annexes()[1:]:
        for reg in ET.parse(XML / annex).getroot().iter("reg"):
            for attr in ("name", "bitsize", "type", "regnum", "group"):
                assert attr in reg.attrib, (annex, reg.attrib.get("name"), attr)
    generic = {
        reg.attrib["name"]: reg.attrib.get("generic")
        for reg in ET.parse(XML / "64bit-core.xml").getroot().iter("reg")
    }
    assert (generic["rip"], generic["rsp"], generic["rbp"]) == ("pc", "sp", "fp")


def test_g_size_fixed_and_avx_is_a_suffix() -> None:
    assert regs.g_size(True) == 912
    assert regs.g_size(False) == 656
    no_avx = regs.g_layout(False)
    assert regs.g_layout(True)[: len(no_avx)] == no_avx
    offset = 0
    for reg in regs.g_layout(True):
        assert reg.offset == offset
        offset += reg.size
    assert all(r.feature != regs.AVX_FEATURE for r in no_avx)
    assert len(regs.encode_g({}, True)) == 912
    assert len(regs.encode_g({"rax": 1, "ymm0h": 5}, False)) == 656


def _values(with_avx: bool) -> st.SearchStrategy[dict[str, int]]:
    return st.fixed_dictionaries({r.name: st.integers(0, r.mask) for r in regs.g_layout(with_avx)})


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans().flatmap(lambda avx: st.tuples(st.just(avx), _values(avx))))
def test_g_round_trip(case: tuple[bool, dict[str, int]]) -> None:
    with_avx, values = case
    blob = regs.encode_g(values, with_avx)
    assert len(blob) == regs.g_size(with_avx)
    assert regs.decode_g(blob, with_avx) == values


@given(
    st.sampled_from(regs.REGISTERS).flatmap(lambda r: st.tuples(st.just(r), st.integers(0, r.mask)))
)
def test_register_round_trip(case: tuple[regs.RegDef, int]) -> None:
    reg, value = case
    data = regs.encode_register(reg.name, value)
    assert len(data) == reg.size
    assert regs.decode_register(reg.name, data) == value
    blob = regs.encode_g({reg.name: value}, True)
    assert blob[reg.offset : reg.offset + reg.size] == data


def test_encoding_details() -> None:
    assert regs.encode_register("rip", 0x1122334455667788) == bytes.fromhex("8877665544332211")
    assert regs.encode_register("eflags", 0x202) == b"\x02\x02\x00\x00"
    assert regs.encode_register("rax", -1) == b"\xff" * 8
    with pytest.raises(ValueError):
        regs.decode_register("rax", b"\x00" * 4)
    with pytest.raises(ValueError):
        regs.decode_g(b"\x00" * 655, False)
    blob = regs.encode_g({"rsp": 0x8000, "cs": 0x10, "not_a_register": 1}, False)
    assert blob[56:64] == (0x8000).to_bytes(8, "little")
    assert blob[140:144] == b"\x10\x00\x00\x00"


@pytest.mark.parametrize("with_avx", [True, False])
@pytest.mark.parametrize("flat", [True, False])
def test_target_xml_parses(with_avx: bool, flat: bool) -> None:
    root = ET.fromstring(regs.target_xml(with_avx, flat=flat))
    assert root.tag == "target"
    assert root.findtext("architecture") == "i386:x86-64"
    includes = [i.attrib["href"] for i in root.iter("{http://www.w3.org/2001/XInclude}include")]
    features = [f.attrib["name"] for f in root.iter("feature")]
    if flat:
        assert includes == []
        names = features
    else:
        assert features == []
        for href in includes:
            assert (XML / href).is_file()
            assert regs.feature_xml(href) == (XML / href).read_bytes()
        names = [ET.parse(XML / h).getroot().attrib["name"] for h in includes]
    assert names[:3] == [
        "org.gnu.gdb.i386.core",
        "org.gnu.gdb.i386.sse",
        "org.gnu.gdb.i386.segments",
    ]
    assert "org.gnu.gdb.i386.system" in names
    assert (regs.AVX_FEATURE in names) == with_avx


def test_annexes() -> None:
    assert regs.xml_annexes() == (
        "target.xml",
        "64bit-core.xml",
        "64bit-sse.xml",
        "64bit-segments.xml",
        "64bit-system.xml",
        "64bit-avx.xml",
    )
    assert regs.feature_xml("target.xml") == regs.target_xml(True)
    assert regs.feature_xml("../pyproject.toml") is None
    assert regs.feature_xml("nope.xml") is None


GDB = shutil.which("gdb")

_ROW = re.compile(r"^ (\S+)\s+\d+\s+\d+\s+\d+\s+(\d+)\s+\S+\s+(\d+)\s+(\d+)\s*$")


@pytest.mark.gdb
@pytest.mark.skipif(GDB is None, reason="gdb not installed")
@pytest.mark.parametrize("with_avx", [True, False])
@pytest.mark.parametrize("flat", [True, False])
def test_gdb_accepts_description(tmp_path: Path, with_avx: bool, flat: bool) -> None:
    """gdb loads the description and lays out the g packet exactly as gdbstub.regs does."""
    (tmp_path / "target.xml").write_bytes(regs.target_xml(with_avx, flat=flat))
    for annex in regs.xml_annexes()[1:]:
        (tmp_path / annex).write_bytes(regs.feature_xml(annex) or b"")
    assert GDB is not None
    proc = subprocess.run(
        [GDB, "-nx", "-batch", "-ex", f"set tdesc filename {tmp_path / 'target.xml'}",
         "-ex", "maint print remote-registers"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        m = _ROW.match(line)
        if m:
            name, size, rnum, goff = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
            rows[name] = (rnum, goff, size)
    layout = regs.g_layout(with_avx)
    assert rows == {r.name: (r.regnum, r.offset, r.size) for r in layout}
    last = max(rows.values(), key=lambda v: v[1])
    assert last[1] + last[2] == regs.g_size(with_avx)
    # gdb recognised the AVX feature: it built the ymm pseudo registers from xmm + ymmh
    assert bool(re.search(r"^ ymm0 ", proc.stdout, re.M)) == with_avx
