"""Big objects read a chunk at a time (fs/bigread.py): driven in-process over
the union core, then through a FUSE mount.

What must hold: what is served is exactly the file's, and only chunks that
matched their sums; a damaged chunk gives EIO for every read that covers
it and leaves the other chunks readable; reads that jump check only
their own chunks; objects whose table is missing or damaged are verified
whole as before (and then get a sound table); a sequential reader has
its next chunks checked ahead, and no further than the window; a write
racing the read-ahead is never hidden by it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time

import blake3
import pytest
import trio

from layerfs.fs import bigread, verify
from layerfs.store import chunksums
from layerfs.store.chunksums import SUM_CHUNK
from tests.fs.conftest import big_file_image, daemon_requests, flip_byte, layerfs_mount, needs_fuse
from tests.fs.test_core import make_union
from tests.store.test_chunksums import first_format_table

pytestmark = [pytest.mark.root]

CHUNKS = 24


@pytest.fixture
def big_env(tmp_path):
    """A store with one image holding d/big (CHUNKS MiB and a bit)."""
    root, image, content, path = big_file_image(tmp_path, CHUNKS * SUM_CHUNK + 4321)
    sums = path + chunksums.SUFFIX
    yield root, image, content, path, sums
    with open(path, "wb") as f:  # leave a sound store for the fsck fixture
        f.write(content)


@pytest.fixture
def whole_checks(monkeypatch) -> list[str]:
    """The digests verified whole (fs.verify), in order."""
    seen: list[str] = []
    real = verify.object_ok

    async def counting(fd, digest, verified):
        seen.append(digest)
        return await real(fd, digest, verified)

    monkeypatch.setattr(verify, "object_ok", counting)
    return seen


def _reads(u, spans: list[tuple[int, int]]) -> list[bytes | int]:
    """Open d/big once and read each (offset, size): bytes, or -errno."""
    async def main() -> list[bytes | int]:
        node = u.lookup(u.lookup(1, b"d").ino, b"big")
        fh = (await u.open(node.ino, os.O_RDONLY)).fh
        out: list[bytes | int] = []
        try:
            for off, size in spans:
                try:
                    out.append(bytes(await u.read(fh, off, size)))
                except OSError as exc:
                    out.append(-exc.errno)
        finally:
            u.release(fh)
        return out

    return trio.run(main)


def _sequential(size: int, step: int = 128 << 10) -> list[tuple[int, int]]:
    return [(off, step) for off in range(0, size, step)]


def _damage(path: str, chunk: int) -> None:
    flip_byte(path, chunk * SUM_CHUNK + 100)


def _union(root, image, tmp_path):
    u = make_union(root, image, str(tmp_path / "upper"))
    return u


def test_sequential_reads_are_checked_chunk_by_chunk(big_env, tmp_path, whole_checks):
    root, image, content, _, _ = big_env
    u = _union(root, image, tmp_path)
    try:
        got = _reads(u, _sequential(len(content)))
        assert b"".join(got) == content
        assert whole_checks == []  # never hashed whole
        oc = u.chunk_reads.chunks(blake3.blake3(content).hexdigest(), "", len(content))
        deadline = time.monotonic() + 30
        while set(oc.state) != {bigread.GOOD} and time.monotonic() < deadline:
            time.sleep(0.01)  # (the last chunks may be checked ahead by a thread, still at work)
        assert set(oc.state) == {bigread.GOOD}
    finally:
        os.close(u.upper.fd)


def test_a_damaged_chunk_fails_every_read_of_it_and_no_other(big_env, tmp_path, whole_checks):
    root, image, content, path, _ = big_env
    _damage(path, 5)
    u = _union(root, image, tmp_path)
    try:
        spans = [(0, SUM_CHUNK)] + [(i * SUM_CHUNK, 4096) for i in range(1, 8)] + [(5 * SUM_CHUNK + 50, 100)]
        got = _reads(u, spans)
        want = [content[o:o + n] for o, n in spans]
        assert [g if i not in (5, 8) else None for i, g in enumerate(got)] == \
               [w if i not in (5, 8) else None for i, w in enumerate(want)]
        assert got[5] == got[8] == -errno.EIO
        assert whole_checks == []
    finally:
        os.close(u.upper.fd)


def test_reads_that_jump_check_only_their_chunks_and_read_nothing_ahead(big_env, tmp_path, whole_checks):
    root, image, content, path, _ = big_env
    digest = blake3.blake3(content).hexdigest()
    _damage(path, 20)
    u = _union(root, image, tmp_path)
    try:
        spans = [(10 * SUM_CHUNK, 4096), (0, 4096), (20 * SUM_CHUNK + 7, 10), (15 * SUM_CHUNK, 4096)]
        got = _reads(u, spans)
        assert got[:2] + got[3:] == [content[o:o + n] for o, n in spans[:2] + spans[3:]]
        assert got[2] == -errno.EIO  # the damaged chunk, and only that one
        assert whole_checks == []
        oc = u.chunk_reads.chunks(digest, "", len(content))
        time.sleep(0.2)  # (time for a read-ahead that must not come)
        assert [i for i, st in enumerate(oc.state) if st == bigread.GOOD] == [0, 10, 15]
        assert digest not in u.verified
    finally:
        os.close(u.upper.fd)


def test_a_reader_that_keeps_jumping_has_the_rest_checked_in_the_background(big_env, tmp_path, whole_checks):
    root, image, content, _, _ = big_env
    digest = blake3.blake3(content).hexdigest()
    u = _union(root, image, tmp_path)
    try:
        # chunks 0, 11, 22, 9, 20, ...: every read after the first jumps
        spans = [((i * 11) % CHUNKS * SUM_CHUNK, 4096) for i in range(bigread.JUMPS + 1)]
        assert _reads(u, spans) == [content[o:o + n] for o, n in spans]
        oc = u.chunk_reads.chunks(digest, "", len(content))
        deadline = time.monotonic() + 30
        while not oc.all_good() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert oc.all_good() and whole_checks == []
        assert _reads(u, [(3, 5)]) == [content[3:8]] and digest in u.verified
    finally:
        os.close(u.upper.fd)


def test_a_sequential_reader_has_the_window_after_it_checked_ahead_and_no_more(big_env, tmp_path, whole_checks,
                                                                                monkeypatch):
    root, image, content, _, _ = big_env
    digest = blake3.blake3(content).hexdigest()
    monkeypatch.setattr(bigread, "WINDOW", 4)
    monkeypatch.setattr(bigread, "BATCH", 2)
    u = _union(root, image, tmp_path)
    try:
        spans = _sequential(2 * SUM_CHUNK)  # chunks 0 and 1, 128 KiB at a time
        assert b"".join(_reads(u, spans)) == content[:2 * SUM_CHUNK]
        oc = u.chunk_reads.chunks(digest, "", len(content))
        # queued a batch at a time: up to WINDOW past the furthest chunk
        # read (1), and at least WINDOW - BATCH + 1 past it
        least, most = list(range(2 + bigread.WINDOW - bigread.BATCH)), list(range(2 + bigread.WINDOW))
        deadline = time.monotonic() + 30
        while [i for i, st in enumerate(oc.state) if st == bigread.GOOD] not in (least, most[:-1], most):
            assert time.monotonic() < deadline, list(oc.state)
            time.sleep(0.01)
        time.sleep(0.2)  # (time for a check past the window, which must not come)
        checked = [i for i, st in enumerate(oc.state) if st != bigread.UNKNOWN]
        assert checked in (least, most[:-1], most)
        assert checked == [i for i, st in enumerate(oc.state) if st == bigread.GOOD]
        assert whole_checks == [] and digest not in u.verified
    finally:
        os.close(u.upper.fd)


def test_a_random_reader_that_checked_every_chunk_has_the_object_verified(big_env, tmp_path, whole_checks):
    root, image, content, _, _ = big_env
    digest = blake3.blake3(content).hexdigest()
    order = [7, 19, 2, 23, 11, 0, 15, 4, 21, 9, 13, 1, 17, 24, 5, 20, 3, 12, 22, 8, 16, 6, 18, 10, 14]
    spans = [(i * SUM_CHUNK + 99, 4096) for i in order]
    u = _union(root, image, tmp_path)
    try:
        got = _reads(u, spans + [(5, 10)])
        assert got == [content[o:o + n] for o, n in spans + [(5, 10)]]
        assert whole_checks == [] and digest in u.verified
    finally:
        os.close(u.upper.fd)


@pytest.mark.parametrize("table", ["missing", "damaged", "first format"])
def test_without_a_sound_table_the_object_is_verified_whole_and_gets_one(big_env, tmp_path, whole_checks, table):
    root, image, content, path, sums = big_env
    if table == "missing":
        os.unlink(sums)
    elif table == "damaged":
        flip_byte(sums, 60)
    else:  # keyed blake3 sums, as layerfs wrote them before GMAC
        key = open(os.path.join(os.path.dirname(os.path.dirname(path)), chunksums.KEY_NAME), "rb").read()
        with open(sums, "wb") as f:
            f.write(first_format_table(key, blake3.blake3(content).hexdigest(), content))
    u = _union(root, image, tmp_path)
    digest = blake3.blake3(content).hexdigest()
    try:
        assert b"".join(_reads(u, _sequential(len(content)))) == content
        assert whole_checks == [digest]
        key = u.objects.sums_key()
        deadline = time.monotonic() + 60
        while (got := u.objects.chunk_sums(digest, len(content))) is None:  # written by a background thread
            assert time.monotonic() < deadline, "no sound table was written"
            time.sleep(0.05)
        assert got.sums == tuple(chunksums.chunk_sum(key, got.nonce, i // SUM_CHUNK, content[i:i + SUM_CHUNK])
                                 for i in range(0, len(content), SUM_CHUNK))
    finally:
        os.close(u.upper.fd)


def test_no_table_is_written_for_content_that_changed_since_its_check(big_env, tmp_path):
    """The table comes from a second read hashed against the name in the
    same pass: content damaged after the whole check gets none."""
    root, image, content, path, sums = big_env
    os.unlink(sums)
    u = _union(root, image, tmp_path)
    digest = blake3.blake3(content).hexdigest()
    try:
        real = u.chunk_reads._write_table

        def damaged_first(d: str, p: str) -> None:
            _damage(path, 3)
            real(d, p)

        u.chunk_reads._write_table = damaged_first
        _reads(u, [(0, 4096)])
        u.chunk_reads.write_table_later(digest, path, len(content))  # (already asked: once per object)
        deadline = time.monotonic() + 30
        while threading.active_count() > 1 and any(t.name == "layerfs-chunksums" for t in threading.enumerate()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not os.path.exists(sums)
    finally:
        os.close(u.upper.fd)


# -- through a mount ------------------------------------------------------------------
def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@needs_fuse
@pytest.mark.parametrize("pace", [0, 0.001], ids=["fast", "slow"])
def test_a_sequential_reader_through_a_mount_gets_the_file(big_env, tmp_path, pace):
    """Read from a cold object by the kernel's read-ahead (several READs in
    flight, 1 MiB each, across chunks) while the threads check ahead: a
    reader faster than the checks waits for them, a slower one finds its
    chunks checked."""
    root, image, content, path, _ = big_env
    _evict(path)
    mp = str(tmp_path / "mnt")
    with layerfs_mount(root, image.id, mp, upper=str(tmp_path / "up")) as handle:
        before = daemon_requests(handle)
        with open(f"{mp}/d/big", "rb") as f:
            got = b""
            while piece := f.read(128 << 10):
                got += piece
                time.sleep(pace)
        assert got == content
        assert daemon_requests(handle).get("read", 0) > before.get("read", 0)


@contextlib.contextmanager
def _mounted_with_damage(big_env, tmp_path, chunk: int):
    """d/big's *chunk* damaged, the object out of the page cache, mounted: (mountpoint, handle)."""
    root, image, _, path, _ = big_env
    _damage(path, chunk)
    _evict(path)
    mp = str(tmp_path / "mnt")
    with layerfs_mount(root, image.id, mp, upper=str(tmp_path / "up")) as handle:
        yield mp, handle


