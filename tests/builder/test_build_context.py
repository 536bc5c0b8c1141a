"""The build context: walking, COPY source resolution, digests, stat cache."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import blake3
import pytest

from layerfs.builder.context import BuildContext, BuildContextError
from layerfs.errors import NotFound
from layerfs.store.statcache import StatCache
from layerfs.store.store import Store

# The stat cache refuses entries touched within the last timestamp tick
# ("racy git"); tests that expect cache hits let that window pass first.
RACY_WINDOW_S = 0.06


def settle() -> None:
    time.sleep(RACY_WINDOW_S)


@pytest.fixture
def stat_store(tmp_path: Path):
    """A store whose stat cache the contexts share (the builder's is the
    store's own table)."""
    with Store(str(tmp_path / "store")) as store:
        yield store


def opened(root: Path, store: Store) -> BuildContext:
    return BuildContext(root, cache=StatCache(store.db))


def stat_rows(store: Store) -> int:
    return store.db.value("SELECT count(*) FROM stat_cache")


def make_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


@pytest.fixture
def ctx_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    make_tree(
        root,
        {
            "Dockerfile": "FROM scratch\n",
            "app.py": "print('hi')\n",
            "README.md": "readme\n",
            "docs/guide.md": "guide\n",
            "src/a.txt": "a\n",
            "src/b.txt": "b\n",
            "src/c.log": "c\n",
            "src/sub/d.txt": "d\n",
            "build/out.bin": b"\x00\x01",
            "build/keep.txt": "keep\n",
            "secret.env": "TOKEN=x\n",
        },
    )
    (root / ".dockerignore").write_text("*.md\n!README.md\nbuild\n!build/keep.txt\nsecret.env\n")
    return root


def paths(entries: object) -> list[str]:
    return [e.path for e in entries]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# walking


def test_walk_honours_dockerignore(ctx_dir: Path) -> None:
    ctx = BuildContext(ctx_dir)
    assert paths(ctx.walk()) == [
        ".dockerignore",
        "Dockerfile",
        "README.md",
        "app.py",
        "build",  # excluded, but walked: an exception lives inside
        "build/keep.txt",
        "docs",
        "docs/guide.md",  # *.md only matches at the top
        "src",
        "src/a.txt",
        "src/b.txt",
        "src/c.log",
        "src/sub",
        "src/sub/d.txt",
    ]


def test_walk_skips_excluded_dir_without_exceptions(tmp_path: Path) -> None:
    make_tree(tmp_path, {"node_modules/x/y.js": "", "index.js": ""})
    (tmp_path / ".dockerignore").write_text("node_modules\n")
    assert paths(BuildContext(tmp_path).walk()) == [".dockerignore", "index.js"]


def test_dockerfile_readable_even_if_excluded(tmp_path: Path) -> None:
    make_tree(tmp_path, {"Dockerfile": "FROM x\n", ".dockerignore": "Dockerfile\n.dockerignore\n"})
    ctx = BuildContext(tmp_path)
    assert ctx.read_dockerfile() == "FROM x\n"
    assert paths(ctx.walk()) == []
    with pytest.raises(BuildContextError, match="not found"):
        ctx.resolve(["Dockerfile"])


def test_missing_dockerfile_and_context(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        BuildContext(tmp_path).read_dockerfile()
    with pytest.raises(NotFound):
        BuildContext(tmp_path / "nope")


def test_dockerfile_outside_context_refused(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    (tmp_path / "ctx").mkdir()
    with pytest.raises(BuildContextError, match="outside the build context"):
        BuildContext(tmp_path / "ctx", dockerfile="../Dockerfile").read_dockerfile()


def test_special_files_are_skipped(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "f").write_text("x")
    assert paths(BuildContext(tmp_path).walk()) == ["f"]


# --------------------------------------------------------------------------
# COPY / ADD sources


def resolved(ctx: BuildContext, *patterns: str) -> list[tuple[str, str, list[str]]]:
    out = ctx.resolve(list(patterns))
    return [(s.path, s.kind, [rel for rel, _ in s.entries]) for s in out.sources]


def test_resolve_file(ctx_dir: Path) -> None:
    assert resolved(BuildContext(ctx_dir), "app.py") == [("app.py", "file", ["app.py"])]
    assert resolved(BuildContext(ctx_dir), "/src/a.txt") == [("src/a.txt", "file", ["a.txt"])]
    assert resolved(BuildContext(ctx_dir), "./src/../app.py") == [("app.py", "file", ["app.py"])]


def test_resolve_directory_means_its_contents(ctx_dir: Path) -> None:
    assert resolved(BuildContext(ctx_dir), "src") == [
        ("src", "dir", ["a.txt", "b.txt", "c.log", "sub", "sub/d.txt"])
    ]
    assert resolved(BuildContext(ctx_dir), "src/sub/") == [("src/sub", "dir", ["d.txt"])]


def test_resolve_dot_is_the_whole_visible_context(ctx_dir: Path) -> None:
    ((path, kind, rels),) = resolved(BuildContext(ctx_dir), ".")
    assert (path, kind) == (".", "dir")
    assert "secret.env" not in rels and "docs/guide.md" in rels
    assert "build/keep.txt" in rels and "build/out.bin" not in rels


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("src/*.txt", ["src/a.txt", "src/b.txt"]),
        ("src/?.log", ["src/c.log"]),
        ("src/[ab].txt", ["src/a.txt", "src/b.txt"]),
        ("src/[^a].txt", ["src/b.txt"]),
        ("*/*.txt", ["build/keep.txt", "src/a.txt", "src/b.txt"]),
        ("s*/s*", ["src/sub"]),
        ("*.md", ["README.md"]),  # docs/guide.md is not at the top; only README survives ignore
        ("*.py", ["app.py"]),
    ],
)
def test_resolve_globs(ctx_dir: Path, pattern: str, expected: list[str]) -> None:
    assert [p for p, _, _ in resolved(BuildContext(ctx_dir), pattern)] == expected


def test_resolve_multiple_sources_keep_order(ctx_dir: Path) -> None:
    out = resolved(BuildContext(ctx_dir), "src/b.txt", "app.py", "src/a.txt")
    assert [p for p, _, _ in out] == ["src/b.txt", "app.py", "src/a.txt"]


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("nope.txt", "COPY failed: file not found in build context or excluded by "
                     ".dockerignore: nope.txt"),
        ("src/*.xyz", "COPY failed: no source files were specified: src/\\*.xyz"),
        ("secret.env", "excluded by .dockerignore: secret.env"),
        ("build/out.bin", "excluded by .dockerignore"),
        ("*.env", "no source files were specified"),
        ("app.py/x", "file not found"),
        ("../etc/passwd", "forbidden path outside the build context: ../etc/passwd"),
        ("src/../../x", "forbidden path outside the build context"),
        ("src/[", "syntax error in pattern"),
    ],
)  # fmt: skip
def test_resolve_errors(ctx_dir: Path, pattern: str, message: str) -> None:
    with pytest.raises(BuildContextError, match=message):
        BuildContext(ctx_dir).resolve([pattern])


