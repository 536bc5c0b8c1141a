"""The metadata schema, its version, and the steps that upgrade older ones.

``SCHEMA`` creates a database at ``VERSION``. On a change: bump VERSION,
change SCHEMA, and add ``MIGRATIONS[old_version]``: the step that turns a
database at *old_version* into one at *old_version + 1*, run inside the
transaction that records the new version (SQLite's DDL is transactional,
so an interrupted upgrade leaves the old database untouched).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

VERSION = 1

MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}

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
