"""The one SQLite connection wrapper of the store.

Concurrency model: SQLite in WAL mode. Every write goes through
:meth:`Database.transaction`, which takes ``BEGIN IMMEDIATE`` so two layerfs
processes writing at once serialise on the database lock instead of failing
half-way; readers never block. File objects are content-addressed and
written tmp+rename, so two writers storing the same content is harmless.
gc additionally holds the store's exclusive flock (see store.lock).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

from layerfs.store import schema


class Database:
    def __init__(self, path: str) -> None:
        # isolation_level=None: we issue BEGIN ourselves, so a transaction
        # covers exactly what transaction() wraps.
        self.conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._pragmas()
        # executescript commits on its own; the DDL is idempotent anyway.
        self.conn.executescript(schema.SCHEMA)
        with self.transaction():
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(schema.VERSION),))

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
