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

from layerfs.errors import InvalidInput
from layerfs.store import manifest as mf
from layerfs.store import streams
from layerfs.store.manifest import Entry
from layerfs.store.objects import IN_MEMORY_MAX, ObjectStore, StoredObject
from layerfs.store.streams import ChunkStream, Limited, Meter, UnpackLimits

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
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


def decompressed(f: BinaryIO, limits: UnpackLimits | None = None) -> BinaryIO:
    """The tar bytes of a plain, gzip, bzip2, xz or zstd stream, within the
    unpack limits; ``read(n)`` returns *n* bytes unless the data ends."""
    return io.BufferedReader(streams.unpack(f, limits).stream, streams.CHUNK)


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


class _TarState:
    """The attributes of a TarFile that ``TarInfo.fromtarfile`` uses."""

    def __init__(self, fileobj: ChunkStream) -> None:
        self.fileobj = fileobj
        self.encoding, self.errors = "utf-8", "surrogateescape"
        self.pax_headers: dict[str, str] = {}
        self.offset = 0


STORE_WINDOW = 64 << 20        # bytes of file contents being stored at once
STORE_WORKERS = min(4, os.cpu_count() or 1)


class TarReader:
    """Collects the entries of one tar stream, storing file contents.

    The stream is decompressed and read ahead in one thread, parsed in the
    caller's, and file contents are hashed, compressed and written by
    worker threads (blake3, zstd and file I/O release the GIL), at most
    STORE_WINDOW bytes at a time; entries get their digests once every
    store finished. ``known`` is called from those workers.

    *limits* bound how far the archive may expand (default: from the
    environment, see :class:`~layerfs.store.streams.UnpackLimits`); the
    holes of sparse members count, as they cost hashing like data."""

    def __init__(self, objects: ObjectStore, known: Callable[[str], bool], workers: int | None = None,
                 limits: UnpackLimits | None = None) -> None:
        self.objects, self.known = objects, known
        self.limits = limits
        self._meter: Meter | None = None
        self.entries: dict[str, Entry] = {}
        self.groups: dict[str, list[str]] = {}
        self.fresh: list[StoredObject] = []
        self.opaque: set[str] = set()
        self.workers = workers if workers is not None else STORE_WORKERS
        self._pending: list = []        # (entry placeholder, future or StoredObject, size)
        self._inflight: list = []       # futures not yet known to be done, oldest first
        self._inflight_bytes = 0
        self._pool = None

    def read(self, f: BinaryIO, as_listed: bool = False) -> list[Entry]:
        """The layer's entries; with *as_listed*, the members as the archive
        lists them instead (no parent dirs made up, hardlinks naming their
        holder, whiteouts as read, opaque markers in :attr:`opaque`) for a
        caller that places them itself (the builder's ADD)."""
        unpacked = streams.unpack(f, self.limits)
        self._meter = unpacked.meter
        prefetch = streams.Prefetch(unpacked.stream, "layerfs-tar-read")
        stream = ChunkStream(prefetch)
        state = _TarState(stream)
        if self.workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="layerfs-store")
        try:
            try:
                self._parse(stream, state)
                total = stream.drain()
            except (tarfile.TarError, EOFError) as exc:
                raise InvalidInput(f"malformed tar archive: {exc}") from None
            except OSError as exc:
                raise InvalidInput(f"malformed tar archive: {exc}") from None
            rest = total - state.offset
            if rest < 1024 or total % 512:
                raise InvalidInput("tar archive is truncated (no end-of-archive marker)")
            self._collect()
        finally:
            prefetch.close()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        return list(self.entries.values()) if as_listed else self._finish()

    def _parse(self, stream: ChunkStream, state: _TarState) -> None:
        first = True
        while True:
            gap = state.offset - stream.tell()
            if gap > 0 and stream.skip(gap) != gap:
                raise InvalidInput("malformed tar archive: unexpected end of data")
            try:
                m = tarfile.TarInfo.fromtarfile(state)
            except tarfile.EOFHeaderError:
                # The end marker is two zero blocks; tar(1) reading stops at
                # the first, but a stream cut right after it is truncated.
                if stream.read(512) != bytes(512):
                    raise InvalidInput("tar archive is truncated (no end-of-archive marker)")
                return
            except tarfile.EmptyHeaderError:
                if first:
                    raise InvalidInput("not a readable tar archive: empty file") from None
                raise InvalidInput("tar archive is truncated (no end-of-archive marker)") from None
            except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
                if first:
                    raise InvalidInput(f"not a readable tar archive: {exc}") from None
                raise InvalidInput("tar archive is truncated (no end-of-archive marker)") from None
            except tarfile.SubsequentHeaderError as exc:
                what = "not a readable tar archive" if first else "malformed tar archive"
                raise InvalidInput(f"{what}: {exc}") from None
            except ValueError as exc:
                # tarfile's GNU sparse map parsers call int() on header text.
                raise InvalidInput(f"malformed tar header: {exc}") from None
            first = False
            if m.size < 0:
                raise InvalidInput(f"malformed tar header: negative size for {m.name!r}")
            self._member(stream, state, m)

    def _member(self, stream: ChunkStream, state: _TarState, m: tarfile.TarInfo) -> None:
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
            e = Entry(path, mf.FILE, size=m.size, **meta)
            self._put(e)
            self._store(e, stream, state, m)
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
        mf.check_path(e.path)
        if e.kind == mf.SYMLINK:
            mf.check_link_target(e.path, e.target)
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

    def _data(self, stream: ChunkStream, state: _TarState, m: tarfile.TarInfo) -> BinaryIO:
        if m.sparse is not None:
            segments = _sparse_segments(m, state.offset - m.offset_data)
            return _SparseData(stream, segments, m.size, self._meter)
        return Limited(stream, m.size)

    def _store(self, e: Entry, stream: ChunkStream, state: _TarState, m: tarfile.TarInfo) -> None:
        size = m.size
        if size <= IN_MEMORY_MAX:
            data = stream.read(size) if m.sparse is None else self._data(stream, state, m).read(size)
            if len(data) != size:
                raise InvalidInput("tar archive is truncated")
            if self._pool is None:
                self._pending.append((e, self._store_bytes(data)))
                return
            fut = self._pool.submit(self._store_bytes, data)
            self._pending.append((e, fut))
            self._inflight.append((fut, size))
            self._inflight_bytes += size
            while self._inflight_bytes > STORE_WINDOW and self._inflight:
                done, n = self._inflight.pop(0)
                done.result()
                self._inflight_bytes -= n
        else:
            obj = self.objects._put_stream(self._data(stream, state, m), self.known)
            if obj.size != size:
                raise InvalidInput("tar archive is truncated")
            self._pending.append((e, obj))

    def _store_bytes(self, data: bytes) -> StoredObject:
        from blake3 import blake3

        digest = blake3(data).hexdigest()
        if self.known(digest):
            return StoredObject(digest, len(data), -1, False)
        return self.objects.put_bytes(data, digest)

    def _collect(self) -> None:
        """Wait for every store; give the entries their digests."""
        from dataclasses import replace

        for e, res in self._pending:
            obj = res if isinstance(res, StoredObject) else res.result()
            if obj.stored_size >= 0:
                self.fresh.append(obj)
            if self.entries.get(e.path) is e:
                self.entries[e.path] = replace(e, digest=obj.digest)
        self._pending.clear()
        self._inflight.clear()
        self._inflight_bytes = 0

    def _finish(self) -> list[Entry]:
        from dataclasses import replace

        entries = self.entries
        for path in self.opaque:
            e = entries.get(path) or Entry(path, mf.DIR, 0o755)
            entries[path] = replace(e, opaque=True)
        # Every path's parent must be a dir. Walking up stops at the first
        # dir already there (its own parents are seen to when it is
        # visited), so a deep tree costs its size, not depth cubed.
        for path in list(entries):
            for anc in mf.missing_dirs(path, lambda p: p in entries and entries[p].kind == mf.DIR):
                entries[anc] = Entry(anc, mf.DIR, 0o755)
        # Members whose link holder was later replaced lose the link.
        groups = {h: [p for p in ps if entries.get(p, Entry(p, mf.FILE)).kind == mf.HARDLINK]
                  for h, ps in self.groups.items() if entries.get(h) and entries[h].kind == mf.FILE}
        return mf.canonical_links(list(entries.values()), {h: ps for h, ps in groups.items() if ps})


