"""The fast paths of push and pull keep their contracts: the tar writer is
byte-identical to tarfile's, the pipelined tar reader still rejects what
the plain one rejected, a blob generated while it uploads is checked, and
a 404 HEAD does not cost a retry backoff."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import time

import pytest

from layerfs import oci
from layerfs.errors import InvalidInput, LayerfsError
from layerfs.oci.cache import layer_key
from layerfs.oci.registry import Client
from layerfs.store import manifest as mf
from layerfs.store import tarlayer, transfer
from layerfs.store.manifest import Entry
from layerfs.store.refs import Ref
from layerfs.store.store import Store
from tests.oci.helpers import tree_signature


def _reference_write_tar(entries, out, open_object, layer=True):
    """The writer as it was: tarfile stream mode + addfile."""
    tf = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
    try:
        for e in tarlayer.with_link_metadata(sorted(entries, key=lambda x: mf.sort_key(x.path))):
            for ti in tarlayer.tarinfo_for(e, layer):
                if ti.type == tarfile.REGTYPE and ti.size:
                    with open_object(e.digest) as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
    finally:
        tf.close()


def _odd_entries(store: Store) -> list[Entry]:
    big = os.urandom(300_000) + bytes(200_000)
    blobs = {"small": b"x" * 10, "text": b"hello world\n" * 5000, "big": big, "empty": b""}
    digests = {k: store.objects.put_bytes(v).digest for k, v in blobs.items()}
    long = "d/" + "n" * 150 + "/" + "f" * 120
    return [
        Entry("", mf.DIR, 0o755),
        Entry("d", mf.DIR, 0o750, uid=1000, gid=1000, mtime_ns=1_700_000_000_123_456_789, opaque=True),
        Entry("d/small", mf.FILE, 0o644, size=10, digest=digests["small"], mtime_ns=5),
        Entry("d/text", mf.FILE, 0o600, size=60000, digest=digests["text"],
              xattrs=(("user.k", b"v\xff"),)),
        Entry("d/big", mf.FILE, 0o755, size=len(big), digest=digests["big"]),
        Entry("d/empty", mf.FILE, 0o644, size=0, digest=digests["empty"]),
        Entry("d/zz-hl", mf.HARDLINK, target="d/small"),
        Entry("d/sym", mf.SYMLINK, 0o777, target="../" * 40 + "x"),
        Entry("d/dev", mf.CHAR, 0o600, rdev=os.makedev(1, 3)),
        Entry("d/fifo", mf.FIFO, 0o644),
        Entry("gone", mf.WHITEOUT),
        Entry(long, mf.FILE, 0o644, size=10, digest=digests["small"]),
        Entry("d/" + "n" * 150, mf.DIR, 0o755),
        Entry("\udcff-name", mf.FILE, 0o644, size=10, digest=digests["small"]),
    ]


@pytest.mark.parametrize("layer", [True, False])
def test_write_tar_is_byte_identical_to_tarfile(bb_store, busybox, layer):
    for entries in (_odd_entries(bb_store), bb_store.layer_entries(busybox.layers[0])):
        a, b = io.BytesIO(), io.BytesIO()
        _reference_write_tar(entries, a, bb_store.objects.open, layer)
        tarlayer.write_tar(entries, b, bb_store.objects.open, layer)
        assert a.getvalue() == b.getvalue()


def test_write_tar_missing_object_data_fails(bb_store):
    d = bb_store.objects.put_bytes(b"short").digest
    with pytest.raises(OSError, match="unexpected end of data"):
        tarlayer.write_tar([Entry("f", mf.FILE, size=99, digest=d)], io.BytesIO(), bb_store.objects.open)


def _tar_bytes(entries, store) -> bytes:
    out = io.BytesIO()
    tarlayer.write_tar(entries, out, store.objects.open)
    return out.getvalue()


def test_reader_round_trips_and_rejects_cuts(bb_store):
    entries = _odd_entries(bb_store)
    data = _tar_bytes(entries, bb_store)
    reader = tarlayer.TarReader(bb_store.objects, lambda d: False)
    got = {e.path: e for e in reader.read(io.BytesIO(data))}
    want = {e.path: e for e in entries}
    assert got["d/text"].digest == want["d/text"].digest and got["d/text"].xattrs == want["d/text"].xattrs
    assert got["d/big"].digest == want["d/big"].digest
    assert got["d"].opaque and got["gone"].kind == mf.WHITEOUT
    assert got["d/zz-hl"].kind == mf.HARDLINK and got["d/zz-hl"].target == "d/small"
    # the end marker is two zero blocks: cut after the first, in data, in a header
    end = len(data.rstrip(b"\0"))
    first_zero = end + (-end % 512)
    for cut in (first_zero + 512, end - 100, 700, 512 + 100):
        with pytest.raises(InvalidInput, match="truncated|malformed|not a readable"):
            tarlayer.TarReader(bb_store.objects, lambda d: False).read(io.BytesIO(data[:cut]))
    with pytest.raises(InvalidInput):
        tarlayer.TarReader(bb_store.objects, lambda d: False).read(io.BytesIO(b""))


def test_reader_many_files_beyond_store_window(bb_store, monkeypatch):
    monkeypatch.setattr(tarlayer, "STORE_WINDOW", 4096)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(300):
            body = (b"%d " % i) * (i * 7)
            ti = tarfile.TarInfo(f"f/{i}")
            ti.size = len(body)
            tf.addfile(ti, io.BytesIO(body))
    entries = tarlayer.TarReader(bb_store.objects, lambda d: False).read(io.BytesIO(out.getvalue()))
    files = {e.path: e for e in entries if e.kind == mf.FILE}
    assert len(files) == 300
    for i in (0, 1, 150, 299):
        assert bb_store.objects.read(files[f"f/{i}"].digest) == (b"%d " % i) * (i * 7)


def test_reader_error_in_worker_surfaces(bb_store):
    class Boom(Exception):
        pass

    def known(d):
        raise Boom()

    data = _tar_bytes(_odd_entries(bb_store), bb_store)
    with pytest.raises(Boom):
        tarlayer.TarReader(bb_store.objects, known).read(io.BytesIO(data))


def test_head_404_does_not_cost_a_retry(registry):
    c = Client(registry.host, retries=3, backoff=3.0)
    t = time.perf_counter()
    assert not c.blob_exists("nothing/here", "sha256:" + "0" * 64)
    c.ping()
    assert not c.blob_exists("nothing/here", "sha256:" + "1" * 64)
    c.ping()
    assert time.perf_counter() - t < 2.5


def test_push_of_cached_digest_streams_and_pulls_back(bb_store, busybox, registry, tmp_path):
    # Saving fills the digest cache; the push then generates while uploading.
    oci.save(bb_store, ["busybox:test"], str(tmp_path / "l.tar"))
    r = oci.push(bb_store, "busybox:test", f"{registry.host}/stream/bb:1")
    assert r.blobs_sent == 1 and r.bytes_sent > 0
    assert not [p for p in os.listdir(bb_store.tmp_dir) if p.startswith("oci-")]   # spools removed
    with Store(str(tmp_path / "other")) as other:
        got = oci.pull(other, f"{registry.host}/stream/bb:1")
        assert got.image.id == busybox.id
        transfer.export_image(bb_store, busybox, str(tmp_path / "a"))
        transfer.export_image(other, got.image, str(tmp_path / "b"))
        assert tree_signature(str(tmp_path / "a")) == tree_signature(str(tmp_path / "b"))


def test_push_with_stale_cached_digest_fails_cleanly(bb_store, busybox, registry):
    oci.push(bb_store, "busybox:test", f"{registry.host}/stale/a:1")
    lid = busybox.layers[0]
    ref = bb_store.get_ref("oci-layer", layer_key(lid, "gzip"))
    d = json.loads(ref.data)
    d["digest"] = "sha256:" + "e" * 64     # as if an older compressor had made it
    bb_store.add_ref(dataclasses.replace(ref, data=json.dumps(d)))
    t = time.perf_counter()
    with pytest.raises(LayerfsError, match="regenerated as"):
        oci.push(bb_store, "busybox:test", f"{registry.host}/stale/b:1")
    assert time.perf_counter() - t < 20
    c = Client(registry.host)
    assert not c.blob_exists("stale/b", d["digest"])
    with pytest.raises(LayerfsError):
        c.get_manifest("stale/b", "1")
    assert not [p for p in os.listdir(bb_store.tmp_dir) if p.startswith("oci-")]


def test_digests_cached_by_an_older_tar_writer_are_not_reused(bb_store, busybox, registry):
    """A store that pushed before the tar writer changed (hardlink headers)
    holds digests of the old bytes under the old key: a push must generate
    the layer anew, not promise a blob it can no longer make."""
    lid = busybox.layers[0]
    bb_store.add_ref(Ref("oci-layer", f"{lid}/gzip", layer_id=lid, weak=True, data=json.dumps(
        {"digest": "sha256:" + "e" * 64, "size": 123, "diff_id": "sha256:" + "d" * 64,
         "media_type": "application/vnd.oci.image.layer.v1.tar+gzip"})))
    r = oci.push(bb_store, "busybox:test", f"{registry.host}/oldwriter/a:1")
    assert r.blobs_sent == 1
    assert Client(registry.host).blob_exists("oldwriter/a", json.loads(
        bb_store.get_ref("oci-layer", layer_key(lid, "gzip")).data)["digest"])


@pytest.mark.parametrize("after", [1, 10_000])
def test_pull_dedups_against_store_objects(bb_store, busybox, registry, tmp_path, monkeypatch, after):
    from layerfs.oci import convert

    monkeypatch.setattr(convert, "SNAPSHOT_AFTER", after)   # snapshot at once / never
    oci.push(bb_store, "busybox:test", f"{registry.host}/dedup/bb:{after}")
    with Store(str(tmp_path / f"other{after}")) as other:
        transfer.import_layer(other, str(tmp_path / "busybox-rootfs"))   # same contents, no OCI history
        before = sorted(p for _, p in other.objects.iter_on_disk())
        got = oci.pull(other, f"{registry.host}/dedup/bb:{after}")
        assert got.image.id == busybox.id
        assert sorted(p for _, p in other.objects.iter_on_disk()) == before
