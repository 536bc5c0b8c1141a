"""The one path resolver inside an image root (store/resolve.py)."""

from __future__ import annotations

import pytest

from layerfs.errors import InvalidInput
from layerfs.store.resolve import resolve_in_root

LINKS = {
    "lib": "usr/lib",            # relative
    "lib64": "/usr/lib",         # absolute: from the root, not the host's /
    "up": "../../../..",         # climbs past the root: stops there
    "usr/lib/self": ".",
    "loop": "loop",
    "a": "b",
    "b": "c/../lib",
}


def _resolve(path: str) -> str:
    return resolve_in_root(path, LINKS.get)


@pytest.mark.parametrize("path, expected", [
    ("/", ""),
    ("lib", "usr/lib"),
    ("/lib/x.so", "usr/lib/x.so"),
    ("/lib64/x.so", "usr/lib/x.so"),
    ("/up/etc/passwd", "etc/passwd"),
    ("/../../etc", "etc"),
    ("/lib/self/self/x", "usr/lib/x"),
    ("a/x", "usr/lib/x"),             # a -> b -> c/../lib -> usr/lib
    ("missing/../lib", "usr/lib"),    # missing parts are joined as written
    ("./usr//lib/", "usr/lib"),
])
def test_links_are_followed_inside_the_root(path, expected):
    assert _resolve(path) == expected


def test_a_loop_is_an_error():
    with pytest.raises(InvalidInput, match="too many levels of symbolic links"):
        _resolve("/loop/x")
