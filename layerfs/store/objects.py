"""The content-addressed object store: file contents keyed by blake3.

An object lives at ``objects/ab/cdef...`` (raw) or ``objects/ab/cdef....zst``
(zstd). Which one is decided once, when the content is first stored, by
:func:`should_compress`:

* Files above ``COMPRESS_MAX`` (1 MiB) stay raw so the FUSE daemon can
  ``pread`` any offset of them without decompressing: a compressed object is
  decompressed whole on its first read, which for a 16 MiB object cost
  3.6-7 ms against ~15 us raw (benchmarks/results-import.md).
* Smaller files are compressed only when that frees at least a quarter of
  their 4 KiB blocks: a 3 KiB file that compresses to 1 KiB still occupies
  one block, so compressing it would only cost CPU on every read.
* A store configured for the kernel backend (``{"backend": "kernel"}`` in
  ``ROOT/config.json``) stores everything raw: kernel overlayfs reads
  objects straight from their files. Elsewhere a kernel mount makes raw
  copies beside ``.zst`` objects on first use (:meth:`ObjectStore.ensure_raw`).

benchmarks/bench_objects.py measures the read cost and the disk saved of
this policy against "never" and "always".

Hashing is single-threaded on purpose: blake3's multi-threaded mode keeps
a thread pool that a fork() (the FUSE daemon is forked) copies without its
threads, and the child's next multi-threaded hash then waits forever. The
one exception is the detached FUSE daemon, which forks nothing: it
verifies big objects on every core (``fs.verify``).

Durability: object files are written tmp + rename without an fsync each;
the store calls :func:`syncfs` once before it commits the metadata that
references them. The database, not the directory, says which objects exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import blake3
import zstandard

from layerfs.errors import Corrupt, InvalidInput, NotFound
from layerfs.store import chunksums

COMPRESS_MAX = 1 << 20
COMPRESS_MIN = 4096 + 1        # one block or less cannot get smaller on disk
IN_MEMORY_MAX = 16 << 20       # larger files are streamed, never held whole
BLOCK = 4096
CHUNK = 1 << 20
ZSTD_LEVEL = 3
HOLE = 64 << 10
_ZERO_HOLE = bytes(HOLE)
EMPTY_DIGEST = blake3.blake3(b"").hexdigest()

_libc = ctypes.CDLL(None, use_errno=True)

# Answers "is this digest already committed?" so a put can skip the write.
KnownDigests = Callable[[str], bool]


@dataclass(frozen=True)
class StoredObject:
    """What storing one content produced."""

    digest: str
    size: int
    stored_size: int
    compressed: bool


def blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def should_compress(raw_size: int, compressed_size: int) -> bool:
    """True when zstd frees at least a quarter of the blocks the raw file takes."""
    if not COMPRESS_MIN <= raw_size <= COMPRESS_MAX:
        return False
    return blocks(compressed_size) * 4 <= blocks(raw_size) * 3


def syncfs(path: str) -> None:
    """Flush every dirty page of the filesystem holding *path* (one syscall)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def is_digest(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


class ObjectStore:
    """Files of objects under one directory; knows nothing of the database."""

    def __init__(self, root: str, tmp_dir: str, compress: bool = True) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        # False in a store whose mounts default to the kernel backend, which
        # reads objects straight from their files: no zstd, no raw copies.
        self.compress = compress
        self._local = threading.local()
        self._counter = itertools.count()
        self._sums_key: bytes | None = None
        self._key_lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    def _compressor(self) -> zstandard.ZstdCompressor:
        # Contexts are costly to create and not thread-safe: one per thread.
        c = getattr(self._local, "zc", None)
        if c is None:
            c = self._local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return c

    def _tmp(self, mode: int = 0o644) -> tuple[int, str]:
        """A new temp file; cheaper than tempfile.mkstemp (no random names)."""
        while True:
            path = os.path.join(self.tmp_dir, f"o-{os.getpid()}-{next(self._counter)}")
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), path
            except FileExistsError:
                continue

    # -- paths -------------------------------------------------------------
    def raw_path(self, digest: str) -> str:
        return os.path.join(self.root, digest[:2], digest[2:])

    def zst_path(self, digest: str) -> str:
        return self.raw_path(digest) + ".zst"

    def sums_path(self, digest: str) -> str:
        return self.raw_path(digest) + chunksums.SUFFIX

    def files(self, digest: str, compressed_first: bool = False) -> list[tuple[str, bool]]:
        """(path, compressed) of the files the object may be stored as, the
        likelier first: opening the right one at once spares a miss in a
        cold fan-out dir (readers that know the storage form say so)."""
        raw = self.raw_path(digest)
        both = [(raw, False), (raw + ".zst", True)]
        return both[::-1] if compressed_first else both

    def locate(self, digest: str) -> tuple[str, bool]:
        """Return (path, compressed) of a stored object, or raise NotFound."""
        raw = self.raw_path(digest)
        if os.path.exists(raw):
            return raw, False
        zst = raw + ".zst"
        if os.path.exists(zst):
            return zst, True
        raise NotFound(f"object {digest[:12]} is missing from the store")

    def on_disk(self, digest: str) -> bool:
        try:
            self.locate(digest)
        except NotFound:
            return False
        return True

    # -- writing -----------------------------------------------------------
    def put_bytes(self, data: bytes, digest: str | None = None) -> StoredObject:
        digest = digest or blake3.blake3(data).hexdigest()
        if len(data) > COMPRESS_MAX or not self.compress:
            self._write(self.raw_path(digest), [data])
            if len(data) >= chunksums.MIN_SIZE:
                summer = chunksums.ChunkSummer(self.sums_key())
                summer.update(data)
                self.write_sums(digest, len(data), summer.finish())
            return StoredObject(digest, len(data), len(data), False)
        packed = self._compressor().compress(data) if len(data) >= COMPRESS_MIN else b""
        if packed and should_compress(len(data), len(packed)):
            self._write(self.zst_path(digest), [packed])
            return StoredObject(digest, len(data), len(packed), True)
        self._write(self.raw_path(digest), [data])
        return StoredObject(digest, len(data), len(data), False)

    def hash_file(self, path: str) -> tuple[str, int]:
        """Digest and size of a file on disk, without storing it."""
        with open(path, "rb", buffering=0) as f:
            return hash_stream(f)

    def put_file(self, path: str, known: KnownDigests | None = None) -> StoredObject:
        """Store the content of *path*; skip the write if *known* has it."""
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size <= IN_MEMORY_MAX:
                data = f.read()
                digest = blake3.blake3(data).hexdigest()
                if known is not None and known(digest):
                    return StoredObject(digest, len(data), -1, False)
                return self.put_bytes(data, digest)
            # Big: hash first, copy only new content (a touched but unchanged
            # file costs one read, not a full write and delete).
            digest, _ = hash_stream(f)
            if known is not None and known(digest):
                return StoredObject(digest, size, -1, False)
            f.seek(0)
            obj = self._put_stream(f, None)
            if obj.digest != digest:
                self.remove(obj.digest)
                raise InvalidInput(f"{path} changed while it was being imported")
            return obj

    def _put_stream(self, f: "io.RawIOBase", known: KnownDigests | None) -> StoredObject:
        h = blake3.blake3()
        summer = chunksums.ChunkSummer(self.sums_key())
        fd, tmp = self._tmp()
        size = 0
        try:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                summer.update(chunk)
                write_sparse(fd, chunk)
                size += len(chunk)
            os.ftruncate(fd, size)
            os.close(fd)
            fd = -1
            digest = h.hexdigest()
            if known is not None and known(digest):
                os.unlink(tmp)
                return StoredObject(digest, size, -1, False)
            _replace(tmp, self.raw_path(digest))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink_quiet(tmp)
            raise
        if size >= chunksums.MIN_SIZE:
            self.write_sums(digest, size, summer.finish())
        return StoredObject(digest, size, size, False)

    def _write(self, dst: str, parts: list[bytes]) -> None:
        """Publish *dst* atomically: an unnamed O_TMPFILE linked into place
        once complete (one directory operation, no debris on a crash), or
        tmp + rename where the filesystem lacks O_TMPFILE."""
        try:
            fd = _open_tmpfile(os.path.dirname(dst))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            return self._write_renamed(dst, parts)
        try:
            _fill(fd, parts)
            try:
                _link_fd(fd, dst)
            except FileExistsError:
                pass  # same name, same content: another writer got there first
        finally:
            os.close(fd)

    def _write_renamed(self, dst: str, parts: list[bytes]) -> None:
        fd, tmp = self._tmp()
        try:
            try:
                _fill(fd, parts)
            finally:
                os.close(fd)
            _replace(tmp, dst)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    # -- chunk sums (store.chunksums) ---------------------------------------
    def sums_key(self) -> bytes:
        if self._sums_key is None:
            with self._key_lock:  # (writers in several threads: one makes it, the others read it)
                if self._sums_key is None:
                    self._sums_key = chunksums.load_key(self.root) or self._make_sums_key()
        return self._sums_key

    def _make_sums_key(self) -> bytes:
        """A new key, published with link(2), which never replaces one that
        another process made meanwhile: the one published is returned."""
        fd, tmp = self._tmp(0o600)
        try:
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, os.path.join(self.root, chunksums.KEY_NAME))
        finally:
            _unlink_quiet(tmp)
        return chunksums.load_key(self.root)

    def write_sums(self, digest: str, size: int, table: chunksums.Table) -> None:
        """Publish the chunk-sum table of a big object whose content was
        hashed against *digest* in the same pass as *table*'s sums."""
        self._write_renamed(self.sums_path(digest), [chunksums.pack(self.sums_key(), digest, size, table)])

    def chunk_sums(self, digest: str, size: int) -> chunksums.Table | None:
        """The big object's chunk sums, or None if it has no sound table."""
        try:
            with open(self.sums_path(digest), "rb") as f:
                table = f.read()
        except FileNotFoundError:
            return None
        return chunksums.unpack(self.sums_key(), digest, size, table)

    # -- reading -----------------------------------------------------------
    def read(self, digest: str, verify: bool = True) -> bytes:
        data = read_object_file(*self.locate(digest))
        if verify and blake3.blake3(data).hexdigest() != digest:
            raise Corrupt(f"object {digest[:12]} fails its digest check")
        return data

    def open(self, digest: str) -> io.BufferedIOBase:
        """A readable stream of the object's content (decompressed)."""
        path, compressed = self.locate(digest)
        f = open(path, "rb")
        if compressed:
            return zstandard.ZstdDecompressor().stream_reader(f, closefd=True)
        return f

    def write_to(self, digest: str, out_fd: int) -> int:
        """Copy an object's content to *out_fd*; returns bytes written."""
        path, compressed = self.locate(digest)
        with open(path, "rb", buffering=0) as f:
            if compressed:
                data = zstandard.ZstdDecompressor().decompress(f.read())
                if write_sparse(out_fd, data) != len(data):
                    os.ftruncate(out_fd, len(data))
                return len(data)
            return copy_sparse(f.fileno(), out_fd)

    def verify(self, digest: str, write_table: bool = False) -> bool:
        """Re-hash one object; False if its bytes do not match its name.
        With *write_table*, a big raw object without a sound chunk-sum
        table gets one, from the same pass."""
        try:
            path, compressed = self.locate(digest)
        except NotFound:
            return False
        if write_table and not compressed and os.path.getsize(path) >= chunksums.MIN_SIZE:
            return self._verify_with_table(digest, path)
        try:
            with open(path, "rb") as f:
                reader = zstandard.ZstdDecompressor().stream_reader(f) if compressed else f
                return hash_stream(reader)[0] == digest
        except zstandard.ZstdError:
            return False

    def _verify_with_table(self, digest: str, path: str) -> bool:
        size = os.path.getsize(path)
        if self.chunk_sums(digest, size) is not None:
            return self.verify(digest)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            found, table = chunksums.digest_and_sums(self.sums_key(), fd)
        finally:
            os.close(fd)
        if found != digest:
            return False
        self.write_sums(digest, size, table)
        return True

    def ensure_raw(self, digest: str) -> bool:
        """Make sure a raw copy of the object exists beside a ``.zst`` one
        (the kernel backend reads objects straight from their files).
        Returns True if a copy was written now; raises NotFound if the
        object is missing. The copy is published atomically but not
        fsynced: callers :func:`syncfs` once after a batch, before they
        rely on it (kernel reads are not digest-checked). :meth:`locate`
        then prefers it; :meth:`remove` drops both files.
        """
        raw = self.raw_path(digest)
        if os.path.exists(raw):
            return False
        self._write(raw, [self.read(digest)])  # (the .zst: no raw one; checked; NotFound if neither)
        return True

    def remove(self, digest: str) -> None:
        for p in (self.raw_path(digest), self.zst_path(digest), self.sums_path(digest)):
            _unlink_quiet(p)

    def iter_on_disk(self, sums: bool = False) -> Iterator[tuple[str, str]]:
        """Yield (digest, path) for every object file present, and with
        *sums* for every chunk-sum table too (what the store's disk holds)."""
        for sub in sorted(os.listdir(self.root)):
            d = os.path.join(self.root, sub)
            if len(sub) != 2 or not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name.endswith(chunksums.SUFFIX):
                    if sums:
                        yield sub + name.removesuffix(chunksums.SUFFIX), os.path.join(d, name)
                else:
                    yield sub + name.removesuffix(".zst"), os.path.join(d, name)



