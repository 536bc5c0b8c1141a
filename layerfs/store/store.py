"""The store: objects, layers, images and tags under one root directory.

The paths under the root are named in ``layout.py``; ``store.layout`` is
that of this store. The database is described in ``db.py``, the lock
(shared for writers, exclusive for gc/repair) in :meth:`Store.writing`.

The database is the truth (as in containerd's metastore): an object or
layer exists when its row is committed. Files are written first and made
durable with one syncfs, then the rows are committed, so after ``kill -9``
at any point nothing committed is lost and nothing committed is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from layerfs.errors import Conflict, InvalidInput, NotFound
from layerfs.store import images as img
from layerfs.store import manifest as mf
from layerfs.store import references, scratch
from layerfs.store.db import Database
from layerfs.store.images import Image
from layerfs.store.layout import StoreLayout
from layerfs.store.manifest import Entry
from layerfs.store.objects import ObjectStore, StoredObject, syncfs
from layerfs.store.refs import BUILD_CACHE, COLUMNS, Ref
from layerfs.store.rootdir import DEFAULT_ROOT, default_root  # noqa: F401 - part of this module's API
from layerfs.store.scan import FileRef, parallel_map, scan
from layerfs.store.statcache import StatCache
from layerfs.store.tree import MergedTree, flatten

RACY_NS = 2_000_000_000


class Store:
    def __init__(self, root: str) -> None:
        self.layout = StoreLayout(root)
        self.root = self.layout.root
        for sub in self.layout.made_on_open:
            try:
                os.makedirs(sub, exist_ok=True)
            except OSError as exc:
                raise InvalidInput(f"cannot use store root {self.root}: {exc.strerror}") from None
        self.tmp_dir = self.layout.tmp
        self.objects = ObjectStore(self.layout.objects, self.tmp_dir,
                                   compress=_config(self.layout).get("backend") != "kernel")
        self.db = Database(self.layout.db)
        self._lock_fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._db_lock = threading.Lock()
        self._lease_lock = threading.Lock()
        self._lease_depth = 0
        self._swept = False  # tmp/ swept of dead commands' entries (_take_lease)

    def close(self) -> None:
        self.db.close()
        os.close(self._lock_fd)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking -------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Shared store lock: many writers at once, but never during gc.

        It is also the lease that keeps a new layer alive until an image or
        reference points at it: hold it across import + put_image, or gc
        may sweep the layer in between. Re-entrant within one Store.
        """
        with self._lease_lock:
            if self._lease_depth == 0:
                self._take_lease()
            self._lease_depth += 1
        try:
            yield
        finally:
            with self._lease_lock:
                self._lease_depth -= 1
                if self._lease_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _take_lease(self) -> None:
        """The shared lock. The first lease of this Store, if it can have
        the lock alone for a moment (no other writer, no gc), first removes
        what killed commands left in tmp/ (``store.scratch``): gigabytes of
        a killed save need not wait for `layerfs gc`."""
        if not self._swept:
            self._swept = True
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                scratch.sweep_dead(self.tmp_dir)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # (converts an exclusive lock held)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- objects -------------------------------------------------------------
    def has_object(self, digest: str) -> bool:
        """True if the content is committed to the store."""
        with self._db_lock:
            return self.db.one("SELECT 1 FROM objects WHERE digest=?", digest) is not None

    def import_claims(self) -> Callable[[str], bool]:
        """The "already have it?" check of one import: True for committed
        content and for content this import already claimed (its first
        sighting writes it, later ones skip). Claims live and die with the
        import, so a failed import never makes another skip a write."""
        claimed: set[str] = set()
        lock = threading.Lock()

        def known(digest: str) -> bool:
            with lock:
                if digest in claimed:
                    return True
                claimed.add(digest)
            return self.has_object(digest)

        return known

    def _resolve_contents(self, files: list[FileRef], fresh: list[StoredObject],
                          stat_rows: list[tuple]) -> dict[str, str]:
        """Digest every file, reusing the stat cache; new contents are stored."""
        out = self._stat_cache_hits(files)
        misses = [ref for ref in files if ref.rel not in out]

        known = self.import_claims()

        def store_one(ref: FileRef) -> StoredObject:
            return self.objects.put_file(ref.abspath, known=known)

        racy = time.time_ns() - RACY_NS
        staged = bool(files) and self._staged(os.path.realpath(files[0].abspath))
        for ref, obj in zip(misses, parallel_map(store_one, misses)):
            out[ref.rel] = obj.digest
            if obj.stored_size >= 0:
                fresh.append(obj)
            st = ref.st
            # Like git's racy-clean rule: a file changed within the last
            # timestamp tick could change again unseen, so don't cache it.
            # Trees staged in our tmp/ are deleted right after: no rows.
            if st.st_ctime_ns < racy and not staged:
                stat_rows.append((os.fsencode(ref.abspath), st.st_dev, st.st_ino, st.st_size,
                                  st.st_mtime_ns, st.st_ctime_ns, obj.digest))
        return out

    def _stat_cache_hits(self, files: list[FileRef]) -> dict[str, str]:
        """{rel: digest} of files unchanged since they were last stored."""
        if not files:
            return {}
        # Only rows of stored objects: a hit skips storing the file.
        cache = StatCache(self.db, stored_only=True)
        cache.preload(os.path.commonpath([f.abspath for f in files]))
        return {ref.rel: digest for ref in files if (digest := cache.lookup(ref.abspath, ref.st))}

    # -- layers --------------------------------------------------------------
    def import_dir(self, path: str, overlay: bool = False) -> str:
        """Make a layer of the tree at *path*; returns its id."""
        with self.writing():
            scanned = self.scan_dir(path, overlay)
            return self.commit_layer(*scanned)

    def _staged(self, realpath: str) -> bool:
        """Inside a tree the store stages and deletes once imported: tmp/,
        or a containerd snapshot's upper (imported at Commit)."""
        return any(_within(realpath, os.path.realpath(d)) for d in (self.tmp_dir, self.layout.snapshots))

    def scan_dir(self, path: str, overlay: bool = False) -> tuple[list[Entry], list[StoredObject], list[tuple]]:
        """Entries of *path* with contents stored but no layer committed yet:
        (entries, new objects, stat-cache rows) for :meth:`commit_layer`."""
        src = os.path.realpath(path)
        root = os.path.realpath(self.root)
        staged = self._staged(src)  # our own staging areas
        if not staged and (_within(src, root) or _within(root, src)):
            raise InvalidInput(f"{path} overlaps the store at {self.root}; refusing to import the store into itself")
        fresh: list[StoredObject] = []
        stat_rows: list[tuple] = []
        entries = scan(path, lambda files: self._resolve_contents(files, fresh, stat_rows), overlay=overlay)
        return entries, fresh, stat_rows

    def commit_layer(self, entries: Iterable[Entry], fresh: list[StoredObject] = (),
                     stat_rows: list[tuple] = ()) -> str:
        """Record a layer whose file contents are already written.

        Order matters for crash safety: manifest file and objects are made
        durable first (one syncfs), then one transaction makes them exist.
        """
        entries = list(entries)
        data = mf.encode(entries)
        lid = mf.layer_id(data)
        path = self.layout.layer(lid)
        if not os.path.exists(path):
            from layerfs.store.atomic import write_bytes

            write_bytes(path, mf.pack(data), self.tmp_dir, durable=False)
        if fresh or stat_rows:
            syncfs(self.root)
        with self.db.transaction() as c:
            self._commit_rows(c, lid, entries, fresh, stat_rows)
        return lid

    def _commit_rows(self, c, lid: str, entries: list[Entry], fresh: list[StoredObject],
                     stat_rows: list[tuple]) -> None:
        c.executemany("INSERT OR IGNORE INTO objects VALUES (?,?,?,?)",
                      [(o.digest, o.size, o.stored_size, int(o.compressed)) for o in fresh])
        c.executemany("INSERT OR REPLACE INTO stat_cache VALUES (?,?,?,?,?,?,?)", stat_rows)
        if c.execute("SELECT 1 FROM layers WHERE id=?", (lid,)).fetchone():
            return  # same tree as before: nothing new to record
        digests = {e.digest for e in entries if e.kind == mf.FILE and e.digest}
        missing = _missing_objects(c, digests)
        if missing:
            raise NotFound(f"layer refers to {len(missing)} objects the store does not have, e.g. {missing[0][:12]}")
        size = sum(e.size for e in entries if e.kind == mf.FILE)
        c.execute("INSERT INTO layers VALUES (?,?,?,?)", (lid, size, len(entries), time.time()))
        c.executemany("INSERT INTO layer_objects VALUES (?,?)", [(lid, d) for d in digests])

    def layer_entries(self, layer_id: str) -> list[Entry]:
        return list(_read_manifest(self.layout, layer_id))

    def layer_manifest_path(self, layer_id: str) -> str:
        return self.layout.layer(layer_id)

    def layer_info(self, layer_id: str) -> tuple[int, int, float]:
        row = self.db.one("SELECT size, entries, created FROM layers WHERE id=?", layer_id)
        if row is None:
            raise NotFound(f"no such layer: {layer_id[:12]}")
        return row

    def resolve_layer(self, text: str) -> str:
        return self._resolve_id("layers", text, "layer")

    def merged_tree(self, image: Image) -> MergedTree:
        return flatten([self.layer_entries(lid) for lid in image.layers])

    def compressed_objects(self, layer_ids: list[str]) -> set[str]:
        """Digests of the objects of these layers that are stored as ``.zst``
        (a reader then opens the right file first)."""
        marks = ",".join("?" * len(layer_ids))
        return {d for (d,) in self.db.all(
            f"SELECT DISTINCT o.digest FROM layer_objects l JOIN objects o ON o.digest = l.digest "
            f"WHERE l.layer_id IN ({marks}) AND o.compressed", *layer_ids)}

    # -- images --------------------------------------------------------------
    def put_image(self, config: dict) -> Image:
        data = img.canonical(config)
        iid = img.image_id(config)
        for lid in config["rootfs"]["layers"]:
            self.layer_info(lid)
        created = img.parse_timestamp(config.get("created", "")) or time.time()
        with self.db.transaction() as c:
            c.execute("INSERT OR IGNORE INTO images VALUES (?,?,?)", (iid, data, created))
            c.executemany("INSERT OR IGNORE INTO image_layers VALUES (?,?,?)",
                          [(iid, i, lid) for i, lid in enumerate(config["rootfs"]["layers"])])
        return Image(iid, config, created)

    def image(self, ref: str) -> Image:
        """Look an image up by name[:tag], full id or unique id prefix."""
        iid = self._image_id_of(ref)
        row = self.db.one("SELECT config, created FROM images WHERE id=?", iid)
        if row is None:
            raise NotFound(f"no such image: {ref}")
        return Image(iid, img.decode(row[0]), row[1])

    def _image_id_of(self, ref: str) -> str:
        text = ref.removeprefix("blake3:")
        if 4 <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text):
            rows = self.db.all("SELECT id FROM images WHERE id >= ? AND id < ? LIMIT 2", text, text + "g")
            if len(rows) == 1:
                return rows[0][0]
            if len(rows) > 1:
                raise InvalidInput(f"ambiguous image id prefix: {ref}")
        try:
            r = references.parse(ref)
        except InvalidInput:
            raise NotFound(f"no such image: {ref}") from None
        row = self.db.one("SELECT image_id FROM tags WHERE name=? AND tag=?", r.name, r.tag)
        if row is None:
            raise NotFound(f"no such image: {ref}")
        return row[0]

    def _resolve_id(self, table: str, text: str, what: str) -> str:
        text = text.removeprefix("blake3:")
        if 4 <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text):
            rows = self.db.all(f"SELECT id FROM {table} WHERE id >= ? AND id < ? LIMIT 2", text, text + "g")
            if len(rows) == 1:
                return rows[0][0]
            if len(rows) > 1:
                raise InvalidInput(f"ambiguous {what} id prefix: {text}")
        raise NotFound(f"no such {what}: {text}")

    def images(self) -> list[tuple[Image, list[str]]]:
        """Every image with its tags (name:tag strings)."""
        tags: dict[str, list[str]] = {}
        for name, tag, iid in self.db.all("SELECT name, tag, image_id FROM tags ORDER BY name, tag"):
            tags.setdefault(iid, []).append(f"{name}:{tag}")
        out = []
        for iid, cfg, created in self.db.all("SELECT id, config, created FROM images ORDER BY created DESC, id"):
            out.append((Image(iid, img.decode(cfg), created), tags.get(iid, [])))
        return out

    def tag(self, image_id: str, ref: str) -> references.Reference:
        r = references.parse(ref)
        if r.digest:
            raise InvalidInput(f"cannot tag with a digest reference: {ref}")
        with self.db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", (r.name, r.tag, image_id))
        return r

    def tags_of(self, image_id: str) -> list[str]:
        rows = self.db.all("SELECT name, tag FROM tags WHERE image_id=? ORDER BY name, tag", image_id)
        return [f"{n}:{t}" for n, t in rows]

    def untag(self, ref: str) -> str:
        r = references.parse(ref)
        with self.db.transaction() as c:
            row = c.execute("SELECT image_id FROM tags WHERE name=? AND tag=?", (r.name, r.tag)).fetchone()
            if row is None:
                raise NotFound(f"no such image: {ref}")
            c.execute("DELETE FROM tags WHERE name=? AND tag=?", (r.name, r.tag))
        return row[0]

    def remove_image(self, ref: str, force: bool = False) -> list[str]:
        """docker rmi: untag if *ref* is one of several tags, else delete.

        Returns the lines docker prints (Untagged: / Deleted:). Layer and
        object bytes are reclaimed by gc, not here. An image that containers
        or mounts use is refused, or with *force* only untagged (they keep
        it). Build-cache entries that produced the image go with it.
        """
        image = self.image(ref)
        tags = self.tags_of(image.id)
        is_tag = ref in tags or (":" not in ref.rpartition("/")[2] and f"{ref}:latest" in tags)
        if is_tag and len(tags) > 1:
            self.untag(ref)
            return [f"Untagged: {self._as_tag(ref)}"]
        users = self.db.all("SELECT kind, key FROM refs WHERE image_id=? AND in_use ORDER BY kind, key", image.id)
        if users and not force:
            kind, key = users[0]
            raise Conflict(f"image {image.id[:12]} is used by {kind} {key}; remove it first or use --force")
        if len(tags) > 1 and not force and not is_tag:
            raise Conflict(f"image {image.id[:12]} is referenced in multiple repositories; use --force")
        with self.db.transaction() as c:
            c.execute("DELETE FROM tags WHERE image_id=?", (image.id,))
            if users:
                return [f"Untagged: {t}" for t in tags]
            c.execute("DELETE FROM refs WHERE kind=? AND image_id=?", (BUILD_CACHE, image.id))
            c.execute("DELETE FROM images WHERE id=?", (image.id,))
        return [f"Untagged: {t}" for t in tags] + [f"Deleted: {image.id}"]

    @staticmethod
    def _as_tag(ref: str) -> str:
        return str(references.parse(ref))

    # -- references from other subsystems (see refs.py) -------------------
    def add_ref(self, ref: Ref) -> None:
        """Record *ref*, replacing the one of the same kind and key."""
        with self.db.transaction() as c:
            c.execute(f"INSERT OR REPLACE INTO refs ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", ref.to_row())

    def get_ref(self, kind: str, key: str) -> Ref | None:
        row = self.db.one(f"SELECT {COLUMNS} FROM refs WHERE kind=? AND key=?", kind, key)
        return None if row is None else Ref.from_row(row)

    def refs(self, kind: str | None = None) -> list[Ref]:
        """The references of one *kind* (all of them if None), by key."""
        if kind is None:
            rows = self.db.all(f"SELECT {COLUMNS} FROM refs ORDER BY kind, key")
        else:
            rows = self.db.all(f"SELECT {COLUMNS} FROM refs WHERE kind=? ORDER BY key", kind)
        return [Ref.from_row(r) for r in rows]

    def drop_refs(self, kind: str, key: str | None = None) -> int:
        with self.db.transaction() as c:
            if key is None:
                return c.execute("DELETE FROM refs WHERE kind=?", (kind,)).rowcount
            return c.execute("DELETE FROM refs WHERE kind=? AND key=?", (kind, key)).rowcount


def _config(layout: StoreLayout) -> dict:
    """ROOT/config.json, the store-wide settings (``{"backend": "kernel"}``
    makes kernel-backend mounts the default and objects raw); {} if absent.
    Errors in it are reported where the setting is used (``fs.backend``)."""
    import json

    try:
        with open(layout.config) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _missing_objects(c, digests: set[str]) -> list[str]:
    """Digests with no committed object, checked 500 at a time."""
    todo = sorted(digests)
    missing = []
    for i in range(0, len(todo), 500):
        chunk = todo[i:i + 500]
        found = {r[0] for r in c.execute(
            f"SELECT digest FROM objects WHERE digest IN ({','.join('?' * len(chunk))})", chunk)}
        missing += [d for d in chunk if d not in found]
    return missing


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


@functools.lru_cache(maxsize=64)
def _read_manifest(layout: StoreLayout, layer_id: str) -> tuple[Entry, ...]:
    # Manifests are immutable, so caching by id is always correct.
    try:
        with open(layout.layer(layer_id), "rb") as f:
            data = mf.unpack(f.read())
    except FileNotFoundError:
        raise NotFound(f"no such layer: {layer_id[:12]}") from None
    return tuple(mf.decode(data))
