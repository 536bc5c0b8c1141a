"""Read-ahead across files (fs/readahead.py) and the hand-over of its
content (files.py): driven in-process over the union core (content taken
at open), then through a FUSE mount (content put in the kernel's page
cache by read-ahead threads).

What must hold: content served from read-ahead is exactly the file's, and
only after its digest matched (a damaged object is never kept: its own
read reports EIO); a write racing a hand-over is never covered by it;
random access starts no read-ahead; unread content stays within the
budget; the index knows which objects are stored compressed.
"""

from __future__ import annotations

import errno
import os
import random
import time

import pytest
import trio

from layerfs.fs import readahead
from layerfs.fs.index import ensure_index_cache, read_index_cache
from layerfs.store.store import Store
from tests.fs.conftest import _fix_times, _touch, daemon_requests, layerfs_mount, make_image, needs_fuse
from tests.fs.test_core import Kernel, make_union

pytestmark = [pytest.mark.root]

NFILES = 300


def _content(i: int) -> bytes:
    rng = random.Random(i)
    if i % 2:  # compressible: stored as .zst
        return f"line {i} of a text file\n".encode() * rng.randint(1, 400)
    return rng.randbytes(rng.randint(1, 40_000))  # stored raw


@pytest.fixture(scope="module")
def many_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("ra")
    src = str(base / "src")
    for i in range(NFILES):
        _touch(f"{src}/d/f{i:04d}", _content(i))
    _fix_times(src)
    root = str(base / "store")
    with Store(root) as store:
        image = make_image(store, [src], "ratest:latest")
    return root, image


@pytest.fixture
def kernel(many_env, tmp_path):
    root, image = many_env
    u = make_union(root, image, str(tmp_path / "upper"))
    yield Kernel(u)
    os.close(u.upper.fd)


def _wait_idle(ra: readahead.Readahead) -> None:
    """Until the queue is empty (or the budget used up) and the loads in
    flight have landed."""
    deadline = time.monotonic() + 30
    seen = -1
    while (ra._queue and ra._held < readahead.BUDGET) or seen != len(ra._ready):
        assert time.monotonic() < deadline, "read-ahead never finished"
        seen = len(ra._ready)
        time.sleep(0.2)


async def _open_read(k: Kernel, ino: int) -> tuple[bytes | None, bytes]:
    """(content read ahead, taken at open; content read)."""
    opened = await k.u.open(ino, os.O_RDONLY)
    try:
        given = k.u.handles[opened.fh].data
        out, off = b"", 0
        while chunk := bytes(await k.u.read(opened.fh, off, 1 << 17)):
            out += chunk
            off += len(chunk)
        return given, out
    finally:
        k.u.release(opened.fh)


def _evict(root: str) -> None:
    """Drop the store's objects from the page cache: read-ahead starts
    only after reads that had to wait for the disk."""
    for dirpath, _, names in os.walk(os.path.join(root, "objects")):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def test_sequential_reads_get_content_at_open(kernel, many_env):
    k = kernel
    _evict(many_env[0])

    async def main():
        handed = 0
        for i in range(NFILES):
            if i in (3, 40, 100, 200):
                _wait_idle(k.u.readahead)
            given, read = await _open_read(k, k.ino(f"d/f{i:04d}"))
            assert read == _content(i), i
            if given is not None:
                assert given == read, i
                handed += 1
        return handed

    handed = trio.run(main)
    assert handed > NFILES // 2
    assert k.u.readahead._held == sum(map(len, k.u.readahead._ready.values()))

    async def again():
        """The kernel keeps what it was given until it forgets the inode:
        a second pass is handed nothing (it would only cost copies)."""
        for i in range(NFILES):
            given, read = await _open_read(k, k.ino(f"d/f{i:04d}"))
            assert given is None and read == _content(i), i

    trio.run(again)
    k.forget_all()
    assert not k.u.kernel_has  # forgotten inodes take their pages with them


def test_a_damaged_object_is_never_handed_out(kernel, many_env):
    k = kernel
    root, _ = many_env
    victim = 10
    with Store(root) as store:
        digest = k.u.index.meta[k.u.index.child(k.u.index.child(0, b"d"), b"f0010")][5]
        path, _compressed = store.objects.locate(digest)
    saved = open(path, "rb").read()
    try:
        with open(path, "r+b") as f:  # same size, other bytes
            f.write(bytes(b ^ 0xFF for b in saved[:64]))

        _evict(root)

        async def main():
            for i in range(victim):
                await _open_read(k, k.ino(f"d/f{i:04d}"))
            _wait_idle(k.u.readahead)
            opened = await k.u.open(k.ino(f"d/f{victim:04d}"), os.O_RDONLY)
            assert k.u.handles[opened.fh].data is None
            with pytest.raises(OSError) as exc:
                await k.u.read(opened.fh, 0, 4096)
            assert exc.value.errno == errno.EIO
            k.u.release(opened.fh)
            # the files after it are unaffected
            given, read = await _open_read(k, k.ino(f"d/f{victim + 1:04d}"))
            assert read == _content(victim + 1)

        trio.run(main)
    finally:
        with open(path, "wb") as f:
            f.write(saved)


