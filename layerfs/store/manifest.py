"""Layer manifests: the canonical, deterministic list of a layer's entries.

A layer is a sorted list of :class:`Entry` records. Its canonical bytes are
compact ASCII JSON (one array per entry, paths sorted bytewise) and its id is
the blake3 of those bytes, so the same tree always yields the same id.

Paths are relative to the layer root, ``""`` being the root itself, and are
``str`` decoded with ``surrogateescape`` so any byte string survives; the
ASCII-only JSON encoding escapes the surrogates and round-trips them.

Holes are not recorded: they are not content. Object files keep zero runs
as holes and extraction recreates them, so sparse files stay sparse.

Hardlinks follow tar's convention: the first path of a link group (in sorted
order) is a regular ``file`` entry, the others are ``hardlink`` entries whose
``target`` names it.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import blake3

from layerfs.errors import Corrupt, InvalidInput

FORMAT = 1

FILE, DIR, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
CHAR, BLOCK, FIFO, SOCKET, WHITEOUT = "char", "block", "fifo", "socket", "whiteout"
KINDS = (FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO, SOCKET, WHITEOUT)

S_IFMT_OF = {
    FILE: stat.S_IFREG, HARDLINK: stat.S_IFREG, DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK,
    FIFO: stat.S_IFIFO, SOCKET: stat.S_IFSOCK,
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of a layer and everything needed to recreate it bit for bit."""

    path: str
    kind: str
    mode: int = 0o644          # permission bits incl. setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    digest: str = ""           # content object (files)
    target: str = ""           # symlink target, or hardlink's first path
    rdev: int = 0              # char/block devices
    xattrs: tuple[tuple[str, bytes], ...] = ()
    opaque: bool = False       # dir hides everything below it

    @property
    def st_mode(self) -> int:
        return S_IFMT_OF.get(self.kind, 0) | self.mode

    def xattr_dict(self) -> dict[str, bytes]:
        return dict(self.xattrs)


def _encode_entry(e: Entry) -> list:
    flags = "o" if e.opaque else ""
    xattrs = {k: base64.b64encode(v).decode() for k, v in e.xattrs}
    return [e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size,
            e.digest, e.target, e.rdev, xattrs, flags]


def _decode_entry(row: list) -> Entry:
    path, kind, mode, uid, gid, mtime, size, digest, target, rdev, xattrs, flags = row
    xa = tuple(sorted((k, base64.b64decode(v)) for k, v in xattrs.items()))
    return Entry(path, kind, mode, uid, gid, mtime, size, digest, target, rdev,
                 xa, "o" in flags)


def sort_key(path: str) -> bytes:
    return os.fsencode(path)


def encode(entries: Iterable[Entry]) -> bytes:
    """Canonical bytes of a manifest (entries are sorted and validated)."""
    ordered = sorted(entries, key=lambda e: sort_key(e.path))
    validate(ordered)
    doc = {"format": FORMAT, "entries": [_encode_entry(e) for e in ordered]}
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode()


def decode(data: bytes) -> list[Entry]:
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {doc.get('format')!r}")
        entries = [_decode_entry(row) for row in doc["entries"]]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise Corrupt(f"manifest cannot be decoded: {exc}") from None
    return entries


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def pack(canonical: bytes) -> bytes:
    """The bytes stored on disk: zstd of the canonical bytes (JSON of paths
    and hex digests shrinks ~5x; decompressing costs ~1 ms per 10k entries)."""
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(canonical)


def unpack(stored: bytes) -> bytes:
    """Canonical bytes back from :func:`pack` (raw manifests pass through)."""
    if not stored.startswith(_ZSTD_MAGIC):
        return stored
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(stored)
    except zstandard.ZstdError as exc:
        raise Corrupt(f"manifest cannot be decompressed: {exc}") from None


def layer_id(canonical: bytes) -> str:
    return blake3.blake3(canonical).hexdigest()


# The kernel's limits (linux/limits.h): a name of more than NAME_MAX bytes
# cannot be created, listed over FUSE or exported, and a path of PATH_MAX
# bytes or more (with its NUL) cannot be passed to a system call. A layer
# holding either would import and then fail on every use, so they are
# refused at the door, as the kernel would refuse them.
NAME_MAX = 255
PATH_MAX = 4096


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:20] + "..." + text[-12:])