def test_error_names_the_instruction(ctx_dir: Path) -> None:
    with pytest.raises(BuildContextError, match="^ADD failed: "):
        BuildContext(ctx_dir).resolve(["nope"], instruction="ADD")


def test_leading_slash_is_the_context_root_not_the_host(ctx_dir: Path) -> None:
    with pytest.raises(BuildContextError, match="file not found"):
        BuildContext(ctx_dir).resolve(["/etc/passwd"])


def test_symlink_source_inside_context_is_followed(ctx_dir: Path) -> None:
    os.symlink("src/a.txt", ctx_dir / "alias.txt")
    os.symlink("src", ctx_dir / "srclink")
    ctx = BuildContext(ctx_dir)
    assert resolved(ctx, "alias.txt") == [("src/a.txt", "file", ["alias.txt"])]
    assert resolved(ctx, "srclink/sub") == [("src/sub", "dir", ["d.txt"])]


@pytest.mark.parametrize("target", ["../outside", "/etc", "src/../../outside"])
def test_symlink_escaping_the_context_is_refused(ctx_dir: Path, target: str) -> None:
    (ctx_dir.parent / "outside").write_text("secret")
    os.symlink(target, ctx_dir / "esc")
    with pytest.raises(BuildContextError, match="forbidden path outside the build context"):
        BuildContext(ctx_dir).resolve(["esc"])


