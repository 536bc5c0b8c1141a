"""The kernel backend's metadata layer of an image, built once and cached.

For the kernel data path (``fs.kernel``) an image becomes one lower layer
holding its whole merged tree, names, modes, owners, times and xattrs,
whose regular files carry no data but two xattrs that send overlayfs to
the object's file in ``ROOT/objects`` (mounted as a data-only layer):

    trusted.overlay.metacopy   (empty)
    trusted.overlay.redirect   /ab/cdef...    (the object's path there)

Format: an EROFS image written by ``fs.erofs``, at
``ROOT/metalayers/<chain key>.v<FORMAT>.erofs``. Chosen by measurement
(benchmarks/bench_metalayer.py, kernel 6.18, ext4, 30,000 paths): a
directory tree of sparse files takes ~4 KiB of disk per path (each file's
xattr block) and 14-22 s to write (2-3 s on tmpfs, lost at reboot); the
EROFS image ~200 bytes per path and under a second. README has the table.

* Keyed by the image's *layer chain* (``Image.chain_key``), so images that
  differ only in their config share it. Dropped by gc when no image has
  that chain (``store.gc.sweep_fs_leftovers``).
* Crash-safe: written in ``ROOT/tmp``, fsynced, renamed into place; the
  raw object copies it relies on are made durable (one syncfs) before. A
  file at the final name is therefore always complete.
* Hostile content cannot steer the kernel: every ``trusted.overlay.*``
  xattr of the image is stored escaped as ``trusted.overlay.overlay.*``
  (composefs's rule; overlayfs 6.7+ shows it unescaped to readers and
  never acts on it). A 0/0 character device, which overlayfs would take
  for a whiteout and hide, is refused: the two backends must show the
  same tree.
* Every regular file's object must be in the store, raw: ``.zst`` objects
  get a raw copy beside them (``ObjectStore.ensure_raw``); a missing object
  is a NotFound naming the path, when the layer is built (the first kernel
  mount of the chain) rather than EIO later. Later mounts trust the cache:
  objects of a live image are never removed by gc.
"""

from __future__ import annotations

import os
import stat
from array import array

from layerfs.errors import NotFound, Unsupported
from layerfs.fs.erofs import Node, write_image
from layerfs.store.layout import StoreLayout
from layerfs.store.overlay_xattrs import escape_overlay_xattr

FORMAT = 2  # 2: a hardlink's nlink counts the names upper layers cover
SUFFIX = ".erofs"


def cache_path(store_root: str, image) -> str:
    """ROOT/metalayers/<chain key>.v<FORMAT>.erofs (gc keys on the first part)."""
    return StoreLayout(store_root).metalayer_entry(f"{image.chain_key}.v{FORMAT}{SUFFIX}")


def object_redirect(digest: str) -> bytes:
    return f"/{digest[:2]}/{digest[2:]}".encode()


def ensure_metalayer(store, image, rebuild: bool = False) -> str:
    """Path of *image*'s metadata layer, built now if it is not cached
    (or if *rebuild*: the cached file proved unusable).

    Also makes sure every object the image reads is in the store raw.
    The caller holds the store open; this takes its writer lease so gc
    cannot sweep the temp file or the raw copies being made.
    """
    path = cache_path(store.root, image)
    if os.path.exists(path) and not rebuild:
        return path
    from layerfs.fs.index import drop_other_formats, ensure_index_cache, read_index_cache

    with store.writing():
        index = read_index_cache(store.root, image.id, ensure_index_cache(store, image))
        nodes, files = nodes_from_index(index)
        made = ensure_raw_objects(store.objects, files)
        if made:
            from layerfs.store.objects import syncfs

            syncfs(store.objects.root)
        data = write_image(nodes, bytes.fromhex(image.chain_key)[:16])
        _publish(store.tmp_dir, path, data)
        drop_other_formats(path, SUFFIX)
    return path


def ensure_raw_objects(objects, files: dict[str, int]) -> int:
    """Raw copies of the objects in *files* ({digest: slot}, from
    :func:`nodes_from_index`; the slot names the file in errors) that lack
    one; returns how many were made. One listdir per fan-out dir, not a
    stat per object: an image has tens of thousands."""
    from layerfs.store.scan import parallel_map

    present: dict[str, set[str]] = {}
    todo = []
    for digest, slot in files.items():
        names = present.get(digest[:2])
        if names is None:
            try:
                names = present[digest[:2]] = set(os.listdir(os.path.join(objects.root, digest[:2])))
            except FileNotFoundError:
                names = present[digest[:2]] = set()
        if digest[2:] not in names:
            todo.append((digest, slot))

    def one(item: tuple[str, object]) -> int:
        digest, where = item
        try:
            return objects.ensure_raw(digest)
        except NotFound:
            raise NotFound(f"object {digest[:12]} of /{where} is missing from the store "
                           "(layerfs fsck reports what is damaged)") from None

    return sum(parallel_map(one, todo))


_METACOPY = (b"trusted.overlay.metacopy", b"")
_REDIRECT = b"trusted.overlay.redirect"


def nodes_from_index(index) -> tuple[list[Node], dict[str, str]]:
    """EROFS nodes of a merged index, and {digest: path of a file} of its files."""
    n = len(index)
    leader = index.leader
    node_of = array("q", [-1]) * n
    count = 0
    for slot in range(n):
        lead = leader.get(slot, slot)
        if lead == slot:
            node_of[slot] = count
            count += 1
        else:
            node_of[slot] = node_of[lead]
    nodes: list[Node] = []
    files: dict[str, str] = {}
    meta, kids, parent, paths = index.meta, index.kids, index.parent, index.paths
    nsubdirs = index.nsubdirs
    append = nodes.append
    for slot in range(n):
        lead = leader.get(slot, slot)
        if lead != slot:
            continue
        st_mode, uid, gid, mtime_ns, size, digest, target, rdev, xattrs = meta[slot]
        fmt = st_mode & 0o170000
        xa = [(escape_overlay_xattr(k).encode(), v) for k, v in xattrs] if xattrs else []
        if fmt == stat.S_IFDIR:
            node = Node(st_mode, uid, gid, mtime_ns, xattrs=xa, nlink=2 + nsubdirs[slot],
                        parent=node_of[max(parent[slot], 0)],
                        children=[(name, node_of[child]) for name, child in kids[slot].items()])
        else:
            if fmt == stat.S_IFCHR and rdev == 0:
                raise Unsupported(f"the image has a 0/0 character device at /{os.fsdecode(paths[slot])}, "
                                  "which kernel overlayfs would take for a whiteout and hide; use "
                                  "--backend fuse for this image")
            node = Node(st_mode, uid, gid, mtime_ns, rdev=rdev, target=target, xattrs=xa,
                        nlink=index.nlink(slot))
            if fmt == stat.S_IFREG and size:
                if digest not in files:
                    files[digest] = _LazyPath(paths, slot)
                node.size = size
                xa += (_METACOPY, (_REDIRECT, object_redirect(digest)))
        append(node)
    return nodes, files


class _LazyPath:
    """A slot's path, decoded only if an error names it."""

    __slots__ = ("paths", "slot")

    def __init__(self, paths: list[bytes], slot: int) -> None:
        self.paths, self.slot = paths, slot

    def __str__(self) -> str:
        return os.fsdecode(self.paths[self.slot])


def _publish(tmp_dir: str, path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, f"meta-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


