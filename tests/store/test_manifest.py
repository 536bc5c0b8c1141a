"""The manifest codec: canonical, deterministic, lossless."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfs.errors import Corrupt, InvalidInput
from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry

names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=12) \
    .filter(lambda s: s not in (".", "..")) | st.binary(min_size=1, max_size=8).filter(
        lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")).map(
        lambda b: b.decode("utf-8", "surrogateescape"))

xattrs = st.dictionaries(st.sampled_from(["user.a", "user.b", "trusted.x", "security.capability"]),
                         st.binary(max_size=20), max_size=3).map(lambda d: tuple(sorted(d.items())))


@st.composite
def entry_lists(draw):
    paths = draw(st.lists(st.lists(names, min_size=1, max_size=3).map("/".join), unique=True, max_size=15))
    entries = {"": Entry("", mf.DIR, 0o755)}
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            anc = "/".join(parts[:i])
            if anc not in entries or entries[anc].kind != mf.DIR:
                entries[anc] = Entry(anc, mf.DIR, draw(st.integers(0, 0o7777)))
        if p in entries:
            continue
        kind = draw(st.sampled_from([mf.FILE, mf.SYMLINK, mf.CHAR, mf.FIFO, mf.WHITEOUT, mf.DIR]))
        entries[p] = Entry(
            p, kind, draw(st.integers(0, 0o7777)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 70000)),
            draw(st.integers(-2**40, 2**62)), draw(st.integers(0, 2**40)) if kind == mf.FILE else 0,
            "ab" * 32 if kind == mf.FILE else "", draw(names) if kind == mf.SYMLINK else "",
            draw(st.integers(0, 2**20)) if kind == mf.CHAR else 0, draw(xattrs),
            draw(st.booleans()) if kind == mf.DIR else False)
    # Drop children of non-dirs (they cannot exist).
    good = {p: e for p, e in entries.items()
            if all(entries.get(a) is not None and entries[a].kind == mf.DIR for a in mf.ancestors(p))}
    return list(good.values())


@given(entry_lists())
@settings(max_examples=200, deadline=None)
def test_codec_round_trips_and_is_canonical(entries):
    data = mf.encode(entries)
    back = mf.decode(data)
    assert sorted(back, key=lambda e: mf.sort_key(e.path)) == back
    assert {e.path: e for e in back} == {e.path: e for e in entries}
    assert mf.encode(reversed(entries)) == data, "order of input must not matter"
    assert data.isascii()


def test_layer_id_is_blake3_of_bytes():
    data = mf.encode([Entry("", mf.DIR, 0o755)])
    assert mf.layer_id(data) == mf.layer_id(bytes(data))
    assert len(mf.layer_id(data)) == 64


@pytest.mark.parametrize("path", ["/abs", "a/../b", "..", "a//b", "a/", "./a", "a/./b"])
def test_bad_paths_rejected(path):
    with pytest.raises(InvalidInput):
        mf.encode([Entry(path, mf.FILE)])


def test_hardlink_must_follow_its_file():
    with pytest.raises(InvalidInput):
        mf.encode([Entry("b", mf.HARDLINK, target="a")])
    mf.encode([Entry("a", mf.FILE), Entry("b", mf.HARDLINK, target="a")])


def test_duplicate_paths_rejected():
    with pytest.raises(InvalidInput):
        mf.encode([Entry("a", mf.FILE), Entry("a", mf.DIR)])


@pytest.mark.parametrize("data", [b"", b"{", b'{"format":9,"entries":[]}', b'{"format":1,"entries":[[1]]}'])
def test_garbage_is_corrupt_not_a_crash(data):
    with pytest.raises(Corrupt):
        mf.decode(data)
