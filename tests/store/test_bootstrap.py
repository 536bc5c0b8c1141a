"""bootstrap debian: what it leaves out of the image and how it reports."""

from __future__ import annotations

import os

import pytest

from layerfs import bootstrap
from layerfs.errors import LayerfsError
from layerfs.store.store import Store


def _touch(path, data: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_apt_caches_are_left_out_as_in_debians_images(tmp_path):
    t = str(tmp_path / "rootfs")
    cache, lists = f"{t}/var/cache/apt", f"{t}/var/lib/apt/lists"
    for p in (f"{cache}/pkgcache.bin", f"{cache}/srcpkgcache.bin", f"{cache}/archives/bash_5.2_amd64.deb",
              f"{cache}/archives/partial/x.deb", f"{cache}/archives/lock",
              f"{lists}/deb.debian.org_debian_dists_bookworm_InRelease", f"{lists}/partial/junk", f"{lists}/lock",
              f"{t}/var/lib/dpkg/status", f"{t}/usr/share/doc/keep.deb"):
        _touch(p)
    bootstrap.drop_apt_caches(t)
    left = sorted(os.path.relpath(os.path.join(dp, n), t) for dp, dns, fns in os.walk(t) for n in fns + dns)
    assert left == ["usr", "usr/share", "usr/share/doc", "usr/share/doc/keep.deb", "var", "var/cache",
                    "var/cache/apt", "var/cache/apt/archives", "var/cache/apt/archives/lock",
                    "var/cache/apt/archives/partial", "var/lib", "var/lib/apt", "var/lib/apt/lists",
                    "var/lib/dpkg", "var/lib/dpkg/status"]


@pytest.mark.tools("debootstrap")
def test_debootstrap_steps_are_reported_and_failure_is_one_line(tmp_path):
    steps: list[str] = []
    with Store(str(tmp_path / "s")) as store:
        with pytest.raises(LayerfsError) as info:
            bootstrap.bootstrap_debian(store, "bookworm", mirror=f"file://{tmp_path}/no-mirror",
                                       on_step=steps.append)
        assert os.listdir(store.tmp_dir) == []
    assert "debootstrap: Retrieving Release" in steps
    assert str(info.value) == f"debootstrap failed: E: Failed getting release file file://{tmp_path}/no-mirror/dists/bookworm/Release"
