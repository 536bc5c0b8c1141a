"""The union of an image's layers and an upper dir: overlayfs semantics.

This is the filesystem proper, independent of FUSE plumbing (``fs.ops``
is the thin pyfuse3 adapter over it). Rules, from
Documentation/filesystems/overlayfs.rst:

* lookup goes top-down: the upper dir first, then the merged lower index;
  a whiteout hides a lower name; an opaque dir hides everything below it;
  a readdir merges both and drops duplicates;
* the first change to a lower node copies it up (content, mode, owner,
  times, xattrs; a hardlink group as a whole, so its links stay one
  inode); its parents are copied up first;
* deleting a name the lower layers have leaves a whiteout; a directory
  created over a whiteout is opaque;
* a directory that moves (rename) is copied up whole and made opaque
  instead of getting a ``redirect`` xattr, so the upper stays a plain
  upper dir that any tool (and ``layerfs`` itself) can read as a layer.
  No EXDEV is returned for it (overlayfs returns it only without
  ``redirect_dir``).

Concurrency: read-side requests run concurrently and never take a lock.
Every request that changes the namespace or copies up takes ``self.lock``
(a :class:`WriteLock` over a ``trio.Lock``) for its whole duration, so the state kept in Nodes is
only ever changed by one request at a time; within a request, state is
updated after the syscalls succeed, so an error leaves it untouched.
Long copies and fsyncs run in worker threads (``trio.to_thread``) and only
hold up other writers, never readers.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import blake3
import pyfuse3
import trio

from layerfs.errors import Corrupt, NotFound
from layerfs.fs.index import LowerIndex
from layerfs.fs.inodes import InodeTable, Node
from layerfs.fs.upper import (PRIVATE_PREFIX, RENAME_EXCHANGE, RENAME_NOREPLACE, UpperDir,
                              file_digest, is_whiteout, renameat2)
from layerfs.store.objects import ObjectStore, read_object_file, unpack_object

log = logging.getLogger("layerfs.fs")

LOWER_TIMEOUT = 86400.0   # lower-only nodes never change behind the kernel's back
UPPER_TIMEOUT = 60.0      # upper nodes change only through this mount, too; a hedge
CAPABILITY = b"security.capability"
SMALL_OBJECT = 1 << 20    # read whole (and verify inline) up to this size
THREAD_COPY = 1 << 20     # copy-ups bigger than this run in a worker thread
ROOT = pyfuse3.ROOT_INODE


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _join(base: bytes, name: bytes) -> bytes:
    return base + b"/" + name if base else name


class WriteLock:
    """A ``trio.Lock`` that does not yield to the scheduler when it is free.

    ``async with trio.Lock()`` always passes through the scheduler (a
    checkpoint) even when nobody holds the lock: a full run-loop turn per
    create/unlink/setattr. Taking a free lock with ``acquire_nowait`` is
    just as exclusive (trio switches tasks only at an ``await``) and fair
    (it refuses while others wait).
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc) -> None:
        self._lock.release()


class Handle:
    """An open file: upper fd, big raw object fd, or small content in memory."""

    __slots__ = ("node", "kind", "fd", "data", "digest", "path", "size")

    def __init__(self, node: Node, kind: str, fd: int = -1, data: bytes | None = None,
                 digest: str = "", path: str = "", size: int = 0) -> None:
        self.node, self.kind, self.fd, self.data = node, kind, fd, data
        self.digest, self.path, self.size = digest, path, size


