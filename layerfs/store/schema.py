"""The metadata schema, its version, and the steps that upgrade older ones.

``SCHEMA`` creates a database at ``VERSION``. On a change: bump VERSION,
change SCHEMA, and add ``MIGRATIONS[old_version]``: the step that turns a
database at *old_version* into one at *old_version + 1*, run inside the
transaction that records the new version (SQLite's DDL is transactional,
so an interrupted upgrade leaves the old database untouched).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

VERSION = 2

SCHEMA = """
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
-- (containers, build cache, OCI digest maps) registers a reference here:
-- gc marks from tags, images and these rows (see refs.py).
CREATE TABLE IF NOT EXISTS refs (
    kind TEXT NOT NULL,             -- 'container', 'build-cache', 'oci-blob', ...
    key TEXT NOT NULL,
    layer_id TEXT,
    image_id TEXT,
    data TEXT,                      -- the owner's payload, never read by the store
    weak INTEGER NOT NULL DEFAULT 0,    -- describes its target, does not keep it alive
    in_use INTEGER NOT NULL DEFAULT 0,  -- something running uses image_id
    paths TEXT NOT NULL DEFAULT '[]',   -- JSON list of paths gc must leave alone
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
"""


def statements() -> list[str]:
    """SCHEMA as single statements (executescript would commit on its own)."""
    out, buf = [], ""
    for line in SCHEMA.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):  # knows comments and quotes
            out.append(buf.strip())
            buf = ""
    return out


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Upgrade a database at *version* to VERSION, one step at a time."""
    for old in range(version, VERSION):
        MIGRATIONS[old](conn)


# -- migrations: each one frozen as it was written, never edited later ---------
def _typed_refs(conn: sqlite3.Connection) -> None:
    """1 -> 2: references say what they mean in columns. Version 1 said it
    with kind names (``oci-*`` were weak, ``container`` and ``mount`` in
    use) and, for mounts, a ``paths`` list inside the owner's JSON."""
    for column in ("weak INTEGER NOT NULL DEFAULT 0", "in_use INTEGER NOT NULL DEFAULT 0",
                   "paths TEXT NOT NULL DEFAULT '[]'"):
        conn.execute(f"ALTER TABLE refs ADD COLUMN {column}")
    conn.execute("UPDATE refs SET weak=1 WHERE kind LIKE 'oci-%'")
    conn.execute("UPDATE refs SET in_use=1 WHERE kind IN ('container', 'mount')")
    for key, raw in conn.execute("SELECT key, data FROM refs WHERE kind='mount'").fetchall():
        try:
            data = json.loads(raw or "{}")
        except ValueError:
            data = {}
        used = data.get("paths", []) if isinstance(data, dict) else []
        paths = [key] + [p for p in (used if isinstance(used, list) else []) if isinstance(p, str)]
        conn.execute("UPDATE refs SET paths=? WHERE kind='mount' AND key=?", (json.dumps(paths), key))


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _typed_refs,
}