def _sparse_segments(m: tarfile.TarInfo, room: int) -> list[tuple[int, int]]:
    """The data segments (offset, length) of a sparse member, checked:
    in order, not overlapping, inside the file, within the member's data."""
    segments = []
    end = 0
    for offset, length in m.sparse:
        if offset < 0 or length < 0:
            raise InvalidInput(f"bad sparse map for {m.name!r}: negative offset or length")
        if not length:
            continue   # GNU tar ends a map with (size, 0)
        if offset < end or offset + length > m.size:
            raise InvalidInput(f"bad sparse map for {m.name!r}: segments overlap or pass the file's end")
        segments.append((offset, length))
        end = offset + length
    if sum(n for _, n in segments) > room:
        raise InvalidInput(f"bad sparse map for {m.name!r}: it names more data than the member holds")
    return segments


class _SparseData:
    """The content of a sparse member: its data segments, read in order
    from the archive, with zeros in between (which the object store keeps
    as holes). Holes count against the unpack limits."""

    def __init__(self, stream: ChunkStream, segments: list[tuple[int, int]], size: int,
                 meter: Meter | None) -> None:
        self.stream, self.segments, self.size, self.meter = stream, segments, size, meter
        self.pos = 0
        self.i = 0           # next segment not yet wholly read

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.pos
        n = left if n is None or n < 0 else min(n, left)
        parts = []
        while n > 0:
            if self.i < len(self.segments) and self.pos >= self.segments[self.i][0]:
                offset, length = self.segments[self.i]
                take = min(n, offset + length - self.pos)
                data = self.stream.read(take)
                if len(data) != take:
                    raise InvalidInput("tar archive is truncated")
                if self.pos + take == offset + length:
                    self.i += 1
            else:
                hole_end = self.segments[self.i][0] if self.i < len(self.segments) else self.size
                take = min(n, hole_end - self.pos)
                if self.meter is not None:
                    self.meter.expand(take)
                data = bytes(take)
            parts.append(data)
            self.pos += take
            n -= take
        return b"".join(parts)


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


