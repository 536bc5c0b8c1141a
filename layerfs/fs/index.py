"""The read-only merged index of an image's layers, built once per mount.

The layers of an image never change, so their union (overlayfs rules, see
``layerfs.store.tree.flatten``) is computed once at mount time and frozen
into flat arrays indexed by a *slot*:

* slots are the merged paths in bytewise order, so slot 0 is the root;
* the inode number of a lower path is ``slot + 1`` (the root is inode 1,
  ``fs.inodes.ROOT``, as FUSE's); the members of a hardlink group all use the
  inode of their first member, so they are one inode; its ``st_nlink`` is
  the group's size in the layer it comes from, as overlayfs shows it
  (names an upper layer covers still count);
* a directory slot maps child names (bytes, as FUSE gives them) to slots.

Nothing here changes after construction. The mutable overlay of the
upper directory lives in ``fs.inodes`` and refers to slots.

The index of an image is also cached on disk (``ROOT/fscache/<image id>.v<format>``,
marshal format): an image id names its layers for ever, so the cache is
always valid, and loading it is several times faster than decoding the
manifests and flattening them again.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import re
import stat
from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store's modules load only when an index is built (not in the daemon)
    from layerfs.store.manifest import Entry
    from layerfs.store.tree import MergedTree

CACHE_FORMAT = 4


class LowerIndex:
    """Slots of the merged lower tree; see the module docstring.

    Per slot it keeps the compact tuple ``(fmt|mode, uid, gid, mtime_ns,
    size, digest, target, rdev, xattrs)`` rather than an ``Entry``: a
    30,000-entry image then costs a few MB and loads from the cache in tens
    of milliseconds.
    """

    __slots__ = ("paths", "meta", "parent", "kids", "leader", "groups", "nsubdirs", "packed", "link_counts",
                 "_attr_cache")

    def __init__(self, paths: list[bytes], meta: list[tuple], parent: array,
                 kids: dict[int, dict[bytes, int]], groups: dict[int, list[int]], link_counts: dict[int, int],
                 nsubdirs: dict[int, int] | None = None, packed: frozenset[str] = frozenset()) -> None:
        self.paths = paths
        # digests stored as .zst: a hint for the reader, which tries that
        # file first (a miss in a cold object dir costs a disk read)
        self.packed = packed
        self.meta = meta
        self.parent = parent
        self.kids = kids
        self.groups = groups
        self.leader: dict[int, int] = {m: lead for lead, members in groups.items() for m in members}
        if nsubdirs is None:
            nsubdirs = {d: sum(1 for s in names.values() if stat.S_ISDIR(meta[s][0]))
                        for d, names in kids.items()}
        self.nsubdirs = nsubdirs
        # {first visible member's slot: links in its layer}, where that is more than one
        self.link_counts = link_counts
        self._attr_cache: dict[int, object] = {}

    # -- construction -----------------------------------------------------
    @classmethod
    def from_tree(cls, tree: MergedTree, packed: frozenset[str] = frozenset()) -> "LowerIndex":
        encoded = sorted((os.fsencode(p), p) for p in tree.entries)
        paths = [b for b, _ in encoded]
        slot_of = {b: i for i, b in enumerate(paths)}
        from layerfs.store import manifest as mf

        with_size, symlink, entries = (mf.FILE, mf.HARDLINK), mf.SYMLINK, tree.entries
        meta = []
        append = meta.append
        parent = array("q", [-1]) * len(paths)
        kids: dict[int, dict[bytes, int]] = {}
        S_ISDIR = stat.S_ISDIR
        for i, (b, p) in enumerate(encoded):
            e = entries[p]
            kind, st_mode = e.kind, e.st_mode
            append((st_mode, e.uid, e.gid, e.mtime_ns, e.size if kind in with_size else 0, e.digest,
                    e.target.encode("utf-8", "surrogateescape") if kind == symlink else b"", e.rdev,
                    tuple(e.xattrs)))
            if S_ISDIR(st_mode):
                kids[i] = {}
            if i:
                head, _, name = b.rpartition(b"/")
                ps = slot_of[head]
                parent[i] = ps
                kids[ps][name] = i
        groups: dict[int, list[int]] = {}
        link_counts: dict[int, int] = {}
        by_key: dict[tuple, list[int]] = {}
        for p, key in tree.links.items():
            by_key.setdefault(key, []).append(slot_of[os.fsencode(p)])
        for key, members in by_key.items():
            members.sort()
            if len(members) > 1:
                groups[members[0]] = members
            count = tree.link_counts.get(key, len(members))
            if count > 1:
                link_counts[members[0]] = count
        return cls(paths, meta, parent, kids, groups, link_counts, packed=packed)

    def dump(self) -> bytes:
        return marshal.dumps((CACHE_FORMAT, self.paths, self.meta, self.parent.tobytes(), self.kids,
                              self.groups, self.nsubdirs, self.packed, self.link_counts))

    @classmethod
    def load(cls, data: bytes) -> "LowerIndex":
        fields = marshal.loads(data)
        if fields[0] != CACHE_FORMAT:
            raise ValueError("index cache format")
        _, paths, meta, parent, kids, groups, nsubdirs, packed, link_counts = fields
        par = array("q")
        par.frombytes(parent)
        return cls(paths, meta, par, kids, groups, link_counts, nsubdirs, packed)

    # -- queries ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def child(self, dslot: int, name: bytes) -> int:
        """Slot of *name* in the directory *dslot*, or -1."""
        names = self.kids.get(dslot)
        if names is None:
            return -1
        return names.get(name, -1)

    def ino(self, slot: int) -> int:
        return self.leader.get(slot, slot) + 1

    def st_mode(self, slot: int) -> int:
        return self.meta[slot][0]

    def is_dir(self, slot: int) -> bool:
        return stat.S_ISDIR(self.meta[slot][0])

    def nlink(self, slot: int) -> int:
        if slot in self.kids:
            return 2 + self.nsubdirs[slot]
        return self.link_counts.get(self.leader.get(slot, slot), 1)

    def name(self, slot: int) -> bytes:
        return self.paths[slot].rpartition(b"/")[2]

    def entry(self, slot: int) -> Entry:
        """The slot as a store Entry (used by copy-up)."""
        from layerfs.store.manifest import Entry

        m = self.meta[slot]
        kind = _kind_of(m[0])
        return Entry(os.fsdecode(self.paths[slot]), kind, stat.S_IMODE(m[0]), m[1], m[2], m[3], m[4],
                     m[5], m[6], m[7], tuple(m[8]))

    def xattrs(self, slot: int) -> dict[bytes, bytes]:
        return {os.fsencode(k): v for k, v in self.meta[slot][8]}

    def group(self, slot: int) -> list[int]:
        """All slots of the hardlink group of *slot* (just [slot] if none)."""
        lead = self.leader.get(slot)
        return [slot] if lead is None else self.groups[lead]


def _kind_of(st_mode: int) -> str:
    from layerfs.store import manifest as mf

    fmt = stat.S_IFMT(st_mode)
    for kind, f in mf.S_IFMT_OF.items():
        if f == fmt and kind != mf.HARDLINK:
            return kind
    raise ValueError(f"bad mode {st_mode:o}")


def cache_path(store_root: str, image_id: str) -> str:
    from layerfs.store.layout import StoreLayout

    return StoreLayout(store_root).fscache_entry(f"{image_id}.v{CACHE_FORMAT}")


def drop_other_formats(path: str, suffix: str = "") -> None:
    """Remove the caches of *path*'s key written in other formats
    (``<key>``, ``<key>.v<N><suffix>``): gc keeps them while the key lives.
    Temp files of a concurrent writer (``<name>.<pid>.tmp``) are not matched."""
    folder, name = os.path.split(path)
    key = name.split(".")[0]
    pattern = re.compile(re.escape(key) + r"(\.v\d+" + re.escape(suffix) + ")?")
    for other in os.listdir(folder):
        if other != name and pattern.fullmatch(other):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, other))


def ensure_index_cache(store, image) -> str:
    """Path of the cached index of *image*, built now if missing.

    Cache writes are best effort (tmp + rename, no fsync): a lost or torn
    cache file is rebuilt, never trusted, because marshal checks its input.
    """
    path = cache_path(store.root, image.id)
    if os.path.exists(path):
        return path
    index = LowerIndex.from_tree(store.merged_tree(image), frozenset(store.compressed_objects(image.layers)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    drop_other_formats(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(index.dump())
    os.replace(tmp, path)
    return path


def read_index_cache(store_root: str, image_id: str, path: str | None = None) -> LowerIndex:
    """Load a cached index (rebuilding it if the file is unusable)."""
    import gc

    path = path or cache_path(store_root, image_id)
    try:
        with open(path, "rb") as f:
            data = f.read()
        enabled = gc.isenabled()
        gc.disable()  # tens of thousands of tuples: the collector would only slow this down
        try:
            return LowerIndex.load(data)
        finally:
            if enabled:
                gc.enable()
    except (OSError, ValueError, EOFError, TypeError):
        pass
    from layerfs.store.store import Store

    with Store(store_root) as store:
        os.unlink(path) if os.path.exists(path) else None
        image = store.image(image_id)
        ensure_index_cache(store, image)
    with open(path, "rb") as f:
        return LowerIndex.load(f.read())
