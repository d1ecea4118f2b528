"""A real Linux kernel and a busybox initramfs for the tests, from Debian 12 packages in a cache.

Theory of operation
===================

The cache is ``$GDBSTUB_CACHE`` or ``~/.cache/gdbstub``; Debian packages live in its
``debian/`` subdirectory as ``apt-get download`` leaves them (``linux-image-*.deb``,
``busybox-static_*.deb``).  When a package is missing and ``apt-get`` works here, it is
downloaded into the cache once (for the kernel: the versioned package ``linux-image-amd64``
depends on); otherwise the helpers answer None and the tests skip.

* :func:`cached_debian_kernel` returns the bzImage ``/boot/vmlinuz-*`` of the cached kernel
  package.  It is read from ``dpkg-deb --fsys-tarfile`` as a stream (``/boot`` comes first in
  the archive, so this takes a fraction of a second instead of unpacking 400 MB of modules) and
  kept next to the package in ``debian/<package file name>/``.
* :func:`extract_vmlinux` writes the ELF ``vmlinux`` inside a bzImage (which carries the Xen
  PVH entry note), decompressed by ``gdbstub.machine.boot.payload``.
* :func:`busybox_initramfs` writes a newc cpio archive with a static busybox as
  ``/bin/busybox``, symlinks for ``sh`` and common applets, ``/dev/console`` and an ``/init``
  script that mounts proc, sysfs and devtmpfs, prints :data:`INIT_MARKER`, and runs
  ``setsid cttyhack sh`` (or plain ``sh``) on the console.

Every file is written to a temporary name and renamed, so parallel test runs never see half a
file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from gdbstub.machine.boot.common import BootError
from gdbstub.machine.boot.payload import vmlinux_of_bzimage

INIT_MARKER = "gdbstub-initramfs: init is running"
# busybox ash's prompt as the console shows it: it may ask for the cursor position right after
SHELL_PROMPT = r"[#$] (\x1b\[6n)?$"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

APPLETS = (
    "sh", "ash", "cat", "chmod", "cp", "cttyhack", "date", "dd", "df", "dmesg", "echo",
    "env", "false", "free", "grep", "halt", "head", "hostname", "kill", "ln", "ls", "mkdir",
    "mknod", "mount", "mv", "poweroff", "ps", "reboot", "rm", "sed", "setsid", "sleep",
    "sync", "tail", "top", "true", "umount", "uname", "vi",
)  # fmt: skip
DIRECTORIES = ("bin", "dev", "etc", "proc", "root", "sbin", "sys", "tmp", "usr", "usr/bin")

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/sbin:/usr/bin
echo "{INIT_MARKER}"
if command -v setsid >/dev/null && command -v cttyhack >/dev/null; then
    exec setsid cttyhack sh
fi
exec sh
"""


def cache_dir() -> Path:
    """The Debian package cache: ``$GDBSTUB_CACHE/debian`` or ``~/.cache/gdbstub/debian``."""
    root = os.environ.get("GDBSTUB_CACHE") or str(Path.home() / ".cache" / "gdbstub")
    return Path(root) / "debian"


