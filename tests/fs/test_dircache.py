"""Directory listings through a real mount, with the kernel caching them
(fs/lowlevel.py: OPENDIR answered ENOSYS, READDIR by inode) and without
(``LAYERFS_DIR_CACHE=off``: the daemon opens directories itself)."""

from __future__ import annotations

import ctypes
import os

import pytest

from tests.fs.conftest import daemon_requests, layerfs_mount, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]


@pytest.fixture(params=["cached", "off"])
def listing_mode(request, monkeypatch):
    """Mounts made in the test: with the kernel's cache of listings, or the
    daemon's own OPENDIR (the path taken where the C module is missing)."""
    if request.param == "off":
        monkeypatch.setenv("LAYERFS_DIR_CACHE", "off")
    return request.param


def _cached(handle) -> bool:
    with open(handle.log) as f:
        lines = [line for line in f if f" {handle.pid} " in line and "directory listings cached" in line]
    assert lines, "the daemon did not say whether the kernel caches listings"
    return "listings cached by the kernel: True" in lines[-1]


def _walk(top: str) -> dict[str, list[str]]:
    return {os.path.relpath(d, top): sorted(dirs + files) for d, dirs, files in os.walk(top)}


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


class _Dir:
    """A directory stream of libc's, read an entry at a time: readdir(3)
    with telldir/seekdir, as a program sees it (getdents in pieces)."""

    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]

    def __init__(self, path: str) -> None:
        self.d = self.libc.opendir(os.fsencode(path))
        assert self.d, os.strerror(ctypes.get_errno())

    def next(self) -> bytes | None:
        while True:
            ent = self.libc.readdir(self.d)
            if not ent:
                return None
            name = ent.contents.d_name
            if name not in (b".", b".."):
                return name

    def rest(self) -> list[bytes]:
        out = []
        while (name := self.next()) is not None:
            out.append(name)
        return out

    def tell(self) -> int:
        return self.libc.telldir(self.d)

    def seek(self, pos: int) -> None:
        self.libc.seekdir(self.d, pos)

    def close(self) -> None:
        self.libc.closedir(self.d)


def test_a_second_walk_is_answered_by_the_kernel(fs_env, tmp_path, listing_mode):
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), read_only=True) as h:
        assert _cached(h) == (listing_mode == "cached")
        first = _walk(h.mountpoint)
        before = daemon_requests(h)
        assert _walk(h.mountpoint) == first
        after = daemon_requests(h)
    assert "many" in first["."] and len(first["many"]) == 60
    if listing_mode == "cached":
        assert "opendir" not in after and "releasedir" not in after
        assert after.get("readdir") == before.get("readdir")  # not one READDIR for the second walk
    else:
        assert after["opendir"] > before["opendir"]


def _changes(m: str) -> None:
    """Every kind of change to the entries of a lower-only dir ("a", its
    first change copies it up) and of one made in the upper ("new")."""
    open(f"{m}/a/made", "w").close()
    os.mkdir(f"{m}/a/newdir")
    os.symlink("f1", f"{m}/a/sl")
    os.link(f"{m}/top", f"{m}/a/top2")
    os.unlink(f"{m}/a/hl3")
    os.rename(f"{m}/a/f1", f"{m}/a/f1b")
    os.rename(f"{m}/xf", f"{m}/a/xf")
    os.rename(f"{m}/a/sub", f"{m}/sub")
    os.mkdir(f"{m}/new")
    for i in range(5):
        open(f"{m}/new/{i}", "w").close()
    os.unlink(f"{m}/new/3")
    os.rename(f"{m}/new/0", f"{m}/new/9")


def test_every_change_shows_in_the_next_listing(fs_env, tmp_path, listing_mode):
    """Listed (and so cached by the kernel) before each change and after
    it: the listing follows every change, and matches a fresh mount's."""
    up = str(tmp_path / "up")
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), upper=up) as h:
        m = h.mountpoint
        before = _walk(m)
        assert before["a"] == ["f1", "hl3", "sub"]
        _changes(m)
        walked = _walk(m)
        assert walked["a"] == ["f1b", "made", "newdir", "sl", "top2", "xf"]
        assert "sub" in walked["."] and "xf" not in walked["."] and "new" in walked["."]
        assert walked["new"] == ["1", "2", "4", "9"]
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt2"), upper=up) as h:
        assert _walk(h.mountpoint) == walked


def test_one_change_at_a_time_shows_through_a_warm_listing(fs_env, tmp_path, listing_mode):
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), upper=str(tmp_path / "up")) as h:
        m = h.mountpoint
        want = set(os.listdir(f"{m}/many"))
        for i in range(20):
            os.listdir(f"{m}/many")  # warm
            if i % 2:
                os.unlink(f"{m}/many/f{i}")
                want.discard(f"f{i}")
            else:
                open(f"{m}/many/n{i}", "w").close()
                want.add(f"n{i}")
            assert set(os.listdir(f"{m}/many")) == want, i


def test_a_listing_read_while_its_entries_go_keeps_every_other_once(fs_env, tmp_path, listing_mode):
    """A listing read an entry at a time (the kernel fetches it in pieces
    of a few KiB) while entries are removed and made: each entry that
    stays is seen exactly once, and nothing is seen that never was there,
    as on a disk filesystem (rm -rf's pattern). (One removed may still be
    seen: libc reads ahead in 32 KiB getdents, as POSIX allows.)"""
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), upper=str(tmp_path / "up")) as h:
        d = f"{h.mountpoint}/many"
        names = [f"{'n' * 200}{i:04d}" for i in range(300)]  # long names: many READDIRs
        for n in names:
            open(f"{d}/{n}", "w").close()
        assert len(os.listdir(d)) == 360  # (now in the kernel's cache, for the mode that caches)
        open(f"{d}/made", "w").close()  # a change: the cache is read again from the daemon
        everything = {*names, *(f"f{i}" for i in range(60)), "made"}  # (not listed: that would cache it again)
        stream = _Dir(d)
        got = [stream.next() for _ in range(100)]
        removed = set()
        for n in sorted(everything)[::3]:  # some read already, most not yet
            os.unlink(f"{d}/{n}")
            removed.add(os.fsencode(n))
        for i in range(10):
            open(f"{d}/late{i}", "w").close()
        got += stream.rest()
        stream.close()
    assert len(got) == len(set(got)), "an entry was listed twice"
    stayed = {os.fsencode(n) for n in everything} - removed
    assert stayed <= set(got), "an entry that stayed was skipped"
    late = {b"late%d" % i for i in range(10)}
    assert set(got) <= stayed | late | removed


def test_seekdir_goes_back_to_where_telldir_was(fs_env, tmp_path, listing_mode):
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), upper=str(tmp_path / "up")) as h:
        m = h.mountpoint
        os.mkdir(f"{m}/up")
        for i in range(200):
            open(f"{m}/up/{'x' * 150}{i}", "w").close()
        for d in (f"{m}/many", f"{m}/up"):  # a lower-only dir, one in the upper
            stream = _Dir(d)
            head = [stream.next() for _ in range(37)]
            pos = stream.tell()
            rest = stream.rest()
            stream.seek(pos)
            assert stream.rest() == rest
            stream.seek(0)
            assert stream.rest() == head + rest
            stream.close()
            assert sorted(head + rest) == sorted(os.fsencode(n) for n in os.listdir(d))