def test_random_access_starts_no_read_ahead(kernel):
    k = kernel
    order = list(range(0, NFILES, readahead.WINDOW + 7))
    random.Random(1).shuffle(order)

    async def main():
        for i in order:
            given, read = await _open_read(k, k.ino(f"d/f{i:04d}"))
            assert given is None and read == _content(i)

    trio.run(main)
    assert not k.u.readahead._queue and not k.u.readahead._ready


def test_unread_content_stays_within_budget(kernel, monkeypatch):
    k = kernel
    monkeypatch.setattr(readahead, "BUDGET", 64 << 10)
    ra = k.u.readahead
    for start in range(0, NFILES - 1, 20):  # windows asked for, never read
        ra._request(start)
        _wait_idle(ra)
        assert ra._held <= readahead.BUDGET + readahead.MAX_FILE


def test_the_index_knows_compressed_objects(many_env):
    root, image = many_env
    with Store(root) as store:
        index = read_index_cache(root, image.id, ensure_index_cache(store, image))
        for slot, m in enumerate(index.meta):
            if m[5]:
                _path, compressed = store.objects.locate(m[5])
                assert (m[5] in index.packed) == compressed, index.paths[slot]
    assert index.packed  # the text files are stored compressed


def test_legacy_index_cache_is_replaced(many_env):
    root, image = many_env
    with Store(root) as store:
        legacy = store.layout.fscache_entry(image.id)
        current = ensure_index_cache(store, image)
        os.unlink(current)
        with open(legacy, "wb") as f:
            f.write(b"format 2")
        assert ensure_index_cache(store, image) == current
    assert not os.path.exists(legacy)


# -- through a mount: content put in the kernel's page cache ----------------------
@needs_fuse
def test_sequential_reads_through_a_mount(many_env, tmp_path):
    """tar-like reads of a cold tree: every file reads back exactly, most
    of them without a READ reaching the daemon (read-ahead put them in the
    page cache); a copy-up in the middle of the sequence reads the upper."""
    root, image = many_env
    _evict(root)
    mp, upper = str(tmp_path / "mnt"), str(tmp_path / "up")
    with layerfs_mount(root, image.id, mp, upper=upper) as handle:
        with open(f"{mp}/d/f0150", "ab") as f:  # copied up before read-ahead reaches it
            f.write(b"appended")
        os.listdir(f"{mp}/d")  # as tar does: the kernel knows the inodes before their opens
        before = daemon_requests(handle)
        for i in range(NFILES):
            with open(f"{mp}/d/f{i:04d}", "rb") as f:
                want = _content(i) + (b"appended" if i == 150 else b"")
                assert f.read() == want, i
                assert os.fstat(f.fileno()).st_size == len(want)
            time.sleep(0.005)  # a reader slower than read-ahead even on a busy machine: this is no race
        reads = daemon_requests(handle).get("read", 0) - before.get("read", 0)
    assert reads < NFILES // 2, reads


@needs_fuse
def test_a_damaged_object_gives_eio_through_a_mount(many_env, tmp_path):
    root, image = many_env
    with Store(root) as store:
        index = read_index_cache(root, image.id, ensure_index_cache(store, image))
        digest = index.meta[index.child(index.child(0, b"d"), b"f0030")][5]
        path, _compressed = store.objects.locate(digest)
    saved = open(path, "rb").read()
    try:
        with open(path, "r+b") as f:
            f.write(bytes(b ^ 0xFF for b in saved[:64]))
        _evict(root)
        mp = str(tmp_path / "mnt")
        with layerfs_mount(root, image.id, mp, upper=str(tmp_path / "up")):
            for i in range(NFILES // 2):
                with open(f"{mp}/d/f{i:04d}", "rb") as f:
                    if i == 30:
                        with pytest.raises(OSError) as exc:
                            f.read()
                        assert exc.value.errno == errno.EIO
                    else:
                        assert f.read() == _content(i), i
    finally:
        with open(path, "wb") as f:
            f.write(saved)


@needs_fuse
def test_writes_racing_read_ahead_are_never_covered(many_env, tmp_path):
    """Appends to files that read-ahead is loading at the same moment: the
    content read back is always the written one (a hand-over of the lower
    content after a copy-up would leave stale pages in the kernel's cache)."""
    import threading

    root, image = many_env
    _evict(root)
    mp = str(tmp_path / "mnt")
    changed = set(range(5, NFILES, 3))
    with layerfs_mount(root, image.id, mp, upper=str(tmp_path / "up")):
        def writer():
            for i in sorted(changed):
                with open(f"{mp}/d/f{i:04d}", "ab") as f:
                    f.write(b"+written")

        t = threading.Thread(target=writer)
        t.start()
        for i in range(NFILES):  # the reader starts read-ahead windows the writer runs into
            with open(f"{mp}/d/f{i:04d}", "rb") as f:
                f.read()
        t.join()
        for i in range(NFILES):
            with open(f"{mp}/d/f{i:04d}", "rb") as f:
                assert f.read() == _content(i) + (b"+written" if i in changed else b""), i
