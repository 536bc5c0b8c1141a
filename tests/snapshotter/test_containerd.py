"""containerd 1.6 (Debian's) pulling and running images through ``layerfs
snapshotter``, driven with ``ctr`` like a user would."""

from __future__ import annotations

import json
import os
import signal
import time

from layerfs.fs import mount as fsmount
from layerfs.snapshotter import records
from layerfs.store.store import Store
from tests.conftest import assert_fsck_clean
from tests.snapshotter.node import layerfs

LF = ("--snapshotter", "layerfs")


def store_snapshots(root: str) -> list[records.Snapshot]:
    with Store(root) as store:
        return records.all_snapshots(store)


def test_pull_run_three_containers_remove_prune_gc(node, images):
    node.ctr("images", "pull", "--plain-http", *LF, images.busybox)
    committed = [s for s in store_snapshots(node.root) if s.kind == "committed"]
    assert len(committed) == 1  # busybox is one layer, imported into the store
    out = node.ctr("run", "--rm", *LF, images.busybox, "once", "echo", "hi").stdout
    assert out.strip() == "hi"

    for i in range(3):
        node.ctr("run", "-d", *LF, images.busybox, f"c{i}", "sh", "-c", f"echo {i} > /mine; exec sleep 1000")
    for i in range(3):
        got = node.ctr("tasks", "exec", "--exec-id", "x", f"c{i}", "sh", "-c",
                       "while [ ! -e /mine ]; do sleep 0.05; done; cat /mine")
        assert got.stdout.strip() == str(i)  # each container has its own upper
    active = [s for s in store_snapshots(node.root) if s.kind == "active"]
    assert len(active) == 3 and all(s.mode == "fuse" for s in active)
    for s in active:
        mp = os.path.join(node.root, "snapshots", s.id, "mnt")
        assert fsmount.mounted_fstype(mp) == "fuse.layerfs"
    # Usage and Update reach the snapshotter through containerd's metadata
    # layer (it passes on the labels a snapshotter inherits)
    usage = node.ctr("snapshots", "--snapshotter", "layerfs", "usage", "c0").stdout
    assert "c0" in usage
    node.ctr("snapshots", "--snapshotter", "layerfs", "label", "c0", "containerd.io/snapshot/test=yes")
    (c0,) = [s for s in store_snapshots(node.root) if s.key.endswith("/c0")]
    assert c0.labels.get("containerd.io/snapshot/test") == "yes"
    # the image's bytes are stored once, however many containers run it
    with Store(node.root) as store:
        (layer,) = {s.layer_id for s in committed}
        n_objects = store.db.value("SELECT COUNT(*) FROM objects")
        assert n_objects == store.db.value("SELECT COUNT(*) FROM layer_objects WHERE layer_id=?", layer)

    # df and images show what containerd pulled
    df = layerfs(node.root, "df", "-v").stdout
    assert committed[0].image_id[:12] in df and "containerd snapshots" in df
    listed = json.loads(layerfs(node.root, "images", "--format", "json").stdout)
    assert committed[0].image_id in {i["ID"] for i in listed}

    node.containerd.remove_everything()
    node.ctr("images", "rm", "--sync", images.busybox)
    assert node.snapshots() == []
    assert store_snapshots(node.root) == []  # containerd's GC called Remove for every one
    assert not [m for m in fsmount.list_mounts(node.root)]
    layerfs(node.root, "gc")
    with Store(node.root) as store:
        assert store.db.value("SELECT COUNT(*) FROM objects") == 0
        assert store.db.value("SELECT COUNT(*) FROM layers") == 0
    assert_fsck_clean(node.root)


def _exec(node, cid: str, *cmd: str) -> str:
    return node.ctr("tasks", "exec", "--exec-id", f"e{time.monotonic_ns()}", cid, *cmd).stdout


def test_restarts_of_snapshotter_and_containerd_keep_containers(node, images):
    node.ctr("images", "pull", "--plain-http", *LF, images.busybox)
    node.ctr("run", "-d", *LF, images.busybox, "keep", "sh", "-c", "echo state > /state; exec sleep 1000")
    _exec(node, "keep", "sh", "-c", "while [ ! -e /state ]; do sleep 0.05; done")
    before = sorted(node.snapshots())

    assert node.snapshotter.stop() == 0  # SIGTERM: a clean exit
    assert_fsck_clean(node.root)
    assert _exec(node, "keep", "cat", "/state").strip() == "state"  # rootfs outlives the server
    node.restart_snapshotter()
    assert sorted(node.snapshots()) == before

    node.containerd.stop()
    node.containerd.start()
    assert "RUNNING" in node.ctr("tasks", "ls").stdout
    assert _exec(node, "keep", "cat", "/state").strip() == "state"
    node.ctr("run", "--rm", *LF, images.busybox, "after", "true")  # and new containers still start

    # the snapshotter killed: its daemons keep serving; a restart finds them
    node.restart_snapshotter(signal.SIGKILL)
    assert _exec(node, "keep", "cat", "/state").strip() == "state"
    assert_fsck_clean(node.root)
