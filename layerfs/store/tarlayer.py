"""Layers to and from tar streams (docker/OCI layer tars).

Reading validates at the edge: member names are normalised (``./`` and a
leading ``/`` are dropped, as GNU tar does) and ``..`` components are
rejected; hardlinks must name an earlier regular file of the same archive.
OCI whiteouts (``.wh.NAME``, ``.wh..wh..opq``) become whiteout entries and
opaque dirs. Writing is deterministic: same entries, same bytes.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import BinaryIO

import zstandard

from layerfs.errors import InvalidInput
from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry
from layerfs.store.objects import IN_MEMORY_MAX, ObjectStore, StoredObject

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_KIND_OF_TYPE = {
    tarfile.DIRTYPE: mf.DIR, tarfile.SYMTYPE: mf.SYMLINK, tarfile.CHRTYPE: mf.CHAR,
    tarfile.BLKTYPE: mf.BLOCK, tarfile.FIFOTYPE: mf.FIFO,
}

# Opens a stored object for reading (used when writing tars).
ObjectOpener = Callable[[str], BinaryIO]


def normalize_name(name: str) -> str:
    """Member name -> layer path; raises InvalidInput on escapes."""
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidInput(f"tar member escapes the layer root: {name!r}")
        parts.append(part)
    return "/".join(parts)


def decompressed(f: BinaryIO) -> BinaryIO:
    """The tar bytes of a plain, gzip, bzip2, xz or zstd stream."""
    head = f.read(6)
    rest = io.BufferedReader(_Prepend(head, f), 1 << 20)
    if head[:4] == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(rest, read_across_frames=True)
    if head[:2] == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=rest, mode="rb")
    if head[:3] == b"BZh":
        import bz2

        return bz2.BZ2File(rest)
    if head[:6] == b"\xfd7zXZ\x00":
        import lzma

        return lzma.LZMAFile(rest)
    return rest


class _Tracking(io.RawIOBase):
    """Counts the bytes of the tar stream and keeps its tail, so the reader
    can tell a complete archive (ends in zero blocks) from a truncated one,
    which tarfile's stream mode would silently accept."""

    TAIL = 64 << 10

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.total, self.tail = f, 0, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        self.total += n
        self.tail = (self.tail + data)[-self.TAIL:]
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def ended_cleanly(self, end_offset: int) -> bool:
        rest = self.total - end_offset
        if rest < 1024 or self.total % 512:
            return False
        if rest > self.TAIL:
            return True  # far more than the end marker; tar ignores trailing blocks
        block = self.tail[len(self.tail) - rest:][:1024]
        return block == bytes(1024)


def open_tar_stream(f: BinaryIO) -> tuple[tarfile.TarFile, _Tracking]:
    """A streaming TarFile over plain, gzip, bzip2, xz or zstd data."""
    tracking = _Tracking(decompressed(f))
    try:
        tf = tarfile.open(fileobj=io.BufferedReader(tracking, 1 << 20), mode="r|",
                          encoding="utf-8", errors="surrogateescape")
    except (tarfile.TarError, EOFError, OSError, zstandard.ZstdError) as exc:
        raise InvalidInput(f"not a readable tar archive: {exc}") from None
    return tf, tracking


class _Prepend(io.RawIOBase):
    def __init__(self, head: bytes, f: BinaryIO) -> None:
        self.head, self.f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