@needs_fuse
def test_a_damaged_chunk_gives_eio_through_a_mount(big_env, tmp_path):
    content = big_env[2]
    with _mounted_with_damage(big_env, tmp_path, 9) as (mp, handle):
        with open(f"{mp}/d/big", "rb") as f:
            assert f.read(9 * SUM_CHUNK) == content[:9 * SUM_CHUNK]
            with pytest.raises(OSError) as exc:
                f.read(SUM_CHUNK)
            assert exc.value.errno == errno.EIO
        log = open(handle.log).read()
    assert "(d/big) fails its digest check" in log and "chunk 9 (bytes 9437184-) fails its sum" in log


@needs_fuse
def test_a_random_reader_through_a_mount_gets_every_good_chunk_and_eio_for_the_bad_one(big_env, tmp_path):
    content = big_env[2]
    offsets = [((i * 11) % CHUNKS) * SUM_CHUNK + (i * 4096) % SUM_CHUNK for i in range(3 * bigread.JUMPS)]
    with _mounted_with_damage(big_env, tmp_path, 13) as (mp, _):
        fd = os.open(f"{mp}/d/big", os.O_RDONLY)
        try:
            for off in offsets:
                if off // SUM_CHUNK == 13:
                    with pytest.raises(OSError) as exc:
                        os.pread(fd, 4096, off)
                    assert exc.value.errno == errno.EIO
                else:
                    assert os.pread(fd, 4096, off) == content[off:off + 4096], off
            # the tail past the last full chunk, read after the rest was checked in the background
            assert os.pread(fd, 8192, CHUNKS * SUM_CHUNK) == content[CHUNKS * SUM_CHUNK:]
        finally:
            os.close(fd)


