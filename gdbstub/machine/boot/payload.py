"""The ``vmlinux`` ELF inside a bzImage: its compressed payload, decompressed.

A bzImage (boot protocol 2.08+) names its payload with ``payload_offset`` and
``payload_length`` in the setup header, counted from the protected-mode kernel; the payload is
the kernel's ELF compressed by the method its magic shows (gzip, xz, LZMA and bzip2 with
Python's own modules; zstd through the ``zstandard`` module or the ``zstd`` command, lz4
through the ``lz4`` command) and ends with the uncompressed size as a 32-bit little-endian
number (gzip's own ISIZE, or the size the kernel's build appends for every other method).

The loader never needs this (the kernel decompresses itself in the guest); symbols do: a
distribution kernel's only symbol table is the ``kallsyms`` one inside that ELF.
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib

from .common import BootError
from .linux import OFF_SETUP_SECTS, OFF_VERSION, SECTOR, is_bzimage

OFF_PAYLOAD_OFFSET = 0x248
MIN_PAYLOAD_VERSION = 0x0208


def _run_filter(cmd: list[str], data: bytes) -> bytes:
    if shutil.which(cmd[0]) is None:
        raise BootError(f"{cmd[0]} is not installed: cannot decompress this kernel")
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise BootError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _zstd(data: bytes) -> bytes:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        return _run_filter(["zstd", "-dc"], data)
    result: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return result


def decompress_payload(payload: bytes) -> bytes:
    """``payload`` decompressed by its magic (a kernel payload decompresses to an ELF file)."""
    magic = payload[:6]
    body = payload[:-4]  # without the appended size
    try:
        if magic[:2] in (b"\x1f\x8b", b"\x1f\x9e"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if magic == b"\xfd7zXZ\x00":
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
        if magic[:2] == b"\x5d\x00":
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(body)
        if magic[:3] == b"BZh":
            return bz2.BZ2Decompressor().decompress(payload)
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise BootError(f"the kernel payload does not decompress: {exc}") from exc
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        return _zstd(body)
    if magic[:4] in (b"\x02\x21\x4c\x18", b"\x04\x22\x4d\x18"):
        return _run_filter(["lz4", "-dc"], body)
    if magic[:4] == b"\x7fELF":
        return payload
    raise BootError(f"unknown kernel compression (magic {magic.hex()})")


def vmlinux_of_bzimage(data: bytes) -> bytes:
    """The ELF ``vmlinux`` inside bzImage ``data``; a one-line BootError when there is none."""
    if not is_bzimage(data):
        raise BootError("not a bzImage (no HdrS)")
    (version,) = struct.unpack_from("<H", data, OFF_VERSION)
    if version < MIN_PAYLOAD_VERSION:
        raise BootError(f"boot protocol {version:#x} has no payload fields")
    start = ((data[OFF_SETUP_SECTS] or 4) + 1) * SECTOR  # the protected-mode kernel
    offset, length = struct.unpack_from("<II", data, OFF_PAYLOAD_OFFSET)
    payload = data[start + offset : start + offset + length]
    if len(payload) != length or length < 4:
        raise BootError("the bzImage's payload is truncated")
    elf = decompress_payload(payload)
    (size,) = struct.unpack("<I", payload[-4:])
    if elf[:4] != b"\x7fELF" or len(elf) & 0xFFFFFFFF != size:
        raise BootError(f"the payload did not decompress to its {size}-byte ELF")
    return elf
