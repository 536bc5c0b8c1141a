"""``load`` of hostile or damaged archives (issue 10, items 4, 7 and 8):
bombs stop at the unpack limits, names past the kernel's limits are
refused, a layer reused without reading its blob is reported, ``load
--verify`` reads every blob, and a docker-archive whose config file is
named for another digest loads with a warning. Inputs are generated here."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import zlib

import pytest

from layerfs.errors import InvalidInput
from layerfs.oci import convert, media
from layerfs.store.store import Store
from tests.conftest import assert_fsck_clean, layerfs_cmd, one_line_error
from tests.oci.test_archive import _layout, _tar, _ti


def _images(root: str) -> list[str]:
    return layerfs_cmd("images", "-q", root=root, check=True).stdout.decode().split()


def test_gzip_bomb_layer_stops_at_the_ratio_limit(tmp_path, monkeypatch):
    """A layer blob of a few hundred KiB that inflates to 256 MiB of zeros."""
    size = 256 << 20
    ti = tarfile.TarInfo("zeros")
    ti.size = size
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    diff = hashlib.sha256()
    parts = []
    for piece in [ti.tobuf(tarfile.PAX_FORMAT)] + [bytes(1 << 20)] * (size >> 20) + [bytes(1024)]:
        diff.update(piece)
        parts.append(c.compress(piece))
    blob = b"".join(parts) + c.flush()
    path = _layout(tmp_path / "l", [blob], name="bomb:1", diff_ids=["sha256:" + diff.hexdigest()])
    root = str(tmp_path / "store")
    monkeypatch.setenv("LAYERFS_MAX_RATIO", "50")
    monkeypatch.setenv("LAYERFS_RATIO_FROM", "4M")
    one_line_error(layerfs_cmd("load", "-q", "-i", str(path), root=root), 2, "more than 50:1", "LAYERFS_MAX_RATIO")
    assert _images(root) == []
    assert_fsck_clean(root)


@pytest.mark.parametrize("name,words", [("n" * 256, "NAME_MAX"), ("/".join(["p" * 250] * 17), "PATH_MAX")])
def test_names_past_the_kernel_limits_refused(tmp_path, name, words):
    path = _layout(tmp_path / "l", [gzip.compress(_tar([(_ti(name), b"x")]), mtime=0)])
    root = str(tmp_path / "store")
    one_line_error(layerfs_cmd("load", "-q", "-i", str(path), root=root), 2, words)
    assert _images(root) == []
    assert_fsck_clean(root)


def test_pulled_layer_blob_with_a_long_name_refused(tmp_path):
    """Pull stores blobs through the same reader (convert.import_layer_blob)."""
    blob = gzip.compress(_tar([(_ti("n" * 300), b"x")]), mtime=0)
    plain = gzip.decompress(blob)
    desc = media.Descriptor(media.OCI_LAYER_GZIP, media.sha256_digest(blob), len(blob))
    with Store(str(tmp_path / "s")) as s:
        with s.writing(), pytest.raises(InvalidInput, match="NAME_MAX"):
            convert.import_layer_blob(s, io.BytesIO(blob), desc, media.sha256_digest(plain), threading.RLock())
        assert s.db.all("SELECT id FROM layers") == []


def _blob_path(layout, blob: bytes):
    return layout / "blobs" / "sha256" / media.sha256_digest(blob)[7:]


def _says_reused(p, short: str) -> None:
    (line,) = [x for x in p.stderr.decode().splitlines() if x.startswith("Reusing verified local layers")]
    assert short in line and "not read" in line and "--verify" in line, line


def test_reused_layer_is_reported_and_verify_reads_every_blob(tmp_path):
    layer = _tar([(_ti("etc/motd"), b"hello\n")])
    blob = gzip.compress(layer, mtime=0)
    short = media.sha256_digest(blob)[7:19]
    layout = _layout(tmp_path / "l", [blob], name="app:1")
    root = str(tmp_path / "store")
    first = layerfs_cmd("load", "-i", str(layout), root=root, check=True)
    assert b"Reusing" not in first.stderr
    assert b"Reusing" not in layerfs_cmd("load", "--verify", "-i", str(layout), root=root, check=True).stderr

    # Another blob in its place (same size, same tar inside, another gzip
    # mtime): the store's layer is reused, and says so.
    forged = gzip.compress(layer, mtime=1)
    assert len(forged) == len(blob) and forged != blob
    _blob_path(layout, blob).write_bytes(forged)
    p = layerfs_cmd("load", "-i", str(layout), root=root, check=True)
    assert p.stdout == b"Loaded image: app:1\n"
    _says_reused(p, short)
    one_line_error(layerfs_cmd("load", "-q", "--verify", "-i", str(layout), root=root), 3, "does not match")
    assert_fsck_clean(root)

    # Missing blob: the same.
    _blob_path(layout, blob).unlink()
    p = layerfs_cmd("load", "-i", str(layout), root=root, check=True)
    _says_reused(p, short)
    one_line_error(layerfs_cmd("load", "-q", "--verify", "-i", str(layout), root=root), 1, "cannot provide blob")
    assert len(_images(root)) == 1
    assert_fsck_clean(root)

    # A blob the store never saw (uncompressed this time), missing, whose
    # diff_id names a layer the store holds: reused by diff_id, reported.
    other = _layout(tmp_path / "raw", [layer], name="app:2", drop_blob=0)
    p = layerfs_cmd("load", "-i", str(other), root=root, check=True)
    _says_reused(p, media.sha256_digest(layer)[7:19])
    one_line_error(layerfs_cmd("load", "-q", "--verify", "-i", str(other), root=root), 1, "cannot provide blob")
    assert_fsck_clean(root)


def _docker_archive(path, config_name: str | None) -> None:
    layer = _tar([(_ti("etc/motd"), b"hi\n")])
    diff = media.sha256_digest(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
    name = config_name or media.sha256_digest(config)[7:] + ".json"
    files = {name: config, diff[7:] + ".tar": layer,
             "manifest.json": json.dumps([{"Config": name, "RepoTags": ["da:1"],
                                           "Layers": [diff[7:] + ".tar"]}]).encode()}
    with tarfile.open(path, "w") as t:
        for n, data in files.items():
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


def test_docker_archive_config_named_for_another_digest_warns(tmp_path):
    good = tmp_path / "good.tar"
    _docker_archive(good, None)
    p = layerfs_cmd("load", "-i", str(good), root=str(tmp_path / "a"), check=True)
    assert p.stdout == b"Loaded image: da:1\n" and b"Warning" not in p.stderr
    bad = tmp_path / "bad.tar"
    _docker_archive(bad, "ab" * 32 + ".json")
    root = str(tmp_path / "b")
    p = layerfs_cmd("load", "-i", str(bad), root=root, check=True)
    assert p.stdout == b"Loaded image: da:1\n"
    (line,) = [x for x in p.stderr.decode().splitlines() if x.startswith("Warning: ")]
    assert "sha256:abababababab" in line and "altered or mislabelled" in line, line
    assert_fsck_clean(root)


def test_compressed_archive_is_unpacked_within_the_limits(bb_store, busybox, tmp_path, monkeypatch):
    from layerfs import oci

    out = tmp_path / "bb.tar"
    oci.save(bb_store, ["busybox:test"], str(out))
    gz = tmp_path / "bb.tar.gz"
    gz.write_bytes(gzip.compress(out.read_bytes(), mtime=0))
    root = str(tmp_path / "store")
    p = layerfs_cmd("load", "-i", str(gz), root=root, check=True)
    assert p.stdout == b"Loaded image: busybox:test\n"
    # The whole archive a bomb: a layout file and 256 MiB of zeros, gzipped.
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = []
    for name, size in (("oci-layout", 30), ("junk", 256 << 20)):
        ti = tarfile.TarInfo(name)
        ti.size = size
        parts.append(c.compress(ti.tobuf(tarfile.PAX_FORMAT)))
        for _ in range(size >> 20):
            parts.append(c.compress(bytes(1 << 20)))
        parts.append(c.compress(bytes(size % (1 << 20) + (-size % 512))))
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(b"".join(parts) + c.compress(bytes(1024)) + c.flush())
    monkeypatch.setenv("LAYERFS_MAX_RATIO", "50")
    monkeypatch.setenv("LAYERFS_RATIO_FROM", "4M")
    one_line_error(layerfs_cmd("load", "-q", "-i", str(bomb), root=root), 2, "LAYERFS_MAX_RATIO")
    assert len(_images(root)) == 1
    assert_fsck_clean(root)
