""".dockerignore semantics, as docker's ``moby/patternmatcher`` implements them.

* One pattern per line; a line whose first character is ``#`` is a comment;
  surrounding whitespace is trimmed; blank lines are skipped.
* ``!pattern`` is an exception: it re-includes what earlier lines excluded.
  The last pattern that matches a path decides.
* Patterns are cleaned like Go's ``filepath.Clean`` and a leading ``/`` is
  dropped: every pattern is relative to the context root.
* Go ``filepath.Match`` syntax (``*``, ``?``, ``[a-z]``, ``[^x]``, ``\\x``)
  plus ``**``, which matches any number of directories (even none).
* A pattern that matches a directory excludes everything under it, so
  ``excluded("a/b/c")`` is true when ``a`` or ``a/b`` matches.

A directory that is excluded may still hold files an exception re-includes
(``build`` + ``!build/keep``); :meth:`IgnoreMatcher.may_include_under` tells a
walker when it must descend anyway.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from layerfs.errors import InvalidInput

__all__ = [
    "IgnoreMatcher",
    "IgnorePattern",
    "PatternError",
    "go_clean",
    "go_match_regex",
    "load",
    "parse_ignore_file",
]


class PatternError(InvalidInput):
    """A .dockerignore or COPY pattern is malformed (Go's ErrBadPattern)."""


def go_clean(path: str) -> str:
    """Go's ``filepath.Clean`` for '/'-separated paths."""
    if not path:
        return "."
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):  # POSIX keeps '//' but Go does not
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def _char_class(pattern: str, start: int) -> tuple[str, int]:
    """Translate the ``[...]`` starting at ``start``; return (regex, end)."""
    i, n = start + 1, len(pattern)
    out = ["["]
    if i < n and pattern[i] == "^":
        out.append("^")
        i += 1
    members = 0
    while True:
        if i >= n:
            raise PatternError(f"syntax error in pattern {pattern!r}: unterminated [")
        ch = pattern[i]
        if ch == "]" and members:
            return "".join(out) + "]", i + 1
        lo, i = _class_char(pattern, i)
        if i < n and pattern[i] == "-" and i + 1 < n and pattern[i + 1] != "]":
            hi, i = _class_char(pattern, i + 1)
            if hi < lo:
                raise PatternError(f"syntax error in pattern {pattern!r}: bad range")
            out.append(f"{re.escape(lo)}-{re.escape(hi)}")
        else:
            out.append(re.escape(lo))
        members += 1


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise PatternError(f"syntax error in pattern {pattern!r}: trailing \\")
    return pattern[i], i + 1


