"""The one SQLite connection wrapper of the store.

Concurrency model: SQLite in WAL mode. Every write goes through
:meth:`Database.transaction`, which takes ``BEGIN IMMEDIATE`` so two layerfs
processes writing at once serialise on the database lock instead of failing
half-way; readers never block. File objects are content-addressed and
written tmp+rename, so two writers storing the same content is harmless.
gc additionally holds the store's exclusive flock (see store.lock).

Versions: ``meta.schema`` holds the schema version (``schema.VERSION``).
Opening a database made by an older layerfs upgrades it in one
transaction (``schema.MIGRATIONS``); one made by a newer layerfs is
refused with :class:`Unsupported` before anything is written to it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

from layerfs.errors import Corrupt, Unsupported
from layerfs.store import schema


class Database:
    def __init__(self, path: str) -> None:
        # isolation_level=None: we issue BEGIN ourselves, so a transaction
        # covers exactly what transaction() wraps.
        self.conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            self._pragmas()
            self._open_schema(path)
        except BaseException:
            self.conn.close()
            raise

    def _open_schema(self, path: str) -> None:
        """Create, check or upgrade the schema (see the module docstring)."""
        if self._version(path) == schema.VERSION:
            return
        with self.transaction() as c:
            version = self._version(path)  # again, under the write lock: another process may have upgraded it
            if version is None:
                for stmt in schema.statements():
                    c.execute(stmt)
                c.execute("INSERT INTO meta VALUES ('schema', ?)", (str(schema.VERSION),))
            elif version > schema.VERSION:
                raise Unsupported(f"the store database {path} has schema version {version}, made by a newer"
                                  f" layerfs; this one reads up to version {schema.VERSION}: upgrade layerfs")
            elif version < schema.VERSION:
                schema.migrate(c, version)
                c.execute("UPDATE meta SET value=? WHERE key='schema'", (str(schema.VERSION),))

    def _version(self, path: str) -> int | None:
        """The schema version recorded in the database; None if it is new."""
        if self.one("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'") is None:
            return None
        # layerfs 1 created its tables, then recorded the version in a
        # second transaction: tables without the row are version 1.
        raw = self.value("SELECT value FROM meta WHERE key='schema'", default="1")
        try:
            return int(raw)
        except ValueError:
            raise Corrupt(f"the store database {path} has a bad schema version: {raw!r}") from None

    def _pragmas(self) -> None:
        c = self.conn
        c.execute("PRAGMA journal_mode=WAL")      # readers don't block the writer
        c.execute("PRAGMA synchronous=NORMAL")    # WAL + NORMAL is durable at checkpoint, never corrupt
        c.execute("PRAGMA foreign_keys=ON")       # layer_objects/image_layers go with their parent
        c.execute("PRAGMA busy_timeout=60000")    # wait for the other writer rather than fail

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def one(self, sql: str, *args: Any) -> tuple | None:
        return self.conn.execute(sql, args).fetchone()

    def all(self, sql: str, *args: Any) -> list[tuple]:
        return self.conn.execute(sql, args).fetchall()

    def value(self, sql: str, *args: Any, default: Any = None) -> Any:
        row = self.one(sql, *args)
        return default if row is None else row[0]

    def close(self) -> None:
        self.conn.close()
