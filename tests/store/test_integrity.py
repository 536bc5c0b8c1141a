"""gc, fsck, concurrent writers and interrupted imports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from layerfs.store import fsck, gc, transfer
from layerfs.store import images as img
from layerfs.store.refs import Ref
from layerfs.store.store import Store


def _image(store, src, tag, base=None):
    lid = transfer.import_layer(store, src, base, as_layer=base is not None)
    cfg = img.with_layer(base.config if base else None, lid, img.history_entry(f"import {tag}"))
    im = store.put_image(cfg)
    store.tag(im.id, tag)
    return im


def test_gc_keeps_tagged_drops_removed(store, tmp_path, busybox_tree):
    base = _image(store, busybox_tree, "bb:1")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "big").write_bytes(os.urandom(300_000))
    top = _image(store, str(extra), "top:1", base)
    assert gc.collect(store).objects_removed == 0
    assert fsck.check(store).clean
    store.remove_image("top:1")
    r = gc.collect(store)
    assert r.layers_removed == 1 and r.objects_removed == 1 and r.bytes_freed >= 300_000
    assert fsck.check(store).clean
    assert store.image("bb:1").id == base.id
    with pytest.raises(Exception):
        store.image(top.id)


def test_gc_keeps_what_refs_hold(store, busybox_tree):
    base = _image(store, busybox_tree, "bb:1")
    store.add_ref(Ref("build-cache", "k1", layer_id=base.layers[0]))
    store.remove_image("bb:1")
    assert gc.collect(store).layers_removed == 0
    assert store.layer_entries(base.layers[0])
    store.drop_refs("build-cache")
    assert gc.collect(store).layers_removed == 1
    assert fsck.check(store).clean


def test_fsck_finds_and_repairs_a_flipped_bit(store, tmp_path, busybox_tree):
    base = _image(store, busybox_tree, "bb:1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_bytes(b"independent" * 1000)
    _image(store, str(other), "other:1")
    digest, path = next((d, p) for d, p in store.objects.iter_on_disk() if not p.endswith(".zst")
                        and os.path.getsize(p) > 100 and any(
                            e.digest == d for e in store.layer_entries(base.layers[0])))
    with open(path, "r+b") as f:
        f.seek(50)
        b = f.read(1)
        f.seek(50)
        f.write(bytes([b[0] ^ 1]))
    report = fsck.check(store)
    assert not report.clean
    kinds = {p.kind for p in report.problems}
    assert {"object", "layer", "image", "tag"} <= kinds
    fsck.check(store, repair=True)
    assert fsck.check(store).clean
    assert store.image("other:1")


def test_fsck_finds_missing_manifest(store, busybox_tree):
    base = _image(store, busybox_tree, "bb:1")
    os.unlink(store.layer_manifest_path(base.layers[0]))
    assert any("manifest missing" in p.message for p in fsck.check(store).problems)


WRITER = r"""
import os, sys
from layerfs.store.store import Store
from layerfs.store import transfer, images as img
root, src, tag = sys.argv[1:4]
with Store(root) as s:
    for i in range(5):
        with s.writing():  # the lease: gc must not sweep the layer before the image names it
            lid = transfer.import_layer(s, src)
            im = s.put_image(img.new_config([lid], history=[img.history_entry(f"{tag}-{i}")]))
            s.tag(im.id, f"{tag}:{i}")
"""


def test_two_processes_writing_at_once(tmp_path, busybox_tree):
    root = str(tmp_path / "store")
    Store(root).close()
    other = tmp_path / "other"
    os.system(f"cp -a {busybox_tree} {other}")
    (other / "mine").write_bytes(os.urandom(100_000))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, root, src, tag])
             for src, tag in ((busybox_tree, "a"), (str(other), "b"))]
    procs.append(subprocess.Popen([sys.executable, "-c",
                                   "import sys;from layerfs.store.store import Store;from layerfs.store import gc\n"
                                   "with Store(sys.argv[1]) as s:\n  [gc.collect(s) for _ in range(5)]", root]))
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with Store(root) as s:
        assert fsck.check(s).clean
        assert len(s.images()) == 10


KILLED = r"""
import sys
from layerfs.store.store import Store
from layerfs.store import transfer
with Store(sys.argv[1]) as s:
    print("start", flush=True)
    transfer.import_layer(s, sys.argv[2])
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_kill_9_during_import_leaves_store_consistent(tmp_path, delay, busybox_tree):
    root = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(200):
        (src / f"f{i}").write_bytes(os.urandom(20_000))
    with Store(root) as s:
        before = _image(s, busybox_tree, "bb:1")
    p = subprocess.Popen([sys.executable, "-c", KILLED, root, str(src)], stdout=subprocess.PIPE)
    p.stdout.readline()
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with Store(root) as s:
        assert fsck.check(s).clean
        assert s.image("bb:1").id == before.id
        gc.collect(s)
        assert fsck.check(s).clean
        assert os.listdir(s.tmp_dir) == []
        # and the same import now succeeds
        transfer.import_layer(s, str(src))
        assert fsck.check(s).clean


def test_rmi_of_a_built_image_drops_its_cache_entry(store, busybox_tree):
    im = _image(store, busybox_tree, "built:1")
    store.add_ref(Ref("build-cache", "step-key", image_id=im.id, layer_id=im.layers[-1]))
    store.remove_image("built:1")
    assert store.get_ref("build-cache", "step-key") is None
    assert fsck.check(store).clean


def test_rmi_refuses_an_image_in_use_and_force_only_untags(store, busybox_tree):
    from layerfs.errors import Conflict

    im = _image(store, busybox_tree, "used:1")
    store.add_ref(Ref("container", "c1", image_id=im.id, in_use=True))
    with pytest.raises(Conflict, match="container c1"):
        store.remove_image("used:1")
    assert store.remove_image("used:1", force=True) == ["Untagged: used:1"]
    assert store.image(im.id).id == im.id
    assert fsck.check(store).clean
