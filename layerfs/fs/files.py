"""Open files of the union: handles, reads with digest checks, writes.

:class:`FileIO` is the open-file half of :class:`layerfs.fs.union.Union`
(a mixin: it uses the union's nodes, upper dir, object store and write
lock). A handle reads one of three sources:

* ``upper`` -- an fd of the file in the upper dir (also for lower handles
  whose node was copied up since, as overlayfs's stacked file ops do);
* ``mem``   -- a small object read whole and verified once;
* ``raw``   -- a big uncompressed object file, ``lazy`` until first read.
  Its reads are checked a chunk at a time against its chunk-sum table
  (``fs.bigread``, which also checks the next chunks ahead of a reader
  going front to back); without a sound table it is verified whole
  (``verify``, in a worker thread) before its first byte is returned.

Small objects that ``fs.readahead`` loads (and verifies) because the files
before them were read in order are handed over by its threads
(:meth:`FileIO._hand_over`: the adapter's ``push`` puts them in the
kernel's page cache), so the reads of such a file never reach the daemon;
what could not be handed over is taken by the file's open and read from
memory. Hand-overs happen only off the request loop and never over
written data (see ``_hand_over`` and :meth:`FileIO.settle_pushes`).

Reads try ``preadv(RWF_NOWAIT)`` in the trio thread first (and the object
is opened with ``openat2(RESOLVE_CACHED)``): a page-cache hit costs no
thread hop, a miss goes to a worker thread so a disk wait does not stall
the loop. The index says which objects are stored as ``.zst``, so the
right file is opened first. A filesystem that refuses NOWAIT (EOPNOTSUPP:
tmpfs, and others without FMODE_NOWAIT) is remembered per source, the
upper's filesystem and the store's, so it costs one failed syscall per
mount: tmpfs and ramfs are then read in the trio thread (their pages are
memory, a read never waits for a disk), anything else in a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable

import blake3
import trio

from layerfs.errors import Corrupt, LayerfsError, NotFound
from layerfs.fs import verify
from layerfs.fs.bigread import ChunkReader
from layerfs.fs.inodes import Node, Opened
from layerfs.fs.names import _err
from layerfs.fs.readahead import Readahead
from layerfs.fs.upper import fs_magic
from layerfs.store.chunksums import SUM_CHUNK
from layerfs.store.objects import read_first, unpack_object

log = logging.getLogger("layerfs.fs")

SMALL_OBJECT = 1 << 20    # read whole (and verify inline) up to this size
INLINE_READ = 256 << 10   # objects read whole in the trio thread when cached, up to this size
NOWAIT, INLINE, THREAD = 0, 1, 2   # how reads from a filesystem are done (see module docstring)
MEMORY_FS = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC


class Handle:
    """An open file: upper fd, big raw object fd, or small content in memory.

    ``served`` tells the C module (``fs.lowlevel``) how to answer this
    handle's READs and WRITEs without the Python handlers (and names an
    upper file's fd for FALLOCATE): (fd or bytes,
    size or -1, read mode, lower, chunk states or None, chunk size), set
    once nothing is left to check or decide here but, at most, whether
    the chunks a READ covers matched (an upper file, a small object
    loaded and verified, a big object verified whole or being checked
    whole for a random reader); None sends every request here. The C
    module reads it on every request, so whatever changes a handle's fd,
    kind or data sets it again (``_switch_to_upper``), and a handle leaves
    ``FileIO.handles`` before its fd is closed (``release``).
    """

    __slots__ = ("node", "kind", "fd", "data", "digest", "path", "size", "served")

    def __init__(self, node: Node, kind: str, fd: int = -1, data: bytes | None = None,
                 digest: str = "", path: str = "", size: int = 0) -> None:
        self.node, self.kind, self.fd, self.data = node, kind, fd, data
        self.digest, self.path, self.size = digest, path, size
        self.served: tuple[int | bytes, int, int, bool, bytearray | None, int] | None = None


class FileIO:
    """open/read/write/fsync/release of :class:`Union` (see the module docstring)."""

    def _init_files(self) -> None:
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.read_modes = {"upper": NOWAIT, "raw": NOWAIT}  # by handle kind: upper dir, store
        # Lower inodes whose content the kernel has had (handed over, or
        # read): read-ahead leaves them alone, since the kernel keeps the
        # pages (keep_cache) until it forgets the inode. Without this a
        # second tar would have every file handed over again.
        self.kernel_has: set[int] = set()
        # How content reaches the kernel's page cache: set by the adapter
        # (fs.ops: notify_store); None in-process, where opens take it.
        self.push: Callable[[int, bytes | memoryview, int], None] | None = None  # (inode, data, offset)
        self.push_lock = threading.Lock()  # guards pushing and the copy-up's marking of nodes upper
        self.pushing: dict[int, int] = {}  # inode -> pushes of its lower content in flight
        self.readahead = Readahead(self.index, self.objects, _digest_ok, self._wanted, self._hand_over)
        self.chunk_reads = ChunkReader(self.objects)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def open(self, ino: int, flags: int) -> Opened:
        """Open a file; moves read-ahead's window along for lower files."""
        node = self.node(ino)
        acc = flags & os.O_ACCMODE
        writing = acc != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self._writable()
            if not node.upper:
                async with self.lock:
                    await self.copy_up(node, data=not flags & os.O_TRUNC)
        if node.upper:
            keep = os.O_ACCMODE | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME
            fd = self.upper.open(self.path(node), (flags & keep) | os.O_NOFOLLOW)
            return Opened(self.adopt_fd(node, fd), True)
        h = self._lower_handle(node)
        if h.kind == "mem" and h.data is None:
            if ino not in self.kernel_has:  # read ahead but not handed over: reads come here, from memory
                h.data = self.readahead.take(h.digest)
                if h.data is not None:  # (the kernel keeps what it reads from here)
                    self.verified.add(h.digest)
                    self.kernel_has.add(ino)
            self.readahead.opened(node.lower)
        return Opened(self._add_handle(h), True)

    # -- read-ahead's side (called in its threads) -------------------------
    def _wanted(self, slot: int) -> bool:
        return self.index.ino(slot) not in self.kernel_has

    def _hand_over(self, slot: int, digest: str, data: bytes) -> bool:
        """Give a small lower file's verified content to the kernel's page
        cache now, if the kernel knows the inode and its content is still
        the lower file's; False keeps the content for an open."""
        ino = self.index.ino(slot)
        if ino in self.kernel_has:
            return True  # not needed
        if not self.push_file(ino, data):
            node = self.table.nodes.get(ino)
            # no longer the lower file's content: nothing to keep it for
            return node is not None and (node.upper or node.lower < 0)
        with self.push_lock:  # (a FORGET meanwhile took the pages with the inode: not had then)
            if ino in self.table.lookups:
                self.kernel_has.add(ino)
        self.verified.add(digest)
        return True

    def push_file(self, ino: int, data: bytes) -> bool:
        """Give the checked lower content of inode *ino*, whole, to the
        kernel's page cache (read-ahead threads only); False if it was not given:
        the kernel does not know the inode, the session closes, or the node
        is no longer the lower file.

        Never over written data: a write needs an open for writing, which
        copies the file up first, and the copy-up marks the node upper
        under ``push_lock`` once no push of it is in flight
        (:meth:`settle_pushes`), so the check and the push here cannot
        straddle it.
        """
        if ino not in self.table.lookups:
            return False
        with self.push_lock:
            push = self.push  # (None once the session closes: stop_handovers)
            node = self.table.nodes.get(ino)
            if push is None or (node is not None and (node.upper or node.lower < 0)):
                return False
            self.pushing[ino] = self.pushing.get(ino, 0) + 1
        try:
            # Not under the lock: the kernel may make this wait for a READ of
            # the same file, which the request loop must be free to answer.
            push(ino, data, 0)
            return True
        except OSError:
            return False
        finally:
            with self.push_lock:
                if self.pushing[ino] == 1:
                    del self.pushing[ino]
                else:
                    self.pushing[ino] -= 1

    def stop_handovers(self, timeout: float) -> bool:
        """No more hand-overs (the session is about to close); True once
        none is in flight, False if one still was after *timeout* seconds."""
        with self.push_lock:  # a hand-over past its check is in self.pushing by now
            self.push = None
        deadline = time.monotonic() + timeout
        while self.pushing:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    async def settle_pushes(self, node: Node) -> None:
        """Mark *node* as being in the upper dir only once no read-ahead
        thread is handing the kernel its lower content (the copy-up's
        caller answers the open only after this, so no write can come
        before such a hand-over and be covered by it)."""
        while True:
            with self.push_lock:
                if node.ino not in self.pushing:
                    node.upper = True
                    if not node.is_dir:
                        node.lower = -1
                    return
            await trio.sleep(0.001)  # the push may wait for a READ this loop answers

    def adopt_fd(self, node: Node, fd: int) -> int:
        """A file handle for an fd of *node* in the upper dir (open, create)."""
        h = Handle(node, "upper", fd)
        self._offer_to_c(h)
        return self._add_handle(h)

    def _offer_to_c(self, h: Handle) -> None:
        """Let the C module answer *h*'s next READs (and an upper file's
        WRITEs) itself where nothing is left to check or decide here
        (``Handle.served``). Its reads go by this side's read mode of the
        file's filesystem; it hands back what it cannot answer at once."""
        if h.kind == "upper":
            h.served = (h.fd, -1, self.read_modes["upper"], False, None, 0)
        elif h.kind == "raw":
            h.served = self._raw_served(h)
        elif h.kind == "mem" and type(h.data) is bytes:
            h.served = (h.data, len(h.data), INLINE, True, None, 0)

    def _raw_served(self, h: Handle) -> tuple[int, int, int, bool, bytearray | None, int] | None:
        """A big object's ``served``: all of it once verified; while the
        threads check all its chunks for a reader that jumps, the chunks
        that matched (a sequential reader's READs all stay with the
        Python handler: they move the checks ahead of it)."""
        if h.digest in self.verified:
            return (h.fd, h.size, self.read_modes["raw"], True, None, 0)
        oc = self.chunk_reads.chunks(h.digest, h.path, h.size)
        if oc is None or not oc.all_queued:
            return None
        return (h.fd, h.size, self.read_modes["raw"], True, oc.state, SUM_CHUNK)

    def _add_handle(self, h: Handle) -> int:
        h.node.opens += 1
        fh = self._new_fh()
        self.handles[fh] = h
        return fh

    def _lower_handle(self, node: Node) -> Handle:
        """No syscalls here: where the object is gets found at first read
        (many opens never read, e.g. tar of a file the kernel has cached)."""
        m = self.index.meta[node.lower]
        size, digest = m[4], m[5]
        if size == 0:
            return Handle(node, "mem", data=b"")
        return Handle(node, "mem" if size <= SMALL_OBJECT else "lazy", digest=digest, size=size)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._current(self.handles[fh])
        data = await self._read(h, off, size)
        self._offer_to_c(h)
        return data

    async def _read(self, h: Handle, off: int, size: int) -> bytes:
        if h.kind == "mem":
            if h.data is None:
                await self._load(h)
            return h.data[off:off + size]
        if h.kind != "raw":
            return await self._pread(h.kind, h.fd, size, off)
        if h.digest not in self.verified and not await self._check_chunks(h, off, size):
            await self._verify_big(h)
        data = await self._pread("raw", h.fd, size, off)
        # Checked bytes are read again to be served: an object cut short
        # since (damage in place) must not pass for a shorter file.
        self._check(len(data) >= min(size, h.size - off), h, verified=False)
        return data

    async def _check_chunks(self, h: Handle, off: int, size: int) -> bool:
        """Check the chunks a READ covers (``fs.bigread``); False if the
        object is to be verified whole instead (no sound table). EIO if a
        chunk fails its sum."""
        oc = self.chunk_reads.chunks(h.digest, h.path, h.size)
        if self.chunk_reads.whole or oc is None:
            return False
        sequential = oc.note_read(off, size)
        self._check(await self.chunk_reads.check(oc, h.fd, off, size), h, verified=False)
        if oc.all_good():  # every chunk matched: as good as a whole check
            self.verified.add(h.digest)
        else:
            self.chunk_reads.follow(oc, sequential)
        return True

    def _current(self, h: Handle) -> Handle:
        """*h*, moved to its node's copy if that was copied up since the
        open, and with its big object opened if not yet."""
        if h.kind != "upper" and h.node.upper:
            self._switch_to_upper(h)
        if h.kind == "lazy":
            self._open_big(h)
        return h

    def follow_copy_up(self, node) -> None:
        """Move the handles of *node* opened while it was lower to its copy."""
        for h in self.handles.values():
            if h.node is node and h.kind != "upper":
                self._switch_to_upper(h)

    def _switch_to_upper(self, h: Handle) -> None:
        """A lower handle whose node was copied up since reads the copy, as
        overlayfs's stacked file operations do."""
        fd = self.upper.open(self.path(h.node), os.O_RDONLY | os.O_NOFOLLOW)
        h.served = None
        if h.fd >= 0:
            os.close(h.fd)
        h.kind, h.fd, h.data = "upper", fd, None
        self._offer_to_c(h)

    def _open_big(self, h: Handle) -> None:
        try:
            path, compressed = self.objects.locate(h.digest)
        except NotFound as exc:
            raise Corrupt(str(exc)) from None
        if compressed:  # (only if the store's size rule changes) decompress whole
            h.kind, h.path, h.fd = "mem", path, -2
            return
        h.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        h.kind, h.path = "raw", path

    async def _load(self, h: Handle) -> None:
        """Read a small object whole and check its digest (once per
        object): in the trio thread when nothing waits for a disk, else in
        a worker thread; either way the read-ahead hears of it."""
        data = self.readahead.take(h.digest)
        if data is not None:
            self.verified.add(h.digest)
            h.data = data
            self.readahead.loaded(h.node.lower, False)
            return
        paths = [(h.path, h.fd == -2)] if h.path else self._object_paths(h.digest)
        data = self._load_cached(paths, h.digest)
        cold = data is None
        if cold:  # not in the page cache: wait for the disk in a thread
            data = await trio.to_thread.run_sync(read_first, paths, h.digest)
        if h.node.lower >= 0:
            self.readahead.loaded(h.node.lower, cold)
            self.kernel_has.add(h.node.ino)
        if h.digest not in self.verified:
            if len(data) > INLINE_READ:
                ok = await trio.to_thread.run_sync(_digest_ok, data, h.digest)
            else:
                ok = _digest_ok(data, h.digest)
            self._check(ok, h)
        h.data = data

    def _object_paths(self, digest: str) -> list[tuple[str, bool]]:
        return self.objects.files(digest, digest in self.index.packed)

    def _load_cached(self, paths: list[tuple[str, bool]], digest: str) -> bytes | None:
        """The object's content if reading it cannot wait for a disk and
        it is small enough to handle in the trio thread, else None."""
        if self.read_modes["raw"] == THREAD:
            return None
        for path, compressed in paths:
            try:
                fd = open_cached(path)
            except FileNotFoundError:
                continue
            if fd < 0:
                return None
            try:
                n = os.fstat(fd).st_size
                if n > INLINE_READ:
                    return None
                buf = bytearray(n)
                if n and self._pread_cached("raw", fd, buf, 0) != n:
                    return None
            finally:
                os.close(fd)
            return unpack_object(bytes(buf), path) if compressed else bytes(buf)
        raise Corrupt(f"object {digest[:12]} is missing from the store")

    def _pread_cached(self, kind: str, fd: int, buf: bytearray, off: int) -> int:
        """Bytes read into *buf* without waiting for a disk (0 if that
        would wait); switches *kind* away from NOWAIT when it is refused."""
        if self.read_modes[kind] == INLINE:
            return os.preadv(fd, [buf], off)
        try:
            return os.preadv(fd, [buf], off, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
        mode = INLINE if fs_magic(fd) in MEMORY_FS else THREAD
        log.info("%s: no RWF_NOWAIT reads, reading %s", "upper dir" if kind == "upper" else "store",
                 "in the loop (memory filesystem)" if mode == INLINE else "in worker threads")
        self.read_modes[kind] = mode
        return os.preadv(fd, [buf], off) if mode == INLINE else 0

    async def _pread(self, kind: str, fd: int, size: int, off: int) -> bytes:
        """pread in the trio thread when the bytes are at hand, otherwise
        in a worker thread so a disk wait does not stall the loop."""
        if self.read_modes[kind] == THREAD:
            return await trio.to_thread.run_sync(os.pread, fd, size, off)
        buf = bytearray(size)
        n = self._pread_cached(kind, fd, buf, off)
        if n == size:
            return buf
        if self.read_modes[kind] == INLINE:  # a short plain read: end of file
            return bytes(memoryview(buf)[:n])
        if n == 0:
            return await trio.to_thread.run_sync(os.pread, fd, size, off)
        rest = await trio.to_thread.run_sync(os.pread, fd, size - n, off + n)
        return bytes(memoryview(buf)[:n]) + rest

    async def _verify_big(self, h: Handle) -> None:
        # A big object found bad answers EIO at once while its file is the
        # same one (hashing a GiB for every read of it would stall the
        # reader for good); a repaired store replaces the file, and a new
        # open then checks the new one.
        st = os.fstat(h.fd)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self.bad.get(h.digest) == identity:
            raise _err(errno.EIO)
        ok = await verify.object_ok(h.fd, h.digest, self.verified)
        if not ok:
            self.bad[h.digest] = identity
        self._check(ok, h)
        if self.chunk_reads.chunks(h.digest, h.path, h.size) is None:
            self.chunk_reads.write_table_later(h.digest, h.path, h.size)

    def _check(self, ok: bool, h: Handle, verified: bool = True) -> None:
        """EIO and a log line unless *ok*; else the object counts as
        verified whole (unless only a part of it was checked)."""
        if not ok:
            log.error("object %s (%s) fails its digest check; returning EIO",
                      h.digest, os.fsdecode(self.index.paths[h.node.lower]) if h.node.lower >= 0 else "?")
            raise _err(errno.EIO)
        if verified:
            self.verified.add(h.digest)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        if h.kind != "upper":
            raise _err(errno.EBADF)
        return os.pwrite(h.fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles.get(fh)
        if h is not None and h.kind == "upper":
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, h.fd)

    def lseek(self, fh: int, off: int, whence: int) -> int:
        """For LSEEK (``fs.lowlevel``; the kernel asks only for SEEK_DATA
        and SEEK_HOLE): the answer of the file below, or -errno."""
        h = self.handles.get(fh)
        if h is None:
            return -errno.EBADF
        try:
            self._current(h)
            if h.kind == "mem":  # no fd: small content, no holes kept
                size = h.size if h.data is None else len(h.data)
                if off >= size:
                    return -errno.ENXIO
                return off if whence == os.SEEK_DATA else size
            return os.lseek(h.fd, off, whence)
        except OSError as exc:
            return -exc.errno
        except LayerfsError:  # Corrupt: the object is missing
            return -errno.EIO

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.fd >= 0:
            os.close(h.fd)
        h.node.opens -= 1
        self.table.maybe_drop(h.node.ino)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPENAT2, _RESOLVE_CACHED = 437, 0x20
_AT_FDCWD = -100
_open_how = struct.Struct("QQQ")
_cached_how = _open_how.pack(os.O_RDONLY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
_openat2_works = True


def open_cached(path: str) -> int:
    """Open *path* read-only if its lookup needs no disk read (openat2 with
    RESOLVE_CACHED, Linux 5.12+); -1 if it would. Without openat2 a plain
    open is done: it may then wait for the disk's metadata."""
    global _openat2_works
    if _openat2_works:
        fd = _libc.syscall(_SYS_OPENAT2, _AT_FDCWD, os.fsencode(path), _cached_how, len(_cached_how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            return -1
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
            raise OSError(err, os.strerror(err), path)
        _openat2_works = False  # (EPERM: a seccomp filter)
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _digest_ok(data: bytes, digest: str) -> bool:
    return blake3.blake3(data).hexdigest() == digest
