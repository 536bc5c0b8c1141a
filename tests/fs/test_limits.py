"""Name and path limits (issue 9 items 4 and 5), kernel overlayfs as the oracle.

* a name of 255 bytes works everywhere, a longer one is ENAMETOOLONG in
  every operation that takes a name (FUSE passes up to 1024 bytes to the
  daemon, the kernel refuses longer ones itself);
* a 0:0 character device is refused with EPERM (it would read back as a
  whiteout), but only after the name's length and existence checks;
* a tree far deeper than PATH_MAX, reached step by step with ``*at``
  calls (each argument a short relative path), works as on ext4: the
  daemon must not need the full path of an upper file either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess

import pytest

from tests.fs.conftest import fresh_upper, kernel_overlay, layerfs_mount, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]

NAME_MAX = 255


@contextlib.contextmanager
def _both(env: dict, base, upper_l: str | None = None, upper_k: str | None = None):
    """(kernel overlay mountpoint, layerfs mountpoint), each over its own upper."""
    ku = upper_k or fresh_upper(str(base / "ku"), like=env["lowers"][-1])
    lu = upper_l or str(base / "lu")
    with kernel_overlay(env["lowers"], ku, str(base / "kw"), str(base / "km")) as km, \
            layerfs_mount(env["root"], env["image"], str(base / "lm"), upper=lu) as h:
        yield km, h.mountpoint


def _result(fn) -> tuple:
    try:
        value = fn()
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))
    return ("ok", value)


def _name_ops(root: str, name: str) -> list[tuple]:
    """Every operation that takes *name*, in an order where each one
    could succeed for a short name."""
    p = os.path.join(root, name)

    def create() -> None:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))

    def lookup() -> tuple:
        st = os.lstat(p)
        return stat.S_IFMT(st.st_mode), st.st_size

    steps = [
        ("lookup", lookup),
        ("create", create),
        ("lookup", lookup),
        ("mknod-0:0-exists", lambda: os.mknod(p, stat.S_IFCHR | 0o600, 0)),
        ("rename-from", lambda: os.rename(p, os.path.join(root, "renamed"))),
        ("rename-to", lambda: os.rename(os.path.join(root, "renamed"), p)),
        ("unlink", lambda: os.unlink(p)),
        ("link-to", lambda: os.link(os.path.join(root, "top"), p)),
        ("unlink", lambda: os.unlink(p)),
        ("mkdir", lambda: os.mkdir(p, 0o755)),
        ("create-in", lambda: open(os.path.join(p, "inside"), "w").close()),
        ("unlink-in", lambda: os.unlink(os.path.join(p, "inside"))),
        ("rmdir", lambda: os.rmdir(p)),
        ("symlink", lambda: os.symlink("top", p)),
        ("readlink", lambda: os.readlink(p)),
        ("unlink", lambda: os.unlink(p)),
        ("mknod-fifo", lambda: os.mknod(p, stat.S_IFIFO | 0o644)),
        ("unlink", lambda: os.unlink(p)),
        ("mknod-0:0", lambda: os.mknod(p, stat.S_IFCHR | 0o600, 0)),
        ("rename-over", lambda: os.rename(os.path.join(root, "hl1"), p)),
        ("lookup", lookup),
        ("rename-back", lambda: os.rename(p, os.path.join(root, "hl1"))),
    ]
    return [(label, _result(fn)) for label, fn in steps]


@pytest.mark.parametrize("length", [NAME_MAX, NAME_MAX + 1, 1000, 1100])
def test_name_length(fs_env, tmp_path, length):
    name = ("n" * length)
    with _both(fs_env, tmp_path) as (km, lm):
        want = _name_ops(km, name)
        got = _name_ops(lm, name)
    assert got == want
    if length > NAME_MAX:
        # (rename-to: its source, "renamed", was never made: ENOENT first)
        assert {r for label, r in want if label != "rename-to"} == {("err", "ENAMETOOLONG")}
    else:
        assert all(r[0] == "ok" for label, r in want if not label.startswith(("mknod-0", "lookup")))
        assert dict(want)["mknod-0:0"] == ("err", "EPERM")
        assert dict(want)["mknod-0:0-exists"] == ("err", "EEXIST")


# -- deep trees --------------------------------------------------------------------------
DIR = "d" * 250
FILE = "f" * 100
LEVELS = 20             # 20 * 251 bytes: a path of 5 kB, past PATH_MAX (4096)


def _descend(root: str, levels: int, make: bool) -> int:
    """A dir fd *levels* deep, reached (and made if *make*) one level at a time."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        if make:
            os.mkdir(DIR, 0o755, dir_fd=fd)
        nfd = os.open(DIR, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _deep_ops(root: str, make: bool) -> list[tuple]:
    fd = _descend(root, LEVELS, make)
    try:
        def write() -> int:
            f = os.open(FILE, os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o640, dir_fd=fd)
            try:
                return os.write(f, b"deep\n")
            finally:
                os.close(f)

        def read(name: str) -> bytes:
            f = os.open(name, os.O_RDONLY, dir_fd=fd)
            try:
                return os.read(f, 1000)
            finally:
                os.close(f)

        def meta(name: str) -> tuple:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_nlink

        def xattr() -> bytes:
            f = os.open(FILE, os.O_RDONLY, dir_fd=fd)
            try:
                os.setxattr(f, "user.deep", b"1")
                return os.getxattr(f, "user.deep")
            finally:
                os.close(f)

        def truncate() -> bytes:
            f = os.open(FILE, os.O_WRONLY | os.O_TRUNC, dir_fd=fd)
            os.close(f)
            return read(FILE)

        steps = [
            ("write", write), ("write", write), ("read", lambda: read(FILE)), ("meta", lambda: meta(FILE)),
            ("chmod", lambda: os.chmod(FILE, 0o600, dir_fd=fd)),
            ("chown", lambda: os.chown(FILE, 7, 8, dir_fd=fd, follow_symlinks=False)),
            ("utime", lambda: os.utime(FILE, ns=(10**18, 10**18), dir_fd=fd, follow_symlinks=False)),
            ("mtime", lambda: os.stat(FILE, dir_fd=fd).st_mtime_ns),
            ("xattr", xattr),
            ("symlink", lambda: os.symlink(FILE, "s", dir_fd=fd)),
            ("readlink", lambda: os.readlink("s", dir_fd=fd)),
            ("link", lambda: os.link(FILE, "hard", src_dir_fd=fd, dst_dir_fd=fd)),
            ("meta", lambda: meta("hard")),
            ("mkfifo", lambda: os.mkfifo("fifo", 0o600, dir_fd=fd)),
            ("mkdir", lambda: os.mkdir("sub", 0o700, dir_fd=fd)),
            ("rename", lambda: os.rename("hard", "sub/hard2", src_dir_fd=fd, dst_dir_fd=fd)),
            ("listdir", lambda: sorted(os.listdir(fd))),
            ("meta", lambda: meta(FILE)),
            ("truncate", truncate),
            ("write", write),
            ("unlink", lambda: os.unlink("fifo", dir_fd=fd)),
            ("rmdir-full", lambda: os.rmdir("sub", dir_fd=fd)),
            ("listdir", lambda: sorted(os.listdir(fd))),
        ]
        return [(label, _result(fn)) for label, fn in steps]
    finally:
        os.close(fd)


def _remove_deep(root: str) -> list[tuple]:
    """rm -r of the deep tree, bottom up, with dir fds only."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    for _ in range(LEVELS):
        fds.append(os.open(DIR, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    out = []
    try:
        for fd in reversed(fds[1:]):
            for name in sorted(os.listdir(fd)):
                if name == "sub":
                    out.append(_result(lambda: os.unlink("hard2", dir_fd=os.open("sub", os.O_RDONLY, dir_fd=fd))))
                    out.append(_result(lambda: os.rmdir("sub", dir_fd=fd)))
                elif name != DIR:
                    out.append(_result(lambda: os.unlink(name, dir_fd=fd)))
        for parent, fd in zip(reversed(fds[:-1]), reversed(fds[1:])):
            os.close(fd)
            out.append(_result(lambda: os.rmdir(DIR, dir_fd=parent)))
    finally:
        os.close(fds[0])
    return out


def _shell_repro(root: str) -> tuple:
    """The issue's repro, as a shell would do it: cd one level at a time."""
    script = ("set -e; cd \"$1\"; for i in $(seq 16); do mkdir $(printf 'q%.0s' $(seq 250)); cd q*; done; "
              "touch $(printf 'f%.0s' $(seq 100)); echo hi > x; cat x; ls | wc -l")
    proc = subprocess.run(["bash", "-c", script, "-", root], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_paths_past_path_max(fs_env, tmp_path):
    lu = str(tmp_path / "lu")
    ku = fresh_upper(str(tmp_path / "ku"), like=fs_env["lowers"][-1])
    with _both(fs_env, tmp_path, lu, ku) as (km, lm):
        want = _deep_ops(km, make=True)
        got = _deep_ops(lm, make=True)
        assert got == want
        assert all(r[0] == "ok" for label, r in want if label != "rmdir-full"), want
        assert _shell_repro(lm) == _shell_repro(km) == (0, "hi\n2\n", "")
    # Remounted, the deep upper dirs are found again (listed, changed, removed).
    with _both(fs_env, tmp_path, lu, ku) as (km, lm):
        fds = [_descend(root, LEVELS, make=False) for root in (km, lm)]
        try:
            want, got = (sorted(os.listdir(fd)) for fd in fds)
            assert got == want and FILE in want
            for fd in fds:
                os.mkdir("after", 0o711, dir_fd=fd)
                os.rename(FILE, "after/moved", src_dir_fd=fd, dst_dir_fd=fd)
            want, got = (sorted(os.listdir(os.open("after", os.O_RDONLY, dir_fd=fd))) for fd in fds)
            assert got == want == ["moved"]
        finally:
            for fd in fds:
                os.close(fd)
        assert _remove_deep(lm) == _remove_deep(km)
        assert sorted(os.listdir(lm)) == sorted(os.listdir(km))