def read_first(files: list[tuple[str, bool]], digest: str) -> bytes:
    """The content of the first of *files* (``ObjectStore.files``) that
    exists; Corrupt if none does."""
    for path, compressed in files:
        try:
            return read_object_file(path, compressed)
        except FileNotFoundError:
            continue
    raise Corrupt(f"object {digest[:12]} is missing from the store")


def read_object_file(path: str, compressed: bool) -> bytes:
    """The content of one object file (see :meth:`ObjectStore.locate`)."""
    with open(path, "rb") as f:
        data = f.read()
    return unpack_object(data, path) if compressed else data


_per_thread = threading.local()


def unpack_object(stored: bytes, path: str) -> bytes:
    """Decompress a ``.zst`` object's bytes; damage is Corrupt, not ZstdError."""
    dctx = getattr(_per_thread, "dctx", None)
    if dctx is None:  # a context per thread: making one costs more than a small object's decompression
        dctx = _per_thread.dctx = zstandard.ZstdDecompressor()
    try:
        return dctx.decompress(stored)
    except zstandard.ZstdError as exc:
        raise Corrupt(f"object {os.path.basename(path)[:12]}: {exc}") from None


_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


# Fan-out dirs are made on first use (a miss costs one ENOENT), not all 256
# up front: an empty store should take no disk.
def _open_tmpfile(directory: str) -> int:
    flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
    try:
        return os.open(directory, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        return os.open(directory, flags, 0o644)


def _replace(tmp: str, dst: str) -> None:
    try:
        os.replace(tmp, dst)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(tmp, dst)


def _link_fd(fd: int, dst: str) -> None:
    # os.link() uses link(2), which would link the /proc symlink itself;
    # linkat with AT_SYMLINK_FOLLOW links the open file it points at.
    if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(dst), _AT_SYMLINK_FOLLOW):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def hash_stream(f: "io.RawIOBase") -> tuple[str, int]:
    """blake3 hex digest and byte count of what ``f`` reads to its end:
    the one stream hasher (objects, import, the builder's context);
    :func:`file_digest` is its form for a whole file on disk."""
    h = blake3.blake3()
    size = 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


