"""Temp entries named after their process, and what a killed command left
removed by the next writer (store.scratch)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from layerfs.store import scratch
from layerfs.store.store import Store


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _leave(folder: str, name: str, size: int = 10, as_dir: bool = False) -> str:
    path = os.path.join(folder, name)
    if as_dir:
        os.makedirs(os.path.join(path, "upper"))
        path = os.path.join(path, "upper", "big")
    with open(path, "wb") as f:
        f.write(b"x" * size)
    return os.path.join(folder, name)


def test_names_carry_the_pid():
    assert scratch.prefix("oci") == f"oci-{os.getpid()}-"
    assert scratch.owner("oci-123-abcd") == 123
    assert scratch.owner("build-run-77-x1y2") == 77
    assert scratch.owner(".layerfs-blob-9-zz") == 9
    assert scratch.owner(".layerfs-5-q.partial") == 5
    assert scratch.owner("o-42-0") == 42
    assert scratch.owner("tmpabc") is None and scratch.owner("gc-lock") is None


def test_sweep_removes_only_what_dead_processes_left(tmp_path):
    dead = _dead_pid()
    folder = str(tmp_path)
    gone = [_leave(folder, f"oci-{dead}-aaaa"), _leave(folder, f"build-run-{dead}-bbbb", as_dir=True)]
    kept = [_leave(folder, f"oci-{os.getpid()}-cccc"), _leave(folder, "unrelated"),
            _leave(folder, f"other-{dead}-dddd")]
    assert scratch.sweep_dead(folder, None) == 3  # oci, build-run, other: all the dead pid's
    assert not any(os.path.exists(p) for p in gone) and not os.path.exists(kept[2])
    assert all(os.path.exists(p) for p in kept[:2])


@pytest.mark.root
def test_sweep_never_reaches_under_a_mount(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    dead = _dead_pid()
    staging = _leave(str(tmp_path), f"build-run-{dead}-eeee", as_dir=True)
    mp = os.path.join(staging, "rootfs")
    os.mkdir(mp)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mp], check=True)
    try:
        with open(os.path.join(mp, "inside"), "w") as f:
            f.write("live")
        assert scratch.sweep_dead(str(tmp_path)) == 0
        assert open(os.path.join(mp, "inside")).read() == "live"
    finally:
        subprocess.run(["umount", mp], check=True)
    assert scratch.sweep_dead(str(tmp_path)) == 1 and not os.path.exists(staging)


def test_the_first_writer_sweeps_tmp_unless_another_holds_the_store(tmp_path):
    root = str(tmp_path / "store")
    dead = _dead_pid()
    with Store(root) as other, other.writing():
        left = _leave(other.tmp_dir, f"oci-{dead}-ffff", size=1 << 20)
        with Store(root) as st, st.writing():
            assert os.path.exists(left)  # a writer is active: not alone, no sweep
    with Store(root) as st:
        assert os.path.exists(left)  # opening alone sweeps nothing
        with st.writing():
            assert not os.path.exists(left)


def test_a_killed_saves_partial_goes_with_the_next_save_and_archives_follow_umask(tmp_path, busybox_tree):
    from tests.conftest import layerfs_cmd

    root = str(tmp_path / "s")
    layerfs_cmd("import", busybox_tree, "-t", "bb:1", root=root, check=True)
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    partial = _leave(str(out), f".layerfs-{dead}-gggg.partial")
    layerfs_cmd("save", "bb:1", "-o", str(out / "bb.tar"), root=root, check=True)
    assert not os.path.exists(partial)
    assert sorted(os.listdir(out)) == ["bb.tar"]
    assert stat.S_IMODE(os.stat(out / "bb.tar").st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_exports_write_aside_each_its_own(tmp_path, busybox_tree):
    """Two exports to one name at once both succeed (each writes its own
    partial file), and what a killed one left beside it goes."""
    import tarfile

    from tests.conftest import layerfs_cmd

    root = str(tmp_path / "s")
    layerfs_cmd("import", busybox_tree, "-t", "bb:1", root=root, check=True)
    out = tmp_path / "out"
    out.mkdir()
    left = _leave(str(out), f".layerfs-{_dead_pid()}-hhhh.partial")
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    env = dict(os.environ, LAYERFS_ROOT=root)
    procs = [subprocess.Popen([exe, "export", "-o", str(out / "same.tar"), "bb:1"], env=env,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert not os.path.exists(left) and sorted(os.listdir(out)) == ["same.tar"]
    with tarfile.open(out / "same.tar") as tf:
        assert "bin/busybox" in tf.getnames() or "./bin/busybox" in tf.getnames()
    assert stat.S_IMODE(os.stat(out / "same.tar").st_mode) == 0o666 & ~_umask()
