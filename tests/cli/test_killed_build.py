"""kill -9 of a mount's owner leaves nothing behind: ``layerfs build``
during a RUN step (no mount, no layerfs process, no staging dir; fsck and
gc clean), and the owner (shim) of a detached container."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from layerfs import procfs
from tests.conftest import layerfs_cmd
from tests.fs.conftest import needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]


def _leftover_processes(root: str, token: str) -> list[str]:
    """Processes of this store (the daemon, the forkserver and the build
    inherit LAYERFS_ROOT) and of the RUN step (its shell's command line
    holds the token)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if procfs.start_time(int(pid)) is None:
            continue  # a zombie, waiting for a parent to reap it
        if f"LAYERFS_ROOT={root}".encode() in environ or token.encode() in cmdline:
            out.append(pid + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return out


def _store_mounts(root: str) -> list[str]:
    return procfs.mounts_under(root)


FSTYPE = {"fuse": "fuse.layerfs", "kernel": "overlay"}


@pytest.fixture(params=["fuse", "kernel"])
def backend(request) -> str:
    """Both backends, chosen by the store's config (the commands take no flag)."""
    from tests.fs.test_kernel_backend import KERNEL_SKIP

    if request.param == "kernel" and KERNEL_SKIP:
        pytest.skip(KERNEL_SKIP)
    return request.param


def _configure(root: str, backend: str) -> None:
    if backend != "fuse":
        with open(os.path.join(root, "config.json"), "w") as f:
            f.write('{"backend": "%s"}' % backend)


def _settled(check, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while (left := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.mark.timeout(180)
def test_kill_9_during_run_leaves_no_mount_process_or_leftover(tmp_path, busybox_tree, backend):
    root = str(tmp_path / "store")
    layerfs_cmd("import", busybox_tree, "-t", "bb:1", root=root, check=True)
    _configure(root, backend)
    token = secrets.token_hex(6)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM bb:1\nRUN echo one > /one\n"
                                    f"RUN echo started-{token} && sleep 20 && echo done-{token}\n")
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    build = subprocess.Popen([exe, "build", "--progress", "plain", "-t", "x:1", str(ctx)],
                             env=dict(os.environ, LAYERFS_ROOT=root), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    seen = b""
    try:
        started = f"started-{token}".encode()
        for line in build.stdout:   # the step's own output, not its "Step 3/3 : RUN ..." line
            seen += line
            if started in line and b"echo" not in line:
                break
        else:
            raise AssertionError(f"the RUN step never started: {seen.decode(errors='replace')}")
        assert [mp for mp in _store_mounts(root) if procfs.mounted_fstype(mp) == FSTYPE[backend]]
        build.kill()
        build.wait()
        assert _settled(lambda: _store_mounts(root)) == []
        assert _settled(lambda: _leftover_processes(root, token)) == []
    finally:
        build.kill()
        build.wait()
        build.stdout.close()
        for mp in reversed(_store_mounts(root)):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    assert os.listdir(os.path.join(root, "tmp")) == []
    r = layerfs_cmd("mounts", "--format", "json", root=root, check=True)
    assert r.stdout.strip() == b"[]"
    r = layerfs_cmd("fsck", root=root, check=True)
    assert r.stdout.strip().endswith(b"clean")
    r = layerfs_cmd("gc", root=root, check=True)
    assert r.stdout.strip() == b"Removed 0 layers, 0 objects, 0B freed; 0 leftover files swept"
    # and the interrupted build runs to the end next time, its first step cached
    (ctx / "Dockerfile").write_text(f"FROM bb:1\nRUN echo one > /one\nRUN echo again-{token}\n")
    r = layerfs_cmd("build", "--progress", "plain", "-t", "x:1", str(ctx), root=root, check=True)
    assert b"Using cache" in r.stdout and f"again-{token}".encode() in r.stdout


@pytest.mark.timeout(180)
def test_kill_9_of_a_containers_owner_unmounts_its_rootfs(tmp_path, busybox_tree, backend):
    from layerfs.runtime import containers as records
    from layerfs.store.store import Store

    root = str(tmp_path / "store")
    layerfs_cmd("import", busybox_tree, "-t", "bb:1", root=root, check=True)
    _configure(root, backend)
    seconds = str(1000 + secrets.randbelow(9000))   # a command line no other process has
    layerfs_cmd("run", "-d", "--name", "c1", "bb:1", "sleep", seconds, root=root, check=True)
    with Store(root) as store:
        c = records.find_container(store, "c1")
    try:
        assert procfs.mounted_fstype(c.rootfs) == FSTYPE[backend]
        os.kill(c.state.owner_pid, 9)
        assert _settled(lambda: _store_mounts(root)) == []
        assert _settled(lambda: _leftover_processes(root, f"sleep\0{seconds}")) == []
        assert layerfs_cmd("mounts", "--format", "json", root=root, check=True).stdout.strip() == b"[]"
        layerfs_cmd("rm", "c1", root=root, check=True)
        assert layerfs_cmd("fsck", root=root, check=True).stdout.strip().endswith(b"clean")
    finally:
        for mp in reversed(_store_mounts(root)):
            subprocess.run(["umount", "-l", mp], capture_output=True)
