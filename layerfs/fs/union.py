"""The union of an image's layers and an upper dir: overlayfs semantics.

This is the filesystem proper, independent of FUSE plumbing: nothing in
the core (this module, ``names``, ``files``, ``upper``, ``inodes``,
``index``) knows pyfuse3. Requests come in as the kernel shapes them
(inode numbers, names as bytes), replies go out as :class:`Attr` records,
readdir hands ``(name, reply, next offset)`` to a callback (the reply is
what the adapter makes of the entry's ``Attr``) and failures are ``OSError``
with an errno (or a ``LayerfsError`` from the store). ``fs.ops`` is the
thin pyfuse3 adapter over it; tests drive the core in-process. The core
keeps the kernel's lookup counts itself: every reply that hands the
kernel an entry (lookup, mkdir, create, ..., readdir entries) counts one,
``forget`` takes them back. Rules, from
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

Identity: one path is one inode. A lower directory keeps its index inode
number (slot + 1) when it is copied up, and when a (re)mount finds it in
the upper dir already; its lower children name it as their parent by that
number. Whether a node is in the upper dir is read from its parent's
upper listing before the node is made (``_lower_node``), never assumed,
and a copy-up never replaces what is in the upper dir (RENAME_NOREPLACE).

Names longer than NAME_MAX are ENAMETOOLONG (FUSE passes up to 1024
bytes); the upper dir is reached relative to dir fds (``fs.upper``), so
paths longer than PATH_MAX work as on the upper's own filesystem.

Concurrency: read-side requests run concurrently and never take a lock.
Every request that changes the namespace or copies up takes ``self.lock``
(a ``fs.loop.NoCheckpointLock``) for its whole duration, so the state kept in Nodes is
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
import time
from collections.abc import Callable
from typing import Any

import trio

from layerfs.fs.files import FileIO
from layerfs.fs.index import LowerIndex
from layerfs.fs.inodes import FIRST_ENTRY, ROOT, Attr, Children, InodeTable, Node, SetAttr
from layerfs.fs.loop import NoCheckpointLock
from layerfs.fs.names import NameOps, _err, _join
from layerfs.fs.upper import (
    NAME_MAX,
    RENAME_NOREPLACE,
    UpperDir,
    discard,
    escape_xattr,
    is_whiteout,
    shown_xattr,
)
from layerfs.store.objects import ObjectStore

log = logging.getLogger("layerfs.fs")

LOWER_TIMEOUT = 86400.0   # lower-only nodes never change behind the kernel's back
UPPER_TIMEOUT = 60.0      # upper nodes change only through this mount, too; a hedge
CAPABILITY = b"security.capability"
THREAD_COPY = 1 << 20     # copy-ups bigger than this run in a worker thread


class Listing:
    """The entries of a lower-only directory: entry *i* is ``names[i]``,
    inode ``inos[i]``, index slot ``slots[i]``, at offset ``FIRST_ENTRY +
    i``; ``replies`` holds ``(name, reply, next offset)`` per entry, made
    at the listing's first read."""

    __slots__ = ("names", "inos", "slots", "replies")

    def __init__(self, names: list[bytes], inos: list[int], slots: list[int] | None) -> None:
        self.names = names
        self.inos = inos
        self.slots = slots
        self.replies: list[tuple[bytes, Any, int]] | None = None