def check_path(path: str) -> None:
    """Reject paths that could name something outside the layer root, or
    that the kernel would refuse (NAME_MAX, PATH_MAX)."""
    if path == "":
        return
    if path.startswith("/") or path.endswith("/"):
        raise InvalidInput(f"bad path in layer: {_short(path)}")
    # A str of n characters encodes to at most 4n bytes: most names and
    # paths need no encoding to be checked.
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidInput(f"bad path in layer: {_short(path)}")
        if "\0" in part:
            raise InvalidInput(f"NUL byte in path: {_short(path)}")
        if 4 * len(part) > NAME_MAX and len(os.fsencode(part)) > NAME_MAX:
            raise InvalidInput(f"name longer than NAME_MAX: {len(os.fsencode(part))} bytes "
                               f"(limit {NAME_MAX}) in {_short(path)}")
    if 4 * len(path) + 2 > PATH_MAX:
        size = len(os.fsencode(path)) + 1     # as the absolute path /PATH
        if size >= PATH_MAX:
            raise InvalidInput(f"path longer than PATH_MAX: {size} bytes as /PATH "
                               f"(limit {PATH_MAX - 1}): {_short(path)}")


def check_link_target(path: str, target: str) -> None:
    """A symlink's target must fit PATH_MAX, as symlink(2) requires."""
    if 4 * len(target) >= PATH_MAX and len(os.fsencode(target)) >= PATH_MAX:
        raise InvalidInput(f"symlink {_short(path)}: target longer than PATH_MAX "
                           f"({len(os.fsencode(target))} bytes, limit {PATH_MAX - 1})")


def validate(ordered: list[Entry]) -> None:
    """Structural checks shared by encode and fsck."""
    seen: dict[str, Entry] = {}
    for e in ordered:
        check_path(e.path)
        if e.kind not in KINDS:
            raise InvalidInput(f"{e.path!r}: unknown entry kind {e.kind!r}")
        if e.path in seen:
            raise InvalidInput(f"duplicate path in layer: {e.path!r}")
        if e.kind == HARDLINK:
            tgt = seen.get(e.target)
            if tgt is None or tgt.kind != FILE:
                raise InvalidInput(f"hardlink {e.path!r} -> {e.target!r}: target is not an earlier file of the layer")
        if e.kind == SYMLINK:
            check_link_target(e.path, e.target)
        if e.mode & ~0o7777:
            raise InvalidInput(f"{e.path!r}: mode {e.mode:o} has type bits")
        seen[e.path] = e


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def ancestors(path: str) -> list[str]:
    """Strict ancestors of *path*, root first (``""`` included)."""
    out = [""]
    parts = path.split("/")[:-1]
    for i in range(len(parts)):
        out.append("/".join(parts[: i + 1]))
    return out if path else []


def missing_dirs(path: str, is_dir: Callable[[str], bool]) -> list[str]:
    """Strict ancestors of *path* up to the nearest one *is_dir* accepts
    (exclusive), root first: the dirs to make up for it. Stopping there
    keeps a deep tree linear (``ancestors`` of every entry is cubic)."""
    out = []
    while path:
        path = path.rpartition("/")[0]
        if is_dir(path):
            break
        out.append(path)
    out.reverse()
    return out


@dataclass
class Manifest:
    """Decoded manifest plus its id; handy for callers that need both."""

    id: str
    entries: list[Entry] = field(default_factory=list)

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}


def canonical_links(entries: list[Entry], groups: dict[str, list[str]]) -> list[Entry]:
    """Rewrite hardlink groups so the sorted-first path holds the content.

    *groups* maps the path currently holding the content (a ``file`` entry)
    to the other paths linked to it. Scanners and tar readers meet link
    members in arbitrary order; the manifest must not depend on that order.
    """
    if not groups:
        return entries
    by_path = {e.path: e for e in entries}
    for holder, others in groups.items():
        members = sorted([holder, *others], key=sort_key)
        first = members[0]
        content = by_path[holder]
        from dataclasses import replace

        by_path[first] = replace(content, path=first, kind=FILE, target="")
        for p in members[1:]:
            by_path[p] = Entry(p, HARDLINK, target=first)
    return list(by_path.values())
