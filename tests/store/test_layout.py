"""StoreLayout: the on-disk names stay those existing stores have, and the
packages that keep data under the root use the paths it gives."""

from __future__ import annotations

import os

from layerfs.store.layout import StoreLayout
from layerfs.store.store import Store


def test_paths_are_those_of_existing_stores(tmp_path):
    # Renaming any of these strands the data of every store made before.
    root = str(tmp_path)
    lay = StoreLayout(root)
    assert {
        "db": lay.db, "lock": lay.lock, "objects": lay.objects, "layers": lay.layers, "tmp": lay.tmp,
        "fscache": lay.fscache, "uppers": lay.uppers, "containers": lay.containers, "logs": lay.logs,
        "cache-mounts": lay.cache_mounts, "build-stat-cache.sqlite": lay.old_build_stat_cache[0],
        "auth.json": lay.auth_file,
    } == {
        "db": f"{root}/db.sqlite", "lock": f"{root}/lock", "objects": f"{root}/objects",
        "layers": f"{root}/layers", "tmp": f"{root}/tmp", "fscache": f"{root}/fscache",
        "uppers": f"{root}/uppers", "containers": f"{root}/containers", "logs": f"{root}/logs",
        "cache-mounts": f"{root}/cache-mounts", "build-stat-cache.sqlite": f"{root}/build-stat-cache.sqlite",
        "auth.json": f"{root}/auth.json",
    }
    assert lay.layer("ab" * 32) == f"{root}/layers/{'ab' * 32}"
    assert lay.private_upper("t0k") == f"{root}/uppers/t0k/upper"
    assert os.path.dirname(lay.mount_log("/mnt/x")) == lay.logs
    assert lay.fscache_image(os.path.basename(lay.fscache_entry("cd" * 32)) + ".idx") == "cd" * 32


def test_relative_roots_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert StoreLayout("s").root == str(tmp_path / "s")
    with Store("s") as store:
        assert store.root == store.layout.root == str(tmp_path / "s")
        assert all(os.path.isdir(d) for d in store.layout.made_on_open)
        assert os.path.exists(store.layout.db) and os.path.exists(store.layout.lock)


def test_other_packages_ask_the_layout(tmp_path):
    from layerfs.fs.index import CACHE_FORMAT, cache_path
    from layerfs.fs.mount import container_upper
    from layerfs.oci.transports import auth_file
    from layerfs.runtime.containers import container_dir, containers_root

    root = str(tmp_path / "s")
    lay = StoreLayout(root)
    assert cache_path(root, "ef" * 32) == lay.fscache_entry(f"{'ef' * 32}.v{CACHE_FORMAT}")
    assert lay.fscache_image(os.path.basename(cache_path(root, "ef" * 32))) == "ef" * 32
    assert container_upper(root, "web") == os.path.join(lay.container("web"), "upper")
    assert containers_root(root) == lay.containers and container_dir(root, "c1") == lay.container("c1")
    with Store(root) as store:
        assert auth_file(store).path == lay.auth_file


def test_gc_removes_the_builders_former_stat_cache(tmp_path):
    # Before the builder used the db's stat_cache table it kept its own
    # SQLite file under the root; nothing reads it now, gc takes it.
    from layerfs.store import gc

    with Store(str(tmp_path / "s")) as store:
        for path in store.layout.old_build_stat_cache:
            with open(path, "wb") as f:
                f.write(b"x" * 100)
        dry = gc.collect(store, dry_run=True)
        assert all(os.path.exists(p) for p in store.layout.old_build_stat_cache)
        assert gc.collect(store).debris_removed == dry.debris_removed == 3
        assert not any(os.path.exists(p) for p in store.layout.old_build_stat_cache)
