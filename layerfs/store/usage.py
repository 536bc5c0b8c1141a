"""Disk usage: what images would cost stored naively, per layer, per file.

Four ways to count the same images:
  * logical: every image as if stored alone (a full copy each; build-step
    images add only the layers no other image has);
  * layer-level: each distinct layer once (what Docker and podman store);
  * file-level: each distinct file content once (what layerfs stores);
  * physical: bytes the store's files occupy on disk (zstd and holes
    included), objects plus manifests plus the database.

Per image, sharing is counted among the images a user sees: tagged ones
and untagged ones that are not build steps. A build step's image (what
``images`` hides, like docker's intermediate images) holds a subset of the
image built on it; counting it as another holder would make every byte of
a built image "shared" and nothing unique. Build-step images are reported
apart, with the bytes only they hold (what ``builder prune`` + ``gc`` give
back).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from layerfs.store.refs import BUILD_CACHE
from layerfs.store.store import Store


@dataclass(frozen=True)
class ImageUsage:
    image_id: str
    tags: tuple[str, ...]
    logical: int          # sum of its layers' file bytes
    shared_layers: int    # bytes in layers some other image also uses
    shared_files: int     # bytes of contents some other shown image also holds
    unique: int           # bytes of contents no other shown image holds
    build_step: bool = False   # an untagged image a build cached (hidden like docker's intermediates)


@dataclass(frozen=True)
class StoreUsage:
    images: list[ImageUsage] = field(default_factory=list)
    logical: int = 0
    layer_level: int = 0
    file_level: int = 0
    physical: int = 0
    objects: int = 0
    layers: int = 0
    build_step_only: int = 0   # bytes of contents that only build-step images hold

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
    img_layers = {iid: [r[0] for r in db.all("SELECT layer_id FROM image_layers WHERE image_id=? ORDER BY position",
                                             iid)]
                  for (iid,) in images}
    layer_objs: dict[str, set[str]] = {}
    for lid, d in db.all("SELECT layer_id, digest FROM layer_objects"):
        layer_objs.setdefault(lid, set()).add(d)
    img_objs = {iid: set().union(*(layer_objs.get(lid, set()) for lid in lids)) if lids else set()
                for iid, lids in img_layers.items()}
    tags: dict[str, list[str]] = {}
    for name, tag, iid in db.all("SELECT name, tag, image_id FROM tags ORDER BY name, tag"):
        tags.setdefault(iid, []).append(f"{name}:{tag}")
    steps = {r.image_id for r in store.refs(BUILD_CACHE) if r.image_id and r.image_id not in tags}
    shown = [iid for (iid,) in images if iid not in steps]
    layer_users = _count_users({iid: set(img_layers[iid]) for iid in shown})
    obj_users = _count_users({iid: img_objs[iid] for iid in shown})
    rows = []
    for (iid,) in images:
        lids, objs = img_layers[iid], img_objs[iid]
        # A shown image is one of the holders it is compared with; a build
        # step is compared with every shown image.
        mine = 0 if iid in steps else 1
        rows.append(ImageUsage(
            iid, tuple(tags.get(iid, ())),
            logical=sum(layer_size.get(lid, 0) for lid in lids),
            shared_layers=sum(layer_size.get(lid, 0) for lid in set(lids) if layer_users.get(lid, 0) > mine),
            shared_files=sum(obj_size.get(d, 0) for d in objs if obj_users.get(d, 0) > mine),
            unique=sum(obj_size.get(d, 0) for d in objs if obj_users.get(d, 0) <= mine),
            build_step=iid in steps,
        ))
    step_objs = set().union(*(img_objs[i] for i in steps)) if steps else set()
    used_layers = set().union(*map(set, img_layers.values())) if img_layers else set()
    return StoreUsage(
        images=rows,
        # Shown images as full copies, plus the layers only build steps
        # use, once: never less than layer-level, and steps do not inflate it.
        logical=sum(r.logical for r in rows if not r.build_step)
        + sum(layer_size.get(lid, 0) for lid in used_layers if lid not in layer_users),
        layer_level=sum(layer_size.get(lid, 0) for lid in used_layers),
        file_level=sum(obj_size.values()),
        physical=physical_bytes(store),
        objects=len(obj_size),
        layers=len(layer_size),
        build_step_only=sum(obj_size.get(d, 0) for d in step_objs if d not in obj_users),
    )


def physical_bytes(store: Store) -> int:
    total = 0
    for _, path in store.objects.iter_on_disk(sums=True):
        total += _disk_bytes(path)
    layout = store.layout
    total += sum(_disk_bytes(layout.layer(n)) for n in os.listdir(layout.layers))
    total += sum(_disk_bytes(path) for path in layout.db_files)
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
    return tree_usage(path)[0]


def tree_usage(path: str) -> tuple[int, int]:
    """(allocated bytes, inodes) of *path* and everything below it, each
    inode counted once (like du; as containerd measures a snapshot);
    (0, 0) if it is missing. Unreadable directories count as empty."""
    try:
        total, inodes = os.lstat(path).st_blocks * 512, 1
    except FileNotFoundError:
        return 0, 0
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
            inodes += 1
    return total, inodes
