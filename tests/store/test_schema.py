"""The schema version: recorded on create, checked on open, upgraded in place."""

from __future__ import annotations

import os
import sqlite3

import pytest

from layerfs.errors import Corrupt, Unsupported
from layerfs.store import schema
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