def with_link_metadata(entries: list[Entry]) -> list[Entry]:
    """Hardlink entries carrying their file's mode, owner, times and xattrs.

    A manifest's hardlink entry holds only its target; the metadata is the
    shared inode's. docker, buildah and containerd apply a link header's
    mode, owner, times and xattrs to that shared inode, so a link header
    must repeat the file's (as docker's tar writer does, which stats the
    inode for every name) or it resets the file to 0644 and mtime 0."""
    files = {e.path: e for e in entries if e.kind == mf.FILE}
    out = []
    for e in entries:
        f = files.get(e.target) if e.kind == mf.HARDLINK else None
        if f is not None:
            e = Entry(e.path, mf.HARDLINK, f.mode, f.uid, f.gid, f.mtime_ns, target=e.target, xattrs=f.xattrs)
        out.append(e)
    return out


def _plain(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime, ti.uname, ti.gname = 0o644, 0, "", ""
    return ti


PREFETCH_BYTES = 64 << 20     # file contents read ahead of the tar writer
PREFETCH_MAX = 16 << 20       # bigger files are streamed when their turn comes
_NUL = bytes(tarfile.RECORDSIZE)


def _read_whole(open_object: ObjectOpener, digest: str, size: int) -> bytes:
    with open_object(digest) as f:
        data = f.read(size)
    if len(data) != size:
        raise OSError("unexpected end of data")
    return data


def write_tar(entries: Iterable[Entry], out: BinaryIO, open_object: ObjectOpener, layer: bool = True) -> None:
    """Write *entries* (sorted) as a PAX tar to *out*.

    The root is written as ``./`` (as ``tar -C dir .`` does) so its
    metadata survives a round trip and a layer's id with it.

    The bytes are exactly what ``tarfile.open(mode="w|", format=PAX)`` +
    ``addfile`` write (headers come from ``TarInfo.tobuf``), but file
    contents are read ahead by a few threads (object reads are disk I/O
    and zstd, both GIL-free) and output goes out in 1 MiB writes."""
    from concurrent.futures import ThreadPoolExecutor

    ordered = with_link_metadata(sorted(entries, key=lambda x: mf.sort_key(x.path)))
    items = [(e, ti) for e in ordered for ti in tarinfo_for(e, layer)]
    buf = bytearray()
    offset = 0

    def emit(data) -> None:
        nonlocal offset
        buf.extend(data)
        offset += len(data)
        if len(buf) >= (1 << 20):
            out.write(bytes(buf))
            buf.clear()

    with ThreadPoolExecutor(4, thread_name_prefix="layerfs-tar-write") as pool:
        futures: dict[int, object] = {}
        ahead = 0          # next item index to consider for prefetch
        ahead_bytes = 0

        def prefetch(upto: int) -> None:
            nonlocal ahead, ahead_bytes
            while ahead < len(items) and (ahead <= upto or ahead_bytes < PREFETCH_BYTES):
                e, ti = items[ahead]
                if ti.type == tarfile.REGTYPE and 0 < ti.size <= PREFETCH_MAX:
                    futures[ahead] = pool.submit(_read_whole, open_object, e.digest, ti.size)
                    ahead_bytes += ti.size
                ahead += 1

        try:
            for i, (e, ti) in enumerate(items):
                prefetch(i)
                emit(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
                if ti.type != tarfile.REGTYPE or not ti.size:
                    continue
                fut = futures.pop(i, None)
                if fut is not None:
                    data = fut.result()
                    ahead_bytes -= ti.size
                    emit(data)
                    del data
                else:
                    left = ti.size
                    with open_object(e.digest) as f:
                        while left:
                            chunk = f.read(min(left, 1 << 20))
                            if not chunk:
                                raise OSError("unexpected end of data")
                            emit(chunk)
                            left -= len(chunk)
                pad = -ti.size % tarfile.BLOCKSIZE
                if pad:
                    emit(_NUL[:pad])
        finally:
            for fut in futures.values():
                fut.cancel()
    # End of archive: two zero blocks, then zeros up to a full record,
    # as TarFile.close() writes them.
    emit(_NUL[:2 * tarfile.BLOCKSIZE])
    rest = offset % tarfile.RECORDSIZE
    if rest:
        emit(_NUL[:tarfile.RECORDSIZE - rest])
    if buf:
        out.write(bytes(buf))


def is_tar_file(path: str) -> bool:
    """Cheap sniff: a regular file that looks like (compressed) tar."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return False
    with open(path, "rb") as f:
        head = f.read(512)
    if streams.sniff(head) != streams.NONE:
        return True
    return len(head) == 512 and head[257:262] == b"ustar"
