"""The schema version: recorded on create, checked on open, upgraded in place."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from layerfs.errors import Conflict, Corrupt, Unsupported
from layerfs.store import fsck, gc, schema, transfer
from layerfs.store import images as img
from layerfs.store.refs import Ref
from layerfs.store.store import Store


def _set_version(root: str, value: str) -> None:
    with sqlite3.connect(os.path.join(root, "db.sqlite")) as c:
        c.execute("UPDATE meta SET value=? WHERE key='schema'", (value,))
    c.close()


def _version(root: str) -> str:
    with sqlite3.connect(os.path.join(root, "db.sqlite")) as c:
        row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    c.close()
    return row[0]


def test_a_new_store_records_the_current_version(store_root):
    Store(store_root).close()
    assert _version(store_root) == str(schema.VERSION)
    Store(store_root).close()  # reopening changes nothing
    assert _version(store_root) == str(schema.VERSION)


def test_a_newer_store_is_refused_and_left_alone(store_root):
    Store(store_root).close()
    _set_version(store_root, str(schema.VERSION + 1))
    with pytest.raises(Unsupported, match="newer layerfs"):
        Store(store_root)
    assert _version(store_root) == str(schema.VERSION + 1)


def test_a_garbled_version_is_corrupt(store_root):
    Store(store_root).close()
    _set_version(store_root, "two")
    with pytest.raises(Corrupt, match="bad schema version"):
        Store(store_root)


def test_every_old_version_has_a_migration():
    assert sorted(schema.MIGRATIONS) == list(range(1, schema.VERSION))


# -- upgrading a store made by layerfs 1 (schema version 1) -----------------
# The schema as layerfs with schema version 1 wrote it, copied by hand: the
# test must not derive the old format from the code that upgrades it.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,          -- logical bytes
    stored_size INTEGER NOT NULL,   -- bytes of the file on disk
    compressed INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,          -- logical bytes of its file contents
    entries INTEGER NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layer_objects (
    layer_id TEXT NOT NULL REFERENCES layers(id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    PRIMARY KEY (layer_id, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS layer_objects_digest ON layer_objects(digest);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    config BLOB NOT NULL,           -- canonical JSON; id = blake3(config)
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS image_layers (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    layer_id TEXT NOT NULL,
    PRIMARY KEY (image_id, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS image_layers_layer ON image_layers(layer_id);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    image_id TEXT NOT NULL,
    PRIMARY KEY (name, tag)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stat_cache (
    path BLOB PRIMARY KEY,          -- os.fsencode(abspath): any bytes
    dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
    digest TEXT NOT NULL
) WITHOUT ROWID;
-- Anything outside the core that must keep layers or images alive
-- (containers, build cache, OCI digest maps) registers a reference here;
-- gc marks from tags, images and these rows.
CREATE TABLE IF NOT EXISTS refs (
    kind TEXT NOT NULL,             -- 'container', 'build-cache', 'oci', ...
    key TEXT NOT NULL,
    layer_id TEXT,
    image_id TEXT,
    data TEXT,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
"""
CORE_TABLES = ("objects", "layers", "layer_objects", "images", "image_layers", "tags", "stat_cache")


def _tree(tmp_path, name: str) -> str:
    d = tmp_path / "trees" / name
    d.mkdir(parents=True)
    (d / f"{name}.txt").write_text(name * 100)
    return str(d)


def _as_version_1(root: str, v1_refs: list[tuple]) -> None:
    """Rewrite the store's database in the version 1 format: the same core
    rows, with *v1_refs* (kind, key, layer_id, image_id, data) as refs."""
    db = os.path.join(root, "db.sqlite")
    os.rename(db, db + ".new")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.rename(db + suffix, db + ".new" + suffix)
    c = sqlite3.connect(db)
    c.executescript(V1_SCHEMA)
    c.execute("INSERT INTO meta VALUES ('schema', '1')")
    c.execute("ATTACH DATABASE ? AS new", (db + ".new",))
    for table in CORE_TABLES:
        c.execute(f"INSERT INTO main.{table} SELECT * FROM new.{table}")
    c.executemany("INSERT INTO refs VALUES (?,?,?,?,?)", v1_refs)
    c.commit()
    c.execute("DETACH DATABASE new")
    c.close()