@needs_fuse
def test_writes_racing_the_read_ahead_are_never_hidden(big_env, tmp_path):
    """A write lands in the middle of a file whose next chunks the threads
    are checking: every later read sees the write (the reader's handle
    reads the copy from then on, as overlayfs's stacked files do)."""
    root, image, content, path, _ = big_env
    _evict(path)
    mp = str(tmp_path / "mnt")
    at = 6 * SUM_CHUNK + 17
    with layerfs_mount(root, image.id, mp, upper=str(tmp_path / "up")):
        with open(f"{mp}/d/big", "rb") as reader:
            reader.read(SUM_CHUNK)  # starts the checks of the next chunks
            with open(f"{mp}/d/big", "r+b") as writer:
                writer.seek(at)
                writer.write(b"written")
            rest = reader.read()
        want = content[:at] + b"written" + content[at + 7:]
        assert rest == want[SUM_CHUNK:]
        with open(f"{mp}/d/big", "rb") as f:
            assert f.read() == want


@needs_fuse
@pytest.mark.damages_store
def test_an_object_emptied_while_read_ahead_gives_eio_and_the_daemon_lives(big_env, tmp_path):
    """Read-ahead threads hash from a mapping of the object, held
    under a read lease: emptying the object in place (``open(path, 'wb')``)
    waits for the lease, the threads let go, and the reads after that fail
    with EIO, never with SIGBUS in the daemon."""
    root, image, content, path, _ = big_env
    _evict(path)
    mp = str(tmp_path / "mnt")
    with layerfs_mount(root, image.id, mp, upper=str(tmp_path / "up")) as handle:
        with open(f"{mp}/d/big", "rb") as f:
            assert f.read(SUM_CHUNK) == content[:SUM_CHUNK]  # read-ahead maps the object now
            open(path, "wb").close()
            with pytest.raises(OSError) as exc:
                f.read()
            assert exc.value.errno == errno.EIO
        os.kill(handle.pid, 0)  # still there
        assert os.listdir(f"{mp}/d") == ["big"]


