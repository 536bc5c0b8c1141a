"""Disk usage: what images would cost stored naively, per layer, per file.

Four ways to count the same images:
  * logical: every image as if stored alone (a full copy each);
  * layer-level: each distinct layer once (what Docker and podman store);
  * file-level: each distinct file content once (what layerfs stores);
  * physical: bytes the store's files occupy on disk (zstd and holes
    included), objects plus manifests plus the database.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from layerfs.store.store import Store


@dataclass(frozen=True)
class ImageUsage:
    image_id: str
    tags: tuple[str, ...]
    logical: int          # sum of its layers' file bytes
    shared_layers: int    # bytes in layers some other image also uses
    shared_files: int     # bytes of contents some other image also holds
    unique: int           # bytes of contents only this image holds


@dataclass(frozen=True)
class StoreUsage:
    images: list[ImageUsage] = field(default_factory=list)
    logical: int = 0
    layer_level: int = 0
    file_level: int = 0
    physical: int = 0
    objects: int = 0
    layers: int = 0

    def saving(self, against: int) -> float:
        return 1 - self.physical / against if against else 0.0


def _disk_bytes(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def measure(store: Store) -> StoreUsage:
    db = store.db
    layer_size = dict(db.all("SELECT id, size FROM layers"))
    obj_size = dict(db.all("SELECT digest, size FROM objects"))
    images = db.all("SELECT id FROM images ORDER BY created")
    img_layers = {iid: [r[0] for r in db.all("SELECT layer_id FROM image_layers WHERE image_id=? ORDER BY position", iid)]
                  for (iid,) in images}
    layer_objs: dict[str, set[str]] = {}
    for lid, d in db.all("SELECT layer_id, digest FROM layer_objects"):
        layer_objs.setdefault(lid, set()).add(d)
    img_objs = {iid: set().union(*(layer_objs.get(lid, set()) for lid in lids)) if lids else set()
                for iid, lids in img_layers.items()}
    layer_users = _count_users({iid: set(l) for iid, l in img_layers.items()})
    obj_users = _count_users(img_objs)
    tags: dict[str, list[str]] = {}
    for name, tag, iid in db.all("SELECT name, tag, image_id FROM tags ORDER BY name, tag"):
        tags.setdefault(iid, []).append(f"{name}:{tag}")
    rows = []
    for (iid,) in images:
        lids = img_layers[iid]
        rows.append(ImageUsage(
            iid, tuple(tags.get(iid, ())),
            logical=sum(layer_size.get(l, 0) for l in lids),
            shared_layers=sum(layer_size.get(l, 0) for l in set(lids) if layer_users[l] > 1),
            shared_files=sum(obj_size.get(d, 0) for d in img_objs[iid] if obj_users[d] > 1),
            unique=sum(obj_size.get(d, 0) for d in img_objs[iid] if obj_users[d] == 1),
        ))
    used_layers = set().union(*map(set, img_layers.values())) if img_layers else set()
    return StoreUsage(
        images=rows,
        logical=sum(r.logical for r in rows),
        layer_level=sum(layer_size.get(l, 0) for l in used_layers),
        file_level=sum(obj_size.values()),
        physical=physical_bytes(store),
        objects=len(obj_size),
        layers=len(layer_size),
    )


def physical_bytes(store: Store) -> int:
    total = 0
    for _, path in store.objects.iter_on_disk():
        total += _disk_bytes(path)
    ldir = os.path.join(store.root, "layers")
    total += sum(_disk_bytes(os.path.join(ldir, n)) for n in os.listdir(ldir))
    for name in ("db.sqlite", "db.sqlite-wal"):
        total += _disk_bytes(os.path.join(store.root, name))
    return total


def _count_users(sets: dict[str, set[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for members in sets.values():
        for m in members:
            counts[m] = counts.get(m, 0) + 1
    return counts


def tree_bytes(path: str) -> int:
    """Allocated bytes of *path* and everything below it, hard links
    counted once (like du); 0 if it is missing."""
    try:
        total = os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
    seen: set[tuple[int, int]] = set()
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total
