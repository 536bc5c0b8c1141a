"""Chunk-sum tables of big objects (store/chunksums.py, ObjectStore): every
way a big object is stored writes one; a table is refused whole when it is
damaged, another object's or another key's; fsck --repair writes the
missing ones from the pass that checks the object; gc removes them with
their objects."""

from __future__ import annotations

import io
import os
import random

import blake3
import pytest

from layerfs.store import chunksums, gc, transfer
from layerfs.store import fsck as fsck_mod
from layerfs.store import images as img
from layerfs.store.chunksums import SUM_CHUNK
from layerfs.store.objects import ObjectStore
from layerfs.store.store import Store

SIZES = [SUM_CHUNK + 1, 2 * SUM_CHUNK, 3 * SUM_CHUNK + 12345]


def _expected(key: bytes, data: bytes, nonce: bytes) -> chunksums.Table:
    return chunksums.Table(nonce, tuple(chunksums.chunk_sum(key, nonce, i // SUM_CHUNK, data[i:i + SUM_CHUNK])
                                        for i in range(0, len(data), SUM_CHUNK)))


def _sound(objects: ObjectStore, digest: str, data: bytes) -> bool:
    """The object's table is sound and holds the sums of *data*."""
    table = objects.chunk_sums(digest, len(data))
    return table is not None and table == _expected(objects.sums_key(), data, table.nonce)


@pytest.fixture
def objects(tmp_path) -> ObjectStore:
    return ObjectStore(str(tmp_path / "objects"), str(tmp_path))


@pytest.mark.parametrize("size", SIZES)
def test_every_way_of_storing_a_big_object_writes_its_table(objects, tmp_path, size):
    data = random.Random(size).randbytes(size)
    digest = blake3.blake3(data).hexdigest()
    src = tmp_path / "src"
    src.write_bytes(data)
    ways = [lambda: objects.put_bytes(data), lambda: objects.put_file(str(src)),
            lambda: objects._put_stream(_Trickle(data), None)]
    for store_it in ways:
        objects.remove(digest)
        assert store_it().digest == digest
        assert _sound(objects, digest, data)


class _Trickle(io.RawIOBase):
    """A stream that returns odd-sized pieces (a network body, a tar member)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.rng = data, 0, random.Random(7)

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else len(self.data), self.rng.randint(1, 300_000))
        piece = self.data[self.pos:self.pos + n]
        self.pos += len(piece)
        return piece


def test_small_objects_get_no_table(objects):
    obj = objects.put_bytes(os.urandom(SUM_CHUNK))
    assert not os.path.exists(objects.sums_path(obj.digest))


def test_a_table_is_refused_whole_when_it_is_not_this_objects(objects, tmp_path):
    data, other = os.urandom(2 * SUM_CHUNK + 5), os.urandom(2 * SUM_CHUNK + 5)
    digest, other_digest = objects.put_bytes(data).digest, objects.put_bytes(other).digest
    path = objects.sums_path(digest)
    sound = open(path, "rb").read()
    key = objects.sums_key()
    nonce = chunksums.unpack(key, digest, len(data), sound).nonce
    damaged = bytearray(sound)
    damaged[40] ^= 1  # one bit of one sum
    refused = [
        bytes(damaged),
        sound[:-1],                                               # cut short
        open(objects.sums_path(other_digest), "rb").read(),       # another object's table
        chunksums.pack(os.urandom(32), digest, len(data), _expected(key, data, nonce)),  # another key's
        chunksums.pack(key, digest, len(data) + 1, _expected(key, data, nonce)),          # another size
        first_format_table(key, digest, data),                                                 # keyed blake3 sums
    ]
    for table in refused:
        assert chunksums.unpack(key, digest, len(data), table) is None
        with open(path, "wb") as f:
            f.write(table)
        assert objects.chunk_sums(digest, len(data)) is None


def first_format_table(key: bytes, digest: str, data: bytes) -> bytes:
    """A table as layerfs wrote them before GMAC: keyed blake3 sums, no nonce."""
    sums = b"".join(blake3.blake3(data[i:i + SUM_CHUNK], key=key).digest(16) for i in range(0, len(data), SUM_CHUNK))
    body = b"LFSUMS1\n" + len(data).to_bytes(8, "little") + bytes.fromhex(digest) + sums
    return body + blake3.blake3(body, key=key).digest()


def test_each_table_has_its_own_nonce_and_a_chunk_sum_depends_on_it_and_the_index(objects):
    """GMAC must never tag two messages under one (key, nonce): a nonce
    per table, and the chunk's index in each chunk's."""
    data = os.urandom(SUM_CHUNK)
    digest = objects.put_bytes(data + data).digest  # two equal chunks
    first = objects.chunk_sums(digest, 2 * len(data))
    assert objects.verify(digest) and first.sums[0] != first.sums[1]
    os.unlink(objects.sums_path(digest))
    assert objects.verify(digest, write_table=True)
    again = objects.chunk_sums(digest, 2 * len(data))
    assert again.nonce != first.nonce and again.sums[0] != first.sums[0]
    key = objects.sums_key()
    assert chunksums.chunk_sum(key, first.nonce, 0, data) == first.sums[0]
    assert chunksums.chunk_sum(os.urandom(32), first.nonce, 0, data) != first.sums[0]


def test_the_key_is_private_and_kept(objects):
    tmp_before = sorted(os.listdir(objects.tmp_dir))
    key = objects.sums_key()
    path = os.path.join(objects.root, chunksums.KEY_NAME)
    assert len(key) == 32 and os.stat(path).st_mode & 0o777 == 0o600
    assert ObjectStore(objects.root, objects.tmp_dir).sums_key() == key
    assert os.listdir(objects.root) == [chunksums.KEY_NAME]  # its temp file made in tmp/ and gone
    assert sorted(os.listdir(objects.tmp_dir)) == tmp_before


def test_a_lost_key_makes_new_tables(objects):
    data = os.urandom(2 * SUM_CHUNK)
    digest = objects.put_bytes(data).digest
    os.unlink(os.path.join(objects.root, chunksums.KEY_NAME))
    fresh = ObjectStore(objects.root, objects.tmp_dir)
    assert fresh.chunk_sums(digest, len(data)) is None  # the old table, under the lost key
    assert fresh.verify(digest, write_table=True)
    assert _sound(fresh, digest, data)


def test_a_damaged_key_file_is_one_error(objects):
    with open(os.path.join(objects.root, chunksums.KEY_NAME), "wb") as f:
        f.write(b"short")
    with pytest.raises(chunksums.LayerfsError, match="sums.key is damaged"):
        objects.sums_key()


def _big_image(root: str, tmp_path) -> tuple[str, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * SUM_CHUNK + 7)
    (src / "big").write_bytes(data)
    with Store(root) as store:
        lid = transfer.import_layer(store, str(src))
        store.tag(store.put_image(img.new_config([lid])).id, "big:1")
    return blake3.blake3(data).hexdigest(), data


@pytest.mark.damages_store
def test_fsck_repair_writes_missing_tables_and_check_alone_writes_nothing(tmp_path):
    root = str(tmp_path / "store")
    digest, data = _big_image(root, tmp_path)
    with Store(root) as store:
        table = store.objects.sums_path(digest)
        os.unlink(table)
        assert fsck_mod.check(store).clean and not os.path.exists(table)
        assert fsck_mod.check(store, repair=True).clean
        assert _sound(store.objects, digest, data)
        with open(store.objects.raw_path(digest), "r+b") as f:  # damaged: no table is made for it
            f.write(b"\0" * 8)
        os.unlink(table)
        report = fsck_mod.check(store, repair=True)
        assert report.problems[0].kind == "object" and not os.path.exists(table)


def test_gc_removes_tables_with_their_objects_and_orphans(tmp_path):
    root = str(tmp_path / "store")
    digest, _ = _big_image(root, tmp_path)
    with Store(root) as store:
        orphan = store.objects.sums_path("ab" * 32)
        os.makedirs(os.path.dirname(orphan), exist_ok=True)
        with open(orphan, "wb") as f:
            f.write(b"debris")
        table = store.objects.sums_path(digest)
        assert os.path.exists(table)
        gc.collect(store)
        assert os.path.exists(table) and not os.path.exists(orphan)
        store.remove_image("big:1")
        gc.collect(store)
        assert not os.path.exists(table)


def test_threads_and_processes_making_the_key_at_once_agree(tmp_path):
    """The first big objects of a pull are written by several threads at
    once, and two commands may start on a new store together: one key."""
    import subprocess
    import sys
    import threading

    root = str(tmp_path / "objects")
    stores = [ObjectStore(root, str(tmp_path)) for _ in range(2)]
    keys: list[bytes | Exception] = []

    def make(s: ObjectStore) -> None:
        try:
            keys.append(s.sums_key())
        except Exception as exc:
            keys.append(exc)

    threads = [threading.Thread(target=make, args=(s,)) for s in stores for _ in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; from layerfs.store.objects import ObjectStore; "
                               f"sys.stdout.write(ObjectStore({root!r}, {str(tmp_path)!r}).sums_key().hex())"],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = {bytes.fromhex(p.communicate()[0]) for p in procs}
    assert len(keys) == 8 and len(set(keys) | outs) == 1, keys
    assert sorted(os.listdir(root)) == [chunksums.KEY_NAME]  # no debris
