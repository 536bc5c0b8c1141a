"""Shared fixtures: a fresh store per test, and trees to import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from layerfs.store.store import Store

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (device nodes, chown, trusted.* xattrs)")


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "store")) as s:
        yield s


@pytest.fixture
def store_root(tmp_path):
    return str(tmp_path / "store")


def layerfs_cmd(*args: str, root: str, input: bytes | None = None, check: bool = False,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real console script as a user would."""
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    env = dict(os.environ, LAYERFS_ROOT=root)
    proc = subprocess.run([exe, *args], capture_output=True, env=env, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc


@pytest.fixture
def busybox_tree(tmp_path):
    from layerfs.bootstrap import busybox_tree as make

    if shutil.which("busybox") is None:
        pytest.skip("busybox-static is not installed")
    dest = str(tmp_path / "busybox-rootfs")
    make(dest)
    return dest
