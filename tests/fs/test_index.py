"""The merged lower index and the inode table, without mounting anything."""

from __future__ import annotations

import stat

from layerfs.fs.index import LowerIndex
from layerfs.fs.inodes import InodeTable
from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry
from layerfs.store.tree import flatten


def _index() -> LowerIndex:
    base = [
        Entry("", mf.DIR, 0o755),
        Entry("a", mf.DIR, 0o755),
        Entry("a/f", mf.FILE, 0o644, size=3, digest="d" * 64, xattrs=(("user.k", b"v"),)),
        Entry("a/g", mf.HARDLINK, target="a/f"),
        Entry("b", mf.DIR, 0o700),
        Entry("b/c", mf.DIR, 0o755),
        Entry("b/l", mf.SYMLINK, 0o777, target="../a/f"),
        Entry("gone", mf.FILE, 0o644, digest="e" * 64, size=1),
    ]
    top = [Entry("", mf.DIR, 0o755), Entry("gone", mf.WHITEOUT), Entry("b", mf.DIR, 0o755, opaque=True),
           Entry("b/new", mf.FILE, 0o600, size=0, digest=mf.layer_id(b""))]
    return LowerIndex.from_tree(flatten([base, top]))


def test_slots_inodes_and_links():
    idx = _index()
    assert idx.paths[0] == b"" and idx.ino(0) == 1
    a = idx.child(0, b"a")
    f, g = idx.child(a, b"f"), idx.child(a, b"g")
    assert f >= 0 and g >= 0 and idx.ino(f) == idx.ino(g)
    assert idx.nlink(f) == 2 and idx.group(g) == sorted([f, g])
    assert idx.child(0, b"gone") == -1
    b = idx.child(0, b"b")
    assert sorted(idx.kids[b]) == [b"new"]  # opaque: b/c and b/l are hidden
    assert idx.nlink(0) == 2 + 2 and idx.nlink(b) == 2
    assert idx.xattrs(f) == {b"user.k": b"v"}
    e = idx.entry(f)
    assert e.kind == mf.FILE and e.path == "a/f" and e.size == 3


def test_a_covered_link_still_counts():
    """As overlayfs shows a lower file: nlink is its layer's link count,
    names a later layer hides or replaces included."""
    base = [Entry("", mf.DIR, 0o755), Entry("h1", mf.FILE, 0o644, size=1, digest="d" * 64),
            Entry("h2", mf.HARDLINK, target="h1"), Entry("h3", mf.HARDLINK, target="h1"),
            Entry("s1", mf.FILE, 0o644, size=1, digest="e" * 64), Entry("s2", mf.HARDLINK, target="s1")]
    top = [Entry("", mf.DIR, 0o755), Entry("h1", mf.FILE, 0o600, size=0, digest=mf.layer_id(b"")),
           Entry("s2", mf.WHITEOUT)]
    idx = LowerIndex.from_tree(flatten([base, top]))
    h1, h2, h3, s1 = (idx.child(0, n) for n in (b"h1", b"h2", b"h3", b"s1"))
    assert idx.nlink(h1) == 1 and idx.group(h2) == [h2, h3]
    assert idx.nlink(h2) == idx.nlink(h3) == 3
    assert idx.nlink(s1) == 2 and idx.group(s1) == [s1]  # the only name left
    again = LowerIndex.load(idx.dump())
    assert [again.nlink(s) for s in (h1, h2, h3, s1)] == [1, 3, 3, 2]


def test_cache_round_trip():
    idx = _index()
    again = LowerIndex.load(idx.dump())
    assert again.paths == idx.paths and again.meta == idx.meta and again.kids == idx.kids
    assert list(again.parent) == list(idx.parent) and again.groups == idx.groups
    assert again.link_counts == idx.link_counts


def test_inode_table_lookup_counts_and_forget():
    idx = _index()
    table = InodeTable(idx)
    a = idx.child(0, b"a")
    f = idx.child(a, b"f")
    node = table.get(idx.ino(f))
    assert node.fmt == stat.S_IFREG and node.parent == a + 1 and node.name in (b"f", b"g")
    assert len(node.all_links()) == 2
    table.looked_up(node.ino, 2)
    table.forget(node.ino, 1)
    assert node.ino in table.nodes
    table.forget(node.ino, 1)
    assert node.ino not in table.nodes  # plain lower: rebuilt from the index when needed
    node = table.get(idx.ino(f))
    node.upper = True
    table.looked_up(node.ino)
    table.forget(node.ino, 1)
    assert node.ino in table.nodes  # state that the index cannot give back stays
    node.drop_link(*node.all_links()[0])
    node.drop_link(*node.all_links()[0])
    assert node.unlinked
    table.maybe_drop(node.ino)
    assert node.ino not in table.nodes
    assert table.statistics().nodes == 0
