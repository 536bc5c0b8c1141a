"""The build context: which files a build may use, and what they hash to.

A :class:`BuildContext` is a directory seen through its .dockerignore. It

* resolves COPY/ADD sources (Go ``filepath.Match`` globs, one path segment at
  a time; a directory source stands for its *contents*) and refuses anything
  that leaves the context (``../x``, a symlink pointing out);
* hashes files with blake3 and folds a COPY's sources into one digest of
  what changes the result -- relative path, kind, mode, size, content,
  symlink target -- but not mtime or owner, so a fresh checkout of the same
  tree hits the build cache (docker's classic builder ignores mtime too);
* remembers digests in the store's stat cache
  (:class:`layerfs.store.statcache.StatCache`), so re-hashing an unchanged
  context costs one ``lstat`` per file and no reads.

The Dockerfile and the .dockerignore are read for parsing even when the
.dockerignore excludes them (docker sends them anyway); excluded, they cannot
be COPYed.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import blake3

from layerfs.builder import dockerignore
from layerfs.errors import InvalidInput, NotFound
from layerfs.store.objects import hash_stream
from layerfs.store.statcache import StatCache

__all__ = [
    "BuildContext",
    "BuildContextError",
    "ContextEntry",
    "CopySource",
    "HashStats",
    "ResolvedSources",
]

Kind = Literal["file", "dir", "symlink"]


class BuildContextError(InvalidInput):
    """A COPY/ADD source is missing, excluded or outside the context."""


@dataclass(frozen=True)
class ContextEntry:
    """One thing in the context.

    Attributes:
        path: relative to the context root, '/'-separated.
        kind: "file", "dir" or "symlink".
        mode: permission bits (``stat.S_IMODE``: includes setuid/sticky).
        size: bytes for a file; 0 otherwise (a directory's size is
            filesystem noise, not content).
        digest: blake3 hex of a file's content, when computed.
        link_target: a symlink's target, as stored.
    """

    path: str
    kind: Kind
    mode: int
    size: int = 0
    digest: str | None = None
    link_target: str | None = None


@dataclass(frozen=True)
class CopySource:
    """One source of a COPY/ADD after globbing.

    ``entries`` pairs each entry with its path relative to where it lands:
    a file source is one entry named by its basename; a directory source
    lists its contents (not itself), relative to it.
    """

    pattern: str
    path: str
    kind: Literal["file", "dir"]
    entries: tuple[tuple[str, ContextEntry], ...]


@dataclass(frozen=True)
class ResolvedSources:
    """All sources of one COPY/ADD and the digest of what they would copy."""

    sources: tuple[CopySource, ...]
    digest: str


@dataclass(frozen=True)
class HashStats:
    """How much hashing work a context did (tests count reads, not time)."""

    files_hashed: int
    bytes_hashed: int
    cache_hits: int


# --------------------------------------------------------------------------
# hashing and the stat cache


# A write within one timestamp tick of our read would leave mtime/ctime
# unchanged ("racy git"); an entry is cached only once its timestamps are
# older than the tick. Whole-second timestamps mean a coarse filesystem.
_RACY_FINE_NS = 50_000_000
_RACY_COARSE_NS = 2_000_000_000


def _is_racy(st: os.stat_result, started_ns: int) -> bool:
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    coarse = st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
    return newest >= started_ns - (_RACY_COARSE_NS if coarse else _RACY_FINE_NS)


# --------------------------------------------------------------------------
# the context


def _kind(mode: int) -> Kind | None:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return None  # sockets, fifos, devices: docker skips them too


def _join(parent: str, name: str) -> str:
    return name if not parent else f"{parent}/{name}"


def _field(value: object) -> bytes:
    """Length-prefixed field: no name can forge a record boundary."""
    data = str(value).encode("utf-8", "surrogateescape")
    return b"%d:%s," % (len(data), data)


class BuildContext:
    """A context directory seen through its .dockerignore.

    Args:
        root: the context directory.
        dockerfile: the Dockerfile's path relative to ``root`` (also picks
            ``<dockerfile>.dockerignore`` when present).
        cache: the store's :class:`StatCache`, or None to hash every
            time. Use the context as a context manager so the new digests
            are committed once, at the end, and only if the build got there.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        dockerfile: str = "Dockerfile",
        cache: StatCache | None = None,
    ):
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise NotFound(f"build context {os.fspath(root)!r} is not a directory")
        self.root = real
        self.dockerfile = dockerfile
        self.matcher = dockerignore.load(real, dockerfile)
        self.cache = cache
        self._hashed = 0
        self._bytes = 0
        self._hits = 0
        self._preloaded = False

    def __enter__(self) -> BuildContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.cache is not None:
            self.cache.__exit__(exc_type, exc, tb)

    def statistics(self) -> HashStats:
        return HashStats(self._hashed, self._bytes, self._hits)

    # -- the Dockerfile ----------------------------------------------------

    def read_dockerfile(self) -> str:
        """The Dockerfile's text, even if .dockerignore excludes it.

        Raises:
            BuildContextError: it is outside the context.
            NotFound: it does not exist.
        """
        real = self._inside(os.path.join(self.root, self.dockerfile), self.dockerfile)
        try:
            with open(real, encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"cannot find Dockerfile {self.dockerfile!r} in the context") from None
        except IsADirectoryError:
            raise InvalidInput(f"Dockerfile {self.dockerfile!r} is a directory") from None

    # -- walking -------------------------------------------------------------

    def walk(self, subdir: str = "") -> Iterator[ContextEntry]:
        """Everything under ``subdir`` the context holds, sorted, depth first.

        Excluded paths are left out; an excluded directory is still entered
        when an exception might re-include something inside it (and is then
        listed, since its included files need it). Symlinks are listed,
        never followed. No content is hashed.
        """
        base = os.path.join(self.root, subdir) if subdir else self.root
        for rel, _abs, st, kind in self._walk(subdir, base):
            yield self._entry(rel, st, kind, digest=None, abs_path=_abs)

    def _walk(
        self, rel_dir: str, abs_dir: str
    ) -> Iterator[tuple[str, str, os.stat_result, Kind]]:
        try:
            with os.scandir(abs_dir) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise BuildContextError(f"cannot read {rel_dir or '.'!r} in the context: {exc}") from exc
        for child in children:
            rel = _join(rel_dir, child.name)
            st = child.stat(follow_symlinks=False)
            kind = _kind(st.st_mode)
            if kind is None:
                continue
            excluded = self.matcher.excluded(rel)
            if kind == "dir":
                if excluded and not self.matcher.may_include_under(rel):
                    continue
                yield rel, child.path, st, kind
                yield from self._walk(rel, child.path)
            elif not excluded:
                yield rel, child.path, st, kind

    def _entry(
        self, rel: str, st: os.stat_result, kind: Kind, digest: str | None, abs_path: str
    ) -> ContextEntry:
        return ContextEntry(
            path=rel,
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            size=st.st_size if kind == "file" else 0,
            digest=digest,
            link_target=os.readlink(abs_path) if kind == "symlink" else None,
        )

    # -- hashing -------------------------------------------------------------

    def file_digest(self, abs_path: str, st: os.stat_result) -> str:
        """blake3 of a regular file, via the stat cache when it is current."""
        if self.cache is not None:
            if not self._preloaded:
                self.cache.preload(self.root)
                self._preloaded = True
            cached = self.cache.lookup(abs_path, st)
            if cached is not None:
                self._hits += 1
                return cached
        started = time.time_ns()
        digest, st = self._read_digest(abs_path, st)
        if self.cache is not None and not _is_racy(st, started):
            self.cache.store(abs_path, st, digest)
        return digest

    def _read_digest(self, abs_path: str, st: os.stat_result) -> tuple[str, os.stat_result]:
        try:
            fd = os.open(abs_path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise BuildContextError(f"cannot read {abs_path!r}: {exc.strerror}") from exc
        try:
            opened = os.fstat(fd)
            # The path may have been swapped since we listed it; key the
            # cache by what we actually read.
            if not stat.S_ISREG(opened.st_mode):
                raise BuildContextError(f"{abs_path!r} changed while hashing")
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                digest, size = hash_stream(f)
        finally:
            os.close(fd)
        self._hashed += 1
        self._bytes += size
        return digest, opened

    def context_digest(self) -> str:
        """One digest of the whole (non-excluded) context."""
        hasher = blake3.blake3()
        for rel, abs_path, st, kind in self._walk("", self.root):
            digest = self.file_digest(abs_path, st) if kind == "file" else None
            hasher.update(_record(rel, self._entry(rel, st, kind, digest, abs_path)))
        return hasher.hexdigest()

    # -- COPY / ADD sources ------------------------------------------------

    def resolve(
        self,
        patterns: Sequence[str],
        *,
        instruction: str = "COPY",
        exclude: Sequence[str] = (),
    ) -> ResolvedSources:
        """Resolve the sources of a COPY/ADD (already variable-expanded).

        Each pattern is a path relative to the context (a leading '/' is
        the context root) and may hold ``filepath.Match`` wildcards in any
        segment. Matches come back sorted; files with digests. ``exclude``
        (``COPY --exclude``) takes .dockerignore-style patterns matched
        against each entry's path relative to its source.

        Raises:
            BuildContextError: a pattern matches nothing (missing or
                excluded), leaves the context, or is malformed.
        """
        try:
            skip = dockerignore.IgnoreMatcher.from_patterns(exclude)
        except dockerignore.PatternError as exc:
            raise BuildContextError(f"{instruction} failed: --exclude: {exc}") from None
        sources: list[CopySource] = []
        for pattern in patterns:
            for source in self._resolve_one(pattern, instruction):
                kept = tuple((rel, e) for rel, e in source.entries if not skip.excluded(rel))
                sources.append(dataclasses.replace(source, entries=kept))
        hasher = blake3.blake3()
        for source in sources:
            hasher.update(b"source" + _field(source.kind))
            for rel, entry in source.entries:
                hasher.update(_record(rel, entry))
        return ResolvedSources(tuple(sources), hasher.hexdigest())

    def _resolve_one(self, pattern: str, instruction: str) -> list[CopySource]:
        cleaned = dockerignore.go_clean(pattern.lstrip("/") or ".")
        if cleaned == ".." or cleaned.startswith("../"):
            raise BuildContextError(
                f"{instruction} failed: forbidden path outside the build context: {pattern}"
            )
        segments = [] if cleaned == "." else cleaned.split("/")
        # (context-relative path as resolved, absolute real path, name as written)
        found = [("", self.root, ".")]
        try:
            for segment in segments:
                found = [m for parent in found for m in self._step(parent, segment, pattern)]
        except (dockerignore.PatternError, BuildContextError) as exc:
            raise BuildContextError(f"{instruction} failed: {exc}") from None
        if not found:
            if dockerignore.has_magic(cleaned):
                reason = "no source files were specified"
            else:
                reason = "file not found in build context or excluded by .dockerignore"
            raise BuildContextError(f"{instruction} failed: {reason}: {pattern}")
        return [self._source(pattern, rel, real, name) for rel, real, name in found]

    def _step(
        self, parent: tuple[str, str, str], segment: str, pattern: str
    ) -> list[tuple[str, str, str]]:
        rel_dir, real_dir, _ = parent
        if not os.path.isdir(real_dir):
            return []
        if dockerignore.has_magic(segment):
            regex = re.compile(dockerignore.go_match_regex(segment) + r"\Z", re.DOTALL)
            try:
                names = sorted(n for n in os.listdir(real_dir) if regex.match(n))
            except OSError:
                return []
        else:
            names = [segment]
        out = []
        for name in names:
            hit = self._visible(rel_dir, real_dir, name, pattern)
            if hit is not None:
                out.append(hit)
        return out

    def _visible(
        self, rel_dir: str, real_dir: str, name: str, pattern: str
    ) -> tuple[str, str, str] | None:
        """(rel, real, name) of ``name`` in a directory, or None if absent or excluded."""
        rel = _join(rel_dir, name)
        path = os.path.join(real_dir, name)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            if self.matcher.excluded(rel):
                return None
            path = self._inside(path, pattern)
            rel = os.path.relpath(path, self.root).replace(os.sep, "/")
            rel = "" if rel == "." else rel
            try:
                st = os.stat(path)
            except OSError:
                return None
        if stat.S_ISDIR(st.st_mode):
            if rel and self.matcher.excluded(rel) and not self.matcher.may_include_under(rel):
                return None
        elif _kind(st.st_mode) is None or (rel and self.matcher.excluded(rel)):
            return None
        return rel, path, name

    def _inside(self, path: str, shown: str) -> str:
        """``path`` with symlinks resolved; refuses one that leaves the context."""
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root.rstrip("/") + "/"):
            raise BuildContextError(f"forbidden path outside the build context: {shown}")
        return real

    def _source(self, pattern: str, rel: str, real: str, name: str) -> CopySource:
        st = os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            entries = tuple(
                (posixpath.relpath(sub, rel) if rel else sub,
                 self._entry(sub, sub_st, kind,
                             self.file_digest(sub_abs, sub_st) if kind == "file" else None,
                             sub_abs))
                for sub, sub_abs, sub_st, kind in self._walk(rel, real)
            )  # fmt: skip
            return CopySource(pattern, rel or ".", "dir", entries)
        entry = self._entry(rel, st, "file", self.file_digest(real, st), real)
        return CopySource(pattern, rel, "file", ((name, entry),))


def _record(rel: str, entry: ContextEntry) -> bytes:
    return b"".join(
        _field(v)
        for v in (
            entry.kind, rel, oct(entry.mode), entry.size,
            entry.digest or "", entry.link_target or "",
        )
    )  # fmt: skip

