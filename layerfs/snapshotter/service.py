"""containerd's snapshotter semantics over the layerfs store.

Vocabulary is containerd's: an *active* snapshot (Prepare, under a
``key``) is writable; Commit turns it into a *committed* snapshot (under a
``name``) that can be a parent; a *view* (View) is read-only and can never
be committed. Keys arrive prefixed by containerd's metadata layer
(``<namespace>/<n>/<key>``) and are kept as they are.

Errors follow containerd's overlayfs snapshotter (its test suite is the
reference): an unknown key or parent is NotFound, a taken key or name
AlreadyExists, a parent that is not committed InvalidInput, Commit of a
view, Mounts of a committed snapshot and Remove of a snapshot with
children FailedPrecondition.

Crash safety: the store's database is the truth. Prepare makes the
snapshot's directory before its row; Commit imports the upper as a layer
(objects and manifest durable first), adds the chain image, then swaps the
active row for the committed one in one transaction; Remove deletes the row
first. Whatever a kill leaves between those steps (a directory, a layer or
chain image nobody names) is swept by :meth:`Snapshotter.cleanup`, which
also runs at start-up.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from layerfs.errors import InvalidInput, LayerfsError
from layerfs.snapshotter import mounts as mnt
from layerfs.snapshotter import records as rec
from layerfs.snapshotter.filters import matcher
from layerfs.snapshotter.records import ACTIVE, COMMITTED, VIEW, FailedPrecondition, Snapshot
from layerfs.store import images as img
from layerfs.store.store import Store
from layerfs.store.transfer import import_layer
from layerfs.store.usage import tree_usage

# containerd's unpacker prepares "extract-<random> <chainID>" snapshots and
# labels them with the chain id it will commit to.
_EXTRACT_KEY = re.compile(r"(^|/)extract-[^/]*$")
UNPACK_LABEL = "containerd.io/snapshot.ref"
log = logging.getLogger("layerfs.snapshotter")


class Snapshotter:
    """The snapshots API of one store root; safe to call from many threads.

    Calls that change snapshots run one at a time (a lock): containerd
    unpacks a chain layer by layer anyway, and serialising keeps the
    row-then-directory steps simple to reason about.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._lock = threading.Lock()
        os.makedirs(mnt.snapshots_dir(self.root), exist_ok=True)

    @contextmanager
    def _store(self) -> Iterator[Store]:
        with Store(self.root) as store:
            yield store

    # -- creating ------------------------------------------------------------
    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[mnt.Mount]:
        return self._create(ACTIVE, key, parent, labels or {})

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[mnt.Mount]:
        return self._create(VIEW, key, parent, labels or {})

    def _create(self, kind: str, key: str, parent: str, labels: dict[str, str]) -> list[mnt.Mount]:
        if not key:
            raise InvalidInput("snapshot key must not be empty")
        with self._lock, self._store() as store:
            # containerd's storage checks the key before the parent
            if rec.find(store, key) is not None:
                raise rec.AlreadyExists(f"snapshot {key} already exists")
            image_id = None
            if parent:
                p = rec.get(store, parent)
                if p.kind != COMMITTED:
                    raise InvalidInput(f"parent {parent} is not a committed snapshot")
                image_id = p.image_id
            mode = _mode(kind, key, parent, labels)
            now = rec.now_ns()
            snap = Snapshot(key, secrets.token_hex(8), kind, parent, dict(labels), now, now,
                            image_id=image_id, mode=mode)
            mnt.create_dirs(self.root, snap.id, mode)
            try:
                rec.insert(store, snap)
            except BaseException:
                mnt.remove_dirs(self.root, snap.id)
                raise
            try:
                mnt.activate(self.root, snap)
            except BaseException:
                rec.remove(store, key)
                mnt.deactivate(self.root, snap.id)
                mnt.remove_dirs(self.root, snap.id)
                raise
            return mnt.mounts_of(self.root, snap)

    def mounts(self, key: str) -> list[mnt.Mount]:
        """The mounts of an active snapshot or view; a layerfs daemon behind
        them that died since is started again first (containerd asks for
        the mounts when it starts a container)."""
        with self._lock, self._store() as store:
            snap = rec.get(store, key)
            if snap.kind == COMMITTED:
                raise FailedPrecondition(f"snapshot {key} is committed: it has no mounts")
            mnt.activate(self.root, snap)
        return mnt.mounts_of(self.root, snap)

    # -- committing and removing -------------------------------------------
    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        if not name:
            raise InvalidInput("snapshot name must not be empty")
        with self._lock, self._store() as store:
            snap = rec.get(store, key)
            if snap.kind != ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active")
            if rec.find(store, name) is not None:
                raise rec.AlreadyExists(f"snapshot {name} already exists")
            start = time.monotonic()
            mnt.deactivate(self.root, snap.id)
            try:
                self._commit(store, snap, name, labels)
            except BaseException:
                mnt.activate(self.root, snap)  # still active: serve it again
                raise
            mnt.remove_dirs(self.root, snap.id)
            log.info("committed %s as %s in %.2f s", key, name, time.monotonic() - start)

    def _commit(self, store: Store, snap: Snapshot, name: str, labels: dict[str, str] | None) -> None:
        upper = mnt.dirs(self.root, snap.id).upper
        if not os.path.isdir(upper):
            os.mkdir(upper, 0o755)  # a FUSE snapshot never mounted has no upper yet
        with store.writing():
            layer_id = import_layer(store, upper, as_layer=True)
            chain = (store.image(snap.image_id).layers if snap.image_id else []) + [layer_id]
            image = store.put_image(_chain_config(chain))
            size, entries, _ = store.layer_info(layer_id)
            now = rec.now_ns()
            done = Snapshot(name, snap.id, COMMITTED, snap.parent, dict(labels if labels is not None else snap.labels),
                            now, now, layer_id, image.id, mnt.BIND, size, entries)
            rec.commit(store, snap, done)

    def remove(self, key: str) -> None:
        with self._lock, self._store() as store:
            snap = rec.remove(store, key)
        # The row is gone first: if what follows is interrupted, Cleanup
        # finds a directory (or mount) no snapshot names and sweeps it.
        mnt.deactivate(self.root, snap.id)
        mnt.remove_dirs(self.root, snap.id)

    # -- reading -------------------------------------------------------------
    def stat(self, key: str) -> Snapshot:
        with self._store() as store:
            return rec.get(store, key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Change labels, as containerd's storage does: with no *paths* all
        labels are replaced; ``labels`` replaces all, ``labels.K`` one."""
        with self._lock, self._store() as store:
            snap = rec.get(store, key)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    k = path.removeprefix("labels.")
                    if labels.get(k):
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise InvalidInput(f"cannot update {path!r} field on snapshot {key}")
            return rec.update(store, replace(snap, labels=new))

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes): what the upper holds on disk for an active
        snapshot, the layer's logical bytes and entries for a committed one."""
        snap = self.stat(key)
        if snap.kind == COMMITTED:
            return snap.size, snap.inodes
        upper = mnt.dirs(self.root, snap.id).upper
        return tree_usage(upper)

    def list(self, filters: list[str] | None = None) -> list[Snapshot]:
        """Every snapshot matching any of *filters* (containerd's syntax)."""
        match = matcher(filters or [])
        with self._store() as store:
            return [s for s in rec.all_snapshots(store) if match(s)]

    # -- housekeeping --------------------------------------------------------
    def cleanup(self) -> int:
        """Sweep what no snapshot names: directories, layerfs mounts under
        ROOT/snapshots, chain images; returns how many things went."""
        # All of it under the lock: a Prepare makes its directory before its
        # row, and must not see the directory swept in between.
        with self._lock, self._store() as store:
            known = {s.id for s in rec.all_snapshots(store)}
            n = rec.drop_orphan_images(store)
            for name in os.listdir(mnt.snapshots_dir(self.root)):  # its mounts are in its directory
                if name not in known:
                    mnt.deactivate(self.root, name)
                    mnt.remove_dirs(self.root, name)
                    n += 1
        return n

    def restore(self) -> list[str]:
        """At start-up: re-establish the mounts of every active snapshot and
        view whose layerfs daemon is gone, then clean up. Returns the keys
        that could not be restored (their error is in the exception text)."""
        failed = []
        with self._store() as store:
            snaps = rec.all_snapshots(store)
        for snap in snaps:
            if snap.kind != COMMITTED:
                try:
                    mnt.activate(self.root, snap)
                except LayerfsError as exc:
                    failed.append(f"{snap.key}: {exc}")
        self.cleanup()
        return failed


def _mode(kind: str, key: str, parent: str, labels: dict[str, str]) -> str:
    if not parent:
        return mnt.BIND
    if kind == VIEW:
        return mnt.VIEW_MODE
    if UNPACK_LABEL in labels or _EXTRACT_KEY.search(key):
        return mnt.OVERLAY
    return mnt.FUSE


def _chain_config(chain: list[str]) -> dict:
    """The image of a committed chain: only its layers and our label, so
    the same chain always gives the same image id."""
    return {"architecture": img.host_arch(), "os": "linux",
            "rootfs": {"type": img.ROOTFS_TYPE, "layers": chain},
            "config": {"Labels": {rec.CHAIN_LABEL: "true"}}}