class Union:
    def __init__(self, index: LowerIndex, objects: ObjectStore, upper: UpperDir | None,
                 read_only: bool = False) -> None:
        self.index = index
        self.objects = objects
        self.upper = upper
        self.read_only = read_only or upper is None
        self.table = InodeTable(index)
        self.lock = WriteLock()
        self.verified: set[str] = set()
        self.bad: set[str] = set()
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, tuple] = {}
        self._next_fh = 1
        self._listing_cache: dict[int, list] = {}
        self._upper_links: dict[int, int] = {}  # upper st_ino -> ino, for pre-mount hardlinks
        root = Node(ROOT, 0, b"", stat.S_IFDIR, 0, upper is not None)
        if upper is not None and upper.is_opaque(b""):
            root.lower = -1
        self.table.add(root)

    # -- naming -------------------------------------------------------------
    def node(self, ino: int) -> Node:
        n = self.table.get(ino)
        if n is None:
            raise _err(errno.ESTALE)
        return n

    def path(self, node: Node) -> bytes:
        """Path of the node's primary link, relative to the root."""
        if not node.upper and node.lower == node.ino - 1:
            return self.index.paths[node.lower]
        parts = []
        while node.ino != ROOT:
            if node.unlinked:
                raise _err(errno.ENOENT)
            parts.append(node.name)
            node = self.node(node.parent)
        parts.reverse()
        return b"/".join(parts)

    def upath(self, node: Node) -> bytes:
        return self.upper.abspath(self.path(node))

    def children(self, d: Node) -> dict[bytes, int]:
        """Merged listing of an upper dir (built on first use, then kept)."""
        if d.children is None:
            self._materialize(d)
        return d.children

    def _materialize(self, d: Node) -> None:
        idx = self.index
        kids: dict[bytes, int] = {}
        if d.lower >= 0:
            for name, s in idx.kids[d.lower].items():
                kids[name] = idx.ino(s)
        if d.upper:
            base = self.path(d)
            for name, st in self.upper.scan(base):
                if is_whiteout(st):
                    kids.pop(name, None)
                    continue
                fmt = stat.S_IFMT(st.st_mode)
                if fmt != stat.S_IFDIR and st.st_nlink > 1 and st.st_ino in self._upper_links:
                    n = self.node(self._upper_links[st.st_ino])
                    if (d.ino, name) not in n.all_links():
                        n.add_link(d.ino, name)
                    kids[name] = n.ino
                    continue
                lower = -1
                if fmt == stat.S_IFDIR and d.lower >= 0:
                    ls = idx.child(d.lower, name)
                    if ls >= 0 and idx.is_dir(ls) and not self.upper.is_opaque(_join(base, name)):
                        lower = ls
                n = self.table.add(Node(self.table.new_ino(), d.ino, name, fmt, lower, True))
                if fmt != stat.S_IFDIR and st.st_nlink > 1:
                    self._upper_links[st.st_ino] = n.ino
                kids[name] = n.ino
        d.children = kids
        d.nsubdirs = sum(1 for ino in kids.values() if self.table.is_dir(ino))

    def child(self, d: Node, name: bytes) -> int:
        """Inode of *name* in dir *d*, 0 if there is none."""
        if d.children is None and not d.upper:
            s = self.index.child(d.lower, name) if d.lower >= 0 else -1
            return self.index.ino(s) if s >= 0 else 0
        return self.children(d).get(name, 0)

    def lower_has(self, d: Node, name: bytes) -> bool:
        return d.lower >= 0 and self.index.child(d.lower, name) >= 0

    def is_empty(self, d: Node) -> bool:
        if d.children is None and not d.upper:
            return d.lower < 0 or not self.index.kids[d.lower]
        return not self.children(d)

    # -- attributes ---------------------------------------------------------
    def lower_attr(self, slot: int) -> pyfuse3.EntryAttributes:
        cache = self.index._attr_cache
        a = cache.get(slot)
        if a is None:
            m = self.index.meta[slot]
            a = pyfuse3.EntryAttributes()
            a.st_ino = self.index.ino(slot)
            a.st_mode = m[0]
            a.st_nlink = self.index.nlink(slot)
            a.st_uid, a.st_gid = m[1], m[2]
            a.st_rdev = m[7]
            a.st_size = m[4] if stat.S_ISREG(m[0]) else (len(m[6]) if stat.S_ISLNK(m[0]) else 0)
            a.st_blksize = 4096
            a.st_blocks = (a.st_size + 511) // 512 if stat.S_ISREG(m[0]) else 8 * stat.S_ISDIR(m[0])
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = m[3]
            a.entry_timeout = a.attr_timeout = LOWER_TIMEOUT
            cache[slot] = a
        return a

    def attr(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self.table.nodes.get(ino)
        if node is None:
            return self.lower_attr(ino - 1)
        if not node.upper:
            return self.lower_attr(node.lower)
        st = self._stat(node)
        return self.upper_attr(node, st)

    def _stat(self, node: Node) -> os.stat_result:
        if node.unlinked:
            for h in self.handles.values():
                if h.node is node and h.kind == "upper":
                    return os.fstat(h.fd)
            raise _err(errno.ENOENT)
        return os.lstat(self.upath(node))

    def upper_attr(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = st.st_mode
        if node.is_dir:
            self.children(node)
            a.st_nlink = 2 + node.nsubdirs
        else:
            a.st_nlink = st.st_nlink
        a.st_uid, a.st_gid, a.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = UPPER_TIMEOUT
        return a

    # -- copy-up ------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise _err(errno.EROFS)

    async def copy_up(self, node: Node, data: bool = True) -> None:
        """Make *node* exist in the upper dir (its parents first)."""
        if node.upper:
            return
        self._writable()
        links = node.all_links()
        for p, _ in links:
            parent = self.node(p)
            await self.copy_up(parent)
            self.children(parent)
        meta = self.index.meta[node.lower]
        verified = self.verified
        if stat.S_ISREG(meta[0]) and data and meta[4] > THREAD_COPY:
            tmp = await trio.to_thread.run_sync(self.upper.build_copy, meta, data, verified)
        else:
            tmp = self.upper.build_copy(meta, data, verified)
        # Like overlayfs, a copy-up leaves the parents' times alone.
        parents = {p: self.upper.abspath(self.path(self.node(p))) for p, _ in links}
        times = {p: os.lstat(path) for p, path in parents.items()}
        first = _child_abs(parents[links[0][0]], links[0][1])
        try:
            os.rename(tmp, first)
        except BaseException:
            _remove_quiet(tmp)
            raise
        for p, name in links[1:]:
            os.link(first, _child_abs(parents[p], name))
        for p, st in times.items():
            os.utime(parents[p], ns=(st.st_atime_ns, st.st_mtime_ns))
        node.upper = True
        if not node.is_dir:
            node.lower = -1
        self.index._attr_cache.pop(node.ino - 1, None)

    async def copy_up_tree(self, d: Node) -> None:
        """Copy a directory up with everything below it, so it no longer
        depends on its lower position (needed before it moves)."""
        await self.copy_up(d)
        for ino in list(self.children(d).values()):
            n = self.node(ino)
            if n.is_dir:
                await self.copy_up_tree(n)
            else:
                await self.copy_up(n)
        if d.lower >= 0:
            rel = self.path(d)
            self.upper.set_opaque(rel)
            for name, st in self.upper.scan(rel):
                if is_whiteout(st):
                    os.unlink(self.upper.abspath(_join(rel, name)))
            d.lower = -1

    # -- reading ------------------------------------------------------------
    def readlink(self, ino: int) -> bytes:
        node = self.table.nodes.get(ino)
        if node is None or not node.upper:
            slot = ino - 1 if node is None else node.lower
            return self.index.meta[slot][6]
        return os.readlink(self.upath(node))

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.table.nodes.get(ino)
        if node is None or not node.upper:
            return list(self.index.xattrs(ino - 1 if node is None else node.lower))
        names = os.listxattr(self.upath(node), follow_symlinks=False)
        return [os.fsencode(n) for n in names if not os.fsencode(n).startswith(PRIVATE_PREFIX)]

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if name.startswith(PRIVATE_PREFIX):
            raise _err(errno.ENODATA)
        node = self.table.nodes.get(ino)
        if node is None or not node.upper:
            value = self.index.xattrs(ino - 1 if node is None else node.lower).get(name)
            if value is None:
                raise _err(errno.ENODATA)
            return value
        if node.nocaps and name == CAPABILITY:
            # The kernel asks this before every write(2) (file_remove_privs);
            # a file this mount made has none until a setxattr puts one.
            raise _err(errno.ENODATA)
        return os.getxattr(self.upath(node), name, follow_symlinks=False)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file; returns (fh, keep_cache)."""
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
            fd = os.open(self.upath(node), (flags & keep) | os.O_CLOEXEC | os.O_NOFOLLOW)
            h = Handle(node, "upper", fd)
        else:
            h = self._lower_handle(node)
        node.opens += 1
        fh = self._new_fh()
        self.handles[fh] = h
        return fh, True

    def adopt_fd(self, node: Node, fd: int) -> int:
        """A file handle for an fd that create() opened."""
        node.opens += 1
        fh = self._new_fh()
        self.handles[fh] = Handle(node, "upper", fd)
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
        h = self.handles[fh]
        if h.kind != "upper" and h.node.upper:
            self._switch_to_upper(h)
        if h.kind == "lazy":
            self._open_big(h)
        if h.kind == "mem":
            if h.data is None:
                await self._load(h)
            return h.data[off:off + size]
        if h.kind == "raw" and h.digest not in self.verified:
            await self._verify_big(h)
        return await _pread(h.fd, size, off)

    def _switch_to_upper(self, h: Handle) -> None:
        """A lower handle whose node was copied up since reads the copy, as
        overlayfs's stacked file operations do."""
        fd = os.open(self.upath(h.node), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        if h.fd >= 0:
            os.close(h.fd)
        h.kind, h.fd, h.data = "upper", fd, None

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
        if not h.path:
            h.path = self.objects.raw_path(h.digest)
        try:
            data = _read_nowait(h.path, h.fd == -2)
        except FileNotFoundError:
            h.path, h.fd = self.objects.zst_path(h.digest), -2
            try:
                data = _read_nowait(h.path, True)
            except FileNotFoundError:
                raise Corrupt(f"object {h.digest[:12]} is missing from the store") from None
        compressed = h.fd == -2
        if data is None:  # not in the page cache: wait for the disk in a thread
            data = await trio.to_thread.run_sync(read_object_file, h.path, compressed)
        if h.digest not in self.verified:
            if len(data) > 256 << 10:
                ok = await trio.to_thread.run_sync(_digest_ok, data, h.digest)
            else:
                ok = _digest_ok(data, h.digest)
            self._check(ok, h)
        h.data = data

    async def _verify_big(self, h: Handle) -> None:
        ok = await trio.to_thread.run_sync(_file_digest_ok, h.path, h.digest)
        self._check(ok, h)

    def _check(self, ok: bool, h: Handle) -> None:
        if not ok:
            if h.digest not in self.bad:
                self.bad.add(h.digest)
            log.error("object %s (%s) fails its digest check; returning EIO",
                      h.digest, os.fsdecode(self.index.paths[h.node.lower]) if h.node.lower >= 0 else "?")
            raise _err(errno.EIO)
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

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.fd >= 0:
            os.close(h.fd)
        h.node.opens -= 1
        self.table.maybe_drop(h.node.ino)

    # -- directories ------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        node = self.node(ino)
        fh = self._new_fh()
        if not node.upper and node.children is None:
            listing = self._listing_cache.get(node.lower)
            if listing is None:
                idx = self.index
                listing = [(name, idx.ino(s), s) for name, s in idx.kids.get(node.lower, {}).items()]
                self._listing_cache[node.lower] = listing
        else:
            listing = [(name, ino_, -1) for name, ino_ in self.children(node).items()]
        self.dirs[fh] = (node, listing)
        return fh

    def readdir(self, fh: int, start: int, token) -> None:
        node, listing = self.dirs[fh]
        nodes = self.table.nodes
        if start < 2:
            for pos, name, ino in ((0, b".", node.ino), (1, b"..", node.parent or ROOT)):
                if pos < start:
                    continue
                if not pyfuse3.readdir_reply(token, name, self.attr(ino), pos + 1):
                    return
            start = 2
        lookups = self.table.lookups
        lower_attr = self.lower_attr
        for i in range(start - 2, len(listing)):
            name, ino, slot = listing[i]
            n = nodes.get(ino)
            if n is None and slot >= 0:
                a = lower_attr(slot)
            else:
                try:
                    a = self.attr(ino)
                except OSError:
                    continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, a, i + 3):
                return
            lookups[ino] = lookups.get(ino, 0) + 1

    def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    # -- namespace changes --------------------------------------------------------
    async def create(self, parent: int, name: bytes, fmt: int, mode: int, uid: int, gid: int,
                     rdev: int = 0, target: bytes = b"", flags: int = 0) -> tuple[Node, int]:
        """Make a new node; returns it and, for regular files, an open fd."""
        self._writable()
        if fmt == stat.S_IFCHR and rdev == 0:
            raise _err(errno.EPERM)  # would read back as a whiteout; overlayfs refuses it too
        async with self.lock:
            d = self.node(parent)
            await self.copy_up(d)
            kids = self.children(d)
            if name in kids:
                raise _err(errno.EEXIST)
            base = self.path(d)
            rel = _join(base, name)
            pst = os.lstat(self.upper.abspath(base))
            if pst.st_mode & stat.S_ISGID:
                gid = pst.st_gid
                if fmt == stat.S_IFDIR:
                    mode |= stat.S_ISGID
            over_whiteout = self.lower_has(d, name)
            dst = self.upper.temp() if over_whiteout else self.upper.abspath(rel)
            fd = -1
            perm = stat.S_IMODE(mode)
            try:
                if fmt == stat.S_IFREG:
                    acc = flags & os.O_ACCMODE if flags & os.O_ACCMODE != os.O_RDONLY else os.O_RDWR
                    fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | acc, perm)
                elif fmt == stat.S_IFDIR:
                    os.mkdir(dst, perm)
                elif fmt == stat.S_IFLNK:
                    os.symlink(target, dst)
                else:
                    os.mknod(dst, fmt | perm, rdev)
                os.chown(dst, uid, gid, follow_symlinks=False)
                if fmt != stat.S_IFLNK and perm & 0o7000:
                    os.chmod(dst, perm)
                if over_whiteout:
                    if fmt == stat.S_IFDIR:
                        os.setxattr(dst, b"trusted.overlay.opaque", b"y")
                    self.upper.put_over_whiteout(dst, rel, fmt == stat.S_IFDIR)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                _remove_quiet(dst)
                raise
            node = self.table.add(Node(self.table.new_ino(), d.ino, name, fmt, -1, True))
            node.nocaps = fmt == stat.S_IFREG
            if fmt == stat.S_IFDIR:
                node.children = {}
                d.nsubdirs += 1
            kids[name] = node.ino
            return node, fd

    async def link(self, ino: int, parent: int, name: bytes) -> Node:
        self._writable()
        async with self.lock:
            node = self.node(ino)
            if node.is_dir:
                raise _err(errno.EPERM)
            await self.copy_up(node)
            d = self.node(parent)
            await self.copy_up(d)
            kids = self.children(d)
            if name in kids:
                raise _err(errno.EEXIST)
            rel = _join(self.path(d), name)
            src = self.upath(node)
            if self.lower_has(d, name):
                tmp = self.upper.temp()
                os.link(src, tmp)
                try:
                    os.rename(tmp, self.upper.abspath(rel))
                except BaseException:
                    _remove_quiet(tmp)
                    raise
            else:
                os.link(src, self.upper.abspath(rel))
            kids[name] = node.ino
            node.add_link(d.ino, name)
            return node

    async def unlink(self, parent: int, name: bytes, want_dir: bool) -> None:
        self._writable()
        async with self.lock:
            d = self.node(parent)
            ino = self.child(d, name)
            if not ino:
                raise _err(errno.ENOENT)
            node = self.node(ino)
            if want_dir and not node.is_dir:
                raise _err(errno.ENOTDIR)
            if not want_dir and node.is_dir:
                raise _err(errno.EISDIR)
            if want_dir and not self.is_empty(node):
                raise _err(errno.ENOTEMPTY)
            if not node.upper and node.links:
                await self.copy_up(node)  # keep the rest of the hardlink group one inode
            await self.copy_up(d)
            kids = self.children(d)
            rel = _join(self.path(d), name)
            whiteout = self.lower_has(d, name)
            if node.upper:
                if want_dir:
                    self.upper.clear_whiteouts(rel)
                if whiteout:
                    self.upper.whiteout(rel, replace=True)
                elif want_dir:
                    os.rmdir(self.upper.abspath(rel))
                else:
                    os.unlink(self.upper.abspath(rel))
            else:
                self.upper.whiteout(rel, replace=False)
            del kids[name]
            if node.is_dir:
                d.nsubdirs -= 1
            node.drop_link(d.ino, name)
            self.table.maybe_drop(ino)

    async def _prepare_move(self, node: Node) -> None:
        if node.is_dir:
            if not node.upper or node.lower >= 0:
                await self.copy_up_tree(node)
        else:
            await self.copy_up(node)

    async def rename(self, op: int, oname: bytes, np_: int, nname: bytes, flags: int) -> None:
        self._writable()
        async with self.lock:
            od, nd = self.node(op), self.node(np_)
            sino = self.child(od, oname)
            if not sino:
                raise _err(errno.ENOENT)
            tino = self.child(nd, nname)
            if flags & RENAME_NOREPLACE and tino:
                raise _err(errno.EEXIST)
            if flags & RENAME_EXCHANGE and not tino:
                raise _err(errno.ENOENT)
            s = self.node(sino)
            t = self.node(tino) if tino else None
            if t is s:
                return
            if t is not None and not flags & RENAME_EXCHANGE:
                if s.is_dir and not t.is_dir:
                    raise _err(errno.ENOTDIR)
                if not s.is_dir and t.is_dir:
                    raise _err(errno.EISDIR)
                if t.is_dir and not self.is_empty(t):
                    raise _err(errno.ENOTEMPTY)
            await self._prepare_move(s)
            if t is not None and (flags & RENAME_EXCHANGE or (not t.upper and t.links)):
                await self._prepare_move(t)
            await self.copy_up(od)
            await self.copy_up(nd)
            okids, nkids = self.children(od), self.children(nd)
            orel, nrel = _join(self.path(od), oname), _join(self.path(nd), nname)
            oabs, nabs = self.upper.abspath(orel), self.upper.abspath(nrel)
            if flags & RENAME_EXCHANGE:
                renameat2(oabs, nabs, RENAME_EXCHANGE)
                for n, (dd, nm, rel) in ((s, (nd, nname, nrel)), (t, (od, oname, orel))):
                    if n.is_dir and self.lower_has(dd, nm):
                        self.upper.set_opaque(rel)
                okids[oname], nkids[nname] = t.ino, s.ino
                if s.is_dir != t.is_dir:
                    delta = 1 if s.is_dir else -1
                    od.nsubdirs -= delta
                    nd.nsubdirs += delta
                s.move_link((od.ino, oname), (nd.ino, nname))
                t.move_link((nd.ino, nname), (od.ino, oname))
                return
            need_whiteout = self.lower_has(od, oname)
            if t is not None:
                if t.is_dir and t.upper:
                    self.upper.clear_whiteouts(nrel)
                os.rename(oabs, nabs)
            elif self.lower_has(nd, nname) and s.is_dir:
                # A whiteout sits at the target: swap it with the dir and
                # reuse it at the old place when one is needed there.
                renameat2(oabs, nabs, RENAME_EXCHANGE)
                if need_whiteout:
                    need_whiteout = False
                else:
                    os.unlink(oabs)
            else:
                os.rename(oabs, nabs)
            if need_whiteout:
                self.upper.whiteout(orel, replace=False)
            if s.is_dir and self.lower_has(nd, nname):
                self.upper.set_opaque(nrel)
            del okids[oname]
            nkids[nname] = s.ino
            if s.is_dir:
                od.nsubdirs -= 1
                nd.nsubdirs += 1
            if t is not None:
                if t.is_dir:
                    nd.nsubdirs -= 1
                t.drop_link(nd.ino, nname)
            s.move_link((od.ino, oname), (nd.ino, nname))
            if t is not None:
                self.table.maybe_drop(t.ino)

    async def setattr(self, ino: int, fields, attr, fh: int | None) -> pyfuse3.EntryAttributes:
        self._writable()
        async with self.lock:
            node = self.node(ino)
            truncating = fields.update_size and attr.st_size == 0
            if not node.upper:
                await self.copy_up(node, data=not truncating)
            h = self.handles.get(fh) if fh is not None else None
            target = h.fd if h is not None and h.kind == "upper" else None
            if target is None and node.unlinked:
                raise _err(errno.ENOENT)
            path = self.upath(node) if target is None else None
            if fields.update_size:
                os.truncate(path if target is None else target, attr.st_size)
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if target is None:
                    os.chown(path, uid, gid, follow_symlinks=False)
                else:
                    os.fchown(target, uid, gid)
            if fields.update_mode and not node.fmt == stat.S_IFLNK:
                os.chmod(path if target is None else target, stat.S_IMODE(attr.st_mode))
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path) if target is None else os.fstat(target)
                at = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mt = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                if target is None:
                    os.utime(path, ns=(at, mt), follow_symlinks=False)
                else:
                    os.utime(target, ns=(at, mt))
            st = os.lstat(path) if target is None else os.fstat(target)
            return self.upper_attr(node, st)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._writable()
        if name.startswith(PRIVATE_PREFIX):
            raise _err(errno.EPERM)
        async with self.lock:
            node = self.node(ino)
            await self.copy_up(node)
            node.nocaps = False
            os.setxattr(self.upath(node), name, value, follow_symlinks=False)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        if name.startswith(PRIVATE_PREFIX):
            raise _err(errno.EPERM)
        async with self.lock:
            node = self.node(ino)
            if not node.upper and name not in self.index.xattrs(node.lower):
                raise _err(errno.ENODATA)
            await self.copy_up(node)
            os.removexattr(self.upath(node), name, follow_symlinks=False)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.upper.root if self.upper is not None else self.objects.root)


