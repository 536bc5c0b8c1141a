"""ADD of a URL, heredocs, WORKDIR owned by USER, symbolic --chmod, and the
progress events (a live display draws from them)."""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from layerfs.builder.chmod import parse_chmod
from layerfs.builder.executor import BuildEvent, BuildOptions, build
from layerfs.errors import InvalidInput
from tests.builder.helpers import make_context

pytestmark = [pytest.mark.root, pytest.mark.tools("busybox")]



needs_fuse = [pytest.mark.fuse]


_ctx = make_context


def _build(store, ctx, **kw):
    lines: list[str] = []
    events: list[BuildEvent] = []
    result = build(store, BuildOptions(context=ctx, **kw), lines.append, events.append)
    return result, lines, events


@pytest.fixture
def http_root(tmp_path):
    """A tiny HTTP server on 127.0.0.1 serving a directory; yields (dir, url)."""
    served = tmp_path / "www"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_add_url_fetches_and_keys_on_content(store, base, tmp_path, http_root):
    served, url = http_root
    (served / "data.txt").write_text("one\n")
    ctx = _ctx(tmp_path, f"FROM busybox:latest\nADD {url}/data.txt /srv/\nADD {url}/data.txt /named\n")
    first, _, _ = _build(store, ctx)
    tree = store.merged_tree(first.image)
    ent = tree.entries["srv/data.txt"]
    assert store.objects.read(ent.digest) == b"one\n"
    assert ent.mode & 0o777 == 0o600
    assert store.objects.read(tree.entries["named"].digest) == b"one\n"
    # Same content: cache hit. New content behind the same URL: a miss.
    _, lines, _ = _build(store, ctx)
    assert lines.count(" ---> Using cache") == 2
    (served / "data.txt").write_text("two\n")
    second, lines, _ = _build(store, ctx)
    assert " ---> Using cache" not in lines
    assert store.objects.read(store.merged_tree(second.image).entries["named"].digest) == b"two\n"
    assert not os.listdir(store.tmp_dir)


def test_add_url_unreachable_is_one_clean_error(store, base, tmp_path, http_root):
    _served, url = http_root
    ctx = _ctx(tmp_path, f"FROM busybox:latest\nADD {url}/missing.txt /x\n")
    with pytest.raises(InvalidInput, match=r"Dockerfile:2: ADD .*missing.txt: cannot fetch: HTTP 404"):
        _build(store, ctx)
    ctx = _ctx(tmp_path, "FROM busybox:latest\nADD http://127.0.0.1:9/nothing /x\n", name="refused")
    with pytest.raises(InvalidInput, match="cannot fetch") as info:
        _build(store, ctx)
    assert "\n" not in str(info.value)
    assert not os.listdir(store.tmp_dir)


def test_add_url_checksum(store, base, tmp_path, http_root):
    import hashlib

    served, url = http_root
    (served / "f").write_text("sum\n")
    good = hashlib.sha256(b"sum\n").hexdigest()
    ctx = _ctx(tmp_path, f"FROM busybox:latest\nADD --checksum=sha256:{good} {url}/f /f\n")
    _build(store, ctx)
    bad = _ctx(tmp_path, f"FROM busybox:latest\nADD --checksum=sha256:{'0' * 64} {url}/f /f\n", name="bad")
    with pytest.raises(InvalidInput, match="checksum mismatch"):
        _build(store, bad)


