"""Where a step's sources come from: the context, ADD URLs, heredocs, and
other stages or images.

A COPY/ADD names its sources by patterns. Most are paths in the build
context (:meth:`BuildContext.resolve`); an ADD may name an ``http(s)://``
URL, fetched now because the cache key is its content; a COPY/ADD may name
a heredoc (``<<EOF``), written now with the step's variables. Those two
are *generated*: each is written into a temporary directory of its own
that :class:`GeneratedSources` owns and removes when the step is done.

``COPY --from`` and ``RUN --mount from=`` name a stage of this Dockerfile
(by name or index) or an image of the store: :func:`stage_or_image`.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
from collections.abc import Mapping

import blake3

from layerfs.builder import dockerfile as dfm
from layerfs.builder import substitution
from layerfs.builder.context import BuildContext, CopySource, ResolvedSources
from layerfs.errors import InvalidInput, NotFound
from layerfs.store import scratch
from layerfs.store.images import Image
from layerfs.store.store import Store

__all__ = ["URL_TIMEOUT", "GeneratedSources", "fetch_url", "is_url", "resolve", "stage_or_image"]

URL_TIMEOUT = 60.0


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class GeneratedSources:
    """The sources one step wrote itself, by pattern: where each lives.

    Use as a context manager: the directories go when the step ends."""

    def __init__(self, tmp_dir: str):
        self.tmp_dir = tmp_dir
        self.roots: dict[str, str] = {}
        self._dirs: list[str] = []

    def new_dir(self) -> str:
        path = scratch.mkdtemp(self.tmp_dir, "build-src")
        self._dirs.append(path)
        return path

    def root(self, pattern: str, default: str) -> str:
        """The directory ``pattern``'s entries are relative to."""
        return self.roots.get(pattern, default)

    def __contains__(self, pattern: str) -> bool:
        return pattern in self.roots

    def close(self) -> None:
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._dirs = []
        self.roots = {}

    def __enter__(self) -> GeneratedSources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve(ctx: BuildContext, e: dfm.Copy | dfm.Add, scope: substitution.Scope, *, escape: str,
            where: str, generated: GeneratedSources) -> ResolvedSources:
    """Context sources, ADD URLs (fetched now: the key is their content)
    and heredocs, in the order written, with one digest over all."""
    docs = {f"<<{'-' if h.strip_tabs else ''}{h.name}": h for h in e.heredocs}
    docs.update({f"<<{h.name}": h for h in e.heredocs})
    special = [p for p in e.sources if is_url(p) or _heredoc_word(p, docs) is not None]
    if not special:
        return ctx.resolve(e.sources, instruction=e.keyword, exclude=e.exclude)
    if any(is_url(p) for p in special) and not isinstance(e, dfm.Add):
        raise InvalidInput(f"{where}: COPY cannot take a URL as source (use ADD)")
    gen = generated.new_dir()
    out: list[CopySource] = []
    hasher = blake3.blake3()
    for n, pattern in enumerate(e.sources):
        sub = os.path.join(gen, str(n))
        doc = _heredoc_word(pattern, docs)
        if doc is not None:
            os.mkdir(sub)
            name = _write_heredoc(doc, sub, scope, escape)
        elif is_url(pattern):
            os.mkdir(sub)
            assert isinstance(e, dfm.Add)
            name = fetch_url(pattern, sub, e.checksum, where)
        else:
            got = ctx.resolve([pattern], instruction=e.keyword, exclude=e.exclude)
            out.extend(got.sources)
            hasher.update(got.digest.encode())
            continue
        got = BuildContext(sub).resolve([name], instruction=e.keyword)
        for src in got.sources:
            generated.roots[pattern] = sub
            out.append(dataclasses.replace(src, pattern=pattern))
        hasher.update(got.digest.encode())
    return ResolvedSources(tuple(out), hasher.hexdigest())


def stage_or_image(store: Store, df: dfm.Dockerfile, stage: dfm.Stage, ref: str,
                   built: Mapping[int, Image | None]) -> Image:
    """What ``--from=ref`` names: an earlier stage, else a store image."""
    dep = df.stage(ref, before=stage.index)
    if dep is not None:
        image = built.get(dep.index)
        if image is None:
            raise InvalidInput(f"--from={ref}: stage has no content")
        return image
    try:
        return store.image(ref)
    except NotFound:
        raise NotFound(f"--from={ref}: no such stage or image; get it with `layerfs pull {ref}`") from None


def _heredoc_word(word: str, docs: Mapping[str, dfm.Heredoc]) -> dfm.Heredoc | None:
    if not word.startswith("<<"):
        return None
    return docs.get(word.replace("'", "").replace('"', ""))


def _write_heredoc(doc: dfm.Heredoc, directory: str, scope: substitution.Scope, escape: str) -> str:
    content = doc.content
    if doc.expand:
        content = substitution.expand_raw(content, scope.variables(), escape)
    path = os.path.join(directory, doc.name)
    with open(path, "w") as f:
        f.write(content)
    os.chmod(path, 0o644)
    return doc.name


def fetch_url(url: str, dest_dir: str, checksum: str | None, where: str) -> str:
    """Download ``url`` into ``dest_dir``; returns the file's name (the last
    path segment, as docker names it), mode 0600, mtime from Last-Modified."""
    import email.utils
    import hashlib
    import urllib.error
    import urllib.parse
    import urllib.request

    path = urllib.parse.urlsplit(url).path
    name = posixpath.basename(path.rstrip("/")) or "index.html"
    if name in (".", ".."):
        name = "index.html"
    target = os.path.join(dest_dir, name)
    sha256 = hashlib.sha256()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "layerfs-build"})
        with urllib.request.urlopen(req, timeout=URL_TIMEOUT) as resp, open(target, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                sha256.update(chunk)
            modified = resp.headers.get("Last-Modified")
    except urllib.error.HTTPError as exc:
        raise InvalidInput(f"{where}: ADD {url}: cannot fetch: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise InvalidInput(f"{where}: ADD {url}: cannot fetch: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{where}: ADD {url}: cannot fetch: {exc}") from None
    if checksum:
        algo, _, want = checksum.partition(":")
        if algo != "sha256" or not want:
            raise InvalidInput(f"{where}: ADD --checksum={checksum}: only sha256:<hex> is supported")
        if sha256.hexdigest() != want.lower():
            raise InvalidInput(f"{where}: ADD {url}: checksum mismatch: expected {checksum}, "
                               f"got sha256:{sha256.hexdigest()}")
    os.chmod(target, 0o600)
    mtime = 0
    if modified:
        try:
            mtime = int(email.utils.parsedate_to_datetime(modified).timestamp())
        except (TypeError, ValueError, OverflowError):
            mtime = 0
    os.utime(target, (mtime, mtime))
    return name