def test_a_version_1_store_is_upgraded_and_works(tmp_path):
    root = str(tmp_path / "store")
    with Store(root) as store:
        app_layer = transfer.import_layer(store, _tree(tmp_path, "app"))
        app = store.put_image(img.with_layer(None, app_layer, img.history_entry("app")))
        store.tag(app.id, "app:1")
        pulled = transfer.import_layer(store, _tree(tmp_path, "pulled"))   # only an OCI map names it
        cached = transfer.import_layer(store, _tree(tmp_path, "cached"))   # a build-cache entry holds it
        scratch = os.path.join(store.tmp_dir, "build-run-x")
        os.makedirs(os.path.join(scratch, "upper"))
    upper = os.path.join(scratch, "upper")
    _as_version_1(root, [
        ("oci-blob", "sha256:" + "a" * 64, pulled, None, json.dumps({"size": 1})),
        ("build-cache", "step", cached, None, json.dumps({"created_by": "RUN x"})),
        ("container", "c1", None, app.id, json.dumps({"name": "web"})),
        ("mount", "/nonexistent/mnt", None, app.id,
         json.dumps({"pid": 1, "upper": upper, "paths": [upper, upper + ".work", scratch]})),
    ])

    with Store(root) as store:
        assert _version(root) == str(schema.VERSION)
        got = {r.kind: r for r in store.refs()}
        assert got["oci-blob"] == Ref("oci-blob", "sha256:" + "a" * 64, layer_id=pulled,
                                      data=json.dumps({"size": 1}), weak=True)
        assert got["build-cache"] == Ref("build-cache", "step", layer_id=cached,
                                         data=json.dumps({"created_by": "RUN x"}))
        assert got["container"].in_use and not got["container"].weak and got["container"].image_id == app.id
        assert got["mount"].in_use
        assert got["mount"].paths == ("/nonexistent/mnt", upper, upper + ".work", scratch)
        assert fsck.check(store).clean

        # It works as a store made by this layerfs: weak maps keep nothing,
        # the build cache keeps its layer, the mount keeps its paths, and
        # the image containers and mounts use cannot be removed.
        result = gc.collect(store)
        assert result.layers_removed == 1
        assert {lid for (lid,) in store.db.all("SELECT id FROM layers")} == {app_layer, cached}
        assert store.get_ref("oci-blob", "sha256:" + "a" * 64) is None
        assert os.path.isdir(upper)
        with pytest.raises(Conflict, match="used by container c1"):
            store.remove_image("app:1")
        store.add_ref(Ref("container", "c2", image_id=app.id, in_use=True))
        assert [r.key for r in store.refs("container")] == ["c1", "c2"]
        assert fsck.check(store).clean

    with Store(root):   # upgraded once: reopening leaves it as it is
        assert _version(root) == str(schema.VERSION)


def test_an_interrupted_upgrade_leaves_version_1_intact(tmp_path, monkeypatch):
    """The upgrade is one transaction: a step that fails rolls all back."""
    root = str(tmp_path / "store")
    Store(root).close()
    _as_version_1(root, [("mount", "/m", None, None, json.dumps({"paths": ["/u"]}))])

    def broken(conn):
        schema._typed_refs(conn)
        raise RuntimeError("power cut")

    monkeypatch.setitem(schema.MIGRATIONS, 1, broken)
    with pytest.raises(RuntimeError):
        Store(root)
    assert _version(root) == "1"
    with sqlite3.connect(os.path.join(root, "db.sqlite")) as c:
        columns = [row[1] for row in c.execute("PRAGMA table_info(refs)")]
    c.close()
    assert columns == ["kind", "key", "layer_id", "image_id", "data"]
    monkeypatch.undo()
    with Store(root) as store:
        assert store.get_ref("mount", "/m").paths == ("/m", "/u")


def test_processes_opening_a_version_1_store_at_once_upgrade_it_once(tmp_path):
    import subprocess
    import sys

    root = str(tmp_path / "store")
    Store(root).close()
    _as_version_1(root, [("mount", "/m", None, None, json.dumps({"paths": ["/u"]}))])
    # Each waits for the go file, so they open the store together; a second
    # upgrade would fail on ALTER TABLE (duplicate column).
    go = tmp_path / "go"
    code = ("import os, sys, time\n"
            "from layerfs.store.store import Store\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
            "Store(sys.argv[1]).close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, root, str(go)], stderr=subprocess.PIPE)
             for _ in range(4)]
    go.touch()
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert _version(root) == str(schema.VERSION)
    with Store(root) as store:
        assert store.get_ref("mount", "/m").paths == ("/m", "/u")
