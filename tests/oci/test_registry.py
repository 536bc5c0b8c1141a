"""push/pull against a real registry (Debian's docker-registry), checked
with skopeo, umoci and runc; faults injected through a local proxy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from layerfs import oci
from layerfs.errors import LayerfsError, NotFound
from layerfs.oci import media
from layerfs.oci.registry import AuthError, Client, RegistryError
from layerfs.store import transfer
from layerfs.store.store import Store
from tests.conftest import layerfs_cmd
from tests.oci.conftest import add_layer
from tests.oci.helpers import FaultProxy, tree_signature

FAST = dict(retries=3, backoff=0.01)


def skopeo(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=300)


def test_push_pull_round_trip_same_id_and_tree(bb_store, busybox, registry, tmp_path):
    r = oci.push(bb_store, "busybox:test", f"{registry.host}/rt/busybox:1")
    assert r.blobs_sent == 1 and r.manifest_digest.startswith("sha256:")
    with Store(str(tmp_path / "other")) as other:
        got = oci.pull(other, f"{registry.host}/rt/busybox:1")
        assert got.image.id == busybox.id
        assert got.names == [f"{registry.host}/rt/busybox:1"]
        transfer.export_image(bb_store, busybox, str(tmp_path / "a"))
        transfer.export_image(other, got.image, str(tmp_path / "b"))
        assert tree_signature(str(tmp_path / "a")) == tree_signature(str(tmp_path / "b"))
        # pushed back from the second store: bit-exact, nothing sent
        again = oci.push(other, f"{registry.host}/rt/busybox:1", f"{registry.host}/rt/busybox:2")
        assert again.manifest_digest == r.manifest_digest and again.bytes_sent == 0


def test_repush_sends_nothing_and_mounts_across_repos(bb_store, busybox, registry):
    first = oci.push(bb_store, "busybox:test", f"{registry.host}/m/one:1")
    second = oci.push(bb_store, "busybox:test", f"{registry.host}/m/one:1")
    assert second.bytes_sent == 0 and second.blobs_reused == 1
    assert second.manifest_digest == first.manifest_digest
    third = oci.push(bb_store, "busybox:test", f"{registry.host}/m/two:1")
    assert third.bytes_sent == 0
    assert any(n.startswith("mounted from m/one") for n in third.notes.values())


def test_pull_skips_layers_the_store_has(bb_store, busybox, registry, tmp_path):
    app = add_layer(bb_store, busybox, {"app/run.sh": b"#!/bin/sh\necho app\n"}, tmp_path, "app:1")
    oci.push(bb_store, "busybox:test", f"{registry.host}/inc/base:1")
    oci.push(bb_store, "app:1", f"{registry.host}/inc/app:1")
    with Store(str(tmp_path / "s2")) as s2:
        oci.pull(s2, f"{registry.host}/inc/base:1")
        pulled = oci.copy(f"docker://{registry.host}/inc/app:1", "layerfs:", oci.context(s2))[0]
        assert pulled.blobs_reused == 1 and pulled.blobs_sent == 1
        assert pulled.destination_ref == app.id


def test_zstd_and_docker_schema2(bb_store, busybox, registry, tmp_path):
    z = oci.push(bb_store, "busybox:test", f"{registry.host}/fmt/z:1", compression="zstd")
    d = oci.push(bb_store, "busybox:test", f"{registry.host}/fmt/d:1", manifest_format="docker")
    c = Client(registry.host)
    raw, ctype = c.get_manifest("fmt/z", "1")
    assert json.loads(raw)["layers"][0]["mediaType"] == media.OCI_LAYER_ZSTD
    raw, ctype = c.get_manifest("fmt/d", "1")
    assert ctype == media.DOCKER_MANIFEST
    assert json.loads(raw)["layers"][0]["mediaType"] == media.DOCKER_LAYER_GZIP
    with Store(str(tmp_path / "z")) as s:
        assert oci.pull(s, f"{registry.host}/fmt/z:1").image.id == busybox.id
        assert oci.pull(s, f"{registry.host}/fmt/d:1").image.id == busybox.id
        # by digest: no tag, same image
        assert oci.pull(s, f"{registry.host}/fmt/d@{d.manifest_digest}").image.id == busybox.id
    assert z.manifest_digest != d.manifest_digest
    with pytest.raises(LayerfsError, match="zstd"):
        oci.push(bb_store, "busybox:test", f"{registry.host}/fmt/x:1", compression="zstd", manifest_format="docker")


def test_index_platform_selection(bb_store, busybox, registry, tmp_path):
    app = add_layer(bb_store, busybox, {"etc/arch": b"other\n"}, tmp_path, "other:1")
    a = oci.push(bb_store, "busybox:test", f"{registry.host}/multi/x:amd")
    b = oci.push(bb_store, "other:1", f"{registry.host}/multi/x:arm")
    c = Client(registry.host)
    index = {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": [
        {"mediaType": media.OCI_MANIFEST, "digest": a.manifest_digest, "size": len(c.get_manifest("multi/x", "amd")[0]),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": media.OCI_MANIFEST, "digest": b.manifest_digest, "size": len(c.get_manifest("multi/x", "arm")[0]),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}
    c.put_manifest("multi/x", "1", json.dumps(index).encode(), media.OCI_INDEX)
    with Store(str(tmp_path / "p")) as s:
        got = oci.pull(s, f"{registry.host}/multi/x:1", platform=media.Platform.parse("linux/arm64"))
        assert got.image.id == app.id
        got = oci.pull(s, f"{registry.host}/multi/x:1", platform=media.Platform.parse("linux/amd64"))
        assert got.image.id == busybox.id
        with pytest.raises(NotFound, match="available: linux/amd64, linux/arm64/v8"):
            oci.pull(s, f"{registry.host}/multi/x:1", platform=media.Platform.parse("linux/s390x"))


def test_skopeo_reads_what_layerfs_pushed(bb_store, busybox, registry, tmp_path):
    oci.push(bb_store, "busybox:test", f"{registry.host}/sk/bb:1")
    out = tmp_path / "ocidir"
    p = skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/sk/bb:1", f"oci:{out}:1")
    assert p.returncode == 0, p.stderr
    p = skopeo("inspect", f"oci:{out}:1")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["Env"] == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"] and len(info["Layers"]) == 1
    p = skopeo("inspect", "--config", f"oci:{out}:1")
    assert json.loads(p.stdout)["config"]["Cmd"] == ["sh"]


def test_layerfs_pulls_what_skopeo_pushed(bb_store, busybox, registry, tmp_path):
    oci.save(bb_store, ["busybox:test"], str(tmp_path / "bb.tar"), fmt="docker")
    p = skopeo("copy", "--dest-tls-verify=false", f"docker-archive:{tmp_path / 'bb.tar'}",
               f"docker://{registry.host}/sk/from-skopeo:1")
    assert p.returncode == 0, p.stderr
    with Store(str(tmp_path / "s")) as s:
        got = oci.pull(s, f"{registry.host}/sk/from-skopeo:1")
        transfer.export_image(s, got.image, str(tmp_path / "b"))
    transfer.export_image(bb_store, busybox, str(tmp_path / "a"))
    assert tree_signature(str(tmp_path / "a")) == tree_signature(str(tmp_path / "b"))


@pytest.mark.root
@pytest.mark.tools("umoci", "runc", "skopeo")
def test_runc_runs_image_from_layerfs_via_registry_skopeo_umoci(bb_store, busybox, registry, tmp_path):
    oci.push(bb_store, "busybox:test", f"{registry.host}/run/bb:1")
    layout = tmp_path / "layout"
    p = skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/run/bb:1", f"oci:{layout}:1")
    assert p.returncode == 0, p.stderr
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:1", str(bundle)], check=True, capture_output=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["echo", "hi from layerfs"]
    (bundle / "config.json").write_text(json.dumps(cfg))
    cid = f"layerfs-oci-{os.getpid()}"
    try:
        p = subprocess.run(["runc", "run", "-b", str(bundle), cid], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    if p.returncode != 0 and ("cgroup" in p.stderr or "permission denied" in p.stderr.lower()):
        pytest.skip(f"runc cannot create containers here: {p.stderr.strip()[:200]}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "hi from layerfs"


# -- auth ---------------------------------------------------------------------

def test_basic_auth_login_push_pull_logout(bb_store, busybox, auth_registry, tmp_path):
    host = auth_registry.host
    with pytest.raises(AuthError, match="layerfs login"):
        oci.push(bb_store, "busybox:test", f"{host}/auth/bb:1", **FAST)
    with pytest.raises(AuthError):
        oci.login(bb_store, host, "alice", "wrong")
    root = bb_store.root
    p = layerfs_cmd("login", host, "-u", "alice", "--password-stdin", root=root, input=b"s3cret\n")
    assert p.returncode == 0 and b"Login Succeeded" in p.stdout, p.stderr
    assert oct(os.stat(os.path.join(root, "auth.json")).st_mode & 0o777) == "0o600"
    p = layerfs_cmd("push", "busybox:test", f"{host}/auth/bb:1", root=root)
    assert p.returncode == 0, p.stderr
    p = layerfs_cmd("pull", f"{host}/auth/bb:1", "-q", root=str(tmp_path / "s2"))
    assert p.returncode == 4 and p.stderr.count(b"\n") == 1, p.stderr   # no creds in that store
    p = layerfs_cmd("logout", host, root=root)
    assert p.returncode == 0
    p = layerfs_cmd("pull", f"{host}/auth/bb:1", root=root)
    assert p.returncode == 4 and b"layerfs login" in p.stderr


def test_bearer_token_flow(bb_store, busybox, registry, tmp_path):
    proxy = FaultProxy(registry.host, bearer=("bob", "pw"))
    try:
        with pytest.raises(AuthError):
            oci.push(bb_store, "busybox:test", f"{proxy.host}/tok/bb:1", **FAST)
        oci.login(bb_store, proxy.host, "bob", "pw")
        r = oci.push(bb_store, "busybox:test", f"{proxy.host}/tok/bb:1", **FAST)
        assert r.blobs_sent + r.blobs_reused == 1
        with Store(str(tmp_path / "s")) as s:
            oci.login(s, proxy.host, "bob", "pw")
            assert oci.pull(s, f"{proxy.host}/tok/bb:1", **FAST).image.id == busybox.id
        assert any(k.startswith("GET /token?") and "scope=repository%3Atok%2Fbb%3Apull" in k for k in proxy.log)
    finally:
        proxy.close()


# -- faults ---------------------------------------------------------------------

@pytest.fixture
def proxy(registry):
    p = FaultProxy(registry.host)
    yield p
    p.close()


@pytest.fixture
def pushed(bb_store, busybox, registry):
    r = oci.push(bb_store, "busybox:test", f"{registry.host}/fault/bb:1")
    return r


def pushed_image_id(store, got):
    return store.image(got.names[0]).id


def _nothing_tagged(store: Store) -> bool:
    return store.images() == []


def test_5xx_and_dropped_connections_are_retried(pushed, proxy, tmp_path):
    layer = json.loads(Client(proxy.host).get_manifest("fault/bb", "1")[0])["layers"][0]["digest"]
    proxy.rules = [{"match": "GET /v2/fault/bb/manifests", "action": "503", "times": 2},
                   {"match": "GET /v2/fault/bb/blobs", "action": "drop", "times": 1},
                   {"match": f"GET /v2/fault/bb/blobs/{layer}", "action": "cut", "times": 1}]
    with Store(str(tmp_path / "s")) as s:
        got = oci.pull(s, f"{proxy.host}/fault/bb:1", **FAST)
        assert got.names and got.image.id == pushed_image_id(s, got)
    # the cut download resumed where it stopped instead of starting over
    assert any(k.startswith(f"GET /v2/fault/bb/blobs/{layer} Range=bytes=") for k in proxy.log), proxy.log


def test_persistent_5xx_gives_clear_error(pushed, proxy, tmp_path):
    proxy.rules = [{"match": "GET /v2/fault/bb/manifests", "action": "503", "times": 100}]
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(RegistryError, match=r"failed after 3 attempts \(503"):
            oci.pull(s, f"{proxy.host}/fault/bb:1", **FAST)
        assert _nothing_tagged(s)


def test_persistent_drops_give_clear_error(pushed, proxy, tmp_path):
    proxy.rules = [{"match": "/v2/fault/bb/", "action": "drop", "times": 100}]
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(RegistryError, match="failed after 3 attempts|kept failing"):
            oci.pull(s, f"{proxy.host}/fault/bb:1", **FAST)
        assert _nothing_tagged(s)


def test_blob_digest_mismatch_rejected(pushed, proxy, tmp_path):
    m = json.loads(Client(proxy.host).get_manifest("fault/bb", "1")[0])
    proxy.rules = [{"match": "GET /v2/fault/bb/blobs/" + m["layers"][0]["digest"], "action": "corrupt", "times": 10}]
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(LayerfsError, match="digest|corrupt|truncated"):
            oci.pull(s, f"{proxy.host}/fault/bb:1", **FAST)
        assert _nothing_tagged(s)
        assert s.db.all("SELECT id FROM layers") == []


def test_manifest_with_missing_blob(pushed, registry, tmp_path):
    c = Client(registry.host)
    raw, _ = c.get_manifest("fault/bb", "1")
    m = json.loads(raw)
    m["layers"].append({"mediaType": media.OCI_LAYER_GZIP, "digest": "sha256:" + "ab" * 32, "size": 10})
    with pytest.raises(RegistryError, match="BLOB_UNKNOWN|blob unknown"):
        c.put_manifest("fault/missing", "1", json.dumps(m).encode(), media.OCI_MANIFEST)


def test_pull_when_registry_lost_a_blob(pushed, proxy, tmp_path):
    m = json.loads(Client(proxy.host).get_manifest("fault/bb", "1")[0])
    proxy.rules = [{"match": "GET /v2/fault/bb/blobs/" + m["layers"][0]["digest"], "action": "404", "times": 10}]
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(NotFound, match="blob unknown"):
            oci.pull(s, f"{proxy.host}/fault/bb:1", **FAST)
        assert _nothing_tagged(s)


def test_unknown_repo_and_bad_refs_cli(bb_store, busybox, registry):
    root = bb_store.root
    p = layerfs_cmd("pull", f"{registry.host}/nope/nothing:1", root=root)
    assert p.returncode == 1 and p.stderr.startswith(b"Error: ") and p.stderr.count(b"\n") == 1
    p = layerfs_cmd("pull", "UPPER/case", root=root)
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1
    p = layerfs_cmd("push", "nosuch:image", f"{registry.host}/x:1", root=root)
    assert p.returncode == 1 and b"no such image" in p.stderr
    p = layerfs_cmd("push", "busybox:test", f"{registry.host}/cli/bb:1", root=root)
    assert p.returncode == 0 and b"digest: sha256:" in p.stdout
