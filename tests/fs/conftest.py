"""Fixtures for real FUSE mounts: a layered test image, layerfs and kernel
overlayfs mounts of it, always unmounted again (daemons killed by pid)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time

import pytest

from layerfs.fs import mount as fsmount
from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.store import Store
from tests import capabilities

FUSE_SKIP = capabilities.fuse()
needs_fuse = pytest.mark.fuse

T0 = 1_600_000_000  # a fixed, old mtime for every lower node


# -- building layered images -------------------------------------------------
def _touch(path: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _whiteout(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, stat.S_IFCHR, 0)


def _opaque(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    os.setxattr(path, "trusted.overlay.opaque", b"y")


def _fix_times(root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (T0, T0), follow_symlinks=False)
    os.utime(root, (T0, T0))


def build_layers(base: str) -> list[str]:
    """Three overlay-format layer dirs exercising every kind and rule."""
    l0, l1, l2 = (os.path.join(base, f"layer{i}") for i in range(3))
    _touch(f"{l0}/a/f1", b"one\n")
    _touch(f"{l0}/a/f2", b"two\n", 0o600, 1000, 1000)
    _touch(f"{l0}/a/sub/g", b"g\n")
    _touch(f"{l0}/a/sub/deep/x/y/z", b"z\n")
    _touch(f"{l0}/b/h", b"compressible line\n" * 2000)
    rnd = os.urandom(1 << 20)
    _touch(f"{l0}/b/big", rnd + bytes(1 << 20) + rnd[:1000])  # raw, with a hole
    os.makedirs(f"{l0}/c")
    _touch(f"{l0}/hl1", b"hard\n")
    os.link(f"{l0}/hl1", f"{l0}/hl2")
    os.link(f"{l0}/hl1", f"{l0}/a/hl3")
    os.symlink("a/f1", f"{l0}/link1")
    os.symlink("nowhere", f"{l0}/dangling")
    os.mkfifo(f"{l0}/fifo1")
    os.mknod(f"{l0}/dev1", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    _touch(f"{l0}/xf", b"x\n")
    os.setxattr(f"{l0}/xf", "user.k", b"v")
    os.setxattr(f"{l0}/xf", "trusted.t", b"1")
    os.makedirs(f"{l0}/sticky")
    os.chmod(f"{l0}/sticky", 0o1777)
    _touch(f"{l0}/suid", b"#!/bin/sh\n", 0o4755)
    _touch(f"{l0}/d/old", b"old\n")
    _touch(f"{l0}/many/f0", b"")
    for i in range(1, 60):
        _touch(f"{l0}/many/f{i}", b"%d\n" % i)
    _touch(f"{l0}/\u00fcnic\u00f8de/\u65e5\u672c", b"unicode\n")
    # layer 1: an overwrite, a whiteout, an opaque dir, a new tree
    _touch(f"{l1}/a/f1", b"one v2\n")
    _whiteout(f"{l1}/a/f2")
    _opaque(f"{l1}/d")
    _touch(f"{l1}/d/new", b"new\n")
    _touch(f"{l1}/e/e1", b"e1\n", 0o640, 33, 33)
    # layer 2: a whiteout of a deep dir, a file over a dir, an opaque dir
    _whiteout(f"{l2}/a/sub/deep")
    _touch(f"{l2}/a/sub/k", b"k\n")
    _touch(f"{l2}/c", b"c is a file now\n")
    _opaque(f"{l2}/e")
    _touch(f"{l2}/e/e2", b"e2\n")
    _touch(f"{l2}/top", b"top\n")
    for layer in (l0, l1, l2):
        _fix_times(layer)
    return [l0, l1, l2]


def make_image(store: Store, layer_dirs: list[str], tag: str):
    lids = [transfer.import_layer(store, d, as_layer=True) for d in layer_dirs]
    image = store.put_image(img.new_config(lids))
    store.tag(image.id, tag)
    return image


@contextlib.contextmanager
def tmpfs(path: str):
    """A tmpfs mounted at *path* for the duration (a backing filesystem
    without RWF_NOWAIT reads, unlike ext4)."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "layerfs-test", path], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


def _build_env(base) -> dict:
    root = str(base / "store")
    with Store(root) as store:
        image = make_image(store, build_layers(str(base / "src")), "fstest:latest")
        lowers = []
        for i, lid in enumerate(image.layers):
            d = str(base / f"lower{i}")
            transfer.extract_layer(store, lid, d)
            lowers.append(d)
    return {"root": root, "image": "fstest:latest", "image_id": image.id, "lowers": lowers, "base": base}