def test_the_threads_are_handed_chunks_a_batch_at_a_time(big_env, tmp_path, whole_checks, monkeypatch):
    """One wake-up per chunk cost more than the hashing (0.66-0.76 s of
    daemon CPU per GiB with no hashing at all): a sequential reader's
    chunks go to the threads in runs of BATCH."""
    root, image, content, _, _ = big_env
    monkeypatch.setattr(bigread, "WINDOW", 8)
    monkeypatch.setattr(bigread, "BATCH", 4)
    runs: list[list[int]] = []
    real = bigread.ChunkReader._next

    def recording(self, src):
        item = real(self, src)
        if item is not None:
            runs.append(item[1])
        return item

    monkeypatch.setattr(bigread.ChunkReader, "_next", recording)
    u = _union(root, image, tmp_path)
    try:
        spans = _sequential(len(content))
        assert b"".join(_reads(u, spans)) == content
        assert whole_checks == []
        handed = sorted(i for run in runs for i in run)
        assert len(handed) == len(set(handed)) >= CHUNKS - bigread.WINDOW  # each chunk once
        assert all(run == list(range(run[0], run[0] + len(run))) for run in runs)  # in order
        assert len(runs) <= len(handed) // bigread.BATCH + 2, runs  # (a short run at each end)
    finally:
        os.close(u.upper.fd)


def test_a_read_of_a_chunk_in_a_threads_batch_does_not_wait_for_the_batch(big_env, tmp_path, monkeypatch):
    """A batch is handed over unmarked: a random reader needing one of its
    chunks checks it itself rather than wait behind the chunks before it
    (up to BATCH MiB from a cold disk)."""
    root, image, content, path, _ = big_env
    digest = blake3.blake3(content).hexdigest()
    monkeypatch.setattr(bigread.ChunkReader, "_start_threads", lambda self: None)  # the test is the thread
    u = _union(root, image, tmp_path)
    reader = u.chunk_reads
    try:
        oc = reader.chunks(digest, path, len(content))
        reader.check_all_later(oc)
        _, run = reader._next(None)
        assert len(run) == bigread.BATCH
        assert all(oc.state[i] == bigread.UNKNOWN for i in run)  # (marked one at a time, as the thread gets there)
        fd = os.open(path, os.O_RDONLY)
        async def read_last() -> bool:
            with trio.fail_after(30):
                return await reader.check(oc, fd, run[-1] * SUM_CHUNK, 10)

        try:
            assert trio.run(read_last)
        finally:
            os.close(fd)
        assert oc.state[run[-1]] == bigread.GOOD and oc.state[run[0]] == bigread.UNKNOWN
        assert not reader._take(oc, run[-1]) and reader._take(oc, run[0])  # the thread skips what was checked
    finally:
        os.close(u.upper.fd)
