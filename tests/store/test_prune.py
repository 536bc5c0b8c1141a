"""rmi with parents, dangling images, image prune, and gc's dry run, on
image chains shaped like a build's (one image per step)."""

from __future__ import annotations

import json
import os

import pytest

from layerfs.store import fsck, gc, prune, transfer
from layerfs.store import images as img
from layerfs.store.refs import Ref
from layerfs.store.store import Store


def _tree(path, name: str, size: int = 200_000) -> str:
    d = path / name
    d.mkdir()
    (d / name).write_bytes(os.urandom(size))
    return str(d)


def _step(store: Store, parent, created_by: str, layer_src: str | None = None, cache: bool = True):
    """One build step on *parent*: a layer (from *layer_src*) or metadata only,
    recorded in the build cache as the builder does."""
    lid = transfer.import_layer(store, layer_src, parent, as_layer=True) if layer_src else None
    history = img.history_entry(created_by, empty_layer=lid is None)
    image = store.put_image(img.with_layer(parent.config if parent else None, lid, history))
    if cache:
        store.add_ref(Ref("build-cache", f"key-{created_by}", image_id=image.id, layer_id=lid,
                          data=json.dumps({"created_by": created_by})))
    return image


@pytest.fixture
def chain(store, tmp_path):
    """base:1 (tagged) <- RUN (layer) <- ENV (no layer) <- RUN (layer) = built:1."""
    base = _step(store, None, "base", _tree(tmp_path, "base"), cache=False)
    store.tag(base.id, "base:1")
    run1 = _step(store, base, "RUN one", _tree(tmp_path, "one"))
    env = _step(store, run1, "ENV A=1")
    built = _step(store, env, "RUN two", _tree(tmp_path, "two"))
    store.tag(built.id, "built:1")
    return base, run1, env, built


def _ids(store: Store) -> set[str]:
    return {image.id for image, _ in store.images()}


def test_lineage_reads_parents_from_history_and_layers(store, chain):
    base, run1, env, built = chain
    family = prune.lineage(store)
    assert family.parents == {run1.id: {base.id}, env.id: {run1.id}, built.id: {env.id}}
    assert family.children[base.id] == {run1.id}


def test_rmi_removes_the_untagged_parents_and_gc_frees_their_bytes(store, chain):
    base, run1, env, built = chain
    lines = prune.remove_image(store, "built:1")
    assert lines == ["Untagged: built:1", f"Deleted: {built.id}", f"Deleted: {env.id}", f"Deleted: {run1.id}"]
    assert _ids(store) == {base.id}
    assert store.refs("build-cache") == []
    dry = gc.collect(store, dry_run=True)
    real = gc.collect(store)
    assert dry == real
    assert real.layers_removed == 2 and real.objects_removed == 2 and real.bytes_freed >= 400_000
    assert fsck.check(store).clean
    assert gc.collect(store, dry_run=True) == gc.GcResult(0, 0, 0, 0)


def test_rmi_keeps_parents_something_else_uses(store, chain, tmp_path):
    base, run1, env, built = chain
    sibling = _step(store, env, "RUN three", _tree(tmp_path, "three"))   # a second build sharing two steps
    store.add_ref(Ref("container", "c1", image_id=sibling.id, in_use=True))
    assert prune.remove_image(store, "built:1") == ["Untagged: built:1", f"Deleted: {built.id}"]
    assert _ids(store) == {base.id, run1.id, env.id, sibling.id}
    # a tagged parent stays too, and so does a parent a container uses
    store.tag(run1.id, "keep:1")
    store.drop_refs("container")
    assert prune.remove_image(store, sibling.id) == [f"Deleted: {sibling.id}", f"Deleted: {env.id}"]
    assert _ids(store) == {base.id, run1.id}


def test_rmi_that_only_untags_removes_no_parent(store, chain):
    base, run1, env, built = chain
    store.tag(built.id, "other:1")
    assert prune.remove_image(store, "built:1") == ["Untagged: built:1"]
    assert _ids(store) == {base.id, run1.id, env.id, built.id}