def test_symlink_escaping_as_intermediate_component_is_refused(ctx_dir: Path) -> None:
    os.symlink("/", ctx_dir / "root")
    with pytest.raises(BuildContextError, match="outside the build context"):
        BuildContext(ctx_dir).resolve(["root/etc/passwd"])
    with pytest.raises(BuildContextError, match="outside the build context"):
        BuildContext(ctx_dir).resolve(["r*/etc"])


def test_symlinks_inside_a_directory_source_are_copied_as_links(ctx_dir: Path) -> None:
    os.symlink("/etc/passwd", ctx_dir / "src" / "abs-link")
    out = BuildContext(ctx_dir).resolve(["src"])
    (entry,) = [e for rel, e in out.sources[0].entries if rel == "abs-link"]
    assert entry.kind == "symlink" and entry.link_target == "/etc/passwd"


def test_symlink_to_excluded_file_is_not_a_way_around_dockerignore(ctx_dir: Path) -> None:
    os.symlink("secret.env", ctx_dir / "innocent")
    with pytest.raises(BuildContextError, match="excluded"):
        BuildContext(ctx_dir).resolve(["innocent"])


# --------------------------------------------------------------------------
# digests


def test_file_digest_is_blake3_of_content(ctx_dir: Path) -> None:
    out = BuildContext(ctx_dir).resolve(["app.py"])
    ((_, entry),) = out.sources[0].entries
    assert entry.digest == blake3.blake3(b"print('hi')\n").hexdigest()
    assert entry.size == 12
    assert entry.mode == stat.S_IMODE((ctx_dir / "app.py").stat().st_mode)


def digest(root: Path, *patterns: str) -> str:
    return BuildContext(root).resolve(list(patterns) or ["."]).digest


def test_digest_ignores_mtime_and_owner_but_not_content(ctx_dir: Path) -> None:
    before = digest(ctx_dir)
    os.utime(ctx_dir / "app.py", (1, 1))
    os.utime(ctx_dir / "src", (1, 1))
    assert digest(ctx_dir) == before
    (ctx_dir / "app.py").write_text("print('bye')\n")
    assert digest(ctx_dir) != before


