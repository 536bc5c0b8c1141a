"""Inodes of a mount: lookup counts and the mutable state over the index.

An inode is either *lower only* (nothing of it has been written; all it
is can be read from the index, so no :class:`Node` needs to exist) or
has a :class:`Node` recording its state: whether it is in the upper dir,
its links, and for a directory whose listing has been touched the merged
children. A lower-only node is created on demand from its slot and may
be dropped again when the kernel forgets it (``droppable``); any node
with state stays until it is unlinked *and* forgotten *and* closed
(s3ql's rule: purge only when refcount and lookup count are both 0).

Contract for callers (``fs.union``): mutate Nodes only from the trio
thread, and never across an ``await`` that another request could
interleave with -- the union's write lock guarantees that.
"""

from __future__ import annotations

import bisect
import collections
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from layerfs.fs.index import LowerIndex

ROOT = 1  # the root's inode number; FUSE's too (ops checks pyfuse3.ROOT_INODE against it)


class Attr(NamedTuple):
    """What the union says about an inode (a getattr/lookup reply).

    A NamedTuple rather than a frozen dataclass: it is made on every
    getattr of an upper node, and a frozen dataclass's ``__init__``
    (``object.__setattr__`` per field) costs several times as much.
    ``lower`` marks the attrs of lower-only inodes, which never change
    (they are cached per slot, and adapters may cache what they make of them).
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    timeout: float  # how long a kernel may cache the entry and its attrs
    lower: bool


class Opened(NamedTuple):
    """An open's reply: the file handle, and whether the kernel may keep
    the file's cached pages."""

    fh: int
    keep_cache: bool


