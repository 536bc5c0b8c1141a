"""The store's stat cache: a file's blake3 digest by its path and stat data.

Like git's index: a file whose (device, inode, size, mtime, ctime) is
unchanged since it was hashed is not read again. The rows live in the
store database's ``stat_cache`` table; ``import`` (store.py) writes them
in the same transaction as the layer whose objects they name, the builder
(its context's COPY sources) through :meth:`StatCache.commit`. It is a
cache, never the truth: gc and fsck drop rows whose digest is not a stored
object, and a dropped row only costs re-hashing.

A caller that will skip storing a file on a hit (import) asks for
``stored_only`` rows: their digest is an object the store holds. The
builder only needs the digest of the content, stored or not.
"""

from __future__ import annotations

import os
from types import TracebackType

from layerfs.store.db import Database

__all__ = ["StatCache", "stat_key"]

StatKey = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _prefix_range(root: str) -> tuple[bytes, bytes]:
    """Bounds of the paths strictly below directory ``root``: ``'/' + 1``
    is ``'0'``, so the half-open range holds exactly ``root/...``."""
    base = os.fsencode(root.rstrip("/"))
    return base + b"/", base + b"0"


class StatCache:
    """A reader and batched writer of the store's ``stat_cache`` table.

    The rows under a directory are loaded in one query (:meth:`preload`);
    new digests are kept in memory and written by :meth:`commit` in one
    transaction. Use as a context manager: commit on success only.
    """

    def __init__(self, db: Database, *, stored_only: bool = False):
        self.db = db
        self.stored_only = stored_only
        self._rows: dict[bytes, tuple[StatKey, str]] = {}
        self._loaded: set[str] = set()
        self._dirty: dict[bytes, tuple[StatKey, str]] = {}

    def _select(self, where: str, *args: object) -> list[tuple]:
        join = " JOIN objects o ON o.digest = s.digest" if self.stored_only else ""
        return self.db.all("SELECT s.path, s.dev, s.ino, s.size, s.mtime_ns, s.ctime_ns, s.digest"
                           f" FROM stat_cache s{join} WHERE {where}", *args)

    def preload(self, root: str) -> None:
        """Load every row under directory ``root`` (absolute) at once."""
        root = root.rstrip("/")
        if root in self._loaded:
            return
        self._loaded.add(root)
        low, high = _prefix_range(root)
        for path, *key, digest in self._select("s.path >= ? AND s.path < ?", low, high):
            self._rows[path] = (tuple(key), digest)  # type: ignore[assignment]

    def lookup(self, path: str, st: os.stat_result) -> str | None:
        """The cached digest of ``path`` if its stat data is unchanged."""
        raw = os.fsencode(path)
        row = self._rows.get(raw)
        if row is None and not any(path.startswith(r + "/") for r in self._loaded):
            for _path, *key, digest in self._select("s.path = ?", raw):
                row = (tuple(key), digest)  # type: ignore[assignment]
                self._rows[raw] = row  # type: ignore[assignment]
        if row is not None and row[0] == stat_key(st):
            return row[1]
        return None

    def store(self, path: str, st: os.stat_result, digest: str) -> None:
        """Remember ``digest`` for ``path`` as of ``st`` (written on commit)."""
        entry = (stat_key(st), digest)
        raw = os.fsencode(path)
        self._rows[raw] = entry
        self._dirty[raw] = entry

    def commit(self) -> None:
        """Write the new digests in one transaction."""
        if not self._dirty:
            return
        rows = [(path, *key, digest) for path, (key, digest) in self._dirty.items()]
        with self.db.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO stat_cache VALUES (?,?,?,?,?,?,?)", rows)
        self._dirty.clear()

    def __enter__(self) -> StatCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