def test_fresh_checkout_has_same_digest(ctx_dir: Path, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    shutil.copytree(ctx_dir, clone)  # new inodes, new ctimes
    assert digest(clone) == digest(ctx_dir)
    assert digest(clone, "src/*.txt", "app.py") == digest(ctx_dir, "src/*.txt", "app.py")


@pytest.mark.parametrize(
    "change",
    [
        lambda r: os.chmod(r / "src/a.txt", 0o755),
        lambda r: os.rename(r / "src/a.txt", r / "src/a2.txt"),
        lambda r: (r / "src/new.txt").write_text(""),
        lambda r: (r / "src/empty").mkdir(),
        lambda r: os.chmod(r / "src/sub", 0o700),
        lambda r: (r / "src/a.txt").write_text("A\n"),
        lambda r: os.symlink("a.txt", r / "src/link"),
    ],
)
def test_digest_sees_what_changes_the_result(ctx_dir: Path, change) -> None:  # type: ignore[no-untyped-def]
    before = digest(ctx_dir, "src")
    change(ctx_dir)
    assert digest(ctx_dir, "src") != before


def test_symlink_target_change_changes_digest(ctx_dir: Path) -> None:
    os.symlink("a.txt", ctx_dir / "src" / "link")
    before = digest(ctx_dir, "src")
    os.remove(ctx_dir / "src" / "link")
    os.symlink("b.txt", ctx_dir / "src" / "link")
    assert digest(ctx_dir, "src") != before


def test_excluded_file_changes_do_not_change_digest(ctx_dir: Path) -> None:
    before = digest(ctx_dir)
    (ctx_dir / "secret.env").write_text("TOKEN=rotated\n")
    (ctx_dir / "build" / "out.bin").write_bytes(b"other")
    assert digest(ctx_dir) == before


def test_same_content_different_layout_differs(tmp_path: Path) -> None:
    one = make_tree(tmp_path / "one", {"a/x": "1", "b/y": "2"})
    two = make_tree(tmp_path / "two", {"a/y": "2", "b/x": "1"})
    assert digest(one, "a", "b") != digest(two, "a", "b")
    # File vs directory source of the same bytes is a different copy too.
    three = make_tree(tmp_path / "three", {"x": "1", "d/x": "1"})
    assert digest(three, "x") != digest(three, "d")


def test_context_digest(ctx_dir: Path, tmp_path: Path) -> None:
    first = BuildContext(ctx_dir).context_digest()
    shutil.copytree(ctx_dir, tmp_path / "copy")
    assert BuildContext(tmp_path / "copy").context_digest() == first
    (ctx_dir / "app.py").write_text("changed")
    assert BuildContext(ctx_dir).context_digest() != first


# --------------------------------------------------------------------------
# the stat cache


def test_stat_cache_second_pass_reads_nothing(ctx_dir: Path, stat_store: Store) -> None:
    settle()
    with opened(ctx_dir, stat_store) as ctx:
        first = ctx.resolve(["."]).digest
        stats = ctx.statistics()
    assert stats.files_hashed == 10 and stats.cache_hits == 0
    with opened(ctx_dir, stat_store) as ctx:
        assert ctx.resolve(["."]).digest == first
        stats = ctx.statistics()
    assert (stats.files_hashed, stats.bytes_hashed, stats.cache_hits) == (0, 0, 10)


def test_stat_cache_rehashes_only_what_changed(ctx_dir: Path, stat_store: Store) -> None:
    settle()
    with opened(ctx_dir, stat_store) as ctx:
        before = ctx.resolve(["src"]).digest
    (ctx_dir / "src" / "a.txt").write_text("changed!\n")
    settle()
    with opened(ctx_dir, stat_store) as ctx:
        after = ctx.resolve(["src"]).digest
        stats = ctx.statistics()
    assert after != before
    assert (stats.files_hashed, stats.bytes_hashed, stats.cache_hits) == (1, 9, 3)


def test_stat_cache_same_size_same_mtime_rewrite_is_detected(ctx_dir: Path, stat_store: Store) -> None:
    """Rewriting with equal size and a forged mtime still changes ctime."""
    target = ctx_dir / "src" / "a.txt"
    settle()
    with opened(ctx_dir, stat_store) as ctx:
        before = ctx.resolve(["src/a.txt"]).digest
    st = target.stat()
    target.write_text("z\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with opened(ctx_dir, stat_store) as ctx:
        assert ctx.resolve(["src/a.txt"]).digest != before
        assert ctx.statistics().files_hashed == 1


def test_racy_entries_are_not_cached(tmp_path: Path, stat_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # A wide racy window, so a loaded machine (file made, then read more than
    # one timestamp tick later) cannot make the brand-new file look settled.
    from layerfs.builder import context as context_mod

    monkeypatch.setattr(context_mod, "_RACY_FINE_NS", 600 * 10**9)
    monkeypatch.setattr(context_mod, "_RACY_COARSE_NS", 600 * 10**9)
    root = make_tree(tmp_path / "c", {"f": "x"})
    with opened(root, stat_store) as ctx:  # no settle: f is brand new
        ctx.resolve(["f"])
    with opened(root, stat_store) as ctx:
        ctx.resolve(["f"])
        assert ctx.statistics().files_hashed == 1


def test_stat_cache_is_the_stores_table_and_commits_once(ctx_dir: Path, stat_store: Store) -> None:
    settle()
    with opened(ctx_dir, stat_store) as ctx:
        ctx.resolve(["."])
        # Nothing is written until the build ends: one transaction per build.
        assert stat_rows(stat_store) == 0
    assert stat_rows(stat_store) == 10
    assert not [n for n in os.listdir(stat_store.root) if "stat" in n]  # no file of its own


def test_stat_cache_not_committed_when_build_fails(ctx_dir: Path, stat_store: Store) -> None:
    settle()
    with pytest.raises(BuildContextError):
        with opened(ctx_dir, stat_store) as ctx:
            ctx.resolve(["src"])
            ctx.resolve(["missing"])
    assert stat_rows(stat_store) == 0
    with opened(ctx_dir, stat_store) as ctx:
        ctx.resolve(["src"])
        assert ctx.statistics().cache_hits == 0


def test_stat_cache_lookup_outside_preloaded_root(tmp_path: Path, stat_store: Store) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    st = f.stat()
    with StatCache(stat_store.db) as cache:
        cache.store(str(f), st, "d1")
    with StatCache(stat_store.db) as cache:
        assert cache.lookup(str(f), st) == "d1"
        assert cache.lookup(str(tmp_path / "other"), st) is None
    # Import only trusts rows whose digest is a stored object ("d1" is not).
    assert StatCache(stat_store.db, stored_only=True).lookup(str(f), st) is None


def test_import_and_build_share_the_stat_cache(tmp_path: Path, stat_store: Store,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A context the store imported before is hashed from the import's rows."""
    from layerfs.store import store as store_mod

    monkeypatch.setattr(store_mod, "RACY_NS", 0)  # the files are brand new
    root = make_tree(tmp_path / "imp", {"a": "1" * 100, "d/b": "2" * 100})
    settle()
    stat_store.import_dir(str(root))
    assert stat_rows(stat_store) == 2
    settle()
    with opened(root, stat_store) as ctx:
        ctx.resolve(["."])
        assert (ctx.statistics().files_hashed, ctx.statistics().cache_hits) == (0, 2)


def test_stat_cache_shared_by_two_contexts(tmp_path: Path, stat_store: Store) -> None:
    one = make_tree(tmp_path / "one", {"a": "1"})
    two = make_tree(tmp_path / "one2", {"b": "2"})  # shares a string prefix with "one"
    settle()
    for root in (one, two):
        with opened(root, stat_store) as ctx:
            ctx.resolve(["."])
    for root in (one, two):
        with opened(root, stat_store) as ctx:
            ctx.resolve(["."])
            assert ctx.statistics().cache_hits == 1 and ctx.statistics().files_hashed == 0


@pytest.mark.slow
def test_large_unchanged_context_rehash_reads_no_content(tmp_path: Path, stat_store: Store) -> None:
    """10,000 files / 200 MB: the second pass is stat-only (counted, not timed)."""
    root = tmp_path / "big"
    chunk = os.urandom(20_000)
    for i in range(10_000):
        d = root / f"d{i % 100:02d}"
        if i < 100:
            d.mkdir(parents=True)
        (d / f"f{i}.bin").write_bytes(chunk[i % 1000 :] + i.to_bytes(4, "big") + chunk[: i % 1000])
    settle()
    with opened(root, stat_store) as ctx:
        first = ctx.resolve(["."]).digest
        cold = ctx.statistics()
    assert cold.files_hashed == 10_000 and cold.bytes_hashed == 10_000 * 20_004
    with opened(root, stat_store) as ctx:
        assert ctx.resolve(["."]).digest == first
        warm = ctx.statistics()
    assert (warm.files_hashed, warm.bytes_hashed, warm.cache_hits) == (0, 0, 10_000)


def test_copy_exclude_filters_entries(ctx_dir: Path) -> None:
    ctx = BuildContext(ctx_dir)
    out = ctx.resolve(["src", "app.py"], exclude=["*.log", "sub", "app.py"])
    assert [[rel for rel, _ in s.entries] for s in out.sources] == [["a.txt", "b.txt"], []]
    assert out.digest != ctx.resolve(["src", "app.py"]).digest
    with pytest.raises(BuildContextError, match="--exclude"):
        ctx.resolve(["src"], exclude=["["])
