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
    peek = Peek(f)
    head = peek.peek(6)
    rest = io.BufferedReader(peek, 1 << 20)
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


class Peek(io.RawIOBase):
    """A stream whose first bytes can be looked at without consuming them
    (to pick a decompressor by magic number on a pipe or socket)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.head = b""

    def peek(self, n: int) -> bytes:
        while len(self.head) < n:
            more = self.f.read(n - len(self.head))
            if not more:
                break
            self.head += more
        return self.head[:n]

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


class _ChunkStream:
    """The tar bytes as one forward-only stream over a chunk source.

    ``read(n)`` returns exactly *n* bytes unless the data ends; it stands
    in for tarfile's own stream (``r|``), which reads in 10 KiB records
    and copies every byte twice more. ``tell``/``seek`` (forward only) are
    what ``TarInfo.fromtarfile`` and sparse members need."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self.next_chunk = next_chunk
        self.buf = b""
        self.pos = 0          # in buf
        self.base = 0         # stream offset of buf[0]
        self.eof = False

    def tell(self) -> int:
        return self.base + self.pos

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.next_chunk()
        if not chunk:
            self.eof = True
            return False
        self.base += len(self.buf)
        self.buf, self.pos = bytes(chunk), 0
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self.buf[self.pos:]]
            self.pos = len(self.buf)
            while self._more():
                parts.append(self.buf)
                self.pos = len(self.buf)
            return b"".join(parts)
        end = self.pos + n
        if end <= len(self.buf):
            out = self.buf[self.pos:end]
            self.pos = end
            return out
        parts = [self.buf[self.pos:]]
        need = n - len(parts[0])
        self.pos = len(self.buf)
        while need > 0 and self._more():
            take = self.buf[:need]
            parts.append(take)
            self.pos = len(take)
            need -= len(take)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Discard up to *n* bytes; returns how many were there."""
        done = 0
        while done < n:
            avail = len(self.buf) - self.pos
            if avail == 0 and not self._more():
                break
            step = min(n - done, len(self.buf) - self.pos)
            self.pos += step
            done += step
        return done

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.tell():
            raise OSError("tar stream can only seek forward")
        self.skip(pos - self.tell())
        return self.tell()

    def drain(self) -> int:
        """Read to the end; returns the total length of the stream."""
        while self._more():
            pass
        self.pos = len(self.buf)
        return self.tell()


class _Limited:
    """At most *size* bytes of a stream (a big member's data)."""

    def __init__(self, stream: _ChunkStream, size: int) -> None:
        self.stream, self.left = stream, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.left:
            n = self.left
        data = self.stream.read(n)
        self.left -= len(data)
        return data


class _TarState:
    """The attributes of a TarFile that ``TarInfo.fromtarfile`` uses."""

    def __init__(self, fileobj: _ChunkStream) -> None:
        self.fileobj = fileobj
        self.encoding, self.errors = "utf-8", "surrogateescape"
        self.pax_headers: dict[str, str] = {}
        self.offset = 0


_EOF = object()
READ_CHUNK = 1 << 20
READ_AHEAD = 8                 # chunks of decompressed tar buffered ahead
STORE_WINDOW = 64 << 20        # bytes of file contents being stored at once
STORE_WORKERS = min(4, os.cpu_count() or 1)


class _Prefetch:
    """Reads *f* in a thread of its own, READ_AHEAD chunks ahead, so that
    download, digest checks and decompression (all GIL-free in C) overlap
    with parsing the tar in the caller's thread."""

    def __init__(self, f: BinaryIO) -> None:
        import queue
        import threading

        self.f = f
        self.q: "queue.Queue" = queue.Queue(READ_AHEAD)
        self.stop = False
        self.done = False
        self.t = threading.Thread(target=self._run, name="layerfs-tar-read", daemon=True)
        self.t.start()

    def _run(self) -> None:
        try:
            while not self.stop:
                chunk = self.f.read(READ_CHUNK)
                if not chunk:
                    break
                self.q.put(chunk)
            self.q.put(_EOF)
        except BaseException as exc:  # handed to the reading thread
            self.q.put(exc)

    def __call__(self) -> bytes:
        if self.done:
            return b""
        item = self.q.get()
        if item is _EOF:
            self.done = True
            return b""
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and wait for it."""
        self.stop = True
        while self.t.is_alive():
            try:
                self.q.get(timeout=0.05)
            except Exception:
                pass
        self.t.join()


class TarReader:
    """Collects the entries of one tar stream, storing file contents.

    The stream is decompressed and read ahead in one thread, parsed in the
    caller's, and file contents are hashed, compressed and written by
    worker threads (blake3, zstd and file I/O release the GIL), at most
    STORE_WINDOW bytes at a time; entries get their digests once every
    store finished. ``known`` is called from those workers."""

    def __init__(self, objects: ObjectStore, known: Callable[[str], bool], workers: int | None = None) -> None:
        self.objects, self.known = objects, known
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
        prefetch = _Prefetch(decompressed(f))
        stream = _ChunkStream(prefetch)
        state = _TarState(stream)
        if self.workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="layerfs-store")
        try:
            try:
                self._parse(stream, state)
                total = stream.drain()
            except (tarfile.TarError, EOFError, zstandard.ZstdError) as exc:
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

    def _parse(self, stream: _ChunkStream, state: _TarState) -> None:
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
                raise InvalidInput(f"{'not a readable tar archive' if first else 'malformed tar archive'}: {exc}") from None
            first = False
            self._member(stream, state, m)

    def _member(self, stream: _ChunkStream, state: _TarState, m: tarfile.TarInfo) -> None:
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

    def _data(self, stream: _ChunkStream, state: _TarState, m: tarfile.TarInfo) -> BinaryIO:
        if m.sparse is not None:
            return tarfile._FileInFile(stream, m.offset_data, m.size, m.name, m.sparse)
        return _Limited(stream, m.size)

    def _store(self, e: Entry, stream: _ChunkStream, state: _TarState, m: tarfile.TarInfo) -> None:
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
    if head[:2] == b"\x1f\x8b" or head[:4] == _ZSTD_MAGIC or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return True
    return len(head) == 512 and head[257:262] == b"ustar"
