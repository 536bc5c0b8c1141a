"""What a container changed (``diff``) and turning that into an image (``commit``).

Both read the container's upper dir (overlayfs format: a 0/0 character
device is a whiteout, ``trusted.overlay.opaque`` marks a replaced dir)
against the image's merged tree. Mountpoints the runtime had to create
(/proc, /dev, /sys, /etc/hosts, /etc/hostname, /etc/resolv.conf when the
image lacks them) are left out, as docker's init layer leaves them out.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass

from layerfs.runtime.containers import RUNTIME_PATHS, Container
from layerfs.runtime.rootpath import is_unused_mountpoint
from layerfs.store import images as img
from layerfs.store import manifest as mf
from layerfs.store import references, scratch, transfer
from layerfs.store.images import Image
from layerfs.store.store import Store
from layerfs.store.tree import MergedTree


@dataclass(frozen=True)
class Change:
    kind: str   # "A" added, "C" changed, "D" deleted
    path: str   # absolute, as the container sees it

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _runtime_only(upper: str, rel: str, tree: MergedTree) -> bool:
    """A mountpoint the runtime made: absent from the image and unused."""
    return rel in RUNTIME_PATHS and rel not in tree.entries and is_unused_mountpoint(os.path.join(upper, rel))


def _same_dir(st: os.stat_result, tree: MergedTree, rel: str) -> bool:
    entry = tree.entries.get(rel)
    return (entry is not None and entry.kind == mf.DIR and stat.S_ISDIR(st.st_mode)
            and stat.S_IMODE(st.st_mode) == entry.mode and st.st_uid == entry.uid
            and st.st_gid == entry.gid)


def container_changes(store: Store, c: Container) -> list[Change]:
    """docker diff: A/C/D per path of the upper dir, sorted by path."""
    if not os.path.isdir(c.upper):
        return []
    tree = store.merged_tree(store.image(c.config.image_id))
    found: dict[str, tuple[str, os.stat_result]] = {}
    for directory, dirs, files in os.walk(c.upper):
        for name in dirs + files:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, c.upper)
            st = os.lstat(full)
            if _runtime_only(c.upper, rel, tree):
                continue
            if _is_whiteout(st):
                kind = "D"
            else:
                kind = "C" if rel in tree.entries else "A"
            found[rel] = (kind, st)
    # A directory only copied up to hold a hidden mountpoint, unchanged
    # itself and with nothing else below it, is not a change.
    listed = sorted(found)
    changes = []
    for rel in listed:
        kind, st = found[rel]
        if kind == "C" and _same_dir(st, tree, rel) and not any(
                other.startswith(rel + "/") for other in listed):
            continue
        changes.append(Change(kind, "/" + rel))
    return changes


def commit_container(store: Store, c: Container, ref: str, message: str = "",
                     author: str = "") -> Image:
    """docker commit: the upper dir becomes one new layer on the image.

    The upper is staged into the store's tmp dir with hard links (no bytes
    copied; the store refuses to import from inside itself otherwise),
    without the runtime's mountpoints. The image's config is kept.
    """
    references.parse(ref)
    image = store.image(c.config.image_id)
    tree = store.merged_tree(image)
    # The writer lease keeps gc away from the staging dir and from the new
    # layer until the image names it.
    with store.writing():
        stage = scratch.mkdtemp(store.tmp_dir, "commit")
        try:
            staged = os.path.join(stage, "upper")
            _stage_upper(c.upper, staged, tree)
            layer = transfer.import_layer(store, staged, image, as_layer=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        comment = message or (f"author: {author}" if author else "")
        history = img.history_entry(f"layerfs commit {c.name}", comment=comment)
        new = store.put_image(img.with_layer(image.config, layer, history))
        store.tag(new.id, ref)
    return new


def _stage_upper(upper: str, dest: str, tree: MergedTree) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        rel_dir = os.path.relpath(directory, upper)
        skipped = set()
        for name in names:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if _runtime_only(upper, rel, tree):
                skipped.add(name)
        return skipped

    if not os.path.isdir(upper):
        os.makedirs(dest)
        return
    shutil.copytree(upper, dest, symlinks=True, copy_function=os.link, ignore=ignore)
    # copytree copies modes, times and xattrs of directories, not owners.
    for directory, dirs, _ in os.walk(upper):
        for name in [""] + dirs:
            src = os.path.join(directory, name) if name else directory
            dst = os.path.join(dest, os.path.relpath(src, upper))
            if os.path.isdir(dst) and not os.path.islink(dst):
                st = os.lstat(src)
                os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
