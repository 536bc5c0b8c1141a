"""Resolve a path inside an image root, as a process chrooted there would.

Every symlink met on the way is followed and read relative to the root: an
absolute target starts again at the root and ``..`` stops at it, so the
result never names anything outside (filepath-securejoin's rules, which runc
and BuildKit use). This is the one resolver of the project; callers differ
only in how they read a link: the runtime from a rootfs directory on the
host (``runtime.rootpath.secure_join``), the builder from the entries of an
image being built (``build.staging``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from layerfs.errors import InvalidInput

# Link lookups allowed in one resolution (Linux allows 40 nested ones; a
# chain through many directories legitimately meets more in total).
MAX_SYMLINKS = 255

# Returns the target of the symlink at a root-relative path ('' is the
# root), or None when nothing or something other than a symlink is there.
ReadLink = Callable[[str], "str | None"]


def components(path: str) -> list[str]:
    """The names of ``path``, without empty and ``.`` parts."""
    return [part for part in path.split("/") if part not in ("", ".")]


def resolve_in_root(path: str, readlink: ReadLink) -> str:
    """The root-relative path ``path`` leads to, every symlink followed.

    ``path`` is taken relative to the root whether or not it starts with
    '/'. Components that do not exist are joined as written, so the result
    is also where to create them; the last component is followed too.

    Raises:
        InvalidInput: more than MAX_SYMLINKS links on the way (a loop).
    """
    parts = deque(components(path))
    current = ""
    links = 0
    while parts:
        part = parts.popleft()
        if part == "..":
            current = current.rpartition("/")[0]
            continue
        candidate = f"{current}/{part}" if current else part
        target = readlink(candidate)
        if target is None:
            current = candidate
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise InvalidInput(f"too many levels of symbolic links resolving {path!r}")
        if target.startswith("/"):
            current = ""
        parts.extendleft(reversed(components(target)))
    return current