# -- helpers running in or out of worker threads -------------------------------
def _child_abs(parent_abs: bytes, name: bytes) -> bytes:
    return parent_abs + b"/" + name


def _remove_quiet(path: bytes) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def _digest_ok(data: bytes, digest: str) -> bool:
    return blake3.blake3(data).hexdigest() == digest


def _file_digest_ok(path: str, digest: str) -> bool:
    return file_digest(path) == digest


def _read_nowait(path: str, compressed: bool) -> bytes | None:
    """The object's content if its file is wholly in the page cache and
    small enough to handle in the trio thread, else None."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        n = os.fstat(fd).st_size
        if n > 256 << 10:
            return None
        buf = bytearray(n)
        try:
            got = os.preadv(fd, [buf], 0, os.RWF_NOWAIT) if n else 0
        except BlockingIOError:
            return None
        if got != n:
            return None
    finally:
        os.close(fd)
    return unpack_object(bytes(buf), path) if compressed else bytes(buf)


async def _pread(fd: int, size: int, off: int) -> bytes:
    """pread in the trio thread when the page cache has the bytes,
    otherwise in a worker thread so a disk wait does not stall the loop."""
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], off, os.RWF_NOWAIT)
    except BlockingIOError:
        n = 0
    if n == size:
        return buf
    if n == 0:
        return await trio.to_thread.run_sync(os.pread, fd, size, off)
    rest = await trio.to_thread.run_sync(os.pread, fd, size - n, off + n)
    return bytes(memoryview(buf)[:n]) + rest
