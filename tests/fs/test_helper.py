"""Mounts that serve a process (the mount helper), the mount registry, and
what gc and fsck do around live and dead mounts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types

import pytest

from layerfs import procfs
from layerfs.fs import mount as fsmount
from layerfs.fs import registry
from layerfs.fs.helper import mount_for_owner
from layerfs.store import fsck, gc, transfer
from layerfs.store import images as img
from layerfs.store.store import Store
from tests.conftest import layerfs_cmd
from tests.fs.conftest import needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]

FSTYPE = "fuse.layerfs"

# An owner process: mounts through the helper, says the daemon's pid, waits.
_OWNER = """
import sys, time
from layerfs.fs.helper import mount_for_owner
root, image, mp, upper, scratch = sys.argv[1:]
print(mount_for_owner(root, image, mp, upper, scratch=scratch), flush=True)
time.sleep(600)
"""


@pytest.fixture
def small(tmp_path):
    """A fresh store with one small image: (store root, image id)."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "f").write_text("hello\n")
    root = str(tmp_path / "store")
    with Store(root) as store:
        lid = transfer.import_layer(store, str(src))
        image = store.put_image(img.new_config([lid]))
        store.tag(image.id, "small:1")
    return root, image.id


def _wait(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _cleanup(mp: str, pid: int) -> None:
    if procfs.alive(pid, None):
        os.kill(pid, signal.SIGKILL)
    if procfs.is_mountpoint(mp):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def test_mount_dies_with_its_owner_and_removes_its_scratch(small, tmp_path):
    root, image_id = small
    scratch = os.path.join(root, "tmp", "build-run-test")
    mp, upper = os.path.join(scratch, "rootfs"), os.path.join(scratch, "upper")
    os.makedirs(mp)
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, root, image_id, mp, upper, scratch],
                             stdout=subprocess.PIPE)
    pid = int(owner.stdout.readline())
    try:
        assert procfs.mounted_fstype(mp) == FSTYPE
        with open(os.path.join(mp, "etc", "f")) as f:
            assert f.read() == "hello\n"
        assert [m.mountpoint for m in fsmount.list_mounts(root)] == [mp]
        owner.kill()
        owner.wait()
        assert _wait(lambda: not procfs.alive(pid, None)), "the daemon outlived its owner"
        assert procfs.mounted_fstype(mp) is None
        assert not os.path.exists(scratch)
        assert fsmount.list_mounts(root, clean=False) == []
        with Store(root) as store:
            assert fsck.check(store).clean
            assert gc.collect(store).debris_removed == 0
    finally:
        owner.kill()
        owner.wait()
        _cleanup(mp, pid)


def test_a_mount_for_a_dead_owner_fails(small, tmp_path):
    root, image_id = small
    mp = tmp_path / "mnt"
    mp.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(Exception, match="gone"):
        fsmount.mount_image(root, image_id, str(mp), upper_dir=str(tmp_path / "up"), owner=gone.pid)
    assert procfs.mounted_fstype(str(mp)) is None
    assert fsmount.list_mounts(root) == []


def test_a_mount_without_an_owner_stays(small, tmp_path):
    """``layerfs mount`` detaches on purpose: its process exits, the mount stays."""
    root, _ = small
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    layerfs_cmd("mount", "small:1", mp, root=root, check=True)
    try:
        assert procfs.mounted_fstype(mp) == FSTYPE
        [info] = fsmount.list_mounts(root)
        assert info.alive
    finally:
        layerfs_cmd("umount", mp, root=root, check=True)
    assert procfs.mounted_fstype(mp) is None


@pytest.mark.timeout(120)
def test_force_unmount_kills_a_wedged_daemon(small, tmp_path):
    root, image_id = small
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    pid = mount_for_owner(root, image_id, mp, str(tmp_path / "upper"))
    assert procfs.is_mountpoint(mp)
    os.kill(pid, signal.SIGSTOP)  # a daemon that answers nothing
    try:
        registry.force_unmount(root, mp, timeout=1.0)
        assert not procfs.is_mountpoint(mp)
        assert _wait(lambda: not procfs.alive(pid, None)), "the daemon is still alive"
        assert fsmount.list_mounts(root, clean=False) == []
    finally:
        _cleanup(mp, pid)


def test_is_mountpoint_reads_escaped_paths(tmp_path):
    """mountinfo writes a space as \\040: the helpers must unescape it."""
    mp = tmp_path / "a b\tc"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mp)], check=True)
    try:
        assert procfs.is_mountpoint(str(mp))
        assert procfs.mounted_fstype(str(mp)) == "tmpfs"
        assert procfs.mounts_under(str(tmp_path)) == [str(mp)]
    finally:
        subprocess.run(["umount", str(mp)], check=True)
    assert not procfs.is_mountpoint(str(mp))


