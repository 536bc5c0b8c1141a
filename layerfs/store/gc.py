"""Mark and sweep: drop what no tag, image, container or cache still needs.

Roots are the images (an untagged image is still an image until ``rmi``)
and the references that are not ``weak`` (containers, build cache, mounts;
see refs.py). Weak ones (OCI maps) go when their target goes. The sweep
runs under the store's exclusive lock, so no writer can commit a reference
to an object between the mark and the sweep.

Paths in use: a reference's ``paths`` (a mount record lists its
mountpoint, upper, work dir and its owner's scratch dir) and every
mountpoint the kernel knows. gc never removes those, nor any directory that
is or holds one: removing it would delete an upper under a live daemon, or
delete through the mount into it. gc cannot tell whether a reference's
owner still lives (for a mount that is the filesystem's business):
``fs.registry.clean_stale`` drops the records of dead daemons first, and
``ignore_refs`` lets a dry run count as if it had.

A dry run computes exactly what a real run removes, in the same order, and
``bytes_freed`` is the disk space (allocated blocks) of everything removed:
object files, layer manifests and swept debris.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from layerfs import procfs
from layerfs.store.store import Store
from layerfs.store.usage import tree_bytes

TMP_GRACE = 3600.0


@dataclass(frozen=True)
class GcResult:
    layers_removed: int
    objects_removed: int
    bytes_freed: int       # allocated bytes of all removed files (objects, manifests, debris)
    debris_removed: int


def live_layers(store: Store, ignore_refs: Collection[tuple[str, str]] = ()) -> set[str]:
    live = {r[0] for r in store.db.all("SELECT DISTINCT layer_id FROM image_layers")}
    for ref in store.refs():
        if ref.weak or (ref.kind, ref.key) in ignore_refs:
            continue
        if ref.layer_id:
            live.add(ref.layer_id)
        if ref.image_id:
            live |= {r[0] for r in store.db.all("SELECT layer_id FROM image_layers WHERE image_id=?", ref.image_id)}
    return live


def collect(store: Store, dry_run: bool = False, ignore_refs: Collection[tuple[str, str]] = ()) -> GcResult:
    """Remove unreferenced layers and objects, then debris (see the module
    docstring). *ignore_refs*: (kind, key) references the caller drops
    before a real run (stale mount records); they keep nothing alive here."""
    with store.exclusive():
        live = live_layers(store, ignore_refs)
        dead_layers = [r[0] for r in store.db.all("SELECT id FROM layers") if r[0] not in live]
        dead = set(dead_layers)
        needed = {d for lid, d in store.db.all("SELECT layer_id, digest FROM layer_objects") if lid not in dead}
        dead_objects = [d for (d,) in store.db.all("SELECT digest FROM objects") if d not in needed]
        freed = sum(_disk_bytes(p) for d in dead_objects
                    for p in (store.objects.raw_path(d), store.objects.zst_path(d), store.objects.sums_path(d)))
        freed += sum(_disk_bytes(store.layer_manifest_path(lid)) for lid in dead_layers)
        if not dry_run:
            _drop(store, dead_layers, dead_objects)
        keep = _paths_in_use(store, ignore_refs)
        swept = [sweep_debris(store, keep, dry_run), sweep_fs_leftovers(store, keep, dry_run)]
    return GcResult(len(dead_layers), len(dead_objects), freed + sum(b for _, b in swept), sum(n for n, _ in swept))


def _drop(store: Store, dead_layers: list[str], dead_objects: list[str]) -> None:
    with store.db.transaction() as c:
        c.executemany("DELETE FROM layers WHERE id=?", [(lid,) for lid in dead_layers])
        c.execute("DELETE FROM refs WHERE weak AND ("
                  "(layer_id IS NOT NULL AND layer_id NOT IN (SELECT id FROM layers)) OR "
                  "(image_id IS NOT NULL AND image_id NOT IN (SELECT id FROM images)))")
        c.executemany("DELETE FROM objects WHERE digest=?", [(d,) for d in dead_objects])
        c.execute("DELETE FROM stat_cache WHERE digest NOT IN (SELECT digest FROM objects)")
    for d in dead_objects:
        store.objects.remove(d)
    for lid in dead_layers:
        _unlink(store.layer_manifest_path(lid))


def _paths_in_use(store: Store, ignore_refs: Collection[tuple[str, str]]) -> list[str]:
    """The paths references keep, plus every mountpoint the kernel knows
    but those of ignored references (the caller detaches them)."""
    refs = store.refs()
    gone = {p for ref in refs if (ref.kind, ref.key) in ignore_refs for p in ref.paths}
    kept = [p for ref in refs if (ref.kind, ref.key) not in ignore_refs for p in ref.paths]
    return [mp for mp, _ in procfs.mounts() if mp not in gone] + kept


def _busy(path: str, in_use: Sequence[str]) -> bool:
    """True if *path* is or holds a path in use."""
    return any(p == path or p.startswith(path + "/") for p in in_use)


def sweep_debris(store: Store, in_use: Sequence[str] = (), dry_run: bool = False) -> tuple[int, int]:
    """Remove files the database does not know: interrupted writes, and
    objects/manifests written by an import that never committed. Returns
    (files removed, bytes freed)."""
    # We hold the exclusive lock, so no writer is active: all of tmp/ is
    # debris, except what a live mount uses (a build killed mid-RUN leaves
    # its staging dir to the mount's daemon until it ends).
    n = freed = 0
    for name in os.listdir(store.tmp_dir):
        path = os.path.join(store.tmp_dir, name)
        if not _busy(path, in_use):
            n, freed = n + 1, freed + _remove(path, dry_run)
    known = {r[0] for r in store.db.all("SELECT digest FROM objects")}
    for digest, path in store.objects.iter_on_disk(sums=True):
        if digest not in known:
            n, freed = n + 1, freed + _remove(path, dry_run)
    layers = {r[0] for r in store.db.all("SELECT id FROM layers")}
    for name in os.listdir(store.layout.layers):
        if name not in layers:
            n, freed = n + 1, freed + _remove(store.layout.layer(name), dry_run)
    for path in store.layout.old_build_stat_cache:
        if os.path.lexists(path):
            n, freed = n + 1, freed + _remove(path, dry_run)
    return n, freed


def sweep_fs_leftovers(store: Store, in_use: Sequence[str] = (), dry_run: bool = False) -> tuple[int, int]:
    """Index caches of deleted images, kernel-backend metadata layers no
    image's layer chain uses (a mounted image is never deleted, so neither
    is its layer), and private uppers no mount record names (untouched for
    a while: a mount being set up has no record yet)."""
    n = freed = 0
    images = {r[0] for r in store.db.all("SELECT id FROM images")}
    layout = store.layout
    for name in _listdir(layout.fscache):
        if layout.fscache_image(name) not in images:
            n, freed = n + 1, freed + _remove(layout.fscache_entry(name), dry_run)
    chains = {image.chain_key for image, _tags in store.images()}
    for name in _listdir(layout.metalayers):
        chain = layout.metalayer_chain(name)
        if chain is not None and chain not in chains:
            n, freed = n + 1, freed + _remove(layout.metalayer_entry(name), dry_run)
    uppers = layout.uppers
    now = time.time()
    for name in _listdir(uppers):
        path = os.path.join(uppers, name)
        if not _busy(path, in_use) and now - os.lstat(path).st_mtime > TMP_GRACE:
            n, freed = n + 1, freed + _remove(path, dry_run)
    return n, freed


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


def _disk_bytes(path: str) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _remove(path: str, dry_run: bool) -> int:
    """Remove *path* (unless *dry_run*); returns the bytes that frees."""
    import shutil

    size = tree_bytes(path)
    if not dry_run:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink(path)
    return size
