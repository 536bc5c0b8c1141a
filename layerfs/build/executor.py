"""Run a parsed Dockerfile against the store: the step executor.

Each step turns a parent image into a child image (metadata-only steps add a
history row with ``empty_layer``; COPY/ADD/RUN/WORKDIR-that-creates add a
layer). Every step's result is recorded in the store-wide build cache
(``refs`` kind ``build-cache``) under a key that digests the parent image,
the instruction after substitution, the variables it sees and, for COPY/ADD,
the digest of the sources -- so any Dockerfile, tag or context path that
reaches the same step reuses it (moby/buildkit's cache keys, in spirit).

The layers of COPY, ADD and WORKDIR are placed as entries on the parent
image by :mod:`layerfs.build.staging` (no tree on the host); RUN's come
from the upper dir of a layerfs mount of the parent.

The library never prints: progress goes to the ``write`` callable the
caller passes, one line per call, in the classic docker builder's wording,
and as :class:`BuildEvent` records to ``on_event`` for a live display.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from layerfs.build import dockerfile as dfm
from layerfs.build import image_sources, run_mounts, staging, substitution
from layerfs.build.context import BuildContext, BuildContextError, CopySource, ResolvedSources
from layerfs.errors import InvalidInput, LayerfsError, NotFound, Unsupported
from layerfs.fs import backend as backends
from layerfs.fs.helper import mount_for_owner, start_forkserver
from layerfs.fs.registry import force_unmount
from layerfs.procfs import is_mountpoint
from layerfs.store import images as img
from layerfs.store import references, refs
from layerfs.store.images import Image
from layerfs.store.refs import Ref
from layerfs.store.store import Store

__all__ = ["BuildError", "BuildEvent", "BuildOptions", "BuildResult", "Builder", "CACHE_KIND", "build", "prune_cache"]

CACHE_KIND = refs.BUILD_CACHE
DEFAULT_SHELL = ("/bin/sh", "-c")
# Bumped when the same step starts making a different layer (2: COPY, ADD
# and WORKDIR place entries: links followed in the image, symlink times).
_KEY_VERSION = "layerfs-build-2"

Writer = Callable[[str], None]


class BuildError(LayerfsError):
    """A build step failed. The CLI exits with the class's ``exit_code``
    (1, as ``docker build`` does), never with the step's own status: 3
    would read as "damaged store". ``step_exit_code`` keeps a RUN step's
    status, which the message also shows."""

    def __init__(self, message: str, step_exit_code: int | None = None):
        super().__init__(message)
        self.step_exit_code = step_exit_code


@dataclass(frozen=True)
class BuildOptions:
    context: str
    dockerfile: str = "Dockerfile"
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    network: str = "host"
    #: ``--secret`` sources by id, for ``RUN --mount=type=secret``.
    secrets: Mapping[str, run_mounts.SecretSource] = field(default_factory=dict)
    #: how RUN steps mount their rootfs (``fuse``/``kernel``; None: the store's default)
    backend: str | None = None


@dataclass(frozen=True)
class BuildResult:
    image: Image
    tags: tuple[str, ...]
    steps: int
    cached: int


@dataclass(frozen=True)
class BuildEvent:
    """What the builder reports, for a caller that draws its own display.

    ``kind`` is one of: ``step`` (a step starts; ``text`` is the classic
    ``Step N/M : ...`` line), ``cached`` (the step was a cache hit),
    ``done`` (the step's image; ``image_id`` is set), ``output`` (one line a
    RUN step printed), ``warning``, ``info``, ``built`` and ``tagged``.
    ``text`` is always the classic builder's line for it.
    """

    kind: str
    text: str
    step: int = 0
    total: int = 0
    image_id: str | None = None


def build(store: Store, options: BuildOptions, write: Writer | None = None,
          on_event: Callable[[BuildEvent], None] | None = None) -> BuildResult:
    """Build; each progress line goes to ``write`` and, as a structured
    :class:`BuildEvent`, to ``on_event`` (either may be None).

    The whole build holds the store's writer lease: its staging dirs live
    under the store's tmp/ and each new layer is unreferenced until the
    step's image names it, so gc must wait for the build to end."""
    with store.writing():
        return Builder(store, write, on_event).build(options)


def prune_cache(store: Store) -> int:
    """Drop every build-cache record and every cache mount not in use;
    returns how many records. Run gc to free the layers' space."""
    run_mounts.prune_cache_mounts(store.root)
    return store.drop_refs(CACHE_KIND)


def _short(image_id: str) -> str:
    return image_id[:12]