def test_gc_keeps_the_upper_of_a_live_mount(small, tmp_path):
    """A mount whose upper and mountpoint live in the store's tmp/ (as a
    build's RUN mount does) with no writer lease held: gc must not delete
    its upper, nor delete through the mountpoint."""
    root, image_id = small
    scratch = os.path.join(root, "tmp", "staging")
    mp, upper = os.path.join(scratch, "rootfs"), os.path.join(scratch, "upper")
    os.makedirs(mp)
    os.makedirs(os.path.join(root, "tmp", "debris"))
    h = fsmount.mount_image(root, image_id, mp, upper_dir=upper)
    try:
        with open(os.path.join(mp, "new"), "w") as f:
            f.write("kept\n")
        with Store(root) as store:
            dry = gc.collect(store, dry_run=True)
            real = gc.collect(store)
            assert dry == real and real.debris_removed == 1  # only tmp/debris
            assert fsck.check(store, repair=True).clean
        assert os.path.exists(os.path.join(upper, "new"))
        with open(os.path.join(mp, "etc", "f")) as f:
            assert f.read() == "hello\n"
        with open(os.path.join(mp, "new")) as f:
            assert f.read() == "kept\n"
        r = layerfs_cmd("gc", root=root, check=True)
        assert b"0 leftover" in r.stdout
        assert [m.mountpoint for m in fsmount.list_mounts(root)] == [mp]
    finally:
        fsmount.unmount(root, mp, timeout=20)
        _cleanup(mp, h.pid)


def test_gc_keeps_a_private_upper_however_old(small, tmp_path):
    root, image_id = small
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    h = fsmount.mount_image(root, image_id, mp)
    try:
        base = os.path.dirname(h.upper)
        os.utime(base, (0, 0))  # older than gc's grace period
        with Store(root) as store:
            assert gc.collect(store).debris_removed == 0
        assert os.path.isdir(h.upper)
    finally:
        fsmount.unmount(root, mp, timeout=20)
        _cleanup(mp, h.pid)
    assert not os.path.exists(h.upper)


def test_gc_mounts_and_umount_clean_stale_records(small, tmp_path):
    """A daemon killed outright leaves a record and a dead mount: the CLI's
    gc cleans both (its dry run counts as if it had, changing nothing);
    so do mounts and umount."""
    root, image_id = small
    mp = os.path.join(root, "tmp", "staging", "rootfs")  # where a build's RUN mount is
    for cleaner in (("gc",), ("mounts",), ("umount", mp)):
        os.makedirs(mp, exist_ok=True)
        h = fsmount.mount_image(root, image_id, mp, upper_dir=str(tmp_path / "up"))
        os.kill(h.pid, signal.SIGKILL)
        assert _wait(lambda: registry.is_enotconn(mp))
        with Store(root) as store:
            assert registry.stale_mounts(store) == [mp]
        if cleaner == ("gc",):
            dry = layerfs_cmd("gc", "--dry-run", root=root, check=True)
            assert registry.is_enotconn(mp)
            with Store(root) as store:
                assert registry.stale_mounts(store) == [mp]
        r = layerfs_cmd(*cleaner, root=root)
        assert r.returncode == 0, r.stderr
        if cleaner == ("gc",):
            assert dry.stdout.replace(b"Would remove", b"Removed") == r.stdout
            assert b"1 leftover" in r.stdout and not os.path.exists(os.path.dirname(mp))
        assert procfs.mounted_fstype(mp) is None, cleaner
        assert fsmount.list_mounts(root, clean=False) == [], cleaner
        assert os.path.isdir(tmp_path / "up")  # not private: it stays


class _GoneParent:
    """The parent's end of the pipe when the parent was killed."""

    closed = False

    def send(self, obj) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("outcome", ["mounted", "failed"])
def test_a_mount_child_whose_parent_died_exits_quietly(monkeypatch, outcome):
    """kill -9 of a build while its RUN step's mount is made: the helper
    child has nobody to answer and must not print a traceback to the
    terminal the build had."""
    from layerfs.errors import LayerfsError
    from layerfs.fs import helper as fshelper
    from layerfs.fs import mount as fsmount

    def fake_mount(*args, **kwargs):
        if outcome == "failed":
            raise LayerfsError("cannot mount x: the process 1 this mount serves is gone")
        return types.SimpleNamespace(pid=12345)

    monkeypatch.setattr(fsmount, "mount_image", fake_mount)
    conn = _GoneParent()
    fshelper._mount_child("/nonexistent", "id", "/mp", "/up", 1, None, conn)
    assert conn.closed
