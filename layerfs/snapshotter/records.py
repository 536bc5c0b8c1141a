"""Snapshot metadata: one row per snapshot in the store's ``refs`` table.

A snapshot is a reference of kind ``"snapshot"`` keyed by containerd's key
(or, once committed, its name), so the store's database is the only truth,
gc keeps what snapshots use alive, and every change is one SQLite
transaction:

* active/view: ``image_id`` is the image of the parent's chain (None with
  no parent); the upper dir lives at ``ROOT/snapshots/<id>/fs``.
* committed: ``layer_id`` is the layer imported from the upper at Commit,
  ``image_id`` the image of the whole chain (every layer below and this
  one), which is what ``layerfs images`` and ``df`` show and what active
  snapshots above it mount.

Chain images carry the label :data:`CHAIN_LABEL`; an unreferenced one (left
by a crash between Commit's steps) is swept by :func:`drop_orphan_images`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace

from layerfs.errors import Conflict, NotFound
from layerfs.store.layout import StoreLayout
from layerfs.store.refs import COLUMNS, Ref
from layerfs.store.store import Store

REF_KIND = "snapshot"
CHAIN_LABEL = "io.layerfs.snapshot.chain"
ACTIVE, VIEW, COMMITTED = "active", "view", "committed"


class AlreadyExists(Conflict):
    """A snapshot with that key or name exists (gRPC ALREADY_EXISTS)."""


class FailedPrecondition(Conflict):
    """The snapshot is in the wrong state for the call (gRPC FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class Snapshot:
    key: str
    id: str                     # directory name under ROOT/snapshots
    kind: str                   # ACTIVE, VIEW or COMMITTED
    parent: str                 # key of the committed parent, "" for none
    labels: dict[str, str] = field(default_factory=dict)
    created: int = 0            # ns since the epoch
    updated: int = 0
    layer_id: str | None = None
    image_id: str | None = None
    mode: str = "bind"          # how mounts are served: see mounts.py
    size: int = 0               # committed: bytes the layer holds
    inodes: int = 0

    def data(self) -> str:
        return json.dumps({"id": self.id, "kind": self.kind, "parent": self.parent, "labels": self.labels,
                           "created": self.created, "updated": self.updated, "mode": self.mode,
                           "size": self.size, "inodes": self.inodes}, sort_keys=True)

    def ref(self, root: str) -> Ref:
        """The store record: it keeps its layer and chain image alive, makes
        ``rmi`` refuse the image (in use), and keeps gc off its directory."""
        return Ref(REF_KIND, self.key, self.layer_id, self.image_id, self.data(), in_use=True,
                   paths=(os.path.join(StoreLayout(root).snapshots, self.id),))


def _decode(key: str, layer_id: str | None, image_id: str | None, data: str | None) -> Snapshot:
    d = json.loads(data or "{}")
    return Snapshot(key, d["id"], d["kind"], d.get("parent", ""), d.get("labels") or {}, d.get("created", 0),
                    d.get("updated", 0), layer_id, image_id, d.get("mode", "bind"), d.get("size", 0),
                    d.get("inodes", 0))


def _from_ref(r: Ref) -> Snapshot:
    return _decode(r.key, r.layer_id, r.image_id, r.data)


def _insert(c, store: Store, snap: Snapshot) -> None:
    c.execute(f"INSERT INTO refs ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", snap.ref(store.root).to_row())


def now_ns() -> int:
    return time.time_ns()


def get(store: Store, key: str) -> Snapshot:
    r = store.get_ref(REF_KIND, key)
    if r is None:
        raise NotFound(f"snapshot {key} does not exist")
    return _from_ref(r)


def find(store: Store, key: str) -> Snapshot | None:
    r = store.get_ref(REF_KIND, key)
    return None if r is None else _from_ref(r)


def all_snapshots(store: Store) -> list[Snapshot]:
    return [_from_ref(r) for r in store.refs(REF_KIND)]


def insert(store: Store, snap: Snapshot) -> None:
    """Add *snap*; AlreadyExists if its key is taken (checked in the same
    transaction, so two concurrent Prepares of one key cannot both win)."""
    with store.db.transaction() as c:
        if c.execute("SELECT 1 FROM refs WHERE kind=? AND key=?", (REF_KIND, snap.key)).fetchone():
            raise AlreadyExists(f"snapshot {snap.key} already exists")
        _insert(c, store, snap)


def update(store: Store, snap: Snapshot) -> Snapshot:
    """Rewrite the row of *snap* (labels); NotFound if it went meanwhile."""
    snap = replace(snap, updated=now_ns())
    with store.db.transaction() as c:
        n = c.execute("UPDATE refs SET data=? WHERE kind=? AND key=?", (snap.data(), REF_KIND, snap.key)).rowcount
    if n == 0:
        raise NotFound(f"snapshot {snap.key} does not exist")
    return snap


def commit(store: Store, active: Snapshot, committed: Snapshot) -> None:
    """Replace the active row by the committed one, in one transaction."""
    with store.db.transaction() as c:
        if c.execute("SELECT 1 FROM refs WHERE kind=? AND key=?", (REF_KIND, committed.key)).fetchone():
            raise AlreadyExists(f"snapshot {committed.key} already exists")
        if c.execute("DELETE FROM refs WHERE kind=? AND key=?", (REF_KIND, active.key)).rowcount == 0:
            raise NotFound(f"snapshot {active.key} does not exist")
        _insert(c, store, committed)


def remove(store: Store, key: str) -> Snapshot:
    """Delete the row of *key* (FailedPrecondition while it has children)
    and the chain image it alone used; returns what was removed."""
    with store.db.transaction() as c:
        row = c.execute("SELECT layer_id, image_id, data FROM refs WHERE kind=? AND key=?", (REF_KIND, key)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        snap = _decode(key, *row)
        for (other,) in c.execute("SELECT data FROM refs WHERE kind=?", (REF_KIND,)).fetchall():
            if json.loads(other or "{}").get("parent") == key:
                raise FailedPrecondition(f"cannot remove snapshot {key}: it has children")
        c.execute("DELETE FROM refs WHERE kind=? AND key=?", (REF_KIND, key))
        if snap.kind == COMMITTED and snap.image_id:
            _drop_image_if_unused(c, snap.image_id)
    return snap


def _drop_image_if_unused(c, image_id: str) -> bool:
    """Delete a chain image nothing keeps; whether it went."""
    if c.execute("SELECT 1 FROM refs WHERE image_id=? AND NOT weak", (image_id,)).fetchone():
        return False
    if c.execute("SELECT 1 FROM tags WHERE image_id=?", (image_id,)).fetchone():
        return False  # someone tagged it: it is theirs now
    c.execute("DELETE FROM images WHERE id=?", (image_id,))
    return True


def drop_orphan_images(store: Store) -> int:
    """Remove chain images no snapshot names (a Commit killed between
    making its image and recording the snapshot leaves one)."""
    n = 0
    with store.db.transaction() as c:
        for iid, cfg in c.execute("SELECT id, config FROM images").fetchall():
            labels = (json.loads(cfg).get("config") or {}).get("Labels") or {}
            if labels.get(CHAIN_LABEL) and _drop_image_if_unused(c, iid):
                n += 1
    return n
