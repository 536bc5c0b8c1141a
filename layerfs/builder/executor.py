"""Run a parsed Dockerfile against the store: the step executor.

Each step turns a parent image into a child image (metadata-only steps add a
history row with ``empty_layer``; COPY/ADD/RUN/WORKDIR-that-creates add a
layer). Every step's result is recorded in the store-wide build cache
(``refs`` kind ``build-cache``) under a key that digests the parent image,
the instruction after substitution, the variables it sees and, for COPY/ADD,
the digest of the sources -- so any Dockerfile, tag or context path that
reaches the same step reuses it (moby/buildkit's cache keys, in spirit).

What a step does to the config is :func:`layerfs.builder.config.apply`.
The layers of COPY, ADD and WORKDIR are placed as entries on the parent
image (:mod:`layerfs.builder.copy_step`, no tree on the host), from sources
found by :mod:`layerfs.builder.sources`; RUN's come from the upper dir of a
layerfs mount of the parent (:mod:`layerfs.builder.run_step`).

The library never prints: progress goes to the ``write`` callable the
caller passes, one line per call, in the classic docker builder's wording,
and as :class:`BuildEvent` records to ``on_event`` for a live display.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from layerfs.builder import config as image_config
from layerfs.builder import copy_step, run_mounts, run_step, sources, substitution
from layerfs.builder import dockerfile as dfm
from layerfs.builder.context import BuildContext, BuildContextError, ResolvedSources
from layerfs.builder.run_step import BuildError
from layerfs.errors import InvalidInput, LayerfsError, NotFound, Unsupported
from layerfs.fs import backend as backends
from layerfs.fs.helper import start_forkserver
from layerfs.store import images as img
from layerfs.store import references, refs
from layerfs.store.images import Image
from layerfs.store.refs import Ref
from layerfs.store.statcache import StatCache
from layerfs.store.store import Store

__all__ = ["BuildError", "BuildEvent", "BuildOptions", "BuildResult", "Builder", "CACHE_KIND", "build", "prune_cache"]

CACHE_KIND = refs.BUILD_CACHE
# Bumped when the same step starts making a different layer (2: COPY, ADD
# and WORKDIR place entries: links followed in the image, symlink times).
_KEY_VERSION = "layerfs-build-2"

Writer = Callable[[str], None]


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


def _sde_ns() -> int | None:
    """The time new layers' mtimes are clamped to (SOURCE_DATE_EPOCH)."""
    sde = _sde()
    return None if sde is None else sde * 10**9


