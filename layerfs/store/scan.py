"""Turn a directory on disk into layer entries (and store their contents).

Two readings of a directory:

* ``overlay=False``: a full root filesystem; every node is what it is.
* ``overlay=True``: an overlayfs upper dir: a 0/0 character device is a
  whiteout, ``trusted.overlay.opaque=y`` marks an opaque dir, and the other
  ``trusted.overlay.*`` bookkeeping xattrs are dropped. Overlayfs (6.7+)
  keeps a user's own ``trusted.overlay.X`` escaped as
  ``trusted.overlay.overlay.X``; that is read back as the user's xattr.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from layerfs.errors import InvalidInput, NotFound
from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry
from layerfs.store.overlay_xattrs import OPAQUE_XATTR, shown_overlay_xattr

HASH_WORKERS = os.cpu_count() or 2


@dataclass(frozen=True)
class FileRef:
    """A regular file met while scanning: where it is and how it looked."""

    rel: str
    abspath: str
    st: os.stat_result


# Given the files met, returns {rel: digest}; the store's implementation
# consults its stat cache and writes new objects.
ContentResolver = Callable[[list[FileRef]], dict[str, str]]


def read_xattrs(path: str, overlay: bool) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in names:
        shown = shown_overlay_xattr(name) if overlay else name
        if shown is None:
            continue
        try:
            out.append((shown, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(sorted(out))


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _entry(rel: str, path: str, st: os.stat_result, overlay: bool) -> Entry:
    fmt = stat.S_IFMT(st.st_mode)
    base = dict(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                mtime_ns=st.st_mtime_ns, xattrs=read_xattrs(path, overlay))
    if fmt == stat.S_IFDIR:
        return Entry(rel, mf.DIR, opaque=overlay and _is_opaque(path), **base)
    if fmt == stat.S_IFREG:
        return Entry(rel, mf.FILE, size=st.st_size, **base)
    if fmt == stat.S_IFLNK:
        return Entry(rel, mf.SYMLINK, target=os.readlink(path), size=0, **base)
    if fmt == stat.S_IFCHR:
        if overlay and st.st_rdev == 0:
            return Entry(rel, mf.WHITEOUT)
        return Entry(rel, mf.CHAR, rdev=st.st_rdev, **base)
    if fmt == stat.S_IFBLK:
        return Entry(rel, mf.BLOCK, rdev=st.st_rdev, **base)
    if fmt == stat.S_IFIFO:
        return Entry(rel, mf.FIFO, **base)
    if fmt == stat.S_IFSOCK:
        return Entry(rel, mf.SOCKET, **base)
    raise InvalidInput(f"{path}: unsupported file type")


def walk(root: str) -> list[tuple[str, str, os.stat_result]]:
    """(relpath, abspath, lstat) of every node under *root*, root first."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise NotFound(f"no such directory: {root}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"not a directory: {root}")
    out = [("", root, st)]
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        try:
            with os.scandir(path) as it:
                for d in it:
                    crel = f"{rel}/{d.name}" if rel else d.name
                    mf.check_path(crel)     # NAME_MAX, PATH_MAX: before going deeper
                    cst = d.stat(follow_symlinks=False)
                    out.append((crel, d.path, cst))
                    if stat.S_ISDIR(cst.st_mode):
                        stack.append((crel, d.path))
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            # The tree fits PATH_MAX (checked above) but not below this
            # directory's own path; tar(1) walks it with *at calls.
            raise InvalidInput(f"{root}: paths below it pass PATH_MAX together with its own path; "
                               f"make a tar of it ('tar -C {root} -cf FILE.tar .') and import that") from None
    return out


def scan(root: str, resolve: ContentResolver, overlay: bool = False) -> list[Entry]:
    """Entries of the tree at *root*, file contents resolved to digests."""
    nodes = walk(root)
    entries: list[Entry] = []
    holders: dict[tuple[int, int], str] = {}
    groups: dict[str, list[str]] = {}
    files: list[FileRef] = []
    for rel, path, st in nodes:
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in holders:
                groups.setdefault(holders[key], []).append(rel)
                continue
            holders[key] = rel
        e = _entry(rel, path, st, overlay)
        if e.kind == mf.FILE:
            files.append(FileRef(rel, path, st))
        entries.append(e)
    digests = resolve(files)
    entries = [replace(e, digest=digests[e.path]) if e.kind == mf.FILE else e for e in entries]
    return mf.canonical_links(entries, groups)


BATCH = 128


def parallel_map(fn: Callable, items: list) -> list:
    """Run *fn* over *items* on one thread per CPU (hashing, zstd and file
    I/O drop the GIL). Work goes out in batches: a future per file cost more
    in thread wake-ups than the small files themselves."""
    if len(items) < 2 * BATCH:
        return [fn(i) for i in items]

    def run(batch: list) -> list:
        return [fn(i) for i in batch]

    batches = [items[i:i + BATCH] for i in range(0, len(items), BATCH)]
    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        return [r for chunk in pool.map(run, batches) for r in chunk]
