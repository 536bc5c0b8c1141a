"""Bad input and faults: each gives a clear gRPC error (or a one-line CLI
error), loses nothing, and touches nothing outside the store."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import threading

import grpc
import pytest

from layerfs.snapshotter import proto, records
from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.store import Store
from tests.conftest import assert_fsck_clean
from tests.snapshotter.harness import LAYERFS, Snapshotter, unmount_all, wait_for
from tests.snapshotter.node import layerfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")


@pytest.fixture
def server(short_dir):
    s = Snapshotter(os.path.join(short_dir, "store"), os.path.join(short_dir, "s.sock"),
                    os.path.join(short_dir, "snapshotter.log")).start()
    yield s
    s.stop()
    unmount_all(s.root)


def client(address: str):
    pb, svc = proto.snapshots()
    channel = grpc.insecure_channel(f"unix://{address}")
    return pb, svc.SnapshotsStub(channel), channel


def code_of(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        r = call(*args)
        if hasattr(r, "__iter__") and not hasattr(r, "ListFields"):
            list(r)
    assert exc.value.details()  # a message saying what went wrong
    return exc.value.code()


def test_grpc_errors_are_containerds_codes(server):
    pb, stub, channel = client(server.address)
    C = grpc.StatusCode
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key="nope")) == C.NOT_FOUND
    assert code_of(stub.Mounts, pb.MountsRequest(key="nope")) == C.NOT_FOUND
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="nope")) == C.NOT_FOUND
    assert code_of(stub.Usage, pb.UsageRequest(key="nope")) == C.NOT_FOUND
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="k", parent="nope")) == C.NOT_FOUND
    stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="a")) == C.ALREADY_EXISTS
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="b", parent="a")) == C.INVALID_ARGUMENT
    stub.Commit(pb.CommitSnapshotRequest(name="base", key="a"))
    stub.View(pb.ViewSnapshotRequest(key="v", parent="base"))
    assert code_of(stub.Commit, pb.CommitSnapshotRequest(name="x", key="v")) == C.FAILED_PRECONDITION
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="base")) == C.FAILED_PRECONDITION
    assert code_of(stub.Mounts, pb.MountsRequest(key="base")) == C.FAILED_PRECONDITION
    bad = pb.UpdateSnapshotRequest(info=pb.Info(name="base"))
    bad.update_mask.paths.append("parent")
    assert code_of(stub.Update, bad) == C.INVALID_ARGUMENT
    assert code_of(stub.List, pb.ListSnapshotsRequest(filters=["name=="])) == C.INVALID_ARGUMENT
    # nothing was changed by the failed calls
    infos = [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    assert sorted((i.name, i.kind) for i in infos) == [("base", pb.COMMITTED), ("v", pb.VIEW)]
    stat = stub.Stat(pb.StatSnapshotRequest(key="v")).info
    assert (stat.parent, stat.kind) == ("base", pb.VIEW) and stat.created_at.seconds > 0
    upd = pb.UpdateSnapshotRequest(info=pb.Info(name="v", labels={"a": "b"}))
    assert dict(stub.Update(upd).info.labels) == {"a": "b"}
    stub.Remove(pb.RemoveSnapshotRequest(key="v"))
    stub.Cleanup(pb.CleanupRequest())
    channel.close()


def test_cli_bad_input_is_one_line(short_dir):
    root = os.path.join(short_dir, "store")
    cases = [(os.path.join(short_dir, "x" * 120, "s.sock"), 2, "unix sockets allow"),
             (os.path.join(short_dir, "missing", "s.sock"), 1, "does not exist"),
             (os.path.join(short_dir, "plain-file"), 2, "not a socket")]
    open(os.path.join(short_dir, "plain-file"), "w").close()
    for address, code, text in cases:
        p = subprocess.run([LAYERFS, "--root", root, "snapshotter", "--address", address],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == code and text in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_killed_during_commit_leaves_no_half_committed_snapshot(server):
    pb, stub, channel = client(server.address)
    (m,) = stub.Prepare(pb.PrepareSnapshotRequest(key="a")).mounts
    for i in range(400):
        d = os.path.join(m.source, f"d{i % 20}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(os.urandom(128 * 1024))
    objects = os.path.join(server.root, "objects")
    err: list = []
    t = threading.Thread(target=lambda: _commit(stub, pb, err))
    t.start()
    # kill -9 once the import is writing objects, before its rows commit
    wait_for(lambda: any(files for _, _, files in os.walk(objects)), "the import to start", timeout=60)
    server.stop(signal.SIGKILL)
    t.join()
    channel.close()
    assert_fsck_clean(server.root)
    with Store(server.root) as store:
        keys = {s.key: s.kind for s in records.all_snapshots(store)}
    assert keys in ({"a": "active"}, {"done": "committed"})  # one or the other, never both or neither
    server.start()
    pb, stub, channel = client(server.address)
    if "a" in keys:  # not committed: the upper is intact and Commit works now
        stub.Commit(pb.CommitSnapshotRequest(name="done", key="a"))
    v = stub.View(pb.ViewSnapshotRequest(key="v", parent="done")).mounts[0].source
    assert sum(len(files) for _, _, files in os.walk(v)) == 400
    channel.close()
    assert_fsck_clean(server.root)


def _commit(stub, pb, err: list) -> None:
    try:
        stub.Commit(pb.CommitSnapshotRequest(name="done", key="a"))
    except grpc.RpcError as exc:
        err.append(exc)


def _oci_archive(path: str, members: list[tuple[tarfile.TarInfo, bytes | None]], ref: str) -> None:
    """An OCI image archive with one hand-made layer (for `ctr images import`)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    layer = gzip.compress(raw.getvalue())
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    config = json.dumps({"architecture": img.host_arch(), "os": "linux", "config": {"Cmd": ["/x"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    blobs = {}

    def blob(data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return d

    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": "sha256:" + blob(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": "sha256:" + blob(layer), "size": len(layer)}]}).encode()
    md = blob(manifest)
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + md,
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": ref,
                                               "io.containerd.image.name": ref}}]}).encode()
    with tarfile.open(path, "w") as out:
        for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)] + \
                [(f"blobs/sha256/{d}", b) for d, b in blobs.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if data is not None:
        info.size = len(data)
    return info, data


def test_hostile_layer_applied_by_containerd_stays_inside(node, short_dir):
    """Names that climb out, absolute names, writes through a symlink that
    points out: containerd's applier resolves them inside the snapshot's
    mount, so the layer commits with everything under its root. A hardlink
    to a file outside fails the unpack with a clear error and leaves no
    committed snapshot. Nothing outside the upper is ever written."""
    outside = os.path.join(short_dir, "outside")
    os.mkdir(outside)
    climbing = [
        _member("ok", data=b"fine\n"),
        _member("../../../../../../" + outside.lstrip("/") + "/dotdot", data=b"x"),
        _member(outside + "/absolute", data=b"x"),
        _member("link", tarfile.SYMTYPE, link=outside),
        _member("link/through-symlink", data=b"x"),
    ]
    _oci_archive(os.path.join(short_dir, "climb.tar"), climbing, "climb:1")
    _oci_archive(os.path.join(short_dir, "hard.tar"),
                 [_member("ok", data=b"fine\n"), _member("hard", tarfile.LNKTYPE, link="../../../../etc/passwd")],
                 "hard:1")

    node.ctr("images", "import", "--snapshotter", "layerfs", os.path.join(short_dir, "climb.tar"))
    assert os.listdir(outside) == []
    (c,) = [s for s in _snapshots(node.root) if s.kind == "committed"]
    with Store(node.root) as store:
        entries = {e.path: e for e in store.layer_entries(c.layer_id)}
    assert entries["ok"].kind == "file" and "link" in entries
    assert not [p for p in entries if p.startswith(("/", ".."))]
    # each escape landed at the same path under the layer's own root
    rel = outside.lstrip("/")
    assert {f"{rel}/dotdot", f"{rel}/absolute", f"{rel}/through-symlink"} <= set(entries)

    p = node.ctr("images", "import", "--snapshotter", "layerfs", os.path.join(short_dir, "hard.tar"), check=False)
    assert p.returncode != 0 and "hard" in p.stderr
    assert [s.key for s in _snapshots(node.root) if s.kind == "committed"] == [c.key]
    assert os.listdir(outside) == []
    assert_fsck_clean(node.root)


def test_containerd_killed_mid_unpack_then_restarted(node, registry, short_dir):
    """containerd disappears while an active snapshot is being filled; after
    a restart the pull completes, and its GC removes what the dead pull
    left (our store keeps nothing containerd does not know)."""
    build = os.path.join(short_dir, "build")
    tree = os.path.join(short_dir, "tree")
    os.makedirs(tree)
    for i in range(64):
        with open(os.path.join(tree, f"blob{i}"), "wb") as f:
            f.write(os.urandom(1 << 20))
    with Store(build) as store:
        lid = transfer.import_layer(store, tree)
        image = store.put_image(img.new_config([lid], {"Cmd": ["/blob0"]}, []))
        store.tag(image.id, "big:1")
    ref = f"{registry.host}/layerfs-test/big:1"
    layerfs(build, "push", "--insecure", "-q", "big:1", ref)
    pull = subprocess.Popen(["ctr", "--address", node.containerd.address, "-n", node.containerd.namespace,
                             "images", "pull", "--plain-http", "--snapshotter", "layerfs", ref],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(s.kind == "active" for s in _snapshots(node.root)), "an unpack to start", timeout=120)
    node.containerd.stop(signal.SIGKILL)
    pull.wait(60)
    node.containerd.start()
    node.ctr("images", "pull", "--plain-http", "--snapshotter", "layerfs", ref)
    # The dead pull's lease (ctr's expire after a day) still holds what it
    # made; drop it as an operator would, then containerd's GC runs.
    for lease in node.ctr("leases", "ls", "-q").stdout.split():
        node.ctr("leases", "rm", lease)
    node.ctr("images", "rm", "--sync", ref)
    wait_for(lambda: _snapshots(node.root) == [], "containerd's GC to remove every snapshot", timeout=60)
    assert_fsck_clean(node.root)


def _snapshots(root: str) -> list[records.Snapshot]:
    with Store(root) as store:
        return records.all_snapshots(store)