def _tmp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def write_atomically(out: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``out`` through a temporary file, so a reader never sees half of it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(out)
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(out)
    return out


def _apt_download(package: str, dest: Path) -> bool:
    """``apt-get download package`` into ``dest``; False when apt is missing or fails."""
    if shutil.which("apt-get") is None:
        return False
    dest.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["apt-get", "download", package], cwd=dest, capture_output=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _kernel_package() -> str | None:
    """The versioned kernel package ``linux-image-amd64`` depends on (apt-cache's answer)."""
    if shutil.which("apt-cache") is None:
        return None
    try:
        proc = subprocess.run(
            ["apt-cache", "depends", KERNEL_META_PACKAGE],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in proc.stdout.splitlines():
        kind, _, name = line.strip().partition(": ")
        if kind == "Depends" and name.startswith("linux-image-") and name != KERNEL_META_PACKAGE:
            return name
    return None


def _cached_deb(pattern: str, package: Callable[[], str | None], download: bool) -> Path | None:
    """The newest cached ``.deb`` matching ``pattern``; downloads ``package()`` if none."""

    def found() -> list[Path]:
        return [
            p
            for p in cache_dir().glob(pattern)
            if not p.name.startswith(".") and not p.name.startswith(f"{KERNEL_META_PACKAGE}_")
        ]

    debs = found()
    if not debs and download:
        name = package()
        if name is not None and _apt_download(name, cache_dir()):
            debs = found()
    return max(debs, key=lambda p: p.stat().st_mtime) if debs else None


def _member_from_deb(deb: Path, wanted: str) -> tuple[str, bytes] | None:
    """(name, bytes) of the first file of the package whose path starts with ``wanted``."""
    if shutil.which("dpkg-deb") is None:
        return None
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isfile() and name.startswith(wanted):
                    f = tar.extractfile(member)
                    if f is not None:
                        return name, f.read()
    except tarfile.TarError:
        return None
    finally:
        proc.kill()  # the rest of the archive is not needed
        proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    return None


def cached_debian_kernel(download: bool = True) -> Path | None:
    """The Debian bzImage (``/boot/vmlinuz-*``) from the cache; None when there is none."""
    deb = _cached_deb("linux-image-*.deb", _kernel_package, download)
    if deb is None:
        return None
    out_dir = cache_dir() / deb.stem
    existing = sorted(out_dir.glob("vmlinuz-*"))
    if existing:
        return existing[0]
    member = _member_from_deb(deb, "boot/vmlinuz-")
    if member is None:
        return None
    name, data = member
    return write_atomically(out_dir / Path(name).name, data)


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """Decompress the payload of ``bzimage`` into the ELF file ``out`` (the kernel's vmlinux)."""
    try:
        elf = vmlinux_of_bzimage(bzimage.read_bytes())
    except BootError as exc:
        raise RuntimeError(f"{bzimage}: {exc}") from exc
    return write_atomically(out, elf)


def cached_busybox(download: bool = True) -> bytes | None:
    """The static busybox binary from the cached ``busybox-static`` package, None without it."""
    deb = _cached_deb("busybox-static_*.deb", lambda: BUSYBOX_PACKAGE, download)
    if deb is None:
        return None
    member = _member_from_deb(deb, "bin/busybox")
    return member[1] if member else None


# ---- newc cpio ------------------------------------------------------------------------------

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000


def _pad4(n: int) -> bytes:
    return bytes(-n % 4)


def cpio_entry(
    ino: int, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    """One newc ("070701") entry: header, NUL-terminated name and data, each 4-byte padded."""
    raw_name = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == S_IFDIR else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out = header + raw_name + _pad4(len(header) + len(raw_name)) + data + _pad4(len(data))
    return out


def newc_archive(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc archive of (name, mode, data, (rdev major, minor)), with its TRAILER!!!."""
    parts = [cpio_entry(i + 1, n, m, d, rdev=r) for i, (n, m, d, r) in enumerate(entries)]
    parts.append(cpio_entry(0, "TRAILER!!!", 0))
    return b"".join(parts)


def busybox_initramfs(out: Path, busybox: bytes | None = None) -> Path:
    """Write a busybox initramfs (newc cpio, uncompressed) to ``out``; return ``out``.

    ``busybox`` defaults to :func:`cached_busybox`; a RuntimeError when there is none.
    """
    if busybox is None:
        busybox = cached_busybox()
    if busybox is None:
        raise RuntimeError(f"no {BUSYBOX_PACKAGE} package in {cache_dir()} and none to download")
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (d, S_IFDIR | 0o755, b"", (0, 0)) for d in DIRECTORIES
    ]
    entries.append(("dev/console", S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("bin/busybox", S_IFREG | 0o755, busybox, (0, 0)))
    entries += [(f"bin/{a}", S_IFLNK | 0o777, b"busybox", (0, 0)) for a in APPLETS]
    entries.append(("init", S_IFREG | 0o755, INIT_SCRIPT.encode(), (0, 0)))
    return write_atomically(out, newc_archive(entries))
