"""Image references: ``[registry[:port]/]path[:tag]`` and ``...@sha256:hex``.

The grammar follows the distribution reference rules docker uses: path
components are lower-case alphanumerics with ``.``, ``_``, ``__`` or ``-``
separators; tags are ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from layerfs.errors import InvalidInput

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"  # one dot-separated part of a host name
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_NAME = re.compile(rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    name: str
    tag: str = DEFAULT_TAG
    digest: str = ""

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"


def parse(text: str) -> Reference:
    """Parse ``name[:tag][@digest]``; the tag defaults to ``latest``."""
    if not text or len(text) > 255:
        raise InvalidInput(f"invalid reference format: {text!r}")
    name, digest = text, ""
    if "@" in text:
        name, _, digest = text.partition("@")
        if not _DIGEST.match(digest):
            raise InvalidInput(f"invalid digest in reference: {text!r}")
    tag = DEFAULT_TAG
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidInput(f"invalid tag {tag!r} in reference {text!r}")
    if not _NAME.match(name):
        hint = " (repository names must be lowercase)" if name.lower() != name else ""
        raise InvalidInput(f"invalid reference format: {text!r}{hint}")
    return Reference(name, tag, digest)


def split_registry(name: str) -> tuple[str, str]:
    """('host[:port]', 'path') if *name* starts with a registry, else ('', name)."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return "", name
