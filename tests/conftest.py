"""Shared fixtures: a fresh store per test, and trees to import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from layerfs.store.store import Store

from tests import capabilities

ROOT = os.geteuid() == 0
needs_root = pytest.mark.root


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The one skip hook: a test's markers say what it needs."""
    for mark in item.iter_markers():
        reason = capabilities.missing(mark)
        if reason is not None:
            pytest.skip(reason)


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

    if (reason := capabilities.tools("busybox")) is not None:
        pytest.skip(reason)
    dest = str(tmp_path / "busybox-rootfs")
    make(dest)
    return dest
