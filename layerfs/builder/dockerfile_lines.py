"""A Dockerfile's text as logical lines (BuildKit's ``parser`` package).

Parser directives (``# escape=``, ``# syntax=``, ``# check=``) count only
at the very top; ``#`` starts a comment only at the start of a line; a line
ending in the escape character continues on the next, and comment or empty
lines inside a continuation are dropped; RUN, COPY and ADD may carry
heredocs (``<<EOF`` ... ``EOF``), read here with the line that names them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from layerfs.builder import substitution
from layerfs.builder.instructions import DockerfileError, Heredoc

__all__ = ["Line", "Reader"]


_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_KNOWN_DIRECTIVES = frozenset({"escape", "syntax", "check"})
_HEREDOC = re.compile(r"^(\d*)<<(-?)(['\"]?)([A-Za-z0-9_][A-Za-z0-9_.\-]*)\3$")


@dataclass(frozen=True)
class Line:
    """A logical line: continuations joined, comments dropped."""

    number: int
    text: str
    heredocs: tuple[Heredoc, ...] = ()


class Reader:
    """Turns the text into logical lines; owns directives and heredocs."""

    def __init__(self, text: str, file: str):
        self.lines = text.splitlines()
        self.pos = 0
        self.file = file
        self.escape = "\\"
        self.syntax: str | None = None

    def fail(self, message: str, number: int, text: str) -> DockerfileError:
        return DockerfileError(message, file=self.file, line=number, text=text)

    def read_directives(self) -> None:
        seen: set[str] = set()
        while self.pos < len(self.lines):
            raw = self.lines[self.pos].strip()
            match = _DIRECTIVE.match(raw)
            if not match or match.group(1).lower() not in _KNOWN_DIRECTIVES:
                return
            name, value = match.group(1).lower(), match.group(2)
            if name in seen:
                raise self.fail(f"only one {name} parser directive can be used", self.pos + 1, raw)
            seen.add(name)
            if name == "escape":
                if value not in ("\\", "`"):
                    raise self.fail("invalid escape token (must be \\ or `)", self.pos + 1, raw)
                self.escape = value
            elif name == "syntax":
                self.syntax = value  # recorded; we have one frontend
            self.pos += 1

    def logical_lines(self) -> list[Line]:
        out: list[Line] = []
        while self.pos < len(self.lines):
            start = self.pos
            raw = self.lines[self.pos].lstrip()
            self.pos += 1
            if not raw or raw.startswith("#"):
                continue
            text, more = self._strip_continuation(raw)
            while more and self.pos < len(self.lines):
                nxt = self.lines[self.pos]
                self.pos += 1
                stripped = nxt.strip()
                if stripped.startswith("#") or not stripped:
                    continue  # comments and empty lines inside a continuation vanish
                part, more = self._strip_continuation(nxt)
                text += part
            text = text.strip()
            if text:
                out.append(Line(start + 1, text, self._heredocs(text, start + 1)))
        return out

    def _strip_continuation(self, line: str) -> tuple[str, bool]:
        trimmed = line.rstrip(" \t")
        if trimmed.endswith(self.escape):
            return trimmed[: -len(self.escape)], True
        return line, False

    def _heredocs(self, text: str, number: int) -> tuple[Heredoc, ...]:
        keyword = text.split(None, 1)[0].upper()
        if keyword not in ("RUN", "COPY", "ADD") or text.split(None, 1)[-1].lstrip().startswith("["):
            return ()
        docs = []
        for word in substitution.split_words(text, self.escape)[1:]:
            match = _HEREDOC.match(word)
            if match:
                docs.append(self._read_heredoc(match, number, text))
        return tuple(docs)

    def _read_heredoc(self, match: re.Match[str], number: int, text: str) -> Heredoc:
        fd, dash, quote, name = match.groups()
        body: list[str] = []
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            self.pos += 1
            candidate = line.lstrip("\t") if dash else line
            if candidate == name:
                content = "".join(part + "\n" for part in body)
                return Heredoc(name, content, not quote, bool(dash), int(fd) if fd else None)
            body.append(candidate)
        raise self.fail(f"unterminated heredoc {name}", number, text)
