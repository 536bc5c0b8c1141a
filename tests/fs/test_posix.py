"""POSIX behaviour over a layerfs mount: open flags, mmap, sparse files,
names, deep trees, unlinked-but-open files, concurrency, ENOSPC."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import subprocess
import threading

import pytest

from tests.fs.conftest import layerfs_mount, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]


@pytest.fixture(scope="module")
def mnt(fs_env, tmp_path_factory):
    base = tmp_path_factory.mktemp("posix")
    with layerfs_mount(fs_env["root"], fs_env["image"], str(base / "mnt"), upper=str(base / "up")) as h:
        yield h.mountpoint


def _errno(fn) -> int:
    with pytest.raises(OSError) as exc:
        fn()
    return exc.value.errno


def test_open_flags(mnt):
    assert _errno(lambda: os.open(f"{mnt}/a/f1", os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST
    assert _errno(lambda: os.open(f"{mnt}/nothere", os.O_RDONLY)) == errno.ENOENT
    assert _errno(lambda: os.open(f"{mnt}/top", os.O_RDONLY | os.O_DIRECTORY)) == errno.ENOTDIR
    assert _errno(lambda: os.open(f"{mnt}/link1", os.O_RDONLY | os.O_NOFOLLOW)) == errno.ELOOP
    assert _errno(lambda: os.open(f"{mnt}/a", os.O_WRONLY)) == errno.EISDIR
    fd = os.open(f"{mnt}/b/h", os.O_RDONLY)
    try:
        assert _errno(lambda: os.write(fd, b"x")) == errno.EBADF
    finally:
        os.close(fd)
    # O_TRUNC of a lower file: copied up empty
    fd = os.open(f"{mnt}/e/e2", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert open(f"{mnt}/e/e2", "rb").read() == b"new"
    # O_APPEND writes at the end whatever the offset
    fd = os.open(f"{mnt}/d/new", os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"tail\n")
    os.close(fd)
    assert open(f"{mnt}/d/new", "rb").read() == b"new\ntail\n"
    # O_CREAT|O_EXCL creates once
    fd = os.open(f"{mnt}/excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    assert stat.S_IMODE(os.stat(f"{mnt}/excl").st_mode) == 0o600
    assert _errno(lambda: os.open(f"{mnt}/excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST
    # O_RDWR read-after-write in the same fd
    fd = os.open(f"{mnt}/a/sub/g", os.O_RDWR)
    os.pwrite(fd, b"G", 0)
    assert os.pread(fd, 10, 0) == b"G\n"
    os.close(fd)


def test_times_change_on_write(mnt):
    before = os.stat(f"{mnt}/many/f5")
    with open(f"{mnt}/many/f5", "a") as f:
        f.write("x")
    after = os.stat(f"{mnt}/many/f5")
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    os.utime(f"{mnt}/many/f5", ns=(5, 7))
    st = os.stat(f"{mnt}/many/f5")
    assert (st.st_atime_ns, st.st_mtime_ns) == (5, 7)
    d0 = os.stat(f"{mnt}/many").st_mtime_ns
    open(f"{mnt}/many/newone", "w").close()
    assert os.stat(f"{mnt}/many").st_mtime_ns > d0


def test_mmap_read_and_write(mnt):
    with open(f"{mnt}/b/big", "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        data = m[:]
        m.close()
    assert data == open(f"{mnt}/b/big", "rb").read() and len(data) == (2 << 20) + 1000
    assert data[(1 << 20):(2 << 20)] == bytes(1 << 20)
    with open(f"{mnt}/many/f9", "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        m[0:1] = b"N"
        m.flush()
        m.close()
    assert open(f"{mnt}/many/f9", "rb").read() == b"N\n"


def test_sparse_files(mnt, fs_env):
    path = f"{mnt}/sparse"
    with open(path, "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
    st = os.stat(path)
    assert st.st_size == (64 << 20) + 3 and st.st_blocks * 512 < (1 << 20)
    with open(path, "rb") as f:
        f.seek(10 << 20)
        assert f.read(4096) == bytes(4096)
    os.truncate(path, 100 << 20)
    assert os.stat(path).st_size == 100 << 20
    # copy-up keeps a lower file's holes
    with open(f"{mnt}/b/big", "r+b") as f:
        f.seek(0, 2)
        f.write(b"!")
    assert os.stat(f"{mnt}/b/big").st_blocks * 512 < (2 << 20) + (512 << 10)


def test_long_and_unicode_names(mnt):
    name = "n" * 255
    open(f"{mnt}/{name}", "w").close()
    assert name in os.listdir(mnt)
    assert _errno(lambda: open(f"{mnt}/{'n' * 256}", "w")) == errno.ENAMETOOLONG
    for uname in ("\u00e9t\u00e9", "\u65e5\u672c\u8a9e", "emoji-\U0001f600", "tab\tname", "sp ace"):
        with open(f"{mnt}/{uname}", "w") as f:
            f.write(uname)
        assert open(f"{mnt}/{uname}").read() == uname
    raw = b"bad-\xff\xfe"
    with open(os.path.join(os.fsencode(mnt), raw), "wb") as f:
        f.write(b"raw")
    assert raw in os.listdir(os.fsencode(mnt))
    assert "\u65e5\u672c" in os.listdir(f"{mnt}/\u00fcnic\u00f8de")


def test_deep_tree(mnt):
    path = f"{mnt}/deep"
    rel = "/".join(f"d{i}" for i in range(120))
    os.makedirs(f"{path}/{rel}")
    with open(f"{path}/{rel}/leaf", "w") as f:
        f.write("leaf")
    assert open(f"{path}/{rel}/leaf").read() == "leaf"
    n = sum(len(dirs) for _, dirs, _ in os.walk(path))
    assert n == 120
    subprocess.run(["rm", "-rf", path], check=True)
    assert not os.path.exists(path)


def test_unlinked_open_file_stays_usable(mnt):
    path = f"{mnt}/a/f1"
    fd = os.open(path, os.O_RDWR)
    os.unlink(path)
    assert not os.path.exists(path)
    os.pwrite(fd, b"Z", 0)
    assert os.pread(fd, 3, 0)[:1] == b"Z"
    assert os.fstat(fd).st_nlink == 0
    os.ftruncate(fd, 1)
    assert os.fstat(fd).st_size == 1
    os.close(fd)
    fd = os.open(f"{mnt}/top", os.O_RDONLY)  # lower-only: reads go on after unlink
    os.unlink(f"{mnt}/top")
    assert os.pread(fd, 10, 0) == b"top\n"
    os.close(fd)


def test_rename_over_open_file_and_hardlink_counts(mnt):
    with open(f"{mnt}/r1", "w") as f:
        f.write("r1")
    with open(f"{mnt}/r2", "w") as f:
        f.write("r2")
    fd = os.open(f"{mnt}/r2", os.O_RDONLY)
    os.rename(f"{mnt}/r1", f"{mnt}/r2")
    assert os.pread(fd, 2, 0) == b"r2"
    os.close(fd)
    assert open(f"{mnt}/r2").read() == "r1"
    os.link(f"{mnt}/r2", f"{mnt}/r3")
    os.link(f"{mnt}/r2", f"{mnt}/b/r4")
    assert os.stat(f"{mnt}/r3").st_nlink == 3
    os.rename(f"{mnt}/r2", f"{mnt}/r3")  # same inode: nothing happens
    assert os.path.exists(f"{mnt}/r2") and os.stat(f"{mnt}/r3").st_nlink == 3
    os.unlink(f"{mnt}/r2")
    assert os.stat(f"{mnt}/b/r4").st_nlink == 2


def test_dir_link_counts_and_setgid(mnt):
    os.mkdir(f"{mnt}/nl")
    assert os.stat(f"{mnt}/nl").st_nlink == 2
    os.mkdir(f"{mnt}/nl/x")
    os.mkdir(f"{mnt}/nl/y")
    assert os.stat(f"{mnt}/nl").st_nlink == 4
    os.rmdir(f"{mnt}/nl/y")
    assert os.stat(f"{mnt}/nl").st_nlink == 3
    os.mkdir(f"{mnt}/sg")
    os.chown(f"{mnt}/sg", 0, 4242)
    os.chmod(f"{mnt}/sg", 0o2775)
    open(f"{mnt}/sg/f", "w").close()
    os.mkdir(f"{mnt}/sg/d")
    assert os.stat(f"{mnt}/sg/f").st_gid == 4242
    assert os.stat(f"{mnt}/sg/d").st_gid == 4242 and os.stat(f"{mnt}/sg/d").st_mode & stat.S_ISGID


def test_permissions_enforced_for_other_users(mnt):
    os.mkdir(f"{mnt}/private", 0o700)

    def as_nobody(fn) -> int:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.chdir(mnt)  # the test's tmp dirs above the mount are root-only
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                fn()
            except OSError as exc:
                code = exc.errno
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert as_nobody(lambda: os.listdir("private")) == errno.EACCES
    assert as_nobody(lambda: os.chmod("hl1", 0o777)) == errno.EPERM
    assert as_nobody(lambda: open("b/h", "ab")) == errno.EACCES
    assert as_nobody(lambda: os.unlink("b/h")) == errno.EACCES
    assert as_nobody(lambda: open("b/h", "rb").read()) == 0
    assert as_nobody(lambda: open("sticky/mine", "w").write("x")) == 0
    assert os.stat(f"{mnt}/sticky/mine").st_uid == 65534


def test_fsync_fallocate_statfs(mnt):
    fd = os.open(f"{mnt}/fs", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"data")
    os.fsync(fd)
    os.fdatasync(fd)
    os.posix_fallocate(fd, 0, 1 << 20)  # pyfuse3 has no fallocate: glibc writes zeros instead
    assert os.fstat(fd).st_size == 1 << 20
    os.close(fd)
    sv = os.statvfs(mnt)
    assert sv.f_blocks > 0 and sv.f_namemax >= 255


def test_concurrent_readers_and_writers(mnt):
    """100 threads at once: 50 readers of lower files, 50 writers."""
    expect = {p: hashlib.sha256(open(f"{mnt}/{p}", "rb").read()).hexdigest() for p in ("b/big", "b/h", "many/f7")}
    os.mkdir(f"{mnt}/conc")
    errors = []

    def reader(i: int) -> None:
        try:
            for _ in range(5):
                for p, h in expect.items():
                    with open(f"{mnt}/{p}", "rb") as f:
                        assert hashlib.sha256(f.read()).hexdigest() == h
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def writer(i: int) -> None:
        try:
            path = f"{mnt}/conc/w{i}"
            for j in range(20):
                with open(path, "a") as f:
                    f.write(f"{i}:{j}\n")
            os.rename(path, f"{path}.done")
            os.mkdir(f"{mnt}/conc/d{i}")
            open(f"{mnt}/many/f{i % 50 + 1}", "ab").close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(50)]
    threads += [threading.Thread(target=writer, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    names = sorted(os.listdir(f"{mnt}/conc"))
    assert len(names) == 100
    for i in range(50):
        assert open(f"{mnt}/conc/w{i}.done").read().count("\n") == 20
    assert os.stat(f"{mnt}/conc").st_nlink == 52


def test_enospc_is_passed_through(fs_env, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"),
                           upper=str(small / "up")) as h:
            with pytest.raises(OSError) as exc:
                with open(f"{h.mountpoint}/fill", "wb") as f:
                    for _ in range(8):
                        f.write(os.urandom(1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
            assert exc.value.errno == errno.ENOSPC
    finally:
        subprocess.run(["umount", "-l", str(small)])
