"""COPY, ADD and WORKDIR: what a step places, and where, as one new layer.

The sources are already resolved (:mod:`layerfs.builder.sources` and the
context, or :mod:`layerfs.builder.image_sources` for ``--from``); this turns
them into a plan -- files and directories to place, archives for ADD to
unpack -- and places it on the parent image with a
:class:`~layerfs.builder.staging.Staging`, following Docker's rules for the
destination: a trailing ``/``, several sources or a directory source make
it a directory; otherwise a file source takes the destination's name. The
destination is resolved inside the image, links followed (``/lib ->
usr/lib`` takes the copy to /usr/lib, as in Docker).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Callable
from typing import Any

from layerfs.builder import dockerfile as dfm
from layerfs.builder import image_sources, staging
from layerfs.builder.chmod import parse_chmod
from layerfs.builder.context import ResolvedSources
from layerfs.builder.sources import GeneratedSources
from layerfs.store.images import Image
from layerfs.store.store import Store

__all__ = ["copy", "workdir"]

Plan = list[tuple[str, Any]]


def _staging(store: Store, base: Image | None, mtime_ns: int | None) -> staging.Staging:
    """An empty layer on ``base`` (mtimes clamped to ``mtime_ns``)."""
    return staging.Staging(store, store.merged_tree(base) if base else None, mtime_ns)


def workdir(store: Store, base: Image | None, path: str, user: str, *, mtime_ns: int | None) -> str | None:
    """WORKDIR's layer: the directory ``path``, if ``base`` lacks it."""
    stage = _staging(store, base, mtime_ns)
    target = stage.resolve(path)
    if stage.is_dir(target):
        return None
    # Like BuildKit: directories WORKDIR creates belong to USER.
    owner = staging.owner_ids(stage, user) if user else (0, 0)
    stage.make_dirs(target, staging.NewDirs(*owner))
    return stage.commit()


def copy(store: Store, base: Image | None, e: dfm.Copy | dfm.Add, cwd: str, *,
         resolved: ResolvedSources | None, from_image: Image | None, context_root: str,
         generated: GeneratedSources, mtime_ns: int | None) -> str:
    """The layer of COPY/ADD ``e`` on ``base``; returns its id. Sources are
    ``from_image``'s tree or ``resolved`` (in ``context_root``, or where
    ``generated`` wrote them)."""
    stage = _staging(store, base, mtime_ns)
    owner = staging.owner_ids(stage, e.chown) if e.chown else (0, 0)
    new = staging.NewDirs(*owner)
    chmod = parse_chmod(e.chmod, e.keyword) if e.chmod else None
    if from_image is not None:
        plan = _image_plan(store, e, from_image, owner, chmod)
    else:
        assert resolved is not None
        plan = _host_plan(e, resolved, context_root, generated, owner, chmod)
    as_dir = e.dest.endswith("/") or e.dest in (".", "..") or len(plan) > 1 \
        or any(kind == "dir" for kind, _ in plan)
    dest = stage.resolve(posixpath.normpath(posixpath.join(cwd, e.dest)))
    as_dir = as_dir or stage.is_dir(dest)
    if as_dir:
        stage.make_dirs(dest, new)
    for kind, what in plan:
        if kind == "archive":
            # Unpacked into dest, with or without a trailing '/'.
            stage.make_dirs(dest, new)
            path, shown, digest = what
            stage.add_archive(path, dest, shown, digest)
        elif as_dir:
            stage.add_items(what, dest, new)
        else:
            parent, _, name = dest.rpartition("/")
            stage.add_items([dataclasses.replace(i, rel=name) for i in what], parent, new)
    return stage.commit()


ModeFn = Callable[[int, bool], int] | None


def _mode(chmod: ModeFn, m: int, kind: str) -> int:
    return chmod(m, kind == "dir") if chmod is not None and kind != "symlink" else m


def _image_plan(store: Store, e: dfm.Copy | dfm.Add, image: Image, owner: tuple[int, int],
                chmod: ModeFn) -> Plan:
    """``COPY --from``: entries of the image's tree, owned as ``--chown`` says."""
    found = image_sources.resolve(store.merged_tree(image), e.sources,
                                  instruction=e.keyword, exclude=e.exclude)
    return [(src.kind, [staging.Item(rel, dataclasses.replace(
                ent, uid=owner[0], gid=owner[1], mode=_mode(chmod, ent.mode, ent.kind)))
             for rel, ent in src.entries]) for src in found]  # fmt: skip


def _host_plan(e: dfm.Copy | dfm.Add, resolved: ResolvedSources, context_root: str,
               generated: GeneratedSources, owner: tuple[int, int], chmod: ModeFn) -> Plan:
    """What a COPY/ADD places, source by source: ("file"|"dir", items)
    or ("archive", (host path, shown name, digest)) for ADD to unpack --
    a local tar only: URLs and heredocs are copied as they are."""
    plan: Plan = []
    for src in resolved.sources:
        src_dir = generated.root(src.pattern, context_root)
        if isinstance(e, dfm.Add) and src.kind == "file" and e.unpack is not False \
                and src.pattern not in generated:
            path = os.path.join(src_dir, src.entries[0][1].path)
            if staging.is_archive(path):
                plan.append(("archive", (path, src.pattern, src.entries[0][1].digest or "")))
                continue
        plan.append((src.kind, [
            staging.Item(rel, *staging.host_entry(rel, os.path.join(src_dir, ent.path), ent.kind,
                                                  _mode(chmod, ent.mode, ent.kind), owner, ent.link_target,
                                                  ent.digest))
            for rel, ent in src.entries]))
    return plan
