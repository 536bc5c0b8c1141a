"""Differential tests: kernel overlayfs is the oracle.

The same operations run in lockstep on a kernel overlay mount (lowerdirs
extracted from the image's layers, a fresh upper; ``index=on`` so hardlinks
survive copy-up and ``redirect_dir=on`` so directories may move, the
semantics layerfs implements) and on a layerfs mount of the same image.
Every operation must give the same result or errno, and at the end both
trees must be equal: content, type, mode, owner, xattrs, link targets,
hardlink groups, and mtimes of everything the operations did not touch.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.fs.upper import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from tests.fs.conftest import fresh_upper, kernel_overlay, layerfs_mount, needs_fuse
from tests.fs.test_kernel_backend import KERNEL_SKIP
from tests.treeutil import describe

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]

PATHS = ["a", "a/f1", "a/sub", "a/sub/g", "a/sub/k", "a/hl3", "b", "b/h", "b/big", "c", "d", "d/new",
         "e", "e/e2", "hl1", "hl2", "link1", "dangling", "fifo1", "xf", "sticky", "suid", "many",
         "many/f3", "top", "n1", "a/n2", "b/n3", "d/n4", "a/sub/n5", "nd", "nd/x", "c/x"]


def apply(root: str, op: tuple):
    """Run one operation under *root*; returns ("ok", value) or ("err", errno)."""
    kind, *args = op
    p = lambda rel: os.path.join(root, rel)  # noqa: E731
    try:
        if kind == "write":
            rel, data, how, off = args
            flags = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     "r+": os.O_RDWR, "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL}[how]
            fd = os.open(p(rel), flags | os.O_NONBLOCK, 0o640)
            try:
                if how == "r+":
                    os.pwrite(fd, data, off)
                else:
                    os.write(fd, data)
            finally:
                os.close(fd)
            return ("ok", None)
        if kind == "read":
            # O_NONBLOCK: a FIFO (fifo1, or one an op made) opens at once and
            # reads as empty instead of blocking the test for ever.
            fd = os.open(p(args[0]), os.O_RDONLY | os.O_NONBLOCK)
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                return ("ok", b"".join(chunks))
            finally:
                os.close(fd)
        if kind == "truncate":
            os.truncate(p(args[0]), args[1])
        elif kind == "mkdir":
            os.mkdir(p(args[0]), args[1])
        elif kind == "rmdir":
            os.rmdir(p(args[0]))
        elif kind == "unlink":
            os.unlink(p(args[0]))
        elif kind == "rename":
            renameat2(os.fsencode(p(args[0])), os.fsencode(p(args[1])), args[2])
        elif kind == "symlink":
            os.symlink(args[0], p(args[1]))
        elif kind == "link":
            os.link(p(args[0]), p(args[1]), follow_symlinks=False)
        elif kind == "chmod":
            os.chmod(p(args[0]), args[1])
        elif kind == "chown":
            os.chown(p(args[0]), args[1], args[2], follow_symlinks=False)
        elif kind == "utime":
            os.utime(p(args[0]), ns=(args[1], args[1]), follow_symlinks=False)
        elif kind == "setxattr":
            os.setxattr(p(args[0]), args[1], args[2], follow_symlinks=False)
        elif kind == "removexattr":
            os.removexattr(p(args[0]), args[1], follow_symlinks=False)
        elif kind == "getxattr":
            return ("ok", os.getxattr(p(args[0]), args[1], follow_symlinks=False))
        elif kind == "listxattr":
            return ("ok", sorted(os.listxattr(p(args[0]), follow_symlinks=False)))
        elif kind == "mkfifo":
            os.mkfifo(p(args[0]), 0o644)
        elif kind == "listdir":
            return ("ok", sorted(os.listdir(p(args[0]))))
        elif kind == "stat":
            s = os.lstat(p(args[0]))
            fmt = stat.S_IFMT(s.st_mode)
            return ("ok", (fmt, stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                           0 if fmt == stat.S_IFDIR else s.st_size, 0 if fmt == stat.S_IFDIR else s.st_nlink))
        elif kind == "readlink":
            return ("ok", os.readlink(p(args[0])))
        elif kind == "rmtree":
            if stat.S_ISFIFO(os.lstat(p(args[0])).st_mode):
                # shutil.rmtree open(2)s its argument before it looks at
                # it: on a FIFO that blocks for ever. Give its answer for
                # any other non-directory instead.
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            shutil.rmtree(p(args[0]))
        else:
            raise AssertionError(kind)
        return ("ok", None)
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def normalized(root: str, since_ns: int) -> dict:
    out = {}
    for path, fields in describe(root).items():
        fields = list(fields)
        fields[4] = "new" if fields[4] >= since_ns else fields[4]
        out[path] = tuple(fields)
    return out


@pytest.fixture(params=["fuse", "kernel"])
def backend(request) -> str:
    """Every differential test runs against both layerfs backends."""
    if request.param == "kernel" and KERNEL_SKIP:
        pytest.skip(KERNEL_SKIP)
    return request.param


def run_both(env: dict, ops: list[tuple], backend: str = "fuse") -> None:
    work = tempfile.mkdtemp(dir=env["base"], prefix="diff-")
    try:
        since = time.time_ns() - 1_000_000_000
        kupper = fresh_upper(os.path.join(work, "ku"), like=env["lowers"][-1])
        with kernel_overlay(env["lowers"], kupper, os.path.join(work, "kw"), os.path.join(work, "km"),
                            backend) as km, \
                layerfs_mount(env["root"], env["image"], os.path.join(work, "lm"),
                              upper=os.path.join(work, "lu"), backend=backend) as h:
            lm = h.mountpoint
            for i, op in enumerate(ops):
                want, got = apply(km, op), apply(lm, op)
                assert got == want, f"op {i} {op!r}: kernel {want!r}, layerfs {got!r}"
            want, got = normalized(km, since), normalized(lm, since)
            assert sorted(got) == sorted(want)
            for path in want:
                assert got[path] == want[path], path
    finally:
        shutil.rmtree(work, ignore_errors=True)


SCRIPT = [
    ("read", "a/f1"), ("stat", "hl2"), ("listdir", ""), ("listdir", "a/sub"), ("listdir", "d"), ("listdir", "e"),
    ("write", "a/f1", b"X", "r+", 1), ("read", "a/f1"),
    ("write", "hl1", b"more\n", "a", 0), ("read", "a/hl3"), ("stat", "hl2"),
    ("unlink", "hl2"), ("stat", "hl1"),
    ("write", "b/big", b"mid", "r+", 1 << 20), ("truncate", "b/h", 5), ("read", "b/h"),
    ("mkdir", "a/sub/deep", 0o755), ("listdir", "a/sub/deep"),            # over a lower whiteout
    ("rename", "a/sub", "moved", 0), ("listdir", "moved"), ("rename", "moved", "a/sub", 0),
    ("rename", "d", "e", 0), ("rmdir", "many"), ("rmtree", "many"), ("mkdir", "many", 0o700), ("listdir", "many"),
    ("rename", "top", "a/f1", RENAME_NOREPLACE), ("rename", "top", "a/f1", RENAME_EXCHANGE), ("read", "top"),
    ("rename", "b", "c", RENAME_EXCHANGE), ("listdir", "c"), ("read", "b"),
    ("rename", "xf", "n1", 0), ("getxattr", "n1", "user.k"), ("listxattr", "n1"),
    ("setxattr", "link1", "trusted.lnk", b"1"), ("setxattr", "a/f1", "user.z", b"zz"), ("removexattr", "n1", "user.k"),
    ("chmod", "suid", 0o755), ("chown", "sticky", 5, 6), ("utime", "dangling", 1_500_000_000_000_000_000),
    ("symlink", "../top", "a/n2"), ("readlink", "a/n2"), ("link", "a/sub/g", "d/n4"), ("link", "a/sub/g", "d/n4"),
    ("mkfifo", "a/sub/n5"), ("unlink", "a/sub"), ("rmdir", "a/sub"), ("unlink", "nope"), ("mkdir", "a", 0o755),
    ("write", "nd/x", b"x", "w", 0), ("write", "a/f1", b"", "x", 0), ("write", "c", b"", "w", 0),
    ("rename", "a", "a/sub/inside", 0), ("rmtree", "a"), ("listdir", ""),
]


def test_scripted_sequence(fs_env, backend):
    run_both(fs_env, SCRIPT, backend)


_path = st.sampled_from(PATHS)
_ops = st.one_of(
    st.tuples(st.just("write"), _path, st.binary(max_size=40), st.sampled_from(["w", "a", "r+", "x"]),
              st.sampled_from([0, 3, 100])),
    st.tuples(st.just("read"), _path),
    st.tuples(st.just("truncate"), _path, st.sampled_from([0, 2, 5000])),
    st.tuples(st.just("mkdir"), _path, st.sampled_from([0o755, 0o700, 0o1777])),
    st.tuples(st.just("rmdir"), _path),
    st.tuples(st.just("unlink"), _path),
    st.tuples(st.just("rename"), _path, _path, st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])),
    st.tuples(st.just("symlink"), st.sampled_from(["a/f1", "../x", "top"]), _path),
    st.tuples(st.just("link"), _path, _path),
    st.tuples(st.just("chmod"), _path, st.sampled_from([0o600, 0o4755, 0o2775, 0o1777])),
    st.tuples(st.just("chown"), _path, st.sampled_from([0, 7, 1000]), st.sampled_from([0, 8])),
    st.tuples(st.just("utime"), _path, st.sampled_from([1_400_000_000_000_000_000, 1_500_000_000_123_456_789])),
    st.tuples(st.just("setxattr"), _path, st.sampled_from(["user.k", "user.new", "trusted.t"]), st.binary(max_size=8)),
    st.tuples(st.just("removexattr"), _path, st.sampled_from(["user.k", "trusted.t"])),
    st.tuples(st.just("mkfifo"), _path),
    st.tuples(st.just("listdir"), _path),
    st.tuples(st.just("stat"), _path),
    st.tuples(st.just("rmtree"), _path),
)


@settings(max_examples=int(os.environ.get("LAYERFS_DIFF_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(st.lists(_ops, min_size=1, max_size=14))
def test_random_sequences(fs_env, backend, ops):
    run_both(fs_env, ops, backend)
