"""containerd's filter syntax, as List uses it on snapshots.

A filter is selectors joined by ``,`` (all must hold); a list of filters
matches when any filter does. A selector is a field path, optionally an
operator (``==``, ``!=``, ``~=`` regexp) and a value; a bare path means
"present and not empty". Paths: ``name``, ``parent``, ``kind``,
``labels.<key>`` (quote keys with dots: ``labels."containerd.io/gc.root"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from layerfs.errors import InvalidInput
from layerfs.snapshotter.records import Snapshot

_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|(==|!=|~=|,|\.)|([^\s"=!~,.]+))')


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise InvalidInput(f"invalid filter {text!r} at {pos}")
        quoted, op, word = m.groups()
        if quoted is not None:
            out.append(("word", re.sub(r"\\(.)", r"\1", quoted)))
        elif op is not None:
            out.append(("op", op))
        else:
            out.append(("word", word))
        pos = m.end()
    return out


def _parse(text: str) -> list[tuple[list[str], str | None, str | None]]:
    selectors = []
    toks = _tokens(text)
    i = 0
    while i < len(toks):
        path = []
        while i < len(toks) and toks[i][0] == "word":
            path.append(toks[i][1])
            i += 1
            if i < len(toks) and toks[i] == ("op", "."):
                i += 1
                continue
            break
        if not path:
            raise InvalidInput(f"invalid filter {text!r}: field expected")
        op = value = None
        if i < len(toks) and toks[i][1] in ("==", "!=", "~="):
            op = toks[i][1]
            # A bare value may hold dots (sha256:..., a.b/c): join its pieces.
            i += 1
            parts = []
            while i < len(toks) and toks[i] != ("op", ","):
                parts.append(toks[i][1])
                i += 1
            if not parts:
                raise InvalidInput(f"invalid filter {text!r}: value expected after {op}")
            value = "".join(parts)
        if i < len(toks):
            if toks[i] != ("op", ","):
                raise InvalidInput(f"invalid filter {text!r}")
            i += 1
        selectors.append((path, op, value))
    return selectors


def _field(snap: Snapshot, path: list[str]) -> str | None:
    head = path[0]
    if head == "labels" and len(path) == 2:
        return snap.labels.get(path[1])
    if len(path) == 1 and head in ("name", "parent", "kind"):
        return {"name": snap.key, "parent": snap.parent, "kind": snap.kind}[head]
    return None


def _holds(snap: Snapshot, path: list[str], op: str | None, value: str | None) -> bool:
    got = _field(snap, path)
    if op is None:
        return bool(got)
    if op == "==":
        return got == value
    if op == "!=":
        return got != value
    try:
        return got is not None and re.search(value, got) is not None
    except re.error as exc:
        raise InvalidInput(f"invalid regular expression {value!r}: {exc}") from None


def matcher(filters: list[str]) -> Callable[[Snapshot], bool]:
    """A predicate for *filters* (raises InvalidInput on a malformed one)."""
    parsed = [_parse(f) for f in filters if f.strip()]
    if not parsed:
        return lambda snap: True
    return lambda snap: any(all(_holds(snap, *sel) for sel in sels) for sels in parsed)
