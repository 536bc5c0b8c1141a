"""Snapshot semantics, called directly (no gRPC): containerd's snapshotter
test suite (core/snapshots/testsuite) is the reference for what each call
does and which error it gives."""

from __future__ import annotations

import os
import time

import pytest

from layerfs.errors import InvalidInput, NotFound
from layerfs.fs import mount as fsmount
from layerfs.snapshotter import mounts as mnt
from layerfs.snapshotter.records import AlreadyExists, FailedPrecondition
from layerfs.snapshotter.service import Snapshotter
from layerfs.store import gc
from layerfs.store.store import Store
from tests.conftest import assert_fsck_clean
from tests.snapshotter.conftest import needs_fuse

pytestmark = needs_fuse


def upper_of(sn: Snapshotter, key: str) -> str:
    return mnt.dirs(sn.root, sn.stat(key).id).upper


def write_layer(sn: Snapshotter, key: str, files: dict[str, bytes], parent: str = "") -> None:
    ms = sn.prepare(key, parent)
    target = ms[0].source if ms[0].type == "bind" else upper_of(sn, key)
    for rel, data in files.items():
        path = os.path.join(target, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def committed_base(sn: Snapshotter) -> None:
    write_layer(sn, "ns/1/extract-1 base", {"etc/hostname": b"base\n", "bin/tool": b"#!tool\n"})
    sn.commit("ns/2/base", "ns/1/extract-1 base")


def test_parentless_prepare_is_a_bind_mount_of_a_plain_dir(sn):
    ms = sn.prepare("ns/1/a")
    assert [(m.type, m.options) for m in ms] == [("bind", ("rw", "rbind"))]
    assert os.path.isdir(ms[0].source) and os.listdir(ms[0].source) == []
    info = sn.stat("ns/1/a")
    assert (info.kind, info.parent, info.labels) == ("active", "", {})


def test_commit_makes_a_layer_and_a_chain_image(sn):
    committed_base(sn)
    info = sn.stat("ns/2/base")
    assert info.kind == "committed" and info.layer_id and info.image_id
    with pytest.raises(NotFound):
        sn.stat("ns/1/extract-1 base")  # the active key is gone
    with Store(sn.root) as store:
        assert store.image(info.image_id).layers == [info.layer_id]
        paths = {e.path for e in store.layer_entries(info.layer_id)}
    assert {"etc/hostname", "bin/tool"} <= paths
    assert not os.path.exists(mnt.dirs(sn.root, info.id).base)  # the upper is in the store now
    assert_fsck_clean(sn.root)


def test_container_snapshot_is_the_layerfs_union_with_a_private_upper(sn):
    committed_base(sn)
    ms = sn.prepare("ns/3/ctr", "ns/2/base")
    assert ms[0].type == "bind"
    root = ms[0].source
    assert fsmount.mounted_fstype(root) == "fuse.layerfs"
    with open(os.path.join(root, "etc/hostname"), "rb") as f:
        assert f.read() == b"base\n"
    with open(os.path.join(root, "etc/hostname"), "wb") as f:
        f.write(b"changed\n")
    os.unlink(os.path.join(root, "bin/tool"))
    up = upper_of(sn, "ns/3/ctr")
    assert open(os.path.join(up, "etc/hostname"), "rb").read() == b"changed\n"
    assert os.stat(os.path.join(up, "bin/tool")).st_rdev == 0  # overlay whiteout
    size, inodes = sn.usage("ns/3/ctr")
    assert size > 0 and inodes >= 3
    # a second container on the same image does not see the first one's writes
    other = sn.prepare("ns/3/ctr2", "ns/2/base")[0].source
    assert open(os.path.join(other, "etc/hostname"), "rb").read() == b"base\n"
    sn.remove("ns/3/ctr")
    assert fsmount.mounted_fstype(root) is None
    assert sn.stat("ns/3/ctr2").kind == "active"


def test_unpack_snapshot_is_an_overlay_mount_whose_upper_takes_whiteouts(sn):
    committed_base(sn)
    key = "ns/4/extract-2 top"
    ms = sn.prepare(key, "ns/2/base", {"containerd.io/snapshot.ref": "top"})
    (m,) = ms
    assert m.type == "overlay"
    opts = dict(o.split("=", 1) for o in m.options)
    lower = opts["lowerdir"]
    assert open(os.path.join(lower, "etc/hostname"), "rb").read() == b"base\n"
    # what containerd's applier does with an OCI whiteout on an overlay upper
    os.mkdir(os.path.join(opts["upperdir"], "bin"))
    os.mknod(os.path.join(opts["upperdir"], "bin/tool"), 0o20000, os.makedev(0, 0))
    with open(os.path.join(opts["upperdir"], "new"), "wb") as f:
        f.write(b"new\n")
    sn.commit("ns/5/top", key)
    view = sn.view("ns/6/v", "ns/5/top")[0]
    assert view.options[0] == "ro"
    assert sorted(os.listdir(os.path.join(view.source, "bin"))) == []
    assert open(os.path.join(view.source, "new"), "rb").read() == b"new\n"
    assert open(os.path.join(view.source, "etc/hostname"), "rb").read() == b"base\n"
    with pytest.raises(OSError):
        open(os.path.join(view.source, "x"), "wb")
    assert fsmount.mounted_fstype(lower) is None  # Commit stopped the unpack's lower mount


def test_errors_are_containerds(sn):
    committed_base(sn)
    with pytest.raises(NotFound):
        sn.stat("nope")
    with pytest.raises(NotFound):
        sn.prepare("k", "no-parent")
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/2/base")
    sn.prepare("active")
    with pytest.raises(InvalidInput):
        sn.prepare("k2", "active")  # parent must be committed
    with pytest.raises(AlreadyExists):
        sn.commit("ns/2/base", "active")
    sn.view("v", "ns/2/base")
    with pytest.raises(FailedPrecondition):
        sn.commit("c", "v")  # views are never committed
    with pytest.raises(FailedPrecondition):
        sn.remove("ns/2/base")  # has a child (the view)
    with pytest.raises(FailedPrecondition):
        sn.mounts("ns/2/base")
    with pytest.raises(NotFound):
        sn.remove("nope")
    with pytest.raises(NotFound):
        sn.commit("x", "nope")
    with pytest.raises(InvalidInput):
        sn.prepare("")
    with pytest.raises(InvalidInput):
        sn.update("ns/2/base", {}, ["parent"])
    # nothing changed by the failed calls
    assert {s.key for s in sn.list()} == {"ns/2/base", "active", "v"}
    sn.remove("v")
    sn.remove("ns/2/base")
    assert {s.key for s in sn.list()} == {"active"}


def test_labels_update_and_list_filters(sn):
    sn.prepare("a", labels={"x": "1", "containerd.io/gc.root": "t"})
    sn.prepare("b", labels={"x": "2"})
    assert sn.update("a", {"y": "3"}, ["labels.y"]).labels == {"x": "1", "y": "3", "containerd.io/gc.root": "t"}
    assert sn.update("a", {}, ["labels.x"]).labels == {"y": "3", "containerd.io/gc.root": "t"}
    assert sn.update("b", {"z": "9"}, []).labels == {"z": "9"}
    assert sn.stat("b").updated >= sn.stat("b").created
    names = lambda fs: sorted(s.key for s in sn.list(fs))  # noqa: E731
    assert names([]) == ["a", "b"]
    assert names(['labels."containerd.io/gc.root"']) == ["a"]
    assert names(["labels.z==9"]) == ["b"]
    assert names(["name==a", "labels.z==9"]) == ["a", "b"]
    assert names(["kind==active,name!=a"]) == ["b"]
    assert names(["name~=^b"]) == ["b"]
    with pytest.raises(InvalidInput):
        sn.list(["name=="])


def test_restart_keeps_snapshots_and_reestablishes_dead_mounts(sn, snap_root):
    committed_base(sn)
    root = sn.prepare("ns/3/ctr", "ns/2/base", {"l": "v"})[0].source
    with open(os.path.join(root, "written"), "wb") as f:
        f.write(b"kept\n")
    # a daemon that dies (the node rebooted, or it was killed)
    pid = next(m.pid for m in fsmount.list_mounts(snap_root) if m.mountpoint == root)
    os.kill(pid, 9)
    while not fsmount.is_enotconn(root):
        time.sleep(0.01)
    again = Snapshotter(snap_root)
    assert again.restore() == []
    assert again.stat("ns/3/ctr").labels == {"l": "v"}
    assert again.mounts("ns/3/ctr")[0].source == root
    assert open(os.path.join(root, "written"), "rb").read() == b"kept\n"
    assert open(os.path.join(root, "etc/hostname"), "rb").read() == b"base\n"


def test_remove_then_gc_gives_the_bytes_back(sn):
    committed_base(sn)
    ctr = sn.prepare("ns/3/ctr", "ns/2/base")[0].source
    with open(os.path.join(ctr, "big"), "wb") as f:
        f.write(os.urandom(1 << 20))
    sn.remove("ns/3/ctr")
    sn.remove("ns/2/base")
    assert sn.list() == []
    with Store(sn.root) as store:
        assert store.images() == []
        result = gc.collect(store)
        assert result.layers_removed == 1 and store.db.all("SELECT * FROM objects") == []
    assert_fsck_clean(sn.root)


def test_cleanup_sweeps_what_no_snapshot_names(sn):
    committed_base(sn)
    stray = mnt.dirs(sn.root, "feedfacefeedface")
    os.makedirs(stray.upper)
    os.makedirs(os.path.join(mnt.snapshots_dir(sn.root), "new-0123"))
    with Store(sn.root) as store:
        from layerfs.snapshotter.service import _chain_config

        base_layer = store.image(sn.stat("ns/2/base").image_id).layers
        orphan = store.put_image(_chain_config(base_layer + base_layer))  # as a killed Commit leaves it
    assert sn.cleanup() == 3
    assert not os.path.exists(stray.base)
    with Store(sn.root) as store:
        assert orphan.id not in {i.id for i, _ in store.images()}
    assert sn.stat("ns/2/base").kind == "committed"


def test_hostile_names_in_an_upper_stay_inside(sn, short_dir):
    """A symlink in a container's upper pointing out of it is only a
    symlink: the union resolves it inside the rootfs, never on the host."""
    committed_base(sn)
    root = sn.prepare("ns/3/ctr", "ns/2/base")[0].source
    os.symlink("/../../../..", os.path.join(root, "escape"))
    outside = os.path.join(short_dir, "outside")
    os.symlink(outside, os.path.join(root, "abs"))
    sn.commit("ns/4/c", "ns/3/ctr")
    v = sn.view("ns/5/v", "ns/4/c")[0].source
    assert os.readlink(os.path.join(v, "escape")) == "/../../../.."
    assert not os.path.exists(outside)


def test_cleanup_racing_prepare_and_remove_spares_live_snapshots(sn):
    """containerd calls Cleanup after its GC, while other clients prepare
    snapshots: Cleanup must never sweep a snapshot being made (regression:
    it swept directories outside the lock, between a Prepare's mkdir and
    its row)."""
    import threading

    committed_base(sn)
    stop = threading.Event()
    errors: list = []

    def sweeper() -> None:
        while not stop.is_set():
            try:
                sn.cleanup()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    t = threading.Thread(target=sweeper)
    t.start()
    try:
        for i in range(8):
            ms = sn.prepare(f"ns/9/c{i}", "ns/2/base")
            assert os.path.isfile(os.path.join(ms[0].source, "etc/hostname"))
            sn.remove(f"ns/9/c{i}")
            sn.prepare(f"ns/9/p{i}")
            assert os.path.isdir(upper_of(sn, f"ns/9/p{i}"))
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert sorted(s.key for s in sn.list()) == sorted(["ns/2/base"] + [f"ns/9/p{i}" for i in range(8)])


def test_mounts_restarts_a_dead_daemon(sn, snap_root):
    committed_base(sn)
    root = sn.prepare("ns/3/ctr", "ns/2/base")[0].source
    pid = next(m.pid for m in fsmount.list_mounts(snap_root) if m.mountpoint == root)
    os.kill(pid, 9)
    while not fsmount.is_enotconn(root):
        time.sleep(0.01)
    assert sn.mounts("ns/3/ctr")[0].source == root
    assert open(os.path.join(root, "etc/hostname"), "rb").read() == b"base\n"


def test_rmi_refuses_a_chain_image_containerd_uses(sn):
    from layerfs.errors import Conflict

    committed_base(sn)
    image_id = sn.stat("ns/2/base").image_id
    with Store(sn.root) as store:
        with pytest.raises(Conflict, match="snapshot"):
            store.remove_image(image_id)
        assert store.image(image_id).id == image_id