class Union(FileIO, NameOps):
    def __init__(self, index: LowerIndex, objects: ObjectStore, upper: UpperDir | None,
                 read_only: bool = False) -> None:
        self.index = index
        self.nslots = len(index)  # the index never changes
        self.objects = objects
        self.upper = upper
        self.read_only = read_only or upper is None
        self.table = InodeTable(index)
        self.lock = NoCheckpointLock()
        self.verified: set[str] = set()
        # Tells the kernel to drop its cached attributes of an inode; set by
        # the adapter (fs.ops), a no-op in-process.
        self.attrs_changed: Callable[[int], None] = lambda ino: None
        self.bad: dict[str, tuple] = {}  # big objects found bad: digest -> identity of the file then
        self._init_files()
        self._lower_listings: dict[int, Listing] = {}  # lower-only dirs, by slot
        # What the adapter hands the kernel for an entry's attributes (fs.ops:
        # an EntryAttributes), set by it; the Attr itself in-process. Lower
        # listings keep theirs (lower attributes never change).
        self.reply_of: Callable[[Attr], Any] = lambda a: a
        self._upper_links: dict[int, int] = {}  # upper st_ino -> ino, for pre-mount hardlinks
        root = Node(ROOT, 0, b"", stat.S_IFDIR, 0, upper is not None)
        if upper is not None and upper.is_opaque(b""):
            root.lower = -1
        self.table.add(root)

    # -- naming -------------------------------------------------------------
    def node(self, ino: int) -> Node:
        n = self.table.nodes.get(ino)
        return n if n is not None else self._lower_node(ino)

    def _lower_node(self, ino: int) -> Node:
        """The Node of a lower inode that has none yet. Its parent's upper
        listing is read first: if the inode is a directory that is in the
        upper dir too, that listing makes its node (in the upper), so no
        second node ever believes it is lower only."""
        idx = self.index
        if not 0 < ino <= len(idx):
            raise _err(errno.ESTALE)
        pslot = idx.parent[ino - 1]
        if pslot >= 0:
            parent = self.node(pslot + 1)
            if parent.upper and parent.children is None:
                self._materialize(parent)
                n = self.table.nodes.get(ino)
                if n is not None:
                    return n
        return self.table.get(ino)

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

    def children(self, d: Node) -> Children:
        """Merged listing of an upper dir (built on first use, then kept)."""
        if d.children is None:
            self._materialize(d)
        return d.children

    def _materialize(self, d: Node) -> None:
        idx = self.index
        kids = Children()
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
                if fmt == stat.S_IFDIR and d.lower >= 0:
                    ls = idx.child(d.lower, name)
                    if ls >= 0 and idx.is_dir(ls) and not self.upper.is_opaque(_join(base, name)):
                        kids[name] = self._merged_dir(d, name, ls).ino
                        continue
                n = self.table.add(Node(self.table.new_ino(), d.ino, name, fmt, -1, True))
                if fmt != stat.S_IFDIR and st.st_nlink > 1:
                    self._upper_links[st.st_ino] = n.ino
                kids[name] = n.ino
        d.children = kids
        d.nsubdirs = sum(1 for ino in kids.values() if self.table.is_dir(ino))

    def _merged_dir(self, d: Node, name: bytes, slot: int) -> Node:
        """The node of a directory both in the upper dir and below: the
        lower inode, marked as in the upper."""
        node = self.table.nodes.get(slot + 1)
        if node is None:
            return self.table.add(Node(slot + 1, d.ino, name, stat.S_IFDIR, slot, True))
        if not node.upper:  # made before its parent was listed: what the listing says holds
            node.upper, node.children = True, None
            self.index._attr_cache.pop(slot, None)
        return node

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
    def lower_attr(self, slot: int) -> Attr:
        cache = self.index._attr_cache
        a = cache.get(slot)
        if a is None:
            m = self.index.meta[slot]
            mode = m[0]
            size = m[4] if stat.S_ISREG(mode) else (len(m[6]) if stat.S_ISLNK(mode) else 0)
            blocks = (size + 511) // 512 if stat.S_ISREG(mode) else 8 * stat.S_ISDIR(mode)
            a = cache[slot] = Attr(self.index.ino(slot), mode, self.index.nlink(slot), m[1], m[2], m[7],
                                   size, 4096, blocks, m[3], m[3], m[3], LOWER_TIMEOUT, True)
        return a

    def attr(self, ino: int) -> Attr:
        """getattr: the attributes of *ino* (no lookup counted)."""
        node = self.table.nodes.get(ino)
        if node is None:
            if not 0 < ino <= self.nslots:
                raise _err(errno.ESTALE)
            return self.lower_attr(ino - 1)
        if node.gone is not None and node.unlinked:
            return node.gone
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
        return self.upper.lstat(self.path(node))

    def upper_attr(self, node: Node, st: os.stat_result) -> Attr:
        if node.is_dir:
            self.children(node)
            nlink = 2 + node.nsubdirs
        else:
            nlink = st.st_nlink
        return Attr(node.ino, st.st_mode, nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
                    st.st_blksize, st.st_blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
                    UPPER_TIMEOUT, False)

    # -- lookups: what the kernel holds -------------------------------------
    def lookup(self, parent: int, name: bytes) -> Attr | None:
        """The entry *name* in dir *parent*, counted as one lookup; None
        when there is no such name (a negative entry the kernel may cache)."""
        if len(name) > NAME_MAX:  # check_name, inline: a lookup is the commonest request
            raise _err(errno.ENAMETOOLONG)
        ino = self.child(self.node(parent), name)
        if not ino:
            if name == b"." or name == b"..":
                raise _err(errno.ENOENT)  # FUSE asks these only without supports_dot_lookup
            return None
        return self.entry(ino)

    def entry(self, ino: int) -> Attr:
        """The attributes of *ino*, handed to the kernel: one lookup more."""
        a = self.attr(ino)
        self.table.looked_up(ino)
        return a

    def forget(self, ino: int, n: int) -> None:
        self.table.forget(ino, n)
        if ino not in self.table.lookups and ino in self.kernel_has:  # the inode went, its pages with it
            with self.push_lock:  # (not between a hand-over's push and its record of it)
                self.kernel_has.discard(ino)

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
        if node.upper:  # the parents' upper listings had it already
            return
        meta = self.index.meta[node.lower]
        verified = self.verified
        if stat.S_ISREG(meta[0]) and data and meta[4] > THREAD_COPY:
            tmp = await trio.to_thread.run_sync(self.upper.build_copy, meta, data, verified)
        else:
            tmp = self.upper.build_copy(meta, data, verified)
        # Like overlayfs, a copy-up leaves the parents' times alone.
        parents = {p: self.path(self.node(p)) for p, _ in links}
        times = {p: self.upper.lstat(rel) for p, rel in parents.items()}
        first = _join(parents[links[0][0]], links[0][1])
        try:
            # Never over something: what is in the upper dir is newer than below.
            self.upper.place(tmp, first, RENAME_NOREPLACE)
        except BaseException as exc:
            discard(tmp)
            if isinstance(exc, FileExistsError):
                self._adopt(node, first)
                return
            raise
        for p, name in links[1:]:
            self.upper.link(first, _join(parents[p], name))
        for p, st in times.items():
            self.upper.utime(parents[p], (st.st_atime_ns, st.st_mtime_ns))
        await self.settle_pushes(node)  # node.upper = True, once read-ahead leaves it alone
        self.index._attr_cache.pop(node.ino - 1, None)
        # The kernel only knows of the request that asked for the copy-up;
        # the node's attributes (now the upper's: a new ctime) and its
        # parents' ctimes changed behind its back, and it would go on
        # showing the old ones, then the new ones mid-walk ("file changed
        # as we read it" from tar).
        for ino in (node.ino, *times):
            self.attrs_changed(ino)

    def _adopt(self, node: Node, rel: bytes) -> None:
        """A copy-up found *rel* in the upper dir already. A directory
        there is taken as it is (its mode, owner and entries are what was
        written); anything else means the node table is wrong: EIO."""
        if not (node.is_dir and stat.S_ISDIR(self.upper.lstat(rel).st_mode)):
            log.error("copy-up of %s: something else is in the upper dir already", os.fsdecode(rel))
            raise _err(errno.EIO)
        log.warning("copy-up of %s: the directory is in the upper dir already; kept", os.fsdecode(rel))
        node.upper, node.children = True, None
        if self.upper.is_opaque(rel):
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
                    self.upper.unlink(_join(rel, name))
            d.lower = -1

    # -- reading ------------------------------------------------------------
    def readlink(self, ino: int) -> bytes:
        node = self.table.nodes.get(ino)
        if node is None or not node.upper:
            slot = ino - 1 if node is None else node.lower
            return self.index.meta[slot][6]
        return self.upper.readlink(self.path(node))

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.table.nodes.get(ino)
        if node is None or not node.upper:
            return list(self.index.xattrs(ino - 1 if node is None else node.lower))
        names = (shown_xattr(os.fsencode(n)) for n in self.upper.listxattr(self.path(node)))
        return [n for n in names if n is not None]

    def getxattr(self, ino: int, name: bytes) -> bytes:
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
        return self.upper.getxattr(self.path(node), escape_xattr(name))

    # -- directories ------------------------------------------------------------
    # Reads of a directory are not tied to an open handle: the kernel may
    # read a listing with no OPENDIR before it (fs/lowlevel.py), and caches
    # what it read by offset. An entry's offset is its own for as long as
    # it exists (inodes.Children), so any reader may go on from any offset.
    def opendir(self, ino: int) -> int:
        """The handle of an open directory: its inode."""
        self.node(ino)
        return ino

    def readdir(self, ino: int, start: int, add: Callable[[bytes, Any, int], bool]) -> None:
        """Hand the entries of directory *ino* from offset *start* on to
        *add(name, reply, offset of the next entry)*, where reply is
        ``reply_of(attrs)``; *add* returns False when the kernel's buffer
        is full. Each entry *add* took counts as a lookup; the one it
        refused is not counted (nor sent), and nothing after it is offered."""
        node = self.node(ino)
        if start < FIRST_ENTRY:
            for pos, name, dot in ((0, b".", node.ino), (1, b"..", node.parent or ROOT)):
                if pos >= start and not add(name, self.reply_of(self.attr(dot)), pos + 1):
                    return
            start = FIRST_ENTRY
        if not node.upper and node.children is None:
            self._add_lower(self._lower_listing(node.lower), start - FIRST_ENTRY, add)
        else:
            self._add_live(self.children(node), start, add)

    def _lower_listing(self, slot: int) -> Listing:
        """The entries of a lower-only directory. They never change: the
        listing is made once per slot and kept."""
        listing = self._lower_listings.get(slot)
        if listing is None:
            idx = self.index
            kids = idx.kids.get(slot, {})
            slots = list(kids.values())
            listing = Listing(list(kids), [idx.ino(s) for s in slots], slots)
            self._lower_listings[slot] = listing
        return listing

    def _add_lower(self, listing: Listing, first: int, add: Callable[[bytes, Any, int], bool]) -> None:
        """The entries of a directory that is still lower only: none of
        them has changed (a change to any copies the directory up first),
        so their replies are made once and kept with the listing."""
        replies = listing.replies
        if replies is None:
            reply_of, lower_attr = self.reply_of, self.lower_attr
            replies = listing.replies = [(name, reply_of(lower_attr(slot)), FIRST_ENTRY + i + 1)
                                         for i, (name, slot) in enumerate(zip(listing.names, listing.slots))]
        end = len(replies)
        for name, reply, next_off in replies[first:]:
            if not add(name, reply, next_off):
                end = next_off - FIRST_ENTRY - 1
                break
        self.table.looked_up_each(listing.inos[first:end])
        if self.readahead.waiting:
            self._listed(listing.slots[first:end])

    def _add_live(self, kids: Children, start: int, add: Callable[[bytes, Any, int], bool]) -> None:
        """The entries of a directory in the upper dir (or whose listing
        was merged): attributes as they are now."""
        reply_of = self.reply_of
        for name, offset in kids.since(start):
            ino = kids[name]
            try:
                a = self.attr(ino)
            except OSError:
                continue  # gone from the upper dir behind the mount's back
            if not add(name, reply_of(a), offset + 1):
                return
            self.table.looked_up(ino)

    def _listed(self, slots: list[int]) -> None:
        """Lower files the kernel now knows: read-ahead may hand over what it kept for them."""
        waiting = self.readahead.waiting
        for slot in slots:
            if slot in waiting:
                self.readahead.known(slot)

    def releasedir(self, fh: int) -> None:
        """Nothing to let go: a directory handle is its inode."""

    async def setattr(self, ino: int, attr: SetAttr, fh: int | None = None) -> Attr:
        self._writable()
        async with self.lock:
            node = self.node(ino)
            truncating = attr.size == 0
            emptied = None  # (atime, mtime) of a lower file that a truncate to 0 copies up empty
            if not node.upper:
                if truncating and self.index.meta[node.lower][4]:
                    emptied = self.index.meta[node.lower][3]
                await self.copy_up(node, data=not truncating)
            h = self.handles.get(fh) if fh is not None else None
            target = h.fd if h is not None and h.kind == "upper" else None
            if target is None and node.unlinked:
                raise _err(errno.ENOENT)
            path = self.path(node) if target is None else None
            up = self.upper
            if attr.size is not None:
                if target is None:
                    up.truncate(path, attr.size)
                else:
                    os.truncate(target, attr.size)
                if emptied is not None and attr.mtime_ns is None:
                    # The size did change, but not in the upper dir (the copy
                    # is empty already): set the mtime the truncate would have.
                    up.utime(path, (emptied, time.time_ns()))
            if attr.uid is not None or attr.gid is not None:
                uid = -1 if attr.uid is None else attr.uid
                gid = -1 if attr.gid is None else attr.gid
                if target is None:
                    up.chown(path, uid, gid)
                else:
                    os.fchown(target, uid, gid)
            if attr.mode is not None and not node.fmt == stat.S_IFLNK:
                if target is None:
                    up.chmod(path, stat.S_IMODE(attr.mode))
                else:
                    os.chmod(target, stat.S_IMODE(attr.mode))
            if attr.atime_ns is not None or attr.mtime_ns is not None:
                st = up.lstat(path) if target is None else os.fstat(target)
                at = st.st_atime_ns if attr.atime_ns is None else attr.atime_ns
                mt = st.st_mtime_ns if attr.mtime_ns is None else attr.mtime_ns
                if target is None:
                    up.utime(path, (at, mt))
                else:
                    os.utime(target, ns=(at, mt))
            st = up.lstat(path) if target is None else os.fstat(target)
            return self.upper_attr(node, st)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._writable()
        async with self.lock:
            node = self.node(ino)
            await self.copy_up(node)
            node.nocaps = False
            self.upper.setxattr(self.path(node), escape_xattr(name), value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        async with self.lock:
            node = self.node(ino)
            if not node.upper and name not in self.index.xattrs(node.lower):
                raise _err(errno.ENODATA)
            await self.copy_up(node)
            self.upper.removexattr(self.path(node), escape_xattr(name))

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.upper.root if self.upper is not None else self.objects.root)
