"""Giving disk space back as a user does: rmi + gc after a build, gc's dry
run, ``image prune`` and ``system prune``."""

from __future__ import annotations

import json
import re

import pytest

from layerfs.store import usage
from layerfs.store.store import Store
from tests.conftest import layerfs_cmd
from tests.fs.conftest import needs_fuse

MB = 1_000_000


def _physical(root: str) -> int:
    with Store(root) as store:
        return usage.physical_bytes(store)


def _out(proc) -> str:
    return proc.stdout.decode()


def _ids(root: str, *args: str) -> set[str]:
    return set(_out(layerfs_cmd("images", "-q", "--no-trunc", *args, root=root, check=True)).split())


def _reclaimed(text: str) -> str:
    m = re.search(r"^Total reclaimed space: (\S+)$", text, re.M)
    assert m, text
    return m.group(1)


@pytest.fixture
def built(tmp_path, busybox_tree):
    """A store with bb:1 and big:1 built on it: a RUN writing 6 MB of
    random bytes, then steps after it (intermediate images)."""
    root = str(tmp_path / "store")
    layerfs_cmd("import", busybox_tree, "-t", "bb:1", root=root, check=True)
    before = _physical(root)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM bb:1\nRUN head -c 6000000 /dev/urandom > /blob\n"
                                    "ENV A=1\nRUN echo x > /x\nCMD [\"sh\"]\n")
    layerfs_cmd("build", "-q", "-t", "big:1", str(ctx), root=root, check=True)
    return root, before, ctx


@needs_fuse
@pytest.mark.fuse
@pytest.mark.root
def test_rmi_then_gc_gives_a_built_image_bytes_back(built):
    root, before, _ = built
    assert _physical(root) - before > 6 * MB
    all_ids = _ids(root, "-a")
    assert len(all_ids) == 5  # bb:1 and four step images
    r = layerfs_cmd("rmi", "big:1", root=root, check=True)
    lines = _out(r).splitlines()
    assert lines[0] == "Untagged: big:1"
    assert len(lines) == 5 and all(line.startswith("Deleted: ") for line in lines[1:])
    assert _ids(root, "-a") == _ids(root) and len(_ids(root)) == 1  # only bb:1 is left
    dry = _out(layerfs_cmd("gc", "--dry-run", root=root, check=True))
    real = _out(layerfs_cmd("gc", root=root, check=True))
    assert dry.replace("Would remove", "Removed") == real
    m = re.match(r"Removed (\d+) layers, (\d+) objects, ([\d.]+)MB freed", real)
    assert m and int(m.group(1)) == 2 and float(m.group(3)) >= 6, real
    after = _physical(root)
    assert after - before < MB, (before, after)
    assert _out(layerfs_cmd("fsck", root=root, check=True)).strip().endswith("clean")
    assert _out(layerfs_cmd("gc", root=root, check=True)).startswith("Removed 0 layers, 0 objects, 0B freed; 0 ")


@needs_fuse
@pytest.mark.fuse
@pytest.mark.root
def test_image_prune_removes_an_untagged_build_and_says_what_it_freed(built):
    root, before, ctx = built
    r = layerfs_cmd("build", "-q", "--no-cache", str(ctx), root=root, check=True)   # no tag: dangling
    dangling = _out(r).strip()
    assert dangling in _ids(root)
    r = layerfs_cmd("image", "prune", root=root, input=b"n\n")
    assert r.returncode == 0 and "WARNING! This will remove all dangling images." in _out(r)
    assert dangling in _ids(root)
    r = layerfs_cmd("image", "prune", "-f", root=root, check=True)
    text = _out(r)
    assert f"Deleted: {dangling}" in text and text.count("Deleted: ") == 4
    assert _reclaimed(text).endswith("MB") and float(_reclaimed(text)[:-2]) >= 6
    assert dangling not in _ids(root, "-a")
    assert len(_ids(root)) == 2  # big:1 and bb:1 stay
    r = layerfs_cmd("image", "prune", "-f", root=root, check=True)
    assert _out(r) == "Total reclaimed space: 0B\n"
    r = layerfs_cmd("image", "prune", "-a", "-f", root=root, check=True)
    assert "Untagged: big:1" in _out(r) and "Untagged: bb:1" in _out(r)
    assert _ids(root, "-a") == set()
    assert _physical(root) < before


@needs_fuse
@pytest.mark.fuse
@pytest.mark.root
def test_system_prune_removes_stopped_containers_dangling_images_and_cache(built):
    root, before, ctx = built
    layerfs_cmd("run", "--name", "stopped", "big:1", "sh", "-c", "head -c 3000000 /dev/urandom > /junk",
                root=root, check=True)
    r = layerfs_cmd("system", "prune", root=root, input=b"n\n")
    assert r.returncode == 0 and "all stopped containers" in _out(r)
    assert json.loads(_out(layerfs_cmd("ps", "-a", "--format", "json", root=root, check=True)))
    r = layerfs_cmd("system", "prune", "-f", root=root, check=True)
    text = _out(r)
    assert "Deleted Containers:" in text and "Deleted build cache records: 4" in text
    assert "Deleted Images:" not in text   # big:1 is tagged: no image is dangling
    assert float(_reclaimed(text)[:-2]) >= 3 and _reclaimed(text).endswith("MB")
    assert json.loads(_out(layerfs_cmd("ps", "-a", "--format", "json", root=root, check=True))) == []
    # the built image still runs; its intermediate steps stay hidden
    assert _out(layerfs_cmd("images", "-q", root=root, check=True)).count("\n") == 2
    r = layerfs_cmd("system", "prune", "-a", "-f", root=root, check=True)
    assert "Untagged: big:1" in _out(r)
    assert _physical(root) < before
    assert _out(layerfs_cmd("fsck", root=root, check=True)).strip().endswith("clean")


def test_prune_commands_reject_bad_input(tmp_path):
    for args in (["image", "prune", "--bogus"], ["system", "prune", "extra"]):
        r = layerfs_cmd(*args, root=str(tmp_path / "s"))
        assert r.returncode == 2 and b"Traceback" not in r.stderr