def go_match_regex(pattern: str, *, doublestar: bool = False) -> str:
    """Regex source (unanchored) for a Go ``filepath.Match`` pattern.

    With ``doublestar``, ``**`` matches across directories the way
    patternmatcher does: ``**/`` is "any leading directories, or none", a
    trailing ``**`` is "anything".

    Raises:
        PatternError: malformed class or trailing backslash.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*" and doublestar and pattern.startswith("**", i):
            i += 2
            if i < n and pattern[i] == "/":
                i += 1
            out.append(".*" if i >= n else "(?:.*/)?")
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            regex, i = _char_class(pattern, i)
            out.append(regex)
            continue
        elif ch == "\\":
            if i + 1 >= n:
                raise PatternError(f"syntax error in pattern {pattern!r}: trailing \\")
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def has_magic(pattern: str) -> bool:
    """True when ``pattern`` has glob syntax (Go's filepath.Glob test)."""
    return any(c in pattern for c in "*?[\\")


@dataclass(frozen=True)
class IgnorePattern:
    """One cleaned pattern; ``exclusion`` is True for a ``!`` exception."""

    text: str
    exclusion: bool
    regex: re.Pattern[str]
    # patternmatcher's "suffixMatch": a leading ** followed only by literal
    # text is a plain suffix test, so "**.txt" matches "a/b.txt".
    suffix: str | None = None

    def match(self, path: str) -> bool:
        if self.suffix is not None:
            return path.endswith(self.suffix) or (
                self.suffix.startswith("/") and path == self.suffix[1:]
            )
        return self.regex.match(path) is not None

    @classmethod
    def compile(cls, line: str) -> IgnorePattern:
        line = line.strip()
        exclusion = line.startswith("!")
        text = go_clean(line[1:].strip() if exclusion else line)
        if exclusion and text in ("", "."):
            raise PatternError('illegal exclusion pattern: "!"')
        try:
            regex = re.compile(go_match_regex(text, doublestar=True) + r"\Z", re.DOTALL)
        except re.error as exc:
            raise PatternError(f"bad pattern {line!r}: {exc}") from None
        rest = text[2:]
        suffix = rest if text.startswith("**") and rest and not has_magic(rest) else None
        return cls(text, exclusion, regex, suffix)

    def literal_prefix(self) -> str:
        """The part of the pattern before its first wildcard."""
        for i, ch in enumerate(self.text):
            if ch in "*?[\\":
                return self.text[:i]
        return self.text


@dataclass(frozen=True)
class IgnoreMatcher:
    """The compiled patterns of one .dockerignore, in file order."""

    patterns: tuple[IgnorePattern, ...] = ()

    @classmethod
    def from_patterns(cls, patterns: Iterable[str]) -> IgnoreMatcher:
        """Compile cleaned pattern lines (see :func:`parse_ignore_file`)."""
        return cls(tuple(IgnorePattern.compile(p) for p in patterns if p.strip()))

    @property
    def has_exceptions(self) -> bool:
        return any(p.exclusion for p in self.patterns)

    def excluded(self, relpath: str) -> bool:
        """Is ``relpath`` (relative to the context root) left out of the context?

        Patterns apply in order and the last one that matches the path or
        one of its parent directories wins (MatchesOrParentMatches).
        """
        if not self.patterns:
            return False
        path = go_clean(relpath.lstrip("/")) if relpath else "."
        parents = _parents(path)
        matched = False
        for pattern in self.patterns:
            # Only a pattern that could flip the current answer is worth testing.
            if pattern.exclusion != matched:
                continue
            hit = pattern.match(path) or any(pattern.match(parent) for parent in parents)
            if hit:
                matched = not pattern.exclusion
        return matched

    def may_include_under(self, reldir: str) -> bool:
        """Could an exception re-include something inside ``reldir``?

        Conservative: True unless no exception's literal prefix is compatible
        with ``reldir/``. A walker uses it to skip excluded trees quickly.
        """
        prefix = go_clean(reldir.lstrip("/")) + "/"
        for pattern in self.patterns:
            if not pattern.exclusion:
                continue
            literal = pattern.literal_prefix()
            if literal.startswith(prefix) or prefix.startswith(literal):
                return True
        return False


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def parse_ignore_file(text: str) -> list[str]:
    """The cleaned pattern lines of a .dockerignore (ignorefile.ReadAll)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    patterns = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = go_clean(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
        patterns.append("!" + line if invert else line)
    return patterns


def load(context_dir: str | Path, dockerfile: str | None = None) -> IgnoreMatcher:
    """The matcher for a build context (empty when it has no .dockerignore).

    Like BuildKit, ``<dockerfile>.dockerignore`` beside the Dockerfile wins
    over the context's ``.dockerignore`` when it exists.

    Raises:
        PatternError: a pattern is malformed.
    """
    root = Path(context_dir)
    candidates = []
    if dockerfile:
        candidates.append(root / (dockerfile + ".dockerignore"))
    candidates.append(root / ".dockerignore")
    for candidate in candidates:
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8", errors="surrogateescape")
            return IgnoreMatcher.from_patterns(parse_ignore_file(text))
    return IgnoreMatcher()
