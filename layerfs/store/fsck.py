"""Check the store's integrity and, on request, repair it.

What is checked:
  * every object row has a file whose bytes hash to its name;
  * every layer row has a manifest that decodes, validates, hashes to the
    layer id, and whose file contents are all committed objects;
  * every image's config hashes to its id and names existing layers;
  * every tag and reference points at an existing image or layer.

What ``repair`` does: writes the chunk-sum table (``store.chunksums``) of
every big object that lacks a sound one, from the pass that checks it;
drops broken objects (and so the layers that need
them), broken layers (and so the images on them), dangling tags and
references, then runs gc. It never invents data: what was damaged is gone,
and the report says so. Images built on removed layers must be re-imported.
Repair never drops a mount record, nor (through gc) anything a mount uses:
a record belongs to its daemon, which may be live (``fs.registry`` drops
the records of dead ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerfs.errors import Corrupt, LayerfsError
from layerfs.store import images as img
from layerfs.store import manifest as mf
from layerfs.store.store import Store


@dataclass(frozen=True)
class Problem:
    kind: str      # object, layer, image, tag, ref
    key: str
    message: str


@dataclass
class FsckReport:
    objects: int = 0
    layers: int = 0
    images: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.problems


def check(store: Store, repair: bool = False) -> FsckReport:
    report = FsckReport()
    bad_objects = _check_objects(store, report, repair)
    bad_layers = _check_layers(store, report, bad_objects)
    bad_images = _check_images(store, report, bad_layers)
    _check_names(store, report, bad_images, bad_layers)
    if repair and report.problems:
        _repair(store, report, bad_objects, bad_layers, bad_images)
    return report


def _check_objects(store: Store, report: FsckReport, repair: bool) -> set[str]:
    bad = set()
    for (digest,) in store.db.all("SELECT digest FROM objects"):
        report.objects += 1
        if not store.objects.verify(digest, write_table=repair):
            what = "missing" if not store.objects.on_disk(digest) else "fails its digest check"
            report.problems.append(Problem("object", digest, f"object {digest[:12]} {what}"))
            bad.add(digest)
    return bad


def _check_layers(store: Store, report: FsckReport, bad_objects: set[str]) -> set[str]:
    bad = set()
    for (lid,) in store.db.all("SELECT id FROM layers"):
        report.layers += 1
        problem = _layer_problem(store, lid, bad_objects)
        if problem:
            report.problems.append(Problem("layer", lid, f"layer {lid[:12]}: {problem}"))
            bad.add(lid)
    return bad


def _layer_problem(store: Store, lid: str, bad_objects: set[str]) -> str:
    try:
        with open(store.layer_manifest_path(lid), "rb") as f:
            data = mf.unpack(f.read())
    except FileNotFoundError:
        return "manifest missing"
    except Corrupt as exc:
        return str(exc)
    if mf.layer_id(data) != lid:
        return "manifest fails its digest check"
    try:
        entries = mf.decode(data)
        mf.validate(entries)
    except LayerfsError as exc:
        return str(exc)
    for e in entries:
        if e.kind == mf.FILE and e.digest:
            if e.digest in bad_objects:
                return f"{e.path!r} needs damaged object {e.digest[:12]}"
            if store.db.one("SELECT 1 FROM objects WHERE digest=?", e.digest) is None:
                return f"{e.path!r} needs object {e.digest[:12]}, which the store does not have"
    return ""


def _check_images(store: Store, report: FsckReport, bad_layers: set[str]) -> set[str]:
    bad = set()
    known = {r[0] for r in store.db.all("SELECT id FROM layers")}
    for iid, data in store.db.all("SELECT id, config FROM images"):
        report.images += 1
        try:
            cfg = img.decode(data)
        except LayerfsError as exc:
            report.problems.append(Problem("image", iid, f"image {iid[:12]}: {exc}"))
            bad.add(iid)
            continue
        if img.image_id(cfg) != iid:
            msg = "config fails its digest check"
        else:
            missing = [lid for lid in cfg["rootfs"]["layers"] if lid not in known or lid in bad_layers]
            msg = f"needs missing or damaged layer {missing[0][:12]}" if missing else ""
        if msg:
            report.problems.append(Problem("image", iid, f"image {iid[:12]}: {msg}"))
            bad.add(iid)
    return bad


def _check_names(store: Store, report: FsckReport, bad_images: set[str], bad_layers: set[str]) -> None:
    images = {r[0] for r in store.db.all("SELECT id FROM images")} - bad_images
    layers = {r[0] for r in store.db.all("SELECT id FROM layers")} - bad_layers
    for name, tag, iid in store.db.all("SELECT name, tag, image_id FROM tags"):
        if iid not in images:
            report.problems.append(Problem("tag", f"{name}:{tag}",
                                           f"tag {name}:{tag} points at missing image {iid[:12]}"))
    for ref in store.refs():
        if ref.weak:
            continue  # weak mappings may dangle until the next gc drops them
        if (ref.layer_id and ref.layer_id not in layers) or (ref.image_id and ref.image_id not in images):
            report.problems.append(Problem("ref", f"{ref.kind}\0{ref.key}",
                                           f"{ref.kind} {ref.key} points at a missing image or layer"))


def _repair(store: Store, report: FsckReport, bad_objects: set[str], bad_layers: set[str],
            bad_images: set[str]) -> None:
    from layerfs.store import gc

    with store.db.transaction() as c:
        c.executemany("DELETE FROM images WHERE id=?", [(i,) for i in bad_images])
        c.executemany("DELETE FROM layers WHERE id=?", [(lid,) for lid in bad_layers])
        c.executemany("DELETE FROM objects WHERE digest=?", [(d,) for d in bad_objects])
        c.execute("DELETE FROM tags WHERE image_id NOT IN (SELECT id FROM images)")
        # A reference that keeps paths (a live mount, a snapshot) is its
        # owner's to drop: repair never takes away what something uses.
        c.execute("DELETE FROM refs WHERE paths = '[]' AND ("
                  "(layer_id IS NOT NULL AND layer_id NOT IN (SELECT id FROM layers))"
                  " OR (image_id IS NOT NULL AND image_id NOT IN (SELECT id FROM images)))")
        c.execute("DELETE FROM stat_cache WHERE digest NOT IN (SELECT digest FROM objects)")
    for d in bad_objects:
        store.objects.remove(d)
    gc.collect(store)
    report.repaired = True
