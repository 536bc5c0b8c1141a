"""Building a layer for COPY, ADD and WORKDIR: entries placed on an image.

A :class:`Staging` starts from the parent image's merged tree and collects
the entries of the step's layer; no tree is made on a host path. Paths are
resolved inside the image being built with the project's one resolver
(:func:`layerfs.store.resolve.resolve_in_root`), so ``/lib -> usr/lib`` is
followed as Docker follows it and no link can lead outside the image.

Contents go straight into the object store: files of the context by path,
checked against the digest the cache key was made of; archives through the
store's own tar reader (the one ``import`` uses). Since nothing is written
to the host, a hostile archive has nowhere to escape to, and since the
layer is made of entries, not read back from an overlayfs upper dir, a
character device stays a device instead of becoming a whiteout.

Placing a path follows Docker's extraction rules (moby's
``archive.Unpack``): its parent is resolved (links followed), its last
component is not; a directory meeting a directory merges into it, anything
else replaces what was there. An archive is resolved with its destination
as the root, as Docker's chrooted extraction does. One deviation: a
directory meeting a link to a directory merges into that directory and the
link stays (GNU tar's --keep-directory-symlink). moby would replace the
link, which on a usr-merged base hides all of /usr/lib behind a new /lib.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace

import blake3

from layerfs.errors import InvalidInput, NotFound
from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry
from layerfs.store.objects import StoredObject
from layerfs.store.resolve import resolve_in_root
from layerfs.store.scan import parallel_map
from layerfs.store.store import Store
from layerfs.store.tarlayer import TarReader, decompressed, is_tar_file
from layerfs.store.tree import MergedTree, flatten

__all__ = ["Item", "NewDirs", "Staging", "host_entry", "is_archive", "owner_ids"]


@dataclass(frozen=True)
class NewDirs:
    """Owner of the directories a step has to create."""

    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Item:
    """One thing a COPY places: its path below the destination, its entry
    (path not yet set) and, for a file, the host path of its bytes."""

    rel: str
    entry: Entry
    source: str = ""


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Staging:
    """The layer of one step, on top of ``tree`` (the parent's merged tree).

    Args:
        store: where contents go; the caller holds its writer lease.
        tree: the parent image's tree, or None for scratch.
        sde_ns: SOURCE_DATE_EPOCH in ns: every mtime of the layer is
            clamped to it (reproducible images).

    A directory the step makes up gets its parent's mtime: a time that
    depends only on the content below, so a rebuild gives the same layer.
    """

    def __init__(self, store: Store, tree: MergedTree | None, sde_ns: int | None = None):
        self.store = store
        self.tree = tree if tree is not None else flatten([])
        self.sde_ns = sde_ns
        self.entries: dict[str, Entry] = {}
        # Directories of the parent replaced by a non-directory here: what
        # the parent had below them is gone from the view.
        self._hidden: set[str] = set()
        self._fresh: list[StoredObject] = []
        self._known = store.import_claims()
        self._links: list[list[Entry]] = []      # hardlink groups, as placed
        self._parents: dict[tuple[str, str], str] = {}

    # -- the image as this step sees it ---------------------------------------

    def lookup(self, path: str) -> Entry | None:
        """The entry at ``path`` (no links followed), or None."""
        e = self.entries.get(path)
        if e is not None:
            return e
        if self._hidden and any(a in self._hidden for a in mf.ancestors(path)):
            return None
        return self.tree.entries.get(path)

    def _readlink(self, path: str) -> str | None:
        e = self.lookup(path)
        return e.target if e is not None and e.kind == mf.SYMLINK else None

    def resolve(self, path: str, root: str = "") -> str:
        """``path`` inside the directory ``root`` taken as the root (the
        image's by default), every link followed; image-relative."""
        rel = resolve_in_root(path, lambda p: self._readlink(_join(root, p)))
        return _join(root, rel) if rel else root

    def is_dir(self, path: str) -> bool:
        e = self.lookup(path)
        return e is not None and e.kind == mf.DIR

    def read_text(self, path: str, limit: int = 1 << 20) -> str:
        """A small file of the image ('' when absent), links followed."""
        e = self.lookup(self.resolve(path))
        if e is None or e.kind != mf.FILE or e.size > limit:
            return ""
        return self.store.objects.read(e.digest).decode("utf-8", errors="replace")

    # -- building ---------------------------------------------------------------

    def make_dirs(self, path: str, new: NewDirs) -> None:
        """Create what is missing of ``path`` (resolved, image-relative)."""
        cur = ""
        parent = self.lookup("")
        for part in path.split("/") if path else ():
            cur = _join(cur, part)
            e = self.lookup(cur)
            if e is None:
                e = Entry(cur, mf.DIR, 0o755, new.uid, new.gid, parent.mtime_ns if parent else 0)
                self.put(e)
            elif e.kind != mf.DIR:
                raise InvalidInput(f"cannot create directory /{cur}: a {e.kind} of that name exists")
            parent = e

    def put(self, e: Entry) -> None:
        """Place ``e`` at its path, whose parent is a directory of the view."""
        old = self.lookup(e.path)
        if old is not None and (old.kind != mf.DIR or e.kind != mf.DIR):
            self._parents.clear()  # a replaced path may have been on a resolved route
            if old.kind == mf.DIR:
                self._hide(e.path)
        if e.kind == mf.DIR and e.path in self._hidden:
            e = replace(e, opaque=True)
        elif e.kind == mf.SYMLINK:
            self._parents.clear()
        self.entries[e.path] = e

    def place(self, e: Entry, root: str) -> Entry:
        """:meth:`put`, except that a directory meeting a link to a
        directory (resolved inside ``root``) merges into that directory.
        Returns the entry as placed."""
        if e.kind == mf.DIR:
            old = self.lookup(e.path)
            if old is not None and old.kind == mf.SYMLINK:
                target = self.resolve(e.path[len(root) + 1:] if root else e.path, root)
                if self.is_dir(target):
                    e = replace(e, path=target)
        self.put(e)
        return e

    def _hide(self, path: str) -> None:
        prefix = path + "/"
        for p in [p for p in self.entries if p.startswith(prefix)]:
            del self.entries[p]
        self._hidden.add(path)

    def parent_dir(self, root: str, rel_parent: str, new: NewDirs) -> str:
        """The directory where a path below ``root`` whose parent is
        ``rel_parent`` lands (resolved inside ``root``, made if missing)."""
        key = (root, rel_parent)
        found = self._parents.get(key)
        if found is None:
            found = self.resolve(rel_parent, root) if rel_parent else root
            self.make_dirs(found, new)
            self._parents[key] = found
        return found

    def add_items(self, items: Sequence[Item], target: str, new: NewDirs) -> None:
        """Place COPY items, each at ``target``/its rel (``target`` is a
        resolved directory of the image; parents resolved from the root)."""
        for item in self.store_contents(items):
            parent, _, name = item.rel.rpartition("/")
            where = self.parent_dir("", _join(target, parent) if parent else target, new)
            self.place(replace(item.entry, path=_join(where, name)), "")

    # -- contents ---------------------------------------------------------------

    def store_contents(self, items: Sequence[Item]) -> list[Item]:
        """``items`` with each file's content stored and its digest set
        (many files at once: hashing and compression release the GIL)."""
        return parallel_map(self._store_one, list(items))

    def _store_one(self, item: Item) -> Item:
        e = item.entry
        if e.kind != mf.FILE:
            return item
        if e.digest and self.store.has_object(e.digest):
            return item  # the bytes the cache key hashed are stored already
        if not item.source:
            raise NotFound(f"the store lacks object {e.digest[:12]} of {e.path!r}; run `layerfs fsck`")
        try:
            obj = self.store.objects.put_file(item.source, known=self._known)
        except OSError as exc:
            raise InvalidInput(f"cannot read {item.source}: {exc.strerror}") from None
        if e.digest and obj.digest != e.digest:
            raise InvalidInput(f"{item.source} changed during the build")
        if obj.stored_size >= 0:
            self._fresh.append(obj)
        return replace(item, entry=replace(e, digest=obj.digest, size=obj.size))

    # -- archives ---------------------------------------------------------------

    def add_archive(self, path: str, dest: str, shown: str, digest: str = "") -> None:
        """Unpack the tar at host ``path`` into image directory ``dest``.

        Read by the store's tar reader, never extracted on the host. Members
        keep their modes (setuid, setgid, sticky, group/other write), owners,
        times and xattrs, as docker keeps them. Refused with InvalidInput:
        whiteouts and opaque markers (an ADD never deletes), 0/0 character
        devices (overlayfs reserves them for whiteouts), and a file whose
        bytes are not ``digest`` (what the cache key hashed), if given.
        """
        reader = TarReader(self.store.objects, self._known)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with _Hashing(os.fdopen(fd, "rb", buffering=0)) as f:
                members = reader.read(f, as_listed=True)
                read = f.finish()
        except (InvalidInput, OSError) as exc:
            raise InvalidInput(f"ADD {shown}: {exc}") from None
        if digest and read != digest:
            raise InvalidInput(f"ADD {shown}: {path} changed during the build")
        self._fresh.extend(reader.fresh)
        if reader.opaque:
            raise InvalidInput(f"ADD {shown}: {sorted(reader.opaque)[0] or '.'!r} holds an opaque-directory "
                               "marker (.wh..wh..opq); an archive cannot delete files of the image")
        new = NewDirs()
        placed: dict[str, Entry] = {}
        groups: dict[str, list[Entry]] = {}
        for m in members:
            _refuse(m, shown)
            if not m.path:
                if m.kind != mf.DIR:
                    raise InvalidInput(f"ADD {shown}: the archive's root member is a {m.kind}, not a directory")
                self.put(replace(m, path=dest, opaque=False))
                continue
            parent, _, name = m.path.rpartition("/")
            where = _join(self.parent_dir(dest, parent, new), name)
            if m.kind == mf.HARDLINK:
                holder = placed.get(m.target)
                if holder is None or holder.kind != mf.FILE or self.entries.get(holder.path) is not holder:
                    raise InvalidInput(f"ADD {shown}: hardlink {m.path!r} names {m.target!r}, "
                                       "which a later member replaced")
                e = replace(holder, path=where)
                groups.setdefault(m.target, [holder]).append(e)
                self.put(e)
            else:
                e = self.place(replace(m, path=where), dest)
            placed[m.path] = e
        self._links.extend(groups.values())

    # -- the layer --------------------------------------------------------------

    def commit(self) -> str:
        """Record the layer: the placed entries, the parent's entry for each
        ancestor not placed, mtimes clamped to SOURCE_DATE_EPOCH."""
        entries = dict(self.entries)
        for path in list(entries):
            anc = mf.parent_of(path) if path else None
            while anc is not None and anc not in entries:
                entries[anc] = replace(self.tree.entries[anc], opaque=False)
                anc = mf.parent_of(anc) if anc else None
        if "" not in entries:
            entries[""] = self.tree.entries[""]
        if self.sde_ns is not None:
            entries = {p: replace(e, mtime_ns=min(e.mtime_ns, self.sde_ns)) if e.mtime_ns > self.sde_ns else e
                       for p, e in entries.items()}
        return self.store.commit_layer(mf.canonical_links(list(entries.values()), self._groups()), self._fresh)

    def _groups(self) -> dict[str, list[str]]:
        """Hardlink groups whose members are all still as placed."""
        out = {}
        for group in self._links:
            alive = [e.path for e in group if self.entries.get(e.path) is e]
            if len(alive) > 1:
                out[alive[0]] = alive[1:]
        return out


class _Hashing(io.RawIOBase):
    """A file read through, hashed on the way (blake3, as the context)."""

    def __init__(self, f: io.RawIOBase) -> None:
        self.f = f
        self.hasher = blake3.blake3()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = self.f.readinto(b) or 0
        self.hasher.update(memoryview(b)[:n])
        return n

    def finish(self) -> str:
        """Read what the tar reader left (trailing padding) and return the digest."""
        while self.read(1 << 20):
            pass
        return self.hasher.hexdigest()

    def close(self) -> None:
        self.f.close()
        super().close()


def _refuse(m: Entry, shown: str) -> None:
    if m.kind == mf.WHITEOUT:
        raise InvalidInput(f"ADD {shown}: member {m.path!r} is a whiteout (.wh. name); "
                           "an archive cannot delete files of the image")
    if m.kind == mf.CHAR and m.rdev == 0:
        raise InvalidInput(f"ADD {shown}: member {m.path!r} is a 0/0 character device, "
                           "which overlay filesystems reserve for whiteouts")


def is_archive(path: str) -> bool:
    """Whether ADD unpacks the file at ``path``: a (compressed) tar whose
    first header reads, as Docker decides (anything else is copied)."""
    try:
        if not is_tar_file(path):
            return False
        with open(path, "rb") as f:
            head = decompressed(f).read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
        return True
    except (OSError, EOFError, ValueError, tarfile.TarError):
        return False


def owner_ids(stage: Staging, spec: str) -> tuple[int, int]:
    """``--chown=user[:group]`` as numeric ids, names looked up in the
    image's /etc/passwd and /etc/group; a uid without a group is also the gid."""
    from layerfs.runtime.users import resolve_user_in

    user, _, group = spec.partition(":")
    try:
        found = resolve_user_in(stage.read_text("etc/passwd"), stage.read_text("etc/group"), spec)
    except (InvalidInput, NotFound) as exc:
        raise InvalidInput(f"--chown={spec}: {exc}") from None
    if not group and user.isdigit():
        return found.uid, found.uid
    return found.uid, found.gid


def host_entry(rel: str, path: str, kind: str, mode: int, owner: tuple[int, int],
               link_target: str | None, digest: str | None) -> tuple[Entry, str]:
    """The entry of a file, dir or symlink of a build source (mtime from the
    host, symlinks included); also the path to read a file's bytes from."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    if kind == "symlink":
        if not stat.S_ISLNK(st.st_mode):
            raise InvalidInput(f"{path} changed during the build")
        return Entry(rel, mf.SYMLINK, mode, *owner, st.st_mtime_ns,
                     target=link_target or os.readlink(path)), ""
    if kind == "dir":
        return Entry(rel, mf.DIR, mode, *owner, st.st_mtime_ns), ""
    return Entry(rel, mf.FILE, mode, *owner, st.st_mtime_ns, st.st_size, digest or ""), path

