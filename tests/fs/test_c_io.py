"""READ and WRITE answered by the C module (fs/lowlevel.py) through a mount.

Files are opened with O_DIRECT so that every read reaches the daemon
instead of the kernel's page cache. What must hold: the bytes are the
file's, whichever side answers; only checked content is answered in C
(a handle opened before a copy-up reads the copy, an object cut short
since its check gives EIO, never fewer bytes); writes land in the upper
file; and ``LAYERFS_C_IO=off`` leaves every request to pyfuse3.
"""

from __future__ import annotations

import errno
import os

import blake3
import pytest

from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.chunksums import SUM_CHUNK
from layerfs.store.store import Store
from tests.fs.conftest import daemon_requests, layerfs_mount, needs_fuse

pytestmark = [pytest.mark.root, needs_fuse]

BIG = 3 * SUM_CHUNK + 777
SMALL = 10_000


@pytest.fixture
def c_env(tmp_path):
    """A store with d/small and d/big: (root, image id, {name: content}, big's object path)."""
    src = tmp_path / "src"
    os.makedirs(src / "d")
    files = {"small": os.urandom(SMALL), "big": os.urandom(BIG)}
    for name, data in files.items():
        (src / "d" / name).write_bytes(data)
    root = str(tmp_path / "store")
    with Store(root) as store:
        lid = transfer.import_layer(store, str(src), as_layer=True)
        image = store.put_image(img.new_config([lid]))
        path, _ = store.objects.locate(blake3.blake3(files["big"]).hexdigest())
    yield root, image.id, files, path
    with open(path, "wb") as f:  # leave a sound store for the fsck fixture
        f.write(files["big"])


def _direct(path: str, flags: int = os.O_RDONLY) -> int:
    return os.open(path, flags | os.O_DIRECT)


SPANS = [(0, 4096), (4096, 8192), (SMALL - 100, 4096), (SMALL, 4096), (1 << 20, 4096),
         (SUM_CHUNK - 10, 4096), (2 * SUM_CHUNK, 128 << 10), (BIG - 5, 4096), (BIG + 4096, 4096)]


def _read_all_spans(fd: int, content: bytes) -> None:
    for off, size in SPANS * 2:  # the second round is answered in C
        assert os.pread(fd, size, off) == content[off:off + size], (off, size)


def test_reads_of_checked_content_are_answered_in_c_with_the_files_bytes(c_env, tmp_path):
    root, image, files, _ = c_env
    mp = str(tmp_path / "mnt")
    with layerfs_mount(root, image, mp, upper=str(tmp_path / "up")) as handle:
        for name, content in files.items():
            fd = _direct(f"{mp}/d/{name}")
            try:
                _read_all_spans(fd, content)
            finally:
                os.close(fd)
        counts = daemon_requests(handle)
    assert counts.get("read (C)", 0) >= len(SPANS), counts


def test_an_upper_file_is_written_and_read_in_c(c_env, tmp_path):
    root, image, _, _ = c_env
    mp, up = str(tmp_path / "mnt"), str(tmp_path / "up")
    content = os.urandom(300_000)
    with layerfs_mount(root, image, mp, upper=up) as handle:
        fd = os.open(f"{mp}/d/new", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for off in range(0, len(content), 4096):
                assert os.pwrite(fd, content[off:off + 4096], off) == len(content[off:off + 4096])
            assert os.pwrite(fd, b"tail", len(content) + 10) == 4
        finally:
            os.close(fd)
        want = content + b"\0" * 10 + b"tail"
        fd = _direct(f"{mp}/d/new")
        try:
            for off, size in [(0, 4096), (8192, 65536), (len(want) - 3, 4096), (len(want), 4096)] * 2:
                assert os.pread(fd, size, off) == want[off:off + size]
        finally:
            os.close(fd)
        counts = daemon_requests(handle)
    with open(f"{up}/d/new", "rb") as f:
        assert f.read() == want
    assert counts.get("write (C)", 0) >= len(content) // 4096, str(sorted(counts.items()))
    assert counts.get("read (C)", 0) > 0, counts


def test_a_handle_opened_before_a_copy_up_reads_the_copy(c_env, tmp_path):
    """The C side answers a lower handle only while its node is lower:
    after another open copies the file up and writes it, the first
    handle's reads show the write (overlayfs's stacked files do)."""
    root, image, files, _ = c_env
    mp = str(tmp_path / "mnt")
    for name, content in files.items():
        with layerfs_mount(root, image, mp, upper=str(tmp_path / f"up-{name}")):
            reader = _direct(f"{mp}/d/{name}")
            try:
                for _ in range(2):
                    assert os.pread(reader, 4096, 0) == content[:4096]
                with open(f"{mp}/d/{name}", "r+b") as writer:
                    writer.write(b"WRITTEN")
                assert os.pread(reader, 4096, 0) == b"WRITTEN" + content[7:4096]
                assert os.pread(reader, 4096, 4096) == content[4096:8192]
            finally:
                os.close(reader)


@pytest.mark.damages_store
def test_an_object_cut_short_after_its_check_gives_eio_not_fewer_bytes(c_env, tmp_path):
    root, image, files, path = c_env
    content = files["big"]
    mp = str(tmp_path / "mnt")
    with layerfs_mount(root, image, mp, upper=str(tmp_path / "up")) as handle:
        fd = _direct(f"{mp}/d/big")
        try:
            for _ in range(200):  # until the object is checked whole and C answers
                assert os.pread(fd, 1 << 20, 0) == content[:1 << 20]
                if daemon_requests(handle).get("read (C)", 0):
                    break
            else:
                pytest.fail("no READ of the checked object was answered in C")
            os.truncate(path, SUM_CHUNK)
            assert os.pread(fd, 4096, 0) == content[:4096]
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, SUM_CHUNK + 4096)
            assert exc.value.errno == errno.EIO
        finally:
            os.close(fd)


def test_with_c_io_off_pyfuse3_answers_every_request(c_env, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFS_C_IO", "off")
    root, image, files, _ = c_env
    mp = str(tmp_path / "mnt")
    with layerfs_mount(root, image, mp, upper=str(tmp_path / "up")) as handle:
        fd = _direct(f"{mp}/d/small")
        try:
            _read_all_spans(fd, files["small"])
        finally:
            os.close(fd)
        with open(f"{mp}/d/new", "wb") as f:
            f.write(b"x" * 5000)
            os.posix_fallocate(f.fileno(), 0, 1 << 20)  # (FALLOCATE is answered in C either way)
        assert os.stat(f"{mp}/d/new").st_size == 1 << 20
        counts = daemon_requests(handle)
    below_eof = sum(off < SMALL for off, _ in SPANS)  # (the kernel answers reads past the end itself)
    assert "read (C)" not in counts and "write (C)" not in counts and counts["read"] == 2 * below_eof
