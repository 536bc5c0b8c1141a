""".dockerignore: file parsing, Go match syntax, **, exceptions, walking hints."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfs.builder import dockerignore
from layerfs.builder.dockerignore import (
    IgnoreMatcher,
    PatternError,
    go_clean,
    load,
    parse_ignore_file,
)


def matcher(*patterns: str) -> IgnoreMatcher:
    return IgnoreMatcher.from_patterns(parse_ignore_file("\n".join(patterns)))


@pytest.mark.parametrize(
    "path, expected",
    [
        ("", "."), ("a/b/../c", "a/c"), ("./a//b/", "a/b"), ("/../a", "/a"),
        ("../a", "../a"), ("//a", "/a"), ("a/./b/.", "a/b"),
    ],
)  # fmt: skip
def test_go_clean(path: str, expected: str) -> None:
    assert go_clean(path) == expected


def test_parse_ignore_file() -> None:
    text = (
        "\ufeff# comment\n"
        "  # not a comment: it does not start the line\n"
        "\n"
        "   spaced   \n"
        "/abs/path\n"
        "./dot/../cleaned/\n"
        "!  /exception\n"
        "#another\n"
        "/\n"
        "\r\n"
    )
    assert parse_ignore_file(text) == [
        "# not a comment: it does not start the line",
        "spaced",
        "abs/path",
        "cleaned",
        "!exception",
        "/",
    ]


@pytest.mark.parametrize(
    "patterns, path, excluded",
    [
        # plain names and parents
        (["foo"], "foo", True),
        (["foo"], "foo/bar/baz", True),
        (["foo"], "foobar", False),
        (["foo"], "a/foo", False),  # anchored at the root
        (["foo/bar"], "foo/bar/x", True),
        (["foo/bar"], "foo/baz", False),
        (["/foo"], "foo", True),
        (["./foo/"], "foo/x", True),
        # * and ?
        (["*.md"], "README.md", True),
        (["*.md"], "docs/README.md", False),  # * never crosses /
        (["*/*.md"], "docs/README.md", True),
        (["*"], "anything/at/all", True),
        (["?.txt"], "a.txt", True),
        (["?.txt"], "ab.txt", False),
        (["a?c"], "a/c", False),
        (["*.md"], ".hidden.md", True),  # Go has no dot-file rule
        # classes and escapes
        (["[abc].go"], "b.go", True),
        (["[abc].go"], "d.go", False),
        (["[^abc].go"], "d.go", True),
        (["[a-c]x"], "bx", True),
        (["[]]x"], "]x", True),
        (["\\*"], "*", True),
        (["\\*"], "a", False),
        (["a.b"], "axb", False),  # regex specials are literal
        (["a+b(c)"], "a+b(c)", True),
        # **
        (["**/*.go"], "main.go", True),
        (["**/*.go"], "a/b/c/main.go", True),
        (["**/*.go"], "main.goo", False),
        (["**"], "x/y", True),
        (["dir/**"], "dir/a/b", True),
        (["dir/**"], "dirx/a", False),
        (["a/**/b"], "a/b", True),
        (["a/**/b"], "a/x/y/b", True),
        (["a/**/b"], "a/x/yb", False),
        (["**/node_modules"], "x/node_modules/y/z.js", True),
        (["**/vendor/**"], "vendor/x", True),
        (["**.txt"], "a/b.txt", True),  # leading ** + literal: a suffix test
        (["**/foo"], "foo", True),
        (["**/foo"], "a/b/foo", True),
        (["**/foo"], "a/bfoo", False),
        (["a**.txt"], "a/b.txt", False),  # not leading: (.*/)? then .txt
        # exceptions; last match wins
        (["*.md", "!README.md"], "README.md", False),
        (["*.md", "!README.md"], "CHANGES.md", True),
        (["!README.md", "*.md"], "README.md", True),
        (["*.md", "!README*.md", "README-secret.md"], "README-secret.md", True),
        (["*.md", "!README*.md", "README-secret.md"], "README-public.md", False),
        (["build", "!build/keep"], "build/keep", False),
        (["build", "!build/keep"], "build/other", True),
        (["build", "!build/keep"], "build/keep/inner", False),
        (["**", "!src/**", "src/**/*.tmp"], "src/a/b.tmp", True),
        (["**", "!src/**", "src/**/*.tmp"], "src/a/b.c", False),
        (["**", "!src/**", "src/**/*.tmp"], "docs/x", True),
        (["docs", "!docs/*.md"], "docs/a.md", False),
        (["docs", "!docs/*.md"], "docs/sub/a.md", True),
        ([], "anything", False),
    ],
)
def test_excluded(patterns: list[str], path: str, excluded: bool) -> None:
    assert matcher(*patterns).excluded(path) is excluded


def test_paths_are_cleaned_before_matching() -> None:
    m = matcher("foo/bar")
    assert m.excluded("./foo//bar")
    assert m.excluded("/foo/bar/")


@pytest.mark.parametrize("bad", ["[", "[a", "a\\", "[z-a]", "!"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(PatternError):
        IgnoreMatcher.from_patterns([bad])


@pytest.mark.parametrize(
    "patterns, directory, expected",
    [
        (["build"], "build", False),
        (["build", "!build/keep"], "build", True),
        (["build", "!build/keep"], "other", False),
        (["**", "!src/main.go"], "src", True),
        (["**", "!src/main.go"], "docs", False),
        (["**", "!*.go"], "anything", True),  # no literal prefix: must walk
        (["**", "!s*/x"], "src", True),
        (["a", "!a/b/c"], "a/b", True),
    ],
)
def test_may_include_under(patterns: list[str], directory: str, expected: bool) -> None:
    assert matcher(*patterns).may_include_under(directory) is expected


def test_load(tmp_path: Path) -> None:
    assert load(tmp_path).patterns == ()
    (tmp_path / ".dockerignore").write_text("*.log\n!keep.log\n")
    m = load(tmp_path)
    assert m.excluded("x.log") and not m.excluded("keep.log")
    assert m.has_exceptions


def test_load_prefers_dockerfile_specific_ignore(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("a\n")
    (tmp_path / "Dockerfile.dev.dockerignore").write_text("b\n")
    assert load(tmp_path, "Dockerfile.dev").excluded("b")
    assert not load(tmp_path, "Dockerfile.dev").excluded("a")
    assert load(tmp_path, "Dockerfile").excluded("a")


def test_go_match_regex_segment_mode() -> None:
    import re

    regex = re.compile(dockerignore.go_match_regex("*.t?t") + r"\Z")
    assert regex.match("a.txt") and not regex.match("a/b.txt")
    assert dockerignore.has_magic("a[b]") and not dockerignore.has_magic("plain.txt")
