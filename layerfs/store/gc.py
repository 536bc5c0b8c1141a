"""Mark and sweep: drop what no tag, image, container or cache still needs.

Roots are the images (an untagged image is still an image until ``rmi``)
and the rows of ``refs`` (containers, build cache, mounts, OCI maps). The
sweep runs under the store's exclusive lock, so no writer can commit a
reference to an object between the mark and the sweep.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from layerfs.store.store import Store

TMP_GRACE = 3600.0
# Mappings kept for interop (OCI digests <-> layer ids) describe layers but
# must not keep them alive: they go when their layer or image goes.
WEAK_PREFIX = "oci-"


@dataclass(frozen=True)
class GcResult:
    layers_removed: int
    objects_removed: int
    bytes_freed: int
    debris_removed: int


def live_layers(store: Store) -> set[str]:
    live = {r[0] for r in store.db.all("SELECT DISTINCT layer_id FROM image_layers")}
    strong = "kind NOT LIKE ? || '%'"
    live |= {r[0] for r in store.db.all(f"SELECT layer_id FROM refs WHERE layer_id IS NOT NULL AND {strong}", WEAK_PREFIX)}
    for (iid,) in store.db.all(f"SELECT image_id FROM refs WHERE image_id IS NOT NULL AND {strong}", WEAK_PREFIX):
        live |= {r[0] for r in store.db.all("SELECT layer_id FROM image_layers WHERE image_id=?", iid)}
    return live


def collect(store: Store, dry_run: bool = False) -> GcResult:
    with store.exclusive():
        live = live_layers(store)
        dead_layers = [r[0] for r in store.db.all("SELECT id FROM layers") if r[0] not in live]
        if not dry_run:
            with store.db.transaction() as c:
                c.executemany("DELETE FROM layers WHERE id=?", [(lid,) for lid in dead_layers])
                c.execute("DELETE FROM refs WHERE kind LIKE ? || '%' AND ("
                          "(layer_id IS NOT NULL AND layer_id NOT IN (SELECT id FROM layers)) OR "
                          "(image_id IS NOT NULL AND image_id NOT IN (SELECT id FROM images)))", (WEAK_PREFIX,))
        dead_objects = store.db.all(
            "SELECT digest, stored_size FROM objects WHERE digest NOT IN (SELECT digest FROM layer_objects)")
        if not dry_run:
            with store.db.transaction() as c:
                c.executemany("DELETE FROM objects WHERE digest=?", [(d,) for d, _ in dead_objects])
                c.execute("DELETE FROM stat_cache WHERE digest NOT IN (SELECT digest FROM objects)")
            for d, _ in dead_objects:
                store.objects.remove(d)
            for lid in dead_layers:
                _unlink(store.layer_manifest_path(lid))
        debris = 0 if dry_run else sweep_debris(store) + sweep_fs_leftovers(store)
    return GcResult(len(dead_layers), len(dead_objects), sum(s for _, s in dead_objects), debris)


def sweep_debris(store: Store) -> int:
    """Remove files the database does not know: interrupted writes, and
    objects/manifests written by an import that never committed."""
    # We hold the exclusive lock, so no writer is active: all of tmp/ is debris.
    n = 0
    for name in os.listdir(store.tmp_dir):
        _remove_any(os.path.join(store.tmp_dir, name))
        n += 1
    known = {r[0] for r in store.db.all("SELECT digest FROM objects")}
    for digest, path in store.objects.iter_on_disk():
        if digest not in known:
            _unlink(path)
            n += 1
    layers = {r[0] for r in store.db.all("SELECT id FROM layers")}
    ldir = os.path.join(store.root, "layers")
    for name in os.listdir(ldir):
        if name not in layers:
            _unlink(os.path.join(ldir, name))
            n += 1
    return n


def sweep_fs_leftovers(store: Store) -> int:
    """Index caches of deleted images, and private uppers of mounts whose
    daemon died (not named by any mount reference, untouched for a while:
    a mount being set up has no reference yet)."""
    import json

    n = 0
    images = {r[0] for r in store.db.all("SELECT id FROM images")}
    cache = os.path.join(store.root, "fscache")
    for name in _listdir(cache):
        if name.split(".")[0] not in images:
            _remove_any(os.path.join(cache, name))
            n += 1
    in_use = set()
    for _, _, _, data in store.refs("mount"):
        try:
            upper = json.loads(data or "{}").get("upper") or ""
        except ValueError:
            continue
        in_use |= {upper, upper + ".work", os.path.dirname(upper)}
    uppers = os.path.join(store.root, "uppers")
    now = time.time()
    for name in _listdir(uppers):
        path = os.path.join(uppers, name)
        if path not in in_use and now - os.lstat(path).st_mtime > TMP_GRACE:
            _remove_any(path)
            n += 1
    return n


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_any(path: str) -> None:
    import shutil

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink(path)