@dataclass(frozen=True)
class SetAttr:
    """The changes of one setattr request; None leaves a field as it is."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


FIRST_ENTRY = 2  # readdir offset of a directory's first entry, after "." (0) and ".." (1)


class Children(dict):
    """A directory's merged entries, name -> inode, each at a readdir
    offset of its own that stays while the entry does.

    Offsets count up in the order names came in (the dict's order), and a
    name removed and made again comes in anew, at the end. So a listing
    read in pieces, while entries come and go between the pieces, never
    skips or repeats an entry that stayed: what POSIX asks of readdir, and
    what the kernel's cache of a listing (kept by offset) relies on.
    ``FIRST_ENTRY + i`` is the offset of the i-th entry of a fresh
    listing, as of a lower directory's listing (``Union._add_lower``), so
    a directory's offsets do not move when it is copied up."""

    __slots__ = ("_offsets", "_next", "_sorted")

    def __init__(self) -> None:
        super().__init__()
        self._offsets: dict[bytes, int] = {}
        self._next = FIRST_ENTRY
        self._sorted: tuple[list[int], list[bytes]] | None = None

    def __setitem__(self, name: bytes, ino: int) -> None:
        if name not in self._offsets:
            self._offsets[name] = self._next
            self._next += 1
            self._sorted = None
        super().__setitem__(name, ino)

    def __delitem__(self, name: bytes) -> None:
        super().__delitem__(name)
        del self._offsets[name]
        self._sorted = None

    def pop(self, name: bytes, *default: int) -> int:  # type: ignore[override]
        if name in self._offsets:
            del self._offsets[name]
            self._sorted = None
        return super().pop(name, *default)

    def since(self, offset: int) -> Iterator[tuple[bytes, int]]:
        """(name, offset) of the entries at *offset* and after, in order.
        Lazy: a READDIR takes the few that fit its buffer, so reading a
        listing in pieces costs each piece its own entries, not the rest
        of the directory (10,000 entries in pieces of 25: 0.28 s when
        each piece copied the rest)."""
        if self._sorted is None:
            self._sorted = (list(self._offsets.values()), list(self._offsets))
        offsets, names = self._sorted
        for i in range(bisect.bisect_left(offsets, offset), len(offsets)):
            yield names[i], offsets[i]


class Node:
    """State of one inode that is not (or no longer) plain lower."""

    __slots__ = ("ino", "parent", "name", "fmt", "lower", "upper", "children", "nsubdirs",
                 "links", "opens", "unlinked", "nocaps", "gone")

    def __init__(self, ino: int, parent: int, name: bytes, fmt: int, lower: int, upper: bool) -> None:
        self.ino = ino
        self.parent = parent          # inode of the dir holding the primary link
        self.name = name              # name of the primary link
        self.fmt = fmt                # stat.S_IFMT bits; never changes
        self.lower = lower            # index slot: content source (non-dirs, until
        #                               copied up) / merged children source (dirs; -1
        #                               when opaque or none)
        self.upper = upper            # exists in the upper dir
        self.children: Children | None = None  # dirs: merged name -> ino
        self.nsubdirs = 0             # dirs with children: how many are dirs
        self.links: list[tuple[int, bytes]] | None = None  # extra links (hardlinks)
        self.opens = 0                # open file handles
        self.unlinked = False
        self.nocaps = False           # made by this mount, no security.capability set since
        self.gone: Attr | None = None  # a removed dir's last attrs (fstat of an fd still open on it)

    @property
    def is_dir(self) -> bool:
        return self.fmt == stat.S_IFDIR

    def all_links(self) -> list[tuple[int, bytes]]:
        primary = [] if self.unlinked else [(self.parent, self.name)]
        return primary + (self.links or [])

    def add_link(self, parent: int, name: bytes) -> None:
        if self.unlinked:
            self.parent, self.name, self.unlinked = parent, name, False
        else:
            self.links = (self.links or []) + [(parent, name)]

    def drop_link(self, parent: int, name: bytes) -> None:
        if not self.unlinked and (self.parent, self.name) == (parent, name):
            if self.links:
                self.parent, self.name = self.links.pop(0)
                if not self.links:
                    self.links = None
            else:
                self.unlinked = True
            return
        if self.links and (parent, name) in self.links:
            self.links.remove((parent, name))
            if not self.links:
                self.links = None

    def move_link(self, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        if (self.parent, self.name) == old and not self.unlinked:
            self.parent, self.name = new
        elif self.links and old in self.links:
            self.links[self.links.index(old)] = new


@dataclass(frozen=True)
class InodeStats:
    nodes: int
    looked_up: int
    next_ino: int


class InodeTable:
    """Nodes by inode number plus the kernel's lookup counts."""

    def __init__(self, index: LowerIndex) -> None:
        self.index = index
        self.nodes: dict[int, Node] = {}
        # ino -> lookups the kernel holds; a Counter for update(), which
        # counts a readdir's entries in one C loop
        self.lookups: collections.Counter[int] = collections.Counter()
        self.next_ino = len(index) + 1

    def statistics(self) -> InodeStats:
        return InodeStats(len(self.nodes), len(self.lookups), self.next_ino)

    def new_ino(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def get(self, ino: int) -> Node | None:
        """The Node of *ino*, made from the index for a lower-only inode."""
        node = self.nodes.get(ino)
        if node is None and 0 < ino <= len(self.index):
            slot = ino - 1
            idx = self.index
            fmt = stat.S_IFMT(idx.meta[slot][0])
            node = Node(ino, idx.parent[slot] + 1, idx.name(slot), fmt, slot, False)
            group = idx.groups.get(slot)
            if group and len(group) > 1:
                node.links = [(idx.parent[s] + 1, idx.name(s)) for s in group[1:]]
            self.nodes[ino] = node
        return node

    def add(self, node: Node) -> Node:
        self.nodes[node.ino] = node
        return node

    def looked_up(self, ino: int, n: int = 1) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + n

    def looked_up_each(self, inos: list[int]) -> None:
        """One lookup more for each of *inos* (a readdir's entries)."""
        self.lookups.update(inos)

    def forget(self, ino: int, n: int) -> None:
        left = self.lookups.get(ino, 0) - n
        if left > 0:
            self.lookups[ino] = left
            return
        self.lookups.pop(ino, None)
        self.maybe_drop(ino)

    def maybe_drop(self, ino: int) -> None:
        node = self.nodes.get(ino)
        if node is None or node.opens or ino in self.lookups:
            return
        if node.unlinked or droppable(node):
            del self.nodes[ino]

    def is_dir(self, ino: int) -> bool:
        node = self.nodes.get(ino)
        if node is not None:
            return node.is_dir
        return self.index.is_dir(ino - 1)


def droppable(node: Node) -> bool:
    """True when the node holds nothing the index cannot give back."""
    return not node.upper and node.children is None and node.ino - 1 == node.lower
