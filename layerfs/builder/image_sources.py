"""COPY --from=<stage or image>: sources taken from an image's tree.

The sources are found in the image's merged tree, never in a copy of it on
the host: each segment of a pattern matches names of the tree (Go
``filepath.Match`` globs, as for the context), and a link met on the way is
followed inside the image's root with the project's one resolver, so
``/etc/localtime -> /usr/share/zoneinfo/UTC`` is the image's file, never
the host's. A directory source stands for its contents, whose links are
copied as links. The entries keep their digests: copying them moves no
bytes. Like the context, only files, directories and links are copied.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from layerfs.builder import dockerignore
from layerfs.builder.context import BuildContextError
from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry
from layerfs.store.resolve import components, resolve_in_root
from layerfs.store.tree import MergedTree

__all__ = ["TreeSource", "resolve"]

_COPIED = (mf.FILE, mf.DIR, mf.SYMLINK)


@dataclass(frozen=True)
class TreeSource:
    """One source after globbing: ``entries`` pairs each entry of the image
    with its path relative to where it lands (a file: its name; a
    directory: its contents, relative to it)."""

    pattern: str
    kind: str  # "file" or "dir"
    entries: tuple[tuple[str, Entry], ...]


def resolve(tree: MergedTree, patterns: Sequence[str], *, instruction: str = "COPY",
            exclude: Sequence[str] = ()) -> list[TreeSource]:
    """The sources ``patterns`` name in ``tree``, in order.

    Raises:
        BuildContextError: a pattern matches nothing, or is malformed.
    """
    try:
        skip = dockerignore.IgnoreMatcher.from_patterns(exclude)
    except dockerignore.PatternError as exc:
        raise BuildContextError(f"{instruction} failed: --exclude: {exc}") from None
    out = []
    for pattern in patterns:
        for path, name in _matches(tree, pattern, instruction):
            e = tree.entries[path]
            if e.kind == mf.DIR:
                entries = tuple((rel, sub) for rel, sub in _walk(tree, path) if not skip.excluded(rel))
                out.append(TreeSource(pattern, "dir", entries))
            elif not skip.excluded(name):
                out.append(TreeSource(pattern, "file", ((name, e),)))
    return out


def _matches(tree: MergedTree, pattern: str, instruction: str) -> list[tuple[str, str]]:
    """(resolved path, name as matched) of what ``pattern`` names."""
    cleaned = dockerignore.go_clean("/" + pattern)  # '..' stops at the root
    found = [("", ".")]
    try:
        for segment in components(cleaned):
            found = [hit for parent, _ in found for hit in _step(tree, parent, segment)]
    except dockerignore.PatternError as exc:
        raise BuildContextError(f"{instruction} failed: {exc}") from None
    found = [(path, name) for path, name in found if tree.entries[path].kind in _COPIED]
    if not found:
        reason = "no source files were specified" if dockerignore.has_magic(cleaned) \
            else "file not found in the source image"
        raise BuildContextError(f"{instruction} failed: {reason}: {pattern}")
    return found


def _step(tree: MergedTree, parent: str, segment: str) -> list[tuple[str, str]]:
    if tree.entries[parent].kind != mf.DIR:
        return []
    if dockerignore.has_magic(segment):
        regex = re.compile(dockerignore.go_match_regex(segment) + r"\Z", re.DOTALL)
        names = sorted(n for n in tree.children.get(parent, ()) if regex.match(n))
    else:
        names = [segment]
    out = []
    for name in names:
        path = resolve_in_root(f"{parent}/{name}" if parent else name, lambda p: _readlink(tree, p))
        if path in tree.entries:
            out.append((path, name))
    return out


def _readlink(tree: MergedTree, path: str) -> str | None:
    e = tree.entries.get(path)
    return e.target if e is not None and e.kind == mf.SYMLINK else None


def _walk(tree: MergedTree, top: str) -> Iterator[tuple[str, Entry]]:
    """The entries below ``top``, relative to it, sorted, each directory
    before its contents; links not followed."""
    stack = [(top, "", iter(sorted(tree.children.get(top, ()))))]
    while stack:
        path, rel, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        child, child_rel = (f"{path}/{name}" if path else name), (f"{rel}/{name}" if rel else name)
        e = tree.entries.get(child)
        if e is None or e.kind not in _COPIED:
            continue
        yield child_rel, e
        if e.kind == mf.DIR:
            stack.append((child, child_rel, iter(sorted(tree.children.get(child, ())))))
