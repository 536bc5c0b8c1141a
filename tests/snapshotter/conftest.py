"""Fixtures for the snapshotter tests: a snapshotter on a fresh store, and
teardown that stops every layerfs mount it made."""

from __future__ import annotations

import os

import pytest

from layerfs.snapshotter.service import Snapshotter
from tests.snapshotter.harness import short_tmpdir, unmount_all
from tests.snapshotter.node import images, node, registry  # noqa: F401  (fixtures)

needs_fuse = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")


@pytest.fixture
def short_dir():
    import shutil

    d = short_tmpdir("lfs")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def snap_root(short_dir):
    root = os.path.join(short_dir, "store")
    yield root
    if os.path.isdir(root):
        unmount_all(root)


@pytest.fixture
def sn(snap_root):
    return Snapshotter(snap_root)