@pytest.fixture(scope="session")
def fs_env(tmp_path_factory):
    """A store holding the three-layer test image, shared by the session."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    return _build_env(tmp_path_factory.mktemp("fsenv"))


@pytest.fixture(scope="session")
def fs_env_tmpfs(tmp_path_factory):
    """fs_env with the store, the lower dirs and every upper on a tmpfs."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    base = tmp_path_factory.mktemp("fsenv-tmpfs")
    with tmpfs(str(base)):
        yield _build_env(base)


# -- mounting ------------------------------------------------------------------
def _kill_daemon(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def layerfs_mount(root: str, image: str, mp: str, upper: str | None = None, read_only: bool = False,
                  backend: str = "fuse"):
    os.makedirs(mp, exist_ok=True)
    handle = fsmount.mount_image(root, image, mp, upper_dir=upper, read_only=read_only, backend=backend)
    try:
        yield handle
    finally:
        try:
            fsmount.unmount(root, mp, timeout=20)
        finally:
            if fsmount.mounted_fstype(mp) is not None:
                _kill_daemon(handle.pid)
                subprocess.run(["umount", "-l", mp], capture_output=True)


def daemon_requests(handle) -> dict[str, int]:
    """The daemon's request counts (it logs them on SIGUSR1)."""
    start = os.path.getsize(handle.log)
    os.kill(handle.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(handle.log) as f:
            f.seek(start)
            for line in f:
                if " requests {" in line:
                    return json.loads(line[line.index(" requests {") + 10:])
        time.sleep(0.05)
    raise AssertionError("the daemon logged no request counts")


def flip_byte(path: str, offset: int) -> None:
    """Damage *path* in place: the byte at *offset* inverted (never a no-op,
    as writing a fixed byte into random content is one time in 256)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def big_file_image(tmp_path, size: int):
    """A store at tmp_path/store with one image holding only d/big, *size*
    random bytes: (root, image, content, path of its object file)."""
    import blake3

    src = tmp_path / "src"
    os.makedirs(src / "d")
    content = os.urandom(size)
    (src / "d" / "big").write_bytes(content)
    root = str(tmp_path / "store")
    with Store(root) as store:
        lid = transfer.import_layer(store, str(src), as_layer=True)
        image = store.put_image(img.new_config([lid]))
        path, _ = store.objects.locate(blake3.blake3(content).hexdigest())
    return root, image, content, path


def fresh_upper(path: str, like: str | None = None) -> str:
    """An empty upper dir whose root looks like the lower root *like*."""
    os.makedirs(path)
    if like is not None:
        st = os.lstat(like)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        os.utime(path, ns=(st.st_mtime_ns, st.st_mtime_ns))
    return path


# The oracle's options for each layerfs backend. The FUSE daemon keeps
# hardlinks across copy-up and moves directories (index=on, redirect_dir=on
# semantics, with a self-contained upper); the kernel backend mounts like
# docker's overlay2 (no index, no redirects: links break on copy-up,
# renaming a merged directory is EXDEV) so its upper stays importable.
ORACLE_OPTIONS = {"fuse": "index=on,redirect_dir=on", "kernel": "index=off,redirect_dir=off,xino=off"}


@contextlib.contextmanager
def kernel_overlay(lowers: list[str], upper: str, work: str, mp: str, backend: str = "fuse"):
    os.makedirs(work, exist_ok=True)
    os.makedirs(mp, exist_ok=True)
    opts = f"lowerdir={':'.join(reversed(lowers))},upperdir={upper},workdir={work},{ORACLE_OPTIONS[backend]}"
    # Mounting the same upper again right after an umount is refused now
    # and then for a moment ("upperdir is in-use") while the old mount's
    # last reference goes away (seen on a machine busy with other mounts);
    # that is the oracle's hiccup, not a result.
    for _ in range(600):
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mp], capture_output=True)
        if r.returncode == 0 or not (b"busy" in r.stderr or b"already mounted" in r.stderr):
            break
        time.sleep(0.05)
    assert r.returncode == 0, f"kernel overlay mount of {upper}: {r.stderr.decode()}"
    try:
        yield mp
    finally:
        for _ in range(50):
            if subprocess.run(["umount", mp], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", mp], capture_output=True)