HASH_BUF = 8 << 20


def file_digest(path) -> str:
    """blake3 of a whole file on disk, single-threaded (see the module
    docstring), read with :func:`hash_fd`. The FUSE daemon verifies big
    objects with ``fs.verify.fd_digest`` instead (mapped, threaded there)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, blake3.blake3()).hexdigest()
    finally:
        os.close(fd)


def hash_fd(fd: int, h: "blake3.blake3", off: int = 0) -> "blake3.blake3":
    """Feed *h* what fd holds from *off* to its end, in 8 MiB preads front
    to back, the next chunk already on its way (WILLNEED) while this one
    is hashed; returns *h*. Threads are *h*'s (its ``max_threads``)."""
    os.posix_fadvise(fd, off, 0, os.POSIX_FADV_SEQUENTIAL)
    buf = bytearray(HASH_BUF)
    view = memoryview(buf)
    while n := os.preadv(fd, [buf], off):
        off += n
        os.posix_fadvise(fd, off, HASH_BUF, os.POSIX_FADV_WILLNEED)
        h.update(view[:n])
    return h


def _fill(fd: int, parts: list[bytes]) -> None:
    holes = False
    for part in parts:
        holes |= write_sparse(fd, part) != len(part)
    if holes:
        os.ftruncate(fd, sum(map(len, parts)))


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return len(data)


def write_sparse(fd: int, data: bytes) -> int:
    """Write *data* at fd's offset, seeking over zero blocks so they stay
    holes; returns the bytes really written. When that is less than
    ``len(data)`` the caller ftruncates to the final size (a trailing hole)."""
    if len(data) < HOLE or _ZERO_HOLE not in data:
        return _write_all(fd, data)
    view = memoryview(data)
    written = 0
    for off in range(0, len(data), HOLE):
        chunk = view[off:off + HOLE]
        if len(chunk) == HOLE and chunk == _ZERO_HOLE:
            os.lseek(fd, HOLE, os.SEEK_CUR)
        else:
            written += _write_all(fd, chunk)
    return written


def copy_sparse(src: int, dst: int) -> int:
    """Copy src to dst's same offsets, data extents only (holes survive)."""
    size = os.fstat(src).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        _copy_range(src, dst, start, end - start)
        pos = end
    os.ftruncate(dst, size)
    return size


def _copy_range(src: int, dst: int, off: int, count: int) -> None:
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src, dst, count - done, off + done, off + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(dst, os.pread(src, min(CHUNK, count - done), off + done), off + done)
        if n == 0:
            raise OSError(errno.EIO, "short copy")
        done += n
