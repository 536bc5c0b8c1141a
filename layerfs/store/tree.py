"""Union of layers (overlayfs rules) and the difference between two trees.

``flatten`` applies layers bottom to top the way overlayfs resolves a lookup:
the upper-most entry wins, a whiteout deletes the path below it, an opaque
dir hides everything the lower layers had beneath it, and a non-directory
replacing a directory takes its subtree away.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry


@dataclass
class MergedTree:
    """A flattened tree: path -> entry, hardlinks resolved to their content.

    ``links`` maps a path to its hardlink-group key (layer index, first
    path) so exporters can recreate the group; paths absent from it are
    single links. ``link_counts`` is each group's size in its own layer,
    covered members included: overlayfs shows a lower file's nlink as its
    layer has it, even where an upper layer hides some of its names.
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    children: dict[str, set[str]] = field(default_factory=dict)
    links: dict[str, tuple[int, str]] = field(default_factory=dict)
    link_counts: dict[tuple[int, str], int] = field(default_factory=dict)

    def remove_subtree(self, path: str) -> None:
        # A loop, not recursion: a layer may nest thousands of dirs.
        todo = [path]
        while todo:
            p = todo.pop()
            todo.extend(f"{p}/{child}" if p else child for child in self.children.pop(p, ()))
            self.entries.pop(p, None)
            self.links.pop(p, None)

    def put(self, e: Entry) -> None:
        old = self.entries.get(e.path)
        if old is not None and old.kind == mf.DIR and e.kind != mf.DIR:
            self.remove_subtree(e.path)
        self.entries[e.path] = e
        self.links.pop(e.path, None)
        if e.path:
            parent, _, name = e.path.rpartition("/")
            self.children.setdefault(parent, set()).add(name)

    def delete(self, path: str) -> None:
        self.remove_subtree(path)
        if path:
            parent, _, name = path.rpartition("/")
            self.children.get(parent, set()).discard(name)

    def hide_below(self, path: str) -> None:
        for child in self.children.pop(path, set()):
            self.remove_subtree(f"{path}/{child}" if path else child)

    def sorted_entries(self) -> list[Entry]:
        return sorted(self.entries.values(), key=lambda e: mf.sort_key(e.path))

    def link_groups(self) -> dict[str, list[str]]:
        """{holder path: other paths} for the hardlink groups still present."""
        groups: dict[tuple[int, str], list[str]] = {}
        for path, key in self.links.items():
            groups.setdefault(key, []).append(path)
        out = {}
        for members in groups.values():
            if len(members) > 1:
                members.sort(key=mf.sort_key)
                out[members[0]] = members[1:]
        return out


def flatten(layers: Sequence[Iterable[Entry]]) -> MergedTree:
    tree = MergedTree()
    tree.put(Entry("", mf.DIR, 0o755))
    for index, entries in enumerate(layers):
        apply_layer(tree, index, list(entries))
    return tree


def apply_layer(tree: MergedTree, index: int, entries: list[Entry]) -> None:
    files = {e.path: e for e in entries if e.kind == mf.FILE}
    for e in entries:
        if e.kind == mf.WHITEOUT:
            tree.delete(e.path)
            continue
        # The tree's dirs have only dirs above them: the walk up stops at the first.
        for anc in mf.missing_dirs(e.path, lambda p: p in tree.entries and tree.entries[p].kind == mf.DIR):
            tree.put(Entry(anc, mf.DIR, 0o755))
        if e.kind == mf.DIR and e.opaque:
            tree.hide_below(e.path)
        if e.kind == mf.HARDLINK:
            holder = files[e.target]
            tree.put(replace(holder, path=e.path))
            key = (index, e.target)
            tree.links[e.path] = key
            tree.links.setdefault(e.target, key)
            tree.link_counts[key] = tree.link_counts.get(key, 1) + 1
            continue
        tree.put(replace(e, opaque=False) if e.opaque else e)


def _same(a: Entry, b: Entry) -> bool:
    return a == b


def diff(lower: MergedTree, upper: MergedTree) -> list[Entry]:
    """Entries of a layer that turns *lower* into *upper*.

    Changed and new paths are included with their ancestors (as docker and
    overlayfs need the parent dirs to exist in the layer); paths that
    vanished become whiteouts; a dir replaced by another kind is handled by
    the replacing entry itself.
    """
    out: dict[str, Entry] = {}
    for path, e in upper.entries.items():
        old = lower.entries.get(path)
        changed = old is None or not _same(old, e) or upper.links.get(path) != lower.links.get(path)
        if changed and path:
            out[path] = e
    for path, old in lower.entries.items():
        if path in upper.entries:
            continue
        parent = mf.parent_of(path)
        if parent in upper.entries and upper.entries[parent].kind == mf.DIR and parent in lower.entries \
                and lower.entries[parent].kind == mf.DIR:
            out[path] = Entry(path, mf.WHITEOUT)
    for path in list(out):
        for anc in mf.missing_dirs(path, lambda p: p in out):
            if anc in upper.entries:
                out[anc] = upper.entries[anc]
    if "" not in out:
        out[""] = upper.entries[""]
    groups = _pull_in_link_groups(upper, out)
    return mf.canonical_links(list(out.values()), groups)


def _pull_in_link_groups(tree: MergedTree, chosen: dict[str, Entry]) -> dict[str, list[str]]:
    """A layer that carries one link of a group carries all of it, so the
    paths stay one inode when the layer is applied."""
    groups = {}
    for holder, others in tree.link_groups().items():
        members = [holder, *others]
        if not any(p in chosen for p in members):
            continue
        for p in members:
            chosen[p] = tree.entries[p]
            for anc in mf.missing_dirs(p, lambda q: q in chosen):
                chosen[anc] = tree.entries[anc]
        groups[holder] = others
    return groups