def test_image_prune_removes_dangling_chains_only(store, chain, tmp_path):
    base, run1, env, built = chain
    # an untagged build: its final image is dangling, its steps go with it
    a = _step(store, base, "RUN a", _tree(tmp_path, "a"))
    b = _step(store, a, "CMD b")
    assert prune.dangling(store) == [b.id]
    assert prune.prune_images(store) == [f"Deleted: {b.id}", f"Deleted: {a.id}"]
    assert _ids(store) == {base.id, run1.id, env.id, built.id}
    assert prune.prune_images(store) == []


def test_image_prune_all_keeps_what_containers_use(store, chain, tmp_path):
    base, run1, env, built = chain
    other = _step(store, None, "other", _tree(tmp_path, "other"), cache=False)
    store.tag(other.id, "other:1")
    store.add_ref(Ref("container", "c1", image_id=env.id, in_use=True))
    lines = prune.prune_images(store, all_images=True)
    assert sorted(lines) == sorted(["Untagged: built:1", f"Deleted: {built.id}", "Untagged: other:1",
                                    f"Deleted: {other.id}"])
    assert lines.index(f"Deleted: {built.id}") == lines.index("Untagged: built:1") + 1
    assert _ids(store) == {base.id, run1.id, env.id}
    store.drop_refs("container")
    assert len(prune.prune_images(store, all_images=True)) == 4   # env, run1, and base untagged + deleted
    assert _ids(store) == set()
    gc.collect(store)
    assert fsck.check(store).clean
    assert store.db.all("SELECT id FROM layers") == []


def test_gc_dry_run_counts_what_gc_then_sweeps(store, chain):
    """Debris too: interrupted writes in tmp/, unknown objects and manifests,
    index caches of removed images."""
    prune.remove_image(store, "built:1")
    os.makedirs(os.path.join(store.tmp_dir, "interrupted"))
    with open(os.path.join(store.tmp_dir, "interrupted", "part"), "wb") as f:
        f.write(os.urandom(50_000))
    with open(os.path.join(store.root, "layers", "f" * 64), "wb") as f:
        f.write(b"x" * 5000)
    os.makedirs(os.path.join(store.root, "fscache"), exist_ok=True)
    with open(os.path.join(store.root, "fscache", "0" * 64 + ".idx"), "wb") as f:
        f.write(b"y" * 5000)
    dry = gc.collect(store, dry_run=True)
    assert os.listdir(store.tmp_dir) == ["interrupted"]
    real = gc.collect(store)
    assert dry == real and real.debris_removed == 3
    assert gc.collect(store) == gc.GcResult(0, 0, 0, 0)


def test_gc_and_fsck_keep_what_a_mount_record_names(store, chain):
    """Without asking whether its daemon lives (the filesystem's business),
    gc keeps the paths a mount record names and the image it mounts; fsck
    --repair keeps the record."""
    base, run1, env, built = chain
    scratch = os.path.join(store.tmp_dir, "build-run-x")
    os.makedirs(os.path.join(scratch, "upper"))
    store.add_ref(Ref("mount", "/nonexistent/mnt", image_id=built.id, data=json.dumps({"pid": 1}),
                      in_use=True, paths=("/nonexistent/mnt", os.path.join(scratch, "upper"), scratch)))
    store.remove_image("built:1", force=True)   # only untags: the mount uses it
    assert gc.collect(store) == gc.GcResult(0, 0, 0, 0)
    assert os.path.isdir(os.path.join(scratch, "upper"))
    with store.db.transaction() as c:   # an image lost to damage
        c.execute("DELETE FROM images WHERE id=?", (built.id,))
    assert fsck.check(store, repair=True).repaired
    assert store.get_ref("mount", "/nonexistent/mnt") is not None
    assert os.path.isdir(os.path.join(scratch, "upper"))
    # the record gone, its paths are debris
    store.drop_refs("mount")
    assert gc.collect(store).debris_removed == 1
