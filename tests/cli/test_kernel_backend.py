"""--backend kernel through the real console script: mount, run, build, bundle,
the store-wide default, and clear refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from layerfs import procfs
from tests.conftest import layerfs_cmd
from tests.fs.test_kernel_backend import KERNEL_SKIP

pytestmark = [pytest.mark.root, pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")]


@pytest.fixture
def store(tmp_path, busybox_tree):
    root = str(tmp_path / "s")
    layerfs_cmd("import", busybox_tree, "-t", "bb:1", root=root, check=True)
    return root


def _mounts(root: str) -> list[dict]:
    return json.loads(layerfs_cmd("mounts", "--format", "json", root=root, check=True).stdout)


def test_mount_and_umount(store, tmp_path):
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    layerfs_cmd("mount", "--backend", "kernel", "bb:1", mp, root=store, check=True)
    try:
        assert procfs.mounted_fstype(mp) == "overlay"
        assert os.path.exists(f"{mp}/bin/busybox")
        (m,) = _mounts(store)
        assert m["backend"] == "kernel" and m["mountpoint"] == mp
    finally:
        layerfs_cmd("umount", mp, root=store, check=True)
    assert procfs.mounted_fstype(mp) is None and _mounts(store) == []


def test_run_with_the_kernel_backend_and_the_store_default(store):
    p = layerfs_cmd("run", "--rm", "--backend", "kernel", "bb:1", "sh", "-c",
                    "echo hi > /x && cat /x && grep ' / ' /proc/mounts", root=store, check=True)
    out = p.stdout.decode()
    assert out.startswith("hi\n") and " overlay " in out and "datadir+=" in out
    with open(os.path.join(store, "config.json"), "w") as f:
        json.dump({"backend": "kernel"}, f)
    p = layerfs_cmd("run", "--rm", "bb:1", "grep", " / ", "/proc/mounts", root=store, check=True)
    assert " overlay " in p.stdout.decode()
    p = layerfs_cmd("run", "--rm", "--backend", "fuse", "bb:1", "grep", " / ", "/proc/mounts", root=store, check=True)
    assert "fuse.layerfs" in p.stdout.decode()
    assert _mounts(store) == []


def test_build_runs_its_steps_on_the_kernel_backend(store, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM bb:1\nRUN grep ' / ' /proc/mounts > /root-mount && echo built > /f\n"
                                    "RUN rm /bin/ls\n")
    layerfs_cmd("build", "--backend", "kernel", "-t", "built:1", str(ctx), root=store, check=True)
    p = layerfs_cmd("run", "--rm", "built:1", "sh", "-c", "cat /f /root-mount; ls /bin/ls || echo gone",
                    root=store, check=True)
    out = p.stdout.decode()
    assert out.startswith("built\n") and " overlay " in out and out.endswith("gone\n")
    assert _mounts(store) == []


def test_bundle_for_runc(store, tmp_path):
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    bundle = str(tmp_path / "bundle")
    layerfs_cmd("bundle", "--backend", "kernel", "bb:1", bundle, "sh", "-c", "grep ' / ' /proc/mounts",
                root=store, check=True)
    try:
        assert procfs.mounted_fstype(f"{bundle}/rootfs") == "overlay"
        p = subprocess.run(["runc", "--root", str(tmp_path / "runc"), "run", "--bundle", bundle,
                            f"kb-{os.getpid()}"], capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert b" overlay " in p.stdout
    finally:
        layerfs_cmd("umount", f"{bundle}/rootfs", root=store, check=True)


def test_bad_backend_names_are_one_line_errors(store, tmp_path):
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    with open(os.path.join(store, "config.json"), "w") as f:
        f.write('{"backend": "zfs"}')
    p = layerfs_cmd("mount", "bb:1", mp, root=store)
    assert p.returncode == 2 and p.stderr.decode().count("\n") == 1
    assert "config.json: unknown backend 'zfs'" in p.stderr.decode()
    p = layerfs_cmd("mount", "--backend", "kernel", "--foreground", "bb:1", mp, root=store)
    assert p.returncode == 2 and "--foreground is for the fuse backend" in p.stderr.decode()