def _xattrs(member: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    out = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            out[key[len("LIBARCHIVE.xattr."):]] = base64.b64decode(value + "==")
    return tuple(sorted(out.items()))


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except ArithmeticError:
            pass
    return int(member.mtime) * 1_000_000_000


class TarReader:
    """Collects the entries of one tar stream, storing file contents."""

    def __init__(self, objects: ObjectStore, known: Callable[[str], bool]) -> None:
        self.objects, self.known = objects, known
        self.entries: dict[str, Entry] = {}
        self.groups: dict[str, list[str]] = {}
        self.fresh: list[StoredObject] = []
        self.opaque: set[str] = set()

    def read(self, f: BinaryIO) -> list[Entry]:
        tf, tracking = open_tar_stream(f)
        try:
            for member in tf:
                self._member(tf, member)
            tracking.drain()
            if not tracking.ended_cleanly(tf.offset):
                raise InvalidInput("tar archive is truncated (no end-of-archive marker)")
        except (tarfile.TarError, EOFError, zstandard.ZstdError) as exc:
            raise InvalidInput(f"malformed tar archive: {exc}") from None
        except OSError as exc:
            raise InvalidInput(f"malformed tar archive: {exc}") from None
        return self._finish()

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        path = normalize_name(m.name)
        name = path.rpartition("/")[2]
        if name == WH_OPAQUE:
            self.opaque.add(mf.parent_of(path))
            return
        if name.startswith(WH_PREFIX):
            target = f"{mf.parent_of(path)}/{name[4:]}".lstrip("/")
            self._put(Entry(target, mf.WHITEOUT))
            return
        meta = dict(mode=m.mode & 0o7777, uid=m.uid, gid=m.gid, mtime_ns=_mtime_ns(m), xattrs=_xattrs(m))
        if m.isreg():
            obj = self._store(tf.extractfile(m), m.size)
            self._put(Entry(path, mf.FILE, size=m.size, digest=obj.digest, **meta))
        elif m.islnk():
            self._link(path, normalize_name(m.linkname))
        elif m.type in _KIND_OF_TYPE:
            kind = _KIND_OF_TYPE[m.type]
            rdev = os.makedev(m.devmajor, m.devminor) if kind in (mf.CHAR, mf.BLOCK) else 0
            target = m.linkname if kind == mf.SYMLINK else ""
            self._put(Entry(path, kind, target=target, rdev=rdev, **meta))
        else:
            raise InvalidInput(f"unsupported tar member type {m.type!r}: {m.name!r}")

    def _put(self, e: Entry) -> None:
        mf.check_path(e.path) if e.path else None
        old = self.entries.get(e.path)
        if old is not None and old.kind == mf.DIR and e.kind == mf.DIR:
            # A later header for the same dir updates metadata, as tar does.
            pass
        self.entries[e.path] = e

    def _link(self, path: str, target: str) -> None:
        holder = self._holder_of(target)
        if holder is None:
            raise InvalidInput(f"hardlink {path!r} points at {target!r}, which is not an earlier file of the archive")
        if path == holder:
            return
        self.groups.setdefault(holder, []).append(path)
        self.entries[path] = Entry(path, mf.HARDLINK, target=holder)

    def _holder_of(self, target: str) -> str | None:
        e = self.entries.get(target)
        if e is None:
            return None
        if e.kind == mf.HARDLINK:
            return e.target
        return target if e.kind == mf.FILE else None

    def _store(self, f: BinaryIO | None, size: int) -> StoredObject:
        if f is None:
            raise InvalidInput("tar member has no data")
        if size <= IN_MEMORY_MAX:
            data = f.read()
            if len(data) != size:
                raise InvalidInput("tar archive is truncated")
            from blake3 import blake3

            digest = blake3(data).hexdigest()
            if self.known(digest):
                return StoredObject(digest, size, -1, False)
            obj = self.objects.put_bytes(data, digest)
        else:
            obj = self.objects._put_stream(f, self.known)
            if obj.size != size:
                raise InvalidInput("tar archive is truncated")
        if obj.stored_size >= 0:
            self.fresh.append(obj)
        return obj

    def _finish(self) -> list[Entry]:
        entries = self.entries
        for path in list(entries):
            for anc in mf.ancestors(path):
                if anc not in entries or entries[anc].kind != mf.DIR:
                    entries[anc] = Entry(anc, mf.DIR, 0o755)
        for path in self.opaque:
            e = entries.get(path) or Entry(path, mf.DIR, 0o755)
            from dataclasses import replace

            entries[path] = replace(e, opaque=True)
        # Members whose link holder was later replaced lose the link.
        groups = {h: [p for p in ps if entries.get(p, Entry(p, mf.FILE)).kind == mf.HARDLINK]
                  for h, ps in self.groups.items() if entries.get(h) and entries[h].kind == mf.FILE}
        return mf.canonical_links(list(entries.values()), {h: ps for h, ps in groups.items() if ps})


def tarinfo_for(e: Entry, layer: bool) -> list[tarfile.TarInfo]:
    """Tar headers of one entry; *layer* writes OCI whiteouts and opaque markers."""
    if e.kind == mf.WHITEOUT:
        parent, _, name = e.path.rpartition("/")
        return [_plain(f"{parent}/{WH_PREFIX}{name}".lstrip("/"))]
    name = e.path or "."
    ti = tarfile.TarInfo(name + ("/" if e.kind == mf.DIR else ""))
    ti.mode, ti.uid, ti.gid = e.mode, e.uid, e.gid
    ti.uname = ti.gname = ""
    secs, ns = divmod(e.mtime_ns, 1_000_000_000)
    ti.mtime = secs
    if ns:
        ti.pax_headers["mtime"] = f"{secs}.{ns:09d}".rstrip("0")
    for key, value in e.xattrs:
        ti.pax_headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    if e.kind == mf.FILE:
        ti.type, ti.size = tarfile.REGTYPE, e.size
    elif e.kind == mf.HARDLINK:
        ti.type, ti.linkname = tarfile.LNKTYPE, e.target
    elif e.kind == mf.DIR:
        ti.type = tarfile.DIRTYPE
    elif e.kind == mf.SYMLINK:
        ti.type, ti.linkname = tarfile.SYMTYPE, e.target
    elif e.kind in (mf.CHAR, mf.BLOCK):
        ti.type = tarfile.CHRTYPE if e.kind == mf.CHAR else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(e.rdev), os.minor(e.rdev)
    elif e.kind == mf.FIFO:
        ti.type = tarfile.FIFOTYPE
    else:
        return []  # sockets cannot be archived, as with GNU tar
    out = [ti]
    if layer and e.kind == mf.DIR and e.opaque:
        out.append(_plain(f"{e.path}/{WH_OPAQUE}".lstrip("/")))
    return out


def _plain(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime, ti.uname, ti.gname = 0o644, 0, "", ""
    return ti


def write_tar(entries: Iterable[Entry], out: BinaryIO, open_object: ObjectOpener, layer: bool = True) -> None:
    """Write *entries* (sorted) as a PAX tar to *out*.

    The root is written as ``./`` (as ``tar -C dir .`` does) so its
    metadata survives a round trip and a layer's id with it."""
    tf = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
    try:
        for e in sorted(entries, key=lambda x: mf.sort_key(x.path)):
            for ti in tarinfo_for(e, layer):
                if ti.type == tarfile.REGTYPE and ti.size:
                    with open_object(e.digest) as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
    finally:
        tf.close()


def is_tar_file(path: str) -> bool:
    """Cheap sniff: a regular file that looks like (compressed) tar."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return False
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b" or head[:4] == _ZSTD_MAGIC or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return True
    return len(head) == 512 and head[257:262] == b"ustar"
