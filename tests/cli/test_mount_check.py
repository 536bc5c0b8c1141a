"""mount reports what is wrong with what was asked for first: the image."""

from __future__ import annotations

from tests.conftest import layerfs_cmd


def test_missing_image_is_reported_before_missing_mountpoint(tmp_path):
    root = str(tmp_path / "s")
    p = layerfs_cmd("mount", "nope:1", str(tmp_path / "no-such-dir"), root=root)
    assert p.returncode == 1 and p.stderr.decode() == "Error: no such image: nope:1\n"


def test_missing_mountpoint_is_reported_for_an_existing_image(tmp_path, busybox_tree):
    root = str(tmp_path / "s")
    layerfs_cmd("import", busybox_tree, "-t", "bb:1", root=root, check=True)
    p = layerfs_cmd("mount", "bb:1", str(tmp_path / "no-such-dir"), root=root)
    assert p.returncode == 1 and "is not a directory" in p.stderr.decode(), p.stderr
