"""Whole-object verification (fs/verify.py): the digest of every shape of
file, the read lease that keeps a truncation from turning into SIGBUS,
one hash for concurrent first reads, and the rule that only the detached
daemon hashes with threads."""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
import time

import blake3
import pytest
import trio

from layerfs.fs import verify
from layerfs.store import chunksums, transfer
from layerfs.store import images as img
from layerfs.store.objects import file_digest
from layerfs.store.store import Store
from tests.fs.conftest import big_file_image, layerfs_mount

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "layerfs")


def _write(path, parts: list[bytes | int]) -> bytes:
    """Data chunks and holes (ints, skipped with lseek); returns the content."""
    content = b""
    with open(path, "wb") as f:
        for p in parts:
            if isinstance(p, int):
                f.seek(p, os.SEEK_CUR)
                content += bytes(p)
            else:
                f.write(p)
                content += p
        f.truncate(len(content))
    return content


def _digest(path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return verify.fd_digest(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("parts", [
    [],
    [b"x"],
    [os.urandom(4096 * 3 + 17)],
    [os.urandom(1 << 20), 3 << 20, os.urandom(12345)],   # a hole across segments
    [os.urandom((1 << 20) * 2)],                          # exactly two segments
    [b"head", 5 << 20],                                   # a trailing hole
])
def test_digest_of_every_shape(tmp_path, monkeypatch, parts):
    monkeypatch.setattr(verify, "SEGMENT", 1 << 20)  # many segments from small files
    path = str(tmp_path / "obj")
    content = _write(path, parts)
    assert _digest(path) == blake3.blake3(content).hexdigest() == file_digest(path)


def test_a_file_open_for_writing_is_hashed_with_pread(tmp_path):
    """No lease can be had while someone holds the object open for
    writing: then nothing is mapped (a truncate could not be held off)."""
    path = str(tmp_path / "obj")
    content = _write(path, [os.urandom(3 << 20)])
    writer = os.open(path, os.O_WRONLY)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert not verify.take_lease(fd)
            assert verify.fd_digest(fd) == blake3.blake3(content).hexdigest()
        finally:
            os.close(fd)
    finally:
        os.close(writer)


def test_a_truncation_waits_for_the_hash(tmp_path, monkeypatch):
    """Someone truncating the object in place while it is hashed (a store
    damaged by hand) waits until the mapping is gone; the rest is read with
    pread, which sees the damage: a wrong digest (EIO), never SIGBUS."""
    with open("/proc/sys/fs/leases-enable") as f:
        if f.read().strip() != "1":
            pytest.skip("file leases are disabled (/proc/sys/fs/leases-enable)")
    monkeypatch.setattr(verify, "SEGMENT", 1 << 20)
    path = str(tmp_path / "obj")
    content = _write(path, [os.urandom(4 << 20)])
    marker = str(tmp_path / "truncated")
    writer: list[subprocess.Popen] = []
    real_leased = verify.leased
    seen: list[bool] = []

    def leased(fd: int) -> bool:
        if len(seen) == 1:  # after the first segment: a writer comes
            writer.append(subprocess.Popen(
                [sys.executable, "-c",
                 f"open({path!r}, 'wb').close(); open({marker!r}, 'w').close()"]))
            deadline = time.monotonic() + 30
            while real_leased(fd):  # the kernel shows the lease breaking once the writer waits
                assert time.monotonic() < deadline, "the writer never reached the lease"
                time.sleep(0.01)
        seen.append(real_leased(fd))
        return seen[-1]

    real_release = verify.release_lease
    held_off = []

    def release(fd: int) -> None:
        held_off.append(writer[0].poll() is None and not os.path.exists(marker))
        real_release(fd)
        assert writer[0].wait(timeout=60) == 0  # the damage lands before the rest is read

    monkeypatch.setattr(verify, "leased", leased)
    monkeypatch.setattr(verify, "release_lease", release)
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = verify.fd_digest(fd)
    finally:
        os.close(fd)
    assert seen == [True, False]  # one segment mapped, then the writer was seen
    assert held_off == [True]  # and it waited until the lease was released
    assert os.path.getsize(path) == 0
    assert digest == blake3.blake3(content[:1 << 20]).hexdigest() != blake3.blake3(content).hexdigest()


def test_concurrent_first_reads_share_one_hash(tmp_path, monkeypatch):
    path = str(tmp_path / "obj")
    content = _write(path, [os.urandom(2 << 20)])
    digest = blake3.blake3(content).hexdigest()
    calls = []
    real = verify.fd_digest

    def counting(fd: int) -> str:
        calls.append(fd)
        time.sleep(0.2)  # long enough for the others to arrive while it runs
        return real(fd)

    monkeypatch.setattr(verify, "fd_digest", counting)
    verified: set[str] = set()
    fds = [os.open(path, os.O_RDONLY) for _ in range(4)]
    results = []

    async def main() -> None:
        async def one(fd: int) -> None:
            results.append(await verify.object_ok(fd, digest, verified))

        async with trio.open_nursery() as n:
            for fd in fds:
                n.start_soon(one, fd)

    try:
        trio.run(main)
    finally:
        for fd in fds:
            os.close(fd)
    assert results == [True] * 4 and len(calls) == 1 and verified == {digest}
    assert not verify._running


def test_concurrent_first_reads_of_a_bad_object_share_one_failed_hash(tmp_path, monkeypatch):
    path = str(tmp_path / "obj")
    _write(path, [os.urandom(2 << 20)])
    calls = []
    real = verify.fd_digest

    def counting(fd: int) -> str:
        calls.append(fd)
        time.sleep(0.2)
        return real(fd)

    monkeypatch.setattr(verify, "fd_digest", counting)
    verified: set[str] = set()
    fds = [os.open(path, os.O_RDONLY) for _ in range(4)]
    results = []

    async def main() -> None:
        async def one(fd: int) -> None:
            results.append(await verify.object_ok(fd, "0" * 64, verified))

        async with trio.open_nursery() as n:
            for fd in fds:
                n.start_soon(one, fd)

    try:
        trio.run(main)
    finally:
        for fd in fds:
            os.close(fd)
    assert results == [False] * 4 and len(calls) == 1 and not verified
    assert not verify._running


def test_a_failed_hash_leaves_the_object_unverified(tmp_path):
    path = str(tmp_path / "obj")
    _write(path, [os.urandom(2 << 20)])
    verified: set[str] = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert trio.run(verify.object_ok, fd, "0" * 64, verified) is False
    finally:
        os.close(fd)
    assert verified == set() and not verify._running


def test_only_the_detached_daemon_allows_threads():
    """blake3's thread pool does not survive fork: threads are for the
    detached daemon only, which calls allow_threads in its detached branch,
    and for no other process (this one included)."""
    assert not verify.threads_allowed()
    callers = []
    for dirpath, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "allow_threads":
                        callers.append(os.path.relpath(path, PKG))
    assert callers == [os.path.join("fs", "daemon.py")]
    with open(os.path.join(PKG, "fs", "daemon.py")) as f:
        tree = ast.parse(f.read())
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_daemon")
    branch = next(n for n in ast.walk(run) if isinstance(n, ast.If) and ast.unparse(n.test) == "detached")
    assert "allow_threads" in ast.unparse(branch)


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.damages_store
def test_objects_truncated_in_place_give_eio_and_the_daemon_lives(tmp_path):
    """One object cut short before the mount, one emptied in place between
    open and first read (``open(path, 'wb')``, as a careless hand would):
    both EIO with a log line, and the daemon (mapping objects to hash them,
    on threads) goes on serving."""
    root = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("short", "emptied", "good"):
        (src / name).write_bytes(os.urandom(3 << 20))
    with Store(root) as store:
        lid = transfer.import_layer(store, str(src))
        image = store.put_image(img.new_config([lid]))
        paths = {e.path: store.objects.locate(e.digest)[0] for e in store.layer_entries(lid) if e.digest}
    with open(paths["short"], "r+b") as f:
        f.truncate(1 << 20)
    with layerfs_mount(root, image.id, str(tmp_path / "mnt")) as h:
        m = h.mountpoint
        with open(f"{m}/emptied", "rb") as f:
            open(paths["emptied"], "wb").close()
            with pytest.raises(OSError) as exc:
                f.read()
            assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            open(f"{m}/short", "rb").read()
        assert exc.value.errno == errno.EIO
        assert open(f"{m}/good", "rb").read() == (src / "good").read_bytes()
        assert sorted(os.listdir(m)) == ["emptied", "good", "short"]
        log = open(h.log).read()
    for name in ("short", "emptied"):
        assert f"({name}) fails its digest check" in log


@pytest.mark.root
def test_a_bad_big_object_fails_at_once_until_its_file_is_replaced(tmp_path, monkeypatch):
    """A big object without a chunk-sum table (verified whole) that failed
    its check answers EIO without another whole-object hash while its
    file is the same; once the store has a good file again (a repair
    renames one in), a new open checks it."""
    from tests.fs.test_core import make_union

    # above SMALL_OBJECT: read through a mapping, checked whole
    root, image, content, path = big_file_image(tmp_path, 3 << 20)
    digest = blake3.blake3(content).hexdigest()
    os.unlink(path + chunksums.SUFFIX)  # (as stored before tables existed)
    good = open(path, "rb").read()
    with open(path, "r+b") as f:  # damaged in place
        f.write(b"\0" * 64)
    hashes = []
    real = verify.object_ok

    async def counting(fd, d, verified):
        hashes.append(d)
        return await real(fd, d, verified)

    monkeypatch.setattr(verify, "object_ok", counting)
    u = make_union(root, image, str(tmp_path / "upper"))
    try:
        async def read_once() -> int:
            node = u.lookup(u.lookup(1, b"d").ino, b"big")
            fh = (await u.open(node.ino, os.O_RDONLY)).fh
            try:
                return len(await u.read(fh, 0, 4096))
            except OSError as exc:
                return -exc.errno
            finally:
                u.release(fh)

        assert trio.run(read_once) == -errno.EIO
        assert trio.run(read_once) == -errno.EIO
        assert hashes == [digest]  # the second read did not hash the GiB again
        tmp = path + ".repair"
        with open(tmp, "wb") as f:
            f.write(good)
        os.rename(tmp, path)
        assert trio.run(read_once) == 4096
        assert hashes == [digest, digest]
    finally:
        os.close(u.upper.fd)
        with open(path, "wb") as f:  # leave a clean store for the fsck fixture
            f.write(good)