def _describe(value: Any) -> Any:
    """A JSON-able description of an expanded instruction, without where it
    was written (line, original text), so equal steps get equal keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"@": type(value).__name__}
        for f in dataclasses.fields(value):
            if f.name in ("line", "original"):
                continue
            out[f.name] = _describe(getattr(value, f.name))
        return out
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return value


def _env_list_to_dict(env: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in env or ():
        k, _, v = item.partition("=")
        out[k] = v
    return out


def _keyed_env(scope: substitution.Scope) -> dict[str, str]:
    """The variables a step's cache key holds: the proxy args, unless an
    ARG declares them, reach RUN but not the key (BuildKit drops ProxyEnv
    from an exec's cache map; docker's classic builder likewise)."""
    declared = scope.variables()
    return {k: v for k, v in scope.run_env().items()
            if k in declared or k not in substitution.PREDEFINED_ARGS}


def _sde() -> int | None:
    v = os.environ.get("SOURCE_DATE_EPOCH")
    return int(v) if v and v.isdigit() else None


@dataclass
class _Stage:
    """Mutable state while building one stage."""

    image: Image | None          # the current image (None: scratch, nothing yet)
    scope: substitution.Scope
    cmd_set: bool = False


class Builder:
    def __init__(self, store: Store, write: Writer | None = None,
                 on_event: Callable[[BuildEvent], None] | None = None):
        self.store = store
        self.write: Writer = write or (lambda line: None)
        self.on_event = on_event
        self._step_no = 0
        self._total = 0
        self._extra_roots: dict[str, str] = {}
        self._generated_dirs: list[str] = []
        self._has_run = False
        self._forkserver_started = False
        self.no_cache = False
        self.network = "host"
        self.backend: str | None = None
        self.secrets: Mapping[str, run_mounts.SecretSource] = {}
        self._run_from: dict[str, Image] = {}
        self._run_binds: dict[str, ResolvedSources] = {}
        self.cached = 0

    def _emit(self, kind: str, text: str, image_id: str | None = None) -> None:
        """One line of progress: to ``write`` as text, to ``on_event`` as a
        :class:`BuildEvent` (a live display keys on ``kind``)."""
        if self.on_event is not None:
            self.on_event(BuildEvent(kind, text, self._step_no, self._total, image_id))
        self.write(text)

    # -- the whole build ---------------------------------------------------

    def build(self, options: BuildOptions) -> BuildResult:
        self.no_cache = options.no_cache
        self.network = options.network
        self.secrets = options.secrets
        self.backend = backends.resolve(self.store.root, options.backend)
        for t in options.tags:
            references.parse(t)
        cache_path = self.store.layout.build_stat_cache
        with BuildContext.open(options.context, dockerfile=options.dockerfile,
                               cache_path=cache_path) as ctx:
            self._ctx = ctx
            text = ctx.read_dockerfile()
            df = dfm.parse(text, file=options.dockerfile)
            if not df.stages:
                raise InvalidInput(f"{options.dockerfile}: the Dockerfile is empty (no FROM instruction)")
            stages = dfm.required_stages(df, options.target, options.build_args)
            for warning in substitution.unused_build_args(df, options.build_args, stages):
                self._emit("warning", warning)
            total = sum(1 + len(s.instructions) for s in stages)
            self._has_run = any(isinstance(i, dfm.Run) for s in stages for i in s.instructions)
            built: dict[int, Image | None] = {}
            step = 0
            final: Image | None = None
            for stage in stages:
                step += 1
                st = self._from(df, stage, built, options.build_args, step, total)
                for instr in stage.instructions:
                    step += 1
                    self._step(ctx, df, stage, st, instr, step, total, built)
                if st.image is None:
                    st.image = self._put(None, img.history_entry("FROM scratch", empty_layer=True), {})
                built[stage.index] = st.image
                final = st.image
        assert final is not None
        for t in options.tags:
            self.store.tag(final.id, t)
        self._emit("built", f"Successfully built {_short(final.id)}", image_id=final.id)
        for t in options.tags:
            self._emit("tagged", f"Successfully tagged {references.parse(t)}")
        return BuildResult(final, tuple(options.tags), total, self.cached)

    # -- FROM ----------------------------------------------------------------

    def _from(self, df: dfm.Dockerfile, stage: dfm.Stage, built: dict[int, Image | None],
              build_args: Mapping[str, str], step: int, total: int) -> _Stage:
        scope0 = substitution.Scope.for_stage(df, build_args)
        frm = substitution.expand_instruction(stage.from_, scope0.global_args, escape=df.escape, file=df.file)
        assert isinstance(frm, dfm.From)
        self._step_no, self._total = step, total
        self._emit("step", f"Step {step}/{total} : {stage.from_.original}")
        base_stage = df.stage(frm.image, before=stage.index, by_index=False)
        image: Image | None
        if base_stage is not None:
            image = built[base_stage.index]
        elif frm.image.lower() == "scratch":
            image = None
        else:
            try:
                image = self.store.image(frm.image)
            except NotFound:
                raise NotFound(
                    f"{df.file}:{stage.from_.line}: FROM {frm.image}: no such image in the store; "
                    f"get it with `layerfs pull {frm.image}` (or `layerfs bootstrap busybox|debian`, "
                    f"or `layerfs import`)") from None
        if image is not None:
            self._emit("done", f" ---> {_short(image.id)}", image_id=image.id)
        base_env = _env_list_to_dict(image.runtime_config.get("Env")) if image else {}
        st = _Stage(image, substitution.Scope.for_stage(df, build_args, base_env))
        triggers = list((image.runtime_config.get("OnBuild") or []) if image else [])
        if triggers:
            self._emit("info", f"# Executing {len(triggers)} build trigger{'s' if len(triggers) > 1 else ''}")
            # The child does not inherit its base's triggers.
            rc = dict(image.runtime_config)
            rc.pop("OnBuild", None)
            st.image = self._put(image.config, img.history_entry("ONBUILD triggers", empty_layer=True), rc)
            for text in triggers:
                try:
                    instr = dfm.parse(f"FROM scratch\n{text}", file=f"{frm.image} ONBUILD").stages[0].instructions[0]
                except (LayerfsError, IndexError) as exc:
                    raise InvalidInput(f"bad ONBUILD trigger {text!r} in {frm.image}: {exc}") from None
                self._run_instruction(self._ctx, df, stage, st, instr, built, trigger=True)
        return st

    _ctx: BuildContext | None = None

    # -- one step ------------------------------------------------------------

    def _step(self, ctx: BuildContext, df: dfm.Dockerfile, stage: dfm.Stage, st: _Stage,
              instr: dfm.Instruction, step: int, total: int, built: dict[int, Image | None]) -> None:
        self._ctx = ctx
        self._step_no, self._total = step, total
        self._emit("step", f"Step {step}/{total} : {instr.original}")
        self._run_instruction(ctx, df, stage, st, instr, built)

    def _run_instruction(self, ctx: BuildContext | None, df: dfm.Dockerfile, stage: dfm.Stage,
                         st: _Stage, instr: dfm.Instruction, built: dict[int, Image | None],
                         trigger: bool = False) -> None:
        try:
            self._run_instruction_body(ctx, df, stage, st, instr, built)
        finally:
            for tmp in self._generated_dirs:
                shutil.rmtree(tmp, ignore_errors=True)
            self._generated_dirs = []
            self._extra_roots = {}

    def _run_instruction_body(self, ctx: BuildContext | None, df: dfm.Dockerfile, stage: dfm.Stage,
                              st: _Stage, instr: dfm.Instruction, built: dict[int, Image | None]) -> None:
        scope_before = st.scope
        expanded, st.scope = st.scope.apply(instr)
        extra: dict[str, Any] = {}
        sources: ResolvedSources | None = None
        from_image: Image | None = None
        if isinstance(expanded, (dfm.Copy, dfm.Add)):
            if ctx is None:
                raise InvalidInput(f"{instr.keyword} needs a build context")
            if isinstance(expanded, dfm.Copy) and expanded.from_:
                from_image = self._from_image(df, stage, expanded.from_, built)
                extra["from"] = from_image.id
            if from_image is None:
                try:
                    sources = self._resolve_sources(ctx, df, instr, expanded, scope_before)
                except BuildContextError as exc:
                    raise BuildContextError(f"{df.file}:{instr.line}: {exc}") from None
                extra["sources"] = sources.digest
        elif isinstance(expanded, dfm.Run):
            where = f"{df.file}:{instr.line}"
            extra["mounts"] = self._run_inputs(ctx, df, stage, st, expanded, built, where)
        self._cached_or_execute(st, expanded, instr, sources, from_image, df, scope_before, extra)
        if isinstance(expanded, dfm.Cmd):
            st.cmd_set = True
        self._emit("done", f" ---> {_short(st.image.id)}", image_id=st.image.id)

    def _cached_or_execute(self, st: _Stage, expanded: dfm.Instruction, instr: dfm.Instruction,
                           sources: ResolvedSources | None, from_image: Image | None,
                           df: dfm.Dockerfile, scope_before: substitution.Scope,
                           extra: dict[str, Any]) -> None:
        key = self._cache_key(st.image, expanded, scope_before, extra)
        hit = None if self.no_cache else self._cache_lookup(key)
        if hit is None and self._has_run and not self._forkserver_started:
            # The first step to execute: start the RUN steps' mount helper
            # now so its start overlaps this step (a fully cached build
            # never pays for it).
            self._forkserver_started = True
            start_forkserver()
        if hit is not None:
            self._emit("cached", " ---> Using cache")
            self.cached += 1
            st.image = hit
        else:
            st.image = self._execute(st, expanded, instr, sources, from_image, df, scope_before)
            self.store.add_ref(Ref(CACHE_KIND, key, image_id=st.image.id,
                                   layer_id=st.image.layers[-1] if st.image.layers else None,
                                   data=json.dumps({"created_by": instr.original})))

    # -- COPY/ADD sources that are not in the context: URLs and heredocs -----

    def _resolve_sources(self, ctx: BuildContext, df: dfm.Dockerfile, instr: dfm.Instruction,
                         e: dfm.Copy | dfm.Add, scope: substitution.Scope) -> ResolvedSources:
        """Context sources, ADD URLs (fetched now: the key is their content)
        and heredocs, in the order written, with one digest over all."""
        docs = {f"<<{'-' if h.strip_tabs else ''}{h.name}": h for h in e.heredocs}
        docs.update({f"<<{h.name}": h for h in e.heredocs})
        special = [p for p in e.sources if _is_url(p) or _heredoc_word(p, docs) is not None]
        if not special:
            return ctx.resolve(e.sources, instruction=e.keyword, exclude=e.exclude)
        if any(_is_url(p) for p in special) and not isinstance(e, dfm.Add):
            raise InvalidInput(f"{df.file}:{instr.line}: COPY cannot take a URL as source (use ADD)")
        gen = tempfile.mkdtemp(prefix="build-src-", dir=self.store.tmp_dir)
        self._generated_dirs.append(gen)
        out: list[CopySource] = []
        hasher = blake3.blake3()
        for n, pattern in enumerate(e.sources):
            sub = os.path.join(gen, str(n))
            doc = _heredoc_word(pattern, docs)
            if doc is not None:
                os.mkdir(sub)
                content = doc.content
                if doc.expand:
                    content = substitution.expand_raw(content, scope.variables(), df.escape)
                with open(os.path.join(sub, doc.name), "w") as f:
                    f.write(content)
                os.chmod(os.path.join(sub, doc.name), 0o644)
                name = doc.name
            elif _is_url(pattern):
                os.mkdir(sub)
                assert isinstance(e, dfm.Add)
                name = _fetch_url(pattern, sub, e.checksum, f"{df.file}:{instr.line}")
            else:
                got = ctx.resolve([pattern], instruction=e.keyword, exclude=e.exclude)
                out.extend(got.sources)
                hasher.update(got.digest.encode())
                continue
            got = BuildContext(sub).resolve([name], instruction=e.keyword)
            for src in got.sources:
                src = dataclasses.replace(src, pattern=pattern)
                self._extra_roots[pattern] = sub
                out.append(src)
            hasher.update(got.digest.encode())
        return ResolvedSources(tuple(out), hasher.hexdigest())

    def _from_image(self, df: dfm.Dockerfile, stage: dfm.Stage, ref: str,
                    built: dict[int, Image | None]) -> Image:
        dep = df.stage(ref, before=stage.index)
        if dep is not None:
            image = built.get(dep.index)
            if image is None:
                raise InvalidInput(f"--from={ref}: stage has no content")
            return image
        try:
            return self.store.image(ref)
        except NotFound:
            raise NotFound(f"--from={ref}: no such stage or image; get it with `layerfs pull {ref}`") from None

    def _cache_key(self, parent: Image | None, expanded: dfm.Instruction,
                   scope: substitution.Scope, extra: Mapping[str, Any]) -> str:
        doc = {
            "v": _KEY_VERSION,
            "parent": parent.id if parent else "scratch",
            "instruction": _describe(expanded),
            "env": sorted(_keyed_env(scope).items()),
            "extra": dict(extra),
            "sde": _sde(),
        }
        return blake3.blake3(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def _cache_lookup(self, key: str) -> Image | None:
        ref = self.store.get_ref(CACHE_KIND, key)
        if ref is None or ref.image_id is None:
            return None
        try:
            return self.store.image(ref.image_id)
        except NotFound:
            return None

    def _put(self, base: dict | None, history: dict, runtime: dict, layer: str | None = None) -> Image:
        return self.store.put_image(img.with_layer(base, layer, history, runtime))

    # -- executing a step --------------------------------------------------

    def _execute(self, st: _Stage, e: dfm.Instruction, instr: dfm.Instruction,
                 sources: ResolvedSources | None, from_image: Image | None,
                 df: dfm.Dockerfile, scope: substitution.Scope) -> Image:
        base = st.image.config if st.image else None
        rc: dict[str, Any] = json.loads(json.dumps(st.image.runtime_config)) if st.image else {}
        created_by = instr.original
        layer: str | None = None
        shell = list(rc.get("Shell") or DEFAULT_SHELL)

        def command(c: dfm.Command) -> list[str]:
            return list(c.args) if c.exec_form else shell + list(c.args)

        if isinstance(e, dfm.Env):
            env = _env_list_to_dict(rc.get("Env"))
            env.update(e.pairs)
            rc["Env"] = [f"{k}={v}" for k, v in env.items()]
        elif isinstance(e, dfm.Label):
            labels = dict(rc.get("Labels") or {})
            labels.update(e.pairs)
            rc["Labels"] = labels
        elif isinstance(e, dfm.Maintainer):
            pass
        elif isinstance(e, dfm.Expose):
            ports = dict(rc.get("ExposedPorts") or {})
            for p in e.ports:
                ports[p if "/" in p else f"{p}/tcp"] = {}
            rc["ExposedPorts"] = ports
        elif isinstance(e, dfm.Volume):
            vols = dict(rc.get("Volumes") or {})
            for p in e.paths:
                vols[p] = {}
            rc["Volumes"] = vols
        elif isinstance(e, dfm.User):
            rc["User"] = e.user
        elif isinstance(e, dfm.Cmd):
            rc["Cmd"] = command(e.command)
        elif isinstance(e, dfm.Entrypoint):
            rc["Entrypoint"] = command(e.command)
            if not st.cmd_set:
                rc.pop("Cmd", None)
        elif isinstance(e, dfm.Stopsignal):
            rc["StopSignal"] = e.signal
        elif isinstance(e, dfm.Shell):
            rc["Shell"] = list(e.args)
        elif isinstance(e, dfm.Arg):
            pass
        elif isinstance(e, dfm.Onbuild):
            rc["OnBuild"] = list(rc.get("OnBuild") or []) + [instr.original.split(None, 1)[1]]
        elif isinstance(e, dfm.Healthcheck):
            hc: dict[str, Any] = {}
            if e.test is None:
                hc["Test"] = ["NONE"]
            elif e.test.exec_form:
                hc["Test"] = ["CMD", *e.test.args]
            else:
                hc["Test"] = ["CMD-SHELL", *e.test.args]
            for name, val in (("Interval", e.interval), ("Timeout", e.timeout),
                              ("StartPeriod", e.start_period), ("StartInterval", e.start_interval),
                              ("Retries", e.retries)):
                if val is not None:
                    hc[name] = val
            rc["Healthcheck"] = hc
        elif isinstance(e, dfm.Workdir):
            wd = posixpath.normpath(posixpath.join(rc.get("WorkingDir") or "/", e.path))
            rc["WorkingDir"] = wd
            stage = self._staging(st.image)
            path = stage.resolve(wd)
            if not stage.is_dir(path):
                # Like BuildKit: directories WORKDIR creates belong to USER.
                owner = staging.owner_ids(stage, rc["User"]) if rc.get("User") else (0, 0)
                stage.make_dirs(path, staging.NewDirs(*owner))
                layer = stage.commit()
        elif isinstance(e, (dfm.Copy, dfm.Add)):
            try:
                layer = self._copy(st, e, rc, sources, from_image)
            except InvalidInput as exc:
                if type(exc) not in (BuildContextError, InvalidInput):
                    raise  # errors that say where themselves
                raise type(exc)(f"{df.file}:{instr.line}: {exc}") from None
        elif isinstance(e, dfm.Run):
            layer = self._run(st, e, rc, shell, scope)
            created_by = f"RUN {' '.join(command(e.command))}" if not e.command.exec_form else instr.original
        else:
            raise Unsupported(f"{df.file}:{instr.line}: {instr.keyword} is not supported")
        hist = img.history_entry(created_by, empty_layer=layer is None)
        if isinstance(e, dfm.Maintainer):
            cfg = img.with_layer(base, None, hist, rc)
            cfg["author"] = e.name
            return self.store.put_image(cfg)
        return self._put(base, hist, rc, layer)

    # -- COPY / ADD ------------------------------------------------------------

    def _staging(self, base: Image | None) -> staging.Staging:
        """An empty layer on ``base`` (mtimes clamped to SOURCE_DATE_EPOCH)."""
        sde = _sde()
        tree = self.store.merged_tree(base) if base else None
        return staging.Staging(self.store, tree, None if sde is None else sde * 10**9)

    def _copy(self, st: _Stage, e: dfm.Copy | dfm.Add, rc: dict[str, Any],
              sources: ResolvedSources | None, from_image: Image | None) -> str:
        stage = self._staging(st.image)
        owner = staging.owner_ids(stage, e.chown) if e.chown else (0, 0)
        new = staging.NewDirs(*owner)
        chmod = _parse_chmod(e.chmod, e.keyword) if e.chmod else None
        plan = self._copy_plan(e, sources, from_image, owner, chmod)
        wd = rc.get("WorkingDir") or "/"
        as_dir = e.dest.endswith("/") or e.dest in (".", "..") or len(plan) > 1 \
            or any(kind == "dir" for kind, _ in plan)
        # The destination is resolved inside the image, links followed
        # (``/lib -> usr/lib`` takes the copy to /usr/lib, as in Docker).
        dest = stage.resolve(posixpath.normpath(posixpath.join(wd, e.dest)))
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

    def _copy_plan(self, e: dfm.Copy | dfm.Add, sources: ResolvedSources | None,
                   from_image: Image | None, owner: tuple[int, int],
                   chmod: Callable[[int, bool], int] | None) -> list[tuple[str, Any]]:
        """What a COPY/ADD places, source by source: ("file"|"dir", items)
        or ("archive", (host path, shown name, digest)) for ADD to unpack."""

        def mode(m: int, kind: str) -> int:
            return chmod(m, kind == "dir") if chmod is not None and kind != "symlink" else m

        if from_image is not None:
            found = image_sources.resolve(self.store.merged_tree(from_image), e.sources,
                                          instruction=e.keyword, exclude=e.exclude)
            return [(src.kind, [staging.Item(rel, dataclasses.replace(
                        ent, uid=owner[0], gid=owner[1], mode=mode(ent.mode, ent.kind)))
                     for rel, ent in src.entries]) for src in found]  # fmt: skip
        assert sources is not None and self._ctx is not None
        plan: list[tuple[str, Any]] = []
        for src in sources.sources:
            src_dir = self._extra_roots.get(src.pattern, self._ctx.root)
            if isinstance(e, dfm.Add) and src.kind == "file" and e.unpack is not False \
                    and not _is_url(src.pattern) and src.pattern not in self._extra_roots:
                path = os.path.join(src_dir, src.entries[0][1].path)
                if staging.is_archive(path):
                    plan.append(("archive", (path, src.pattern, src.entries[0][1].digest or "")))
                    continue
            plan.append((src.kind, [
                staging.Item(rel, *staging.host_entry(rel, os.path.join(src_dir, ent.path), ent.kind,
                                                      mode(ent.mode, ent.kind), owner, ent.link_target,
                                                      ent.digest))
                for rel, ent in src.entries]))
        return plan

    # -- RUN -------------------------------------------------------------------

    def _run_inputs(self, ctx: BuildContext | None, df: dfm.Dockerfile, stage: dfm.Stage, st: _Stage,
                    e: dfm.Run, built: dict[int, Image | None], where: str) -> list[Any]:
        """Check a RUN's flags before the cache lookup and return what its
        mounts read, for the key: a bind's source content, the image a
        bind or cache comes ``from`` (never a secret's or a cache's content)."""
        if e.network not in (None, "default", "none", "host"):
            raise InvalidInput(f"{where}: RUN --network={e.network}: want default, none or host")
        self._run_from, self._run_binds = {}, {}
        inputs: list[Any] = []
        for m in self._parse_run_mounts(e, st, where):
            if m.from_ is not None and m.from_ not in self._run_from:
                self._run_from[m.from_] = self._from_image(df, stage, m.from_, built)
            if m.type == "bind" and m.from_ is None:
                if ctx is None:
                    raise InvalidInput(f"{where}: RUN --mount=type=bind needs a build context")
                try:
                    got = ctx.resolve([m.source or "."], instruction="RUN --mount")
                except BuildContextError as exc:
                    raise BuildContextError(f"{where}: {exc}") from None
                self._run_binds[m.source] = got
                inputs.append(["context", m.source, got.digest])
            elif m.from_ is not None and m.type in ("bind", "cache"):
                inputs.append([m.type, m.from_, self._run_from[m.from_].id])
        return inputs

    def _parse_run_mounts(self, e: dfm.Run, st: _Stage, where: str) -> tuple[run_mounts.RunMount, ...]:
        workdir = (st.image.runtime_config.get("WorkingDir") if st.image else None) or "/"
        try:
            return tuple(run_mounts.parse_mount(spec, workdir) for spec in e.mounts)
        except LayerfsError as exc:
            raise type(exc)(f"{where}: {exc}") from None

    def _fill_mount(self, from_: str | None, source: str, dest: str, copy: bool) -> None:
        """Materialise a mount's source in ``dest`` (run_mounts.Filler)."""
        if from_ is None:
            assert self._ctx is not None
            run_mounts.stage_context(self._ctx.root, self._run_binds[source], dest, copy)
            return
        from layerfs.runtime.rootpath import secure_join
        from layerfs.store import transfer

        export = dest + ".export"
        try:
            transfer.export_image(self.store, self._run_from[from_], export)
            found = secure_join(export, source or "/")
            if not os.path.lexists(found):
                raise InvalidInput(f"--mount from={from_},source={source}: no such file or directory in {from_}")
            os.rename(found, dest)
        finally:
            shutil.rmtree(export, ignore_errors=True)

    def _run(self, st: _Stage, e: dfm.Run, rc: dict[str, Any], shell: list[str],
             scope: substitution.Scope) -> str:
        if st.image is None:
            raise InvalidInput("RUN in a stage FROM scratch: there is no shell to run it with")
        try:
            from layerfs.fs.mount import unmount
            from layerfs.runtime import ContainerSpec, run_container
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise Unsupported(f"RUN needs the layerfs FUSE filesystem and runtime: {exc}") from None
        from layerfs.build.mount_stubs import MountStubs, prune_unchanged_dirs
        from layerfs.runtime.spec import Tmpfs, Volume
        from layerfs.store import transfer

        argv = list(e.command.args) if e.command.exec_form else shell + list(e.command.args)
        if e.heredocs and not e.command.exec_form:
            argv = shell + _heredoc_script(e.command.args[0] if e.command.args else "", e.heredocs)
        env = dict(_env_list_to_dict(rc.get("Env")))
        env.update(scope.run_env())
        if "PATH" not in env:
            env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        mounts = self._parse_run_mounts(e, st, "RUN")
        tmp = tempfile.mkdtemp(prefix="build-run-", dir=self.store.tmp_dir)
        mp = os.path.join(tmp, "rootfs")
        upper = os.path.join(tmp, "upper")
        state = os.path.join(tmp, "state")
        os.mkdir(mp)
        os.mkdir(state)
        mounted = False
        w_fd = -1
        pump: threading.Thread | None = None
        prepared: run_mounts.PreparedMounts | None = None
        try:
            prepared = run_mounts.prepare(mounts, store_root=self.store.root, tmp_dir=tmp,
                                          secrets=self.secrets, fill=self._fill_mount,
                                          from_ids={k: v.id for k, v in self._run_from.items()})
            env.update(prepared.env)
            mount_for_owner(self.store.root, st.image.id, mp, upper, scratch=tmp, backend=self.backend)
            mounted = True
            stubs = MountStubs.make(mp, prepared.mountpoints())
            # The pipe is made after the FUSE daemon forked, so only the
            # container holds its write end and EOF means the step ended.
            r_fd, w_fd = os.pipe()
            pump = threading.Thread(target=self._pump, args=(r_fd,), daemon=True)
            pump.start()
            network = self.network if e.network in (None, "default") else e.network
            spec = ContainerSpec(rootfs=mp, args=tuple(argv), env=tuple(f"{k}={v}" for k, v in env.items()),
                                 cwd=rc.get("WorkingDir") or "/", user=rc.get("User") or "",
                                 network=network, hostname="buildkitsandbox",
                                 volumes=tuple(Volume(h, t, ro) for h, t, ro in prepared.binds),
                                 tmpfs=tuple(Tmpfs(t, size) for t, size in prepared.tmpfs))
            result = _run_interruptibly(run_container, spec, state, w_fd)
            os.close(w_fd)
            w_fd = -1
            pump.join()
            if result.exit_code != 0 or result.exec_error:
                why = result.exec_error or f"returned a non-zero code: {result.exit_code}"
                raise BuildError(f"The command '{' '.join(argv)}' {why}", step_exit_code=result.exit_code)
            stubs.remove()
            unmount(self.store.root, mp)
            mounted = False
            if stubs.created:
                prune_unchanged_dirs(upper, self.store.merged_tree(st.image))
            return transfer.import_layer(self.store, upper, st.image, as_layer=True)
        finally:
            if w_fd >= 0:
                os.close(w_fd)
            if pump is not None:
                pump.join(timeout=5)
            if mounted:
                force_unmount(self.store.root, mp)
            if prepared is not None:
                prepared.close()
            # Never recurse into a mount that is still there: rmtree would
            # delete through it (or hang on a wedged daemon).
            if not is_mountpoint(mp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _pump(self, fd: int) -> None:
        buf = b""
        with os.fdopen(fd, "rb", buffering=0) as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._emit("output", line.decode(errors="replace"))
        if buf:
            self._emit("output", buf.decode(errors="replace"))


# -- running a step's container ---------------------------------------------

def _run_interruptibly(run_container: Callable[..., Any], spec: Any, state: str, out_fd: int) -> Any:
    """run_container in a worker thread; Ctrl-C (KeyboardInterrupt in the
    main thread) kills the container instead of being forwarded to it --
    a ``/bin/sh -c`` PID 1 ignores SIGINT, so forwarding would do nothing."""
    box: dict[str, Any] = {}
    cancelled = threading.Event()
    started: list[Any] = []

    def on_start(proc: Any) -> None:
        started.append(proc)
        if cancelled.is_set():
            raise KeyboardInterrupt

    def target() -> None:
        try:
            box["result"] = run_container(spec, state, stdout=out_fd, stderr=out_fd, on_start=on_start)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="build-run", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        cancelled.set()
        for proc in started:
            proc.kill()
        worker.join()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


# -- ADD of a URL, heredocs ---------------------------------------------------

def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _heredoc_word(word: str, docs: Mapping[str, dfm.Heredoc]) -> dfm.Heredoc | None:
    if not word.startswith("<<"):
        return None
    return docs.get(word.replace("'", "").replace('"', ""))


URL_TIMEOUT = 60.0


def _fetch_url(url: str, dest_dir: str, checksum: str | None, where: str) -> str:
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


def _heredoc_script(command: str, docs: Sequence[dfm.Heredoc]) -> list[str]:
    """The shell arguments for a RUN with heredocs (BuildKit's rules).

    ``RUN <<EOF`` alone runs the document as the script (a ``#!`` line
    picks the interpreter: the document goes to a temporary file that is
    executed and removed). Otherwise the shell gets the command followed by
    the documents and their delimiters, so it does the redirection itself,
    and expansion as the (quoted or not) delimiter says.
    """
    words = command.strip()
    if len(docs) == 1 and words.replace("'", "").replace('"', "") in (f"<<{docs[0].name}", f"<<-{docs[0].name}"):
        body = docs[0].content
        if body.startswith("#!"):
            runner = ('t=$(mktemp) && printf %s "$1" > "$t" && chmod 700 "$t" && "$t"; '
                      'rc=$?; rm -f "$t"; exit $rc')
            return [runner, "sh", body]
        return [body]
    text = command
    for doc in docs:
        text += "\n" + doc.content + doc.name
    return [text + "\n"]


def _parse_chmod(spec: str, keyword: str) -> Callable[[int, bool], int]:
    """``--chmod``: octal (``755``) or symbolic like chmod(1) (``u+x``,
    ``go-w,a+rX``, ``u=rw,g=r,o=``); returns mode(old_mode, is_dir)."""
    if spec.isdigit():
        try:
            value = int(spec, 8)
        except ValueError:
            raise InvalidInput(f"{keyword} --chmod={spec}: invalid mode") from None
        if value > 0o7777:
            raise InvalidInput(f"{keyword} --chmod={spec}: invalid mode")
        return lambda _mode, _is_dir: value
    import re

    clauses = []
    for clause in spec.split(","):
        m = re.fullmatch(r"([ugoa]*)((?:[-+=][rwxXst]*)+)", clause)
        if not m:
            raise InvalidInput(f"{keyword} --chmod={spec}: invalid mode (octal, or symbolic like u+x,go-w)")
        clauses.append((m.group(1) or "a", re.findall(r"([-+=])([rwxXst]*)", m.group(2))))

    def apply(mode: int, is_dir: bool) -> int:
        mode &= 0o7777
        for who, ops in clauses:
            mask = 0
            for w, bits in (("u", 0o4700), ("g", 0o2070), ("o", 0o0007)):
                if w in who or "a" in who:
                    mask |= bits
            for op, perms in ops:
                bits = 0
                for p in perms:
                    if p == "r":
                        bits |= 0o444
                    elif p == "w":
                        bits |= 0o222
                    elif p == "x" or (p == "X" and (is_dir or mode & 0o111)):
                        bits |= 0o111
                    elif p == "s":
                        bits |= 0o6000
                    elif p == "t":
                        bits |= 0o1000
                bits &= mask | (0o1000 if "t" in perms and ("o" in who or "a" in who) else 0)
                if op == "+":
                    mode |= bits
                elif op == "-":
                    mode &= ~bits
                else:
                    mode = (mode & ~(mask & 0o777 | mask & 0o6000)) | bits
        return mode

    return apply