# Instructions whose whole effect is on the config (image_config.apply),
# or nothing (ARG's is on the variables, done by substitution.Scope).
_CONFIG_ONLY = (dfm.Env, dfm.Label, dfm.Maintainer, dfm.Expose, dfm.Volume, dfm.User, dfm.Cmd,
                dfm.Entrypoint, dfm.Stopsignal, dfm.Shell, dfm.Arg, dfm.Onbuild, dfm.Healthcheck)


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
        self._ctx: BuildContext | None = None
        self._generated = sources.GeneratedSources(store.tmp_dir)
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
        with BuildContext(options.context, dockerfile=options.dockerfile,
                          cache=StatCache(self.store.db)) as ctx:
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
        base_env = image_config.env_dict(image.runtime_config.get("Env")) if image else {}
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
                self._run_instruction(self._ctx, df, stage, st, instr, built)
        return st

    # -- one step ------------------------------------------------------------

    def _step(self, ctx: BuildContext, df: dfm.Dockerfile, stage: dfm.Stage, st: _Stage,
              instr: dfm.Instruction, step: int, total: int, built: dict[int, Image | None]) -> None:
        self._ctx = ctx
        self._step_no, self._total = step, total
        self._emit("step", f"Step {step}/{total} : {instr.original}")
        self._run_instruction(ctx, df, stage, st, instr, built)

    def _run_instruction(self, ctx: BuildContext | None, df: dfm.Dockerfile, stage: dfm.Stage,
                         st: _Stage, instr: dfm.Instruction, built: dict[int, Image | None]) -> None:
        with sources.GeneratedSources(self.store.tmp_dir) as self._generated:
            self._run_instruction_body(ctx, df, stage, st, instr, built)

    def _run_instruction_body(self, ctx: BuildContext | None, df: dfm.Dockerfile, stage: dfm.Stage,
                              st: _Stage, instr: dfm.Instruction, built: dict[int, Image | None]) -> None:
        scope_before = st.scope
        expanded, st.scope = st.scope.apply(instr)
        extra: dict[str, Any] = {}
        resolved: ResolvedSources | None = None
        from_image: Image | None = None
        if isinstance(expanded, (dfm.Copy, dfm.Add)):
            if ctx is None:
                raise InvalidInput(f"{instr.keyword} needs a build context")
            if isinstance(expanded, dfm.Copy) and expanded.from_:
                from_image = sources.stage_or_image(self.store, df, stage, expanded.from_, built)
                extra["from"] = from_image.id
            if from_image is None:
                try:
                    resolved = sources.resolve(ctx, expanded, scope_before, escape=df.escape,
                                               where=f"{df.file}:{instr.line}", generated=self._generated)
                except BuildContextError as exc:
                    raise BuildContextError(f"{df.file}:{instr.line}: {exc}") from None
                extra["sources"] = resolved.digest
        elif isinstance(expanded, dfm.Run):
            where = f"{df.file}:{instr.line}"
            extra["mounts"] = self._run_inputs(ctx, df, stage, st, expanded, built, where)
        self._cached_or_execute(st, expanded, instr, resolved, from_image, df, scope_before, extra)
        if isinstance(expanded, dfm.Cmd):
            st.cmd_set = True
        self._emit("done", f" ---> {_short(st.image.id)}", image_id=st.image.id)

    def _cached_or_execute(self, st: _Stage, expanded: dfm.Instruction, instr: dfm.Instruction,
                           resolved: ResolvedSources | None, from_image: Image | None,
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
            st.image = self._execute(st, expanded, instr, resolved, from_image, df, scope_before)
            self.store.add_ref(Ref(CACHE_KIND, key, image_id=st.image.id,
                                   layer_id=st.image.layers[-1] if st.image.layers else None,
                                   data=json.dumps({"created_by": instr.original})))

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
                 resolved: ResolvedSources | None, from_image: Image | None,
                 df: dfm.Dockerfile, scope: substitution.Scope) -> Image:
        base = st.image.config if st.image else None
        before: dict[str, Any] = st.image.runtime_config if st.image else {}
        rc = image_config.apply(before, e, cmd_set=st.cmd_set)
        created_by = instr.original
        layer: str | None = None
        if isinstance(e, dfm.Workdir):
            layer = self._workdir(st, rc)
        elif isinstance(e, (dfm.Copy, dfm.Add)):
            try:
                layer = self._copy(st, e, rc, resolved, from_image)
            except InvalidInput as exc:
                if type(exc) not in (BuildContextError, InvalidInput):
                    raise  # errors that say where themselves
                raise type(exc)(f"{df.file}:{instr.line}: {exc}") from None
        elif isinstance(e, dfm.Run):
            layer = self._run(st, e, rc, list(rc.get("Shell") or image_config.DEFAULT_SHELL), scope)
            if not e.command.exec_form:
                created_by = f"RUN {' '.join(image_config.shell_command(rc, e.command))}"
        elif type(e) not in _CONFIG_ONLY:
            raise Unsupported(f"{df.file}:{instr.line}: {instr.keyword} is not supported")
        hist = img.history_entry(created_by, empty_layer=layer is None)
        if isinstance(e, dfm.Maintainer):
            cfg = img.with_layer(base, None, hist, rc)
            cfg["author"] = e.name
            return self.store.put_image(cfg)
        return self._put(base, hist, rc, layer)

    def _workdir(self, st: _Stage, rc: Mapping[str, Any]) -> str | None:
        return copy_step.workdir(self.store, st.image, rc["WorkingDir"], rc.get("User") or "", mtime_ns=_sde_ns())

    def _copy(self, st: _Stage, e: dfm.Copy | dfm.Add, rc: dict[str, Any],
              resolved: ResolvedSources | None, from_image: Image | None) -> str:
        assert self._ctx is not None or from_image is not None
        return copy_step.copy(self.store, st.image, e, rc.get("WorkingDir") or "/", resolved=resolved,
                              from_image=from_image, context_root=self._ctx.root if self._ctx else "",
                              generated=self._generated, mtime_ns=_sde_ns())

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
                self._run_from[m.from_] = sources.stage_or_image(self.store, df, stage, m.from_, built)
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
        return run_step.run(self.store, st.image, e, rc, shell, scope.run_env(),
                            self._parse_run_mounts(e, st, "RUN"),
                            network=self.network, backend=self.backend, secrets=self.secrets,
                            fill=self._fill_mount,
                            from_ids={k: v.id for k, v in self._run_from.items()},
                            output=lambda line: self._emit("output", line))