def test_copy_url_is_refused(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY http://127.0.0.1:9/x /x\n")
    with pytest.raises(InvalidInput, match="use ADD"):
        _build(store, ctx)


def test_copy_heredoc(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nARG WHO=world\nCOPY <<EOF /etc/greeting\nhello $WHO\nEOF\n"
                         "COPY <<'RAW' /raw/\nkeep $WHO\nRAW\n")
    result, _, _ = _build(store, ctx)
    tree = store.merged_tree(result.image)
    assert store.objects.read(tree.entries["etc/greeting"].digest) == b"hello world\n"
    assert store.objects.read(tree.entries["raw/RAW"].digest) == b"keep $WHO\n"
    _, lines, _ = _build(store, ctx, build_args={"WHO": "you"})
    assert lines.count(" ---> Using cache") == 1  # ARG only: the heredoc changed


def test_chmod_symbolic():
    assert parse_chmod("u+x", "COPY")(0o644, False) == 0o744
    assert parse_chmod("go-w,a+rX", "COPY")(0o660, True) == 0o755
    assert parse_chmod("a+X", "COPY")(0o644, False) == 0o644
    assert parse_chmod("u=rw,g=r,o=", "COPY")(0o777, False) == 0o640
    assert parse_chmod("0755", "COPY")(0, False) == 0o755
    for bad in ("u+q", "999", "rwx", ""):
        with pytest.raises(InvalidInput):
            parse_chmod(bad, "COPY")(0, False)


def test_copy_chmod_symbolic(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY --chmod=u+x,go-r f /f\n", {"f": "x"})
    os.chmod(os.path.join(ctx, "f"), 0o644)
    result, _, _ = _build(store, ctx)
    assert store.merged_tree(result.image).entries["f"].mode & 0o777 == 0o700


def test_workdir_created_for_user(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nUSER nobody\nWORKDIR /home/nobody/app\n"
                         "USER 7:8\nWORKDIR /srv\n")
    result, _, _ = _build(store, ctx)
    tree = store.merged_tree(result.image)
    for path, owner in (("home/nobody", (65534, 65534)), ("home/nobody/app", (65534, 65534)), ("srv", (7, 8))):
        assert (tree.entries[path].uid, tree.entries[path].gid) == owner, path
    assert (tree.entries["home"].uid, tree.entries["home"].gid) == (0, 0)  # existed already


def test_events_mirror_the_lines(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nLABEL a=1\n")
    _build(store, ctx)
    result, lines, events = _build(store, ctx, tags=("ev:1",))
    assert [e.text for e in events] == lines
    kinds = [e.kind for e in events]
    assert kinds == ["step", "done", "step", "cached", "done", "built", "tagged"]
    assert events[2].step == 2 and events[2].total == 2
    assert events[-2].image_id == result.image.id




def _fuse(fn):
    for m in needs_fuse:
        fn = m(fn)
    return fn


@_fuse
def test_run_heredocs(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nENV N=5\n"
                         "RUN <<EOF\necho script-$N > /a\necho more >> /a\nEOF\n"
                         "RUN cat <<'X' > /b\nliteral $N\nX\n"
                         "RUN <<EOF\n#!/bin/sh\necho shebang > /c\nEOF\n")
    result, _, _ = _build(store, ctx)
    tree = store.merged_tree(result.image)
    read = lambda p: store.objects.read(tree.entries[p].digest)  # noqa: E731
    assert read("a") == b"script-5\nmore\n"
    assert read("b") == b"literal $N\n"
    assert read("c") == b"shebang\n"


@_fuse
def test_run_output_events(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nRUN echo line1; echo line2\n")
    _, _, events = _build(store, ctx)
    outs = [e.text for e in events if e.kind == "output"]
    assert outs == ["line1", "line2"]
    assert all(e.step == 2 for e in events if e.kind == "output")


_RAYON_CHILD = """
import os, sys, blake3
from layerfs.bootstrap import bootstrap_busybox
from layerfs.builder.executor import BuildOptions, build
from layerfs.store.store import Store

store_root, ctx = sys.argv[1], sys.argv[2]
with Store(store_root) as store:
    bootstrap_busybox(store)
    # Start rayon's global pool in this (the building) process.
    blake3.blake3(b"x" * (8 << 20), max_threads=blake3.blake3.AUTO).hexdigest()
    result = build(store, BuildOptions(context=ctx))
    tree = store.merged_tree(result.image)
    sys.stdout.write(store.objects.read(tree.entries["size"].digest).decode())
"""


@_fuse
@pytest.mark.timeout(240)
def test_run_after_multithreaded_hashing_does_not_hang(tmp_path):
    """Regression: blake3's multi-threaded mode starts rayon's pool in the
    build process; a FUSE daemon forked from it used to hang on its first
    multi-threaded hash (verifying a lower file > 256 KiB at first read).
    In a child process, so this suite's own process never starts the pool
    (other suites fork FUSE daemons from it)."""
    import subprocess
    import sys

    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY big /big\nRUN wc -c < /big > /size\n")
    with open(os.path.join(ctx, "big"), "wb") as f:
        f.write(os.urandom(3 << 20))
    proc = subprocess.run([sys.executable, "-c", _RAYON_CHILD, str(tmp_path / "store"), ctx],
                          capture_output=True, timeout=200)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == str(3 << 20)
