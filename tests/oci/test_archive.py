"""save/load: OCI layout tarballs and dirs, docker-archives; umoci and
skopeo read what layerfs writes; hostile archives are refused."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile

import pytest

from layerfs import oci
from layerfs.errors import Corrupt, InvalidInput, LayerfsError, NotFound
from layerfs.oci import media
from layerfs.store import transfer
from layerfs.store.store import Store
from tests.conftest import layerfs_cmd
from tests.oci.conftest import add_layer
from tests.oci.helpers import tree_signature


def _sig_of(store, image, dest):
    transfer.export_image(store, image, dest)
    return tree_signature(dest)


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_save_load_round_trip(bb_store, busybox, tmp_path, fmt):
    app = add_layer(bb_store, busybox, {"srv/app.txt": b"hello\n"}, tmp_path, "app:2")
    out = str(tmp_path / f"images-{fmt}.tar")
    oci.save(bb_store, ["busybox:test", "app:2"], out, fmt=fmt)
    with Store(str(tmp_path / "loaded")) as s:
        loaded = oci.load(s, out)
        assert {(x.image.id, tuple(x.names)) for x in loaded} == {
            (busybox.id, ("busybox:test",)), (app.id, ("app:2",))}
        assert _sig_of(s, s.image("app:2"), str(tmp_path / "b")) == _sig_of(bb_store, app, str(tmp_path / "a"))
    # deterministic: saving again gives the same bytes
    out2 = str(tmp_path / f"again-{fmt}.tar")
    oci.save(bb_store, ["busybox:test", "app:2"], out2, fmt=fmt)
    assert hashlib.sha256(open(out, "rb").read()).digest() == hashlib.sha256(open(out2, "rb").read()).digest()


@pytest.mark.tools("skopeo")
def test_load_layout_directory_and_skopeo_inspects(bb_store, busybox, tmp_path):
    oci.save(bb_store, ["busybox:test"], str(tmp_path / "bb.tar"))
    p = subprocess.run(["skopeo", "inspect", f"oci-archive:{tmp_path / 'bb.tar'}:test"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    oci.save(bb_store, ["busybox:test"], str(tmp_path / "bb-docker.tar"), fmt="docker")
    p = subprocess.run(["skopeo", "inspect", f"docker-archive:{tmp_path / 'bb-docker.tar'}"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["Layers"]) == 1
    # skopeo writes a layout dir; layerfs loads it
    d = tmp_path / "layout"
    p = subprocess.run(["skopeo", "copy", f"oci-archive:{tmp_path / 'bb.tar'}:test", f"oci:{d}:test"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with Store(str(tmp_path / "s")) as s:
        (x,) = oci.load(s, str(d))
        assert x.image.id == busybox.id


@pytest.mark.root
@pytest.mark.tools("umoci")
def test_umoci_unpacks_what_layerfs_saved(bb_store, busybox, tmp_path):
    app = add_layer(bb_store, busybox, {"srv/app.txt": b"hello\n"}, tmp_path, "app:3")
    # a whiteout in the top layer, to check it is applied
    d = tmp_path / "wh"
    (d / "bin").mkdir(parents=True)
    os.mknod(d / "bin" / "vi", 0o20000 | 0o600, os.makedev(0, 0))
    lid = transfer.import_layer(bb_store, str(d), as_layer=True)
    from layerfs.store import images as img

    entry = img.history_entry("RUN rm /bin/vi", created="2024-01-03T00:00:00Z")
    top = bb_store.put_image(img.with_layer(app.config, lid, entry))
    bb_store.tag(top.id, "app:top")
    oci.save(bb_store, ["app:top"], str(tmp_path / "app.tar"))
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(tmp_path / "app.tar") as tf:
        tf.extractall(layout)
    bundle = tmp_path / "bundle"
    p = subprocess.run(["umoci", "unpack", "--image", f"{layout}:top", str(bundle)], capture_output=True, text=True)
    assert p.returncode == 0, (p.stderr, os.listdir(layout), tarfile.open(tmp_path / "app.tar").getnames()[-3:])
    got = tree_signature(str(bundle / "rootfs"))
    want = _sig_of(bb_store, top, str(tmp_path / "export"))
    assert "bin/vi" not in got and "srv/app.txt" in got
    assert got == want


def test_cli_save_load(bb_store, busybox, tmp_path):
    root = bb_store.root
    out = str(tmp_path / "cli.tar")
    p = layerfs_cmd("save", "busybox:test", "-o", out, root=root)
    assert p.returncode == 0, p.stderr
    p = layerfs_cmd("load", "-i", out, root=str(tmp_path / "other"))
    assert p.returncode == 0 and p.stdout == b"Loaded image: busybox:test\n", p.stderr
    p = layerfs_cmd("save", "nosuch", "-o", out, root=root)
    assert p.returncode == 1 and p.stderr.count(b"\n") == 1
    p = layerfs_cmd("load", "-i", str(tmp_path / "missing.tar"), root=root)
    assert p.returncode == 1 and p.stderr.startswith(b"Error: ")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    p = layerfs_cmd("load", "-i", str(tmp_path / "junk.tar"), root=root)
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1, p.stderr


# -- bad input -------------------------------------------------------------------

def _layout(path, layers: list[bytes], name: str = "evil:1", diff_ids=None, config_extra=None,
            drop_blob: int | None = None):
    """An OCI layout dir with the given (already compressed or not) layer blobs."""
    os.makedirs(path / "blobs" / "sha256")

    def put(data: bytes) -> str:
        d = media.sha256_digest(data)
        (path / "blobs" / "sha256" / d[7:]).write_bytes(data)
        return d

    descs = []
    for i, blob in enumerate(layers):
        d = put(blob)
        if drop_blob == i:
            os.unlink(path / "blobs" / "sha256" / d[7:])
        mt = media.OCI_LAYER_GZIP if blob[:2] == b"\x1f\x8b" else media.OCI_LAYER
        descs.append({"mediaType": mt, "digest": d, "size": len(blob)})
    if diff_ids is None:
        diff_ids = [media.sha256_digest(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b) for b in layers]
    cfg = {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
           **(config_extra or {})}
    craw = json.dumps(cfg).encode()
    manifest = {"schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
                "config": {"mediaType": media.OCI_CONFIG, "digest": put(craw), "size": len(craw)}, "layers": descs}
    mraw = json.dumps(manifest).encode()
    index = {"schemaVersion": 2, "manifests": [{"mediaType": media.OCI_MANIFEST, "digest": put(mraw), "size": len(mraw),
                                                "annotations": {media.ANNOTATION_CONTAINERD_NAME: name}}]}
    (path / "index.json").write_text(json.dumps(index))
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return path


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            ti.size = len(data) if ti.isreg() else 0
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def _ti(name, type=tarfile.REGTYPE, linkname="", mode=0o644, **kw):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = type, linkname, mode
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _no_images(store) -> bool:
    return store.images() == []


def test_dotdot_member_rejected_nothing_written_outside(bb_store, tmp_path):
    layer = _tar([(_ti("../../escaped"), b"pwned")])
    path = _layout(tmp_path / "l", [gzip.compress(layer, mtime=0)])
    with pytest.raises(InvalidInput, match="escapes"):
        oci.load(bb_store, str(path))
    assert _no_images(bb_store)
    assert not any(p.name == "escaped" for p in tmp_path.rglob("escaped"))


def test_hardlink_outside_rejected(bb_store, tmp_path):
    layer = _tar([(_ti("etc/passwd", tarfile.LNKTYPE, linkname="/etc/shadow"), b"")])
    with pytest.raises(InvalidInput, match="hardlink"):
        oci.load(bb_store, str(_layout(tmp_path / "l", [layer])))
    assert _no_images(bb_store)


def test_absolute_paths_symlinks_out_and_devices_stored_safely(bb_store, tmp_path):
    layer = _tar([
        (_ti("/abs/file"), b"data"),
        (_ti("out", tarfile.SYMTYPE, linkname="/etc/shadow"), b""),
        (_ti("up", tarfile.SYMTYPE, linkname="../../../../etc"), b""),
        (_ti("up/injected"), b"through the symlink?"),
        (_ti("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), b""),
    ])
    before = set(os.listdir("/etc"))
    try:
        (x,) = oci.load(bb_store, str(_layout(tmp_path / "l", [layer])))
    except InvalidInput:
        assert _no_images(bb_store)   # refusing is fine too
        return
    entries = {e.path: e for e in bb_store.layer_entries(x.image.layers[0])}
    assert entries["abs/file"].kind == "file"
    assert entries["out"].target == "/etc/shadow"
    assert entries["dev/mem"].kind == "char"
    assert set(os.listdir("/etc")) == before and not os.path.exists("/etc/injected")


def test_truncated_archive(bb_store, busybox, tmp_path):
    out = tmp_path / "bb.tar"
    oci.save(bb_store, ["busybox:test"], str(out))
    data = out.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(LayerfsError):
            oci.load(s, str(cut))
        assert _no_images(s)


def test_corrupt_layer_blob_digest_mismatch(tmp_path):
    layer = gzip.compress(_tar([(_ti("a"), b"hello")]), mtime=0)
    path = _layout(tmp_path / "l", [layer])
    blob = path / "blobs" / "sha256" / media.sha256_digest(layer)[7:]
    blob.write_bytes(layer[:-8] + bytes(8))   # same size, wrong bytes
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(LayerfsError, match="digest|corrupt|CRC|incorrect"):
            oci.load(s, str(path))
        assert _no_images(s) and s.db.all("SELECT id FROM layers") == []


def test_wrong_diff_id_rejected(tmp_path):
    layer = gzip.compress(_tar([(_ti("a"), b"hello")]), mtime=0)
    path = _layout(tmp_path / "l", [layer], diff_ids=["sha256:" + "00" * 32])
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(Corrupt, match="diff_id|does not match"):
            oci.load(s, str(path))
        assert _no_images(s)


def test_missing_blob_in_layout(tmp_path):
    layer = _tar([(_ti("a"), b"hello")])
    path = _layout(tmp_path / "l", [layer, _tar([(_ti("b"), b"x")])], drop_blob=1)
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(NotFound, match="missing"):
            oci.load(s, str(path))
        assert _no_images(s)


def test_diff_id_count_mismatch_and_bad_json(tmp_path):
    layer = _tar([(_ti("a"), b"hello")])
    path = _layout(tmp_path / "l", [layer], diff_ids=[])
    with Store(str(tmp_path / "s")) as s:
        with pytest.raises(InvalidInput, match="diff_ids"):
            oci.load(s, str(path))
        (path / "index.json").write_text("{nope")
        with pytest.raises(InvalidInput, match="JSON"):
            oci.load(s, str(path))
        assert _no_images(s)


def test_load_rejects_bad_name_without_tagging(tmp_path):
    path = _layout(tmp_path / "l", [_tar([(_ti("a"), b"hello")])], name="Bad Name!")
    with Store(str(tmp_path / "s")) as s:
        (x,) = oci.load(s, str(path))      # the annotation is unusable: loaded untagged
        assert x.names == [] and s.tags_of(x.image.id) == []


def test_archive_members_read_at_once_from_several_threads(tmp_path):
    """load copies blobs in parallel: every member stream of one archive
    must read its own bytes however reads of the others interleave (they
    shared the tar's file position, and big layers came out corrupt)."""
    import random
    import threading

    from layerfs.oci.bundle import open_bundle

    rng = random.Random(7)
    blobs = {f"blobs/sha256/{i:02d}": rng.randbytes((3 << 20) + i * 4099) for i in range(4)}
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in blobs.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    bundle = open_bundle(str(path))
    got: dict[str, bytes] = {}
    streams = {name: bundle.open(name) for name in blobs}
    barrier = threading.Barrier(len(streams))

    def read(name: str) -> None:
        barrier.wait()
        parts = []
        while chunk := streams[name].read(rng.choice([4096, 65536, 100_003])):
            parts.append(chunk)
        got[name] = b"".join(parts)

    threads = [threading.Thread(target=read, args=(n,)) for n in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bundle.close()
    assert {n: hashlib.sha256(d).hexdigest() for n, d in got.items()} == \
        {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}
