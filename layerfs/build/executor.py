"""Run a parsed Dockerfile against the store: the step executor.

Each step turns a parent image into a child image (metadata-only steps add a
history row with ``empty_layer``; COPY/ADD/RUN/WORKDIR-that-creates add a
layer). Every step's result is recorded in the store-wide build cache
(``refs`` kind ``build-cache``) under a key that digests the parent image,
the instruction after substitution, the variables it sees and, for COPY/ADD,
the digest of the sources -- so any Dockerfile, tag or context path that
reaches the same step reuses it (moby/buildkit's cache keys, in spirit).

The library never prints: progress goes to the ``write`` callable the
caller passes, one line per call, in the classic docker builder's wording.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from layerfs.build import dockerfile as dfm
from layerfs.build import substitution
from layerfs.build.context import BuildContext, ResolvedSources
from layerfs.errors import InvalidInput, LayerfsError, NotFound, Unsupported
from layerfs.store import images as img
from layerfs.store import manifest as mf
from layerfs.store import references
from layerfs.store.images import Image
from layerfs.store.store import Store
from layerfs.store.tree import MergedTree

__all__ = ["BuildError", "BuildOptions", "BuildResult", "Builder", "CACHE_KIND", "build", "prune_cache"]

CACHE_KIND = "build-cache"
DEFAULT_SHELL = ("/bin/sh", "-c")
STAT_CACHE_NAME = "build-stat-cache.sqlite"
_KEY_VERSION = "layerfs-build-1"

Writer = Callable[[str], None]


class BuildError(LayerfsError):
    """A build step failed; ``exit_code`` is the step's (RUN) exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class BuildOptions:
    context: str
    dockerfile: str = "Dockerfile"
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    network: str = "host"


@dataclass(frozen=True)
class BuildResult:
    image: Image
    tags: tuple[str, ...]
    steps: int
    cached: int


def build(store: Store, options: BuildOptions, write: Writer | None = None) -> BuildResult:
    return Builder(store, write).build(options)


def prune_cache(store: Store) -> int:
    """Drop every build-cache record; returns how many. Run gc to free space."""
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
    def __init__(self, store: Store, write: Writer | None = None):
        self.store = store
        self.write: Writer = write or (lambda line: None)
        self.no_cache = False
        self.network = "host"
        self.cached = 0

    # -- the whole build ---------------------------------------------------

    def build(self, options: BuildOptions) -> BuildResult:
        self.no_cache = options.no_cache
        self.network = options.network
        for t in options.tags:
            references.parse(t)
        cache_path = os.path.join(self.store.root, STAT_CACHE_NAME)
        with BuildContext.open(options.context, dockerfile=options.dockerfile,
                               cache_path=cache_path) as ctx:
            self._ctx = ctx
            text = ctx.read_dockerfile()
            df = dfm.parse(text, file=options.dockerfile)
            if not df.stages:
                raise InvalidInput(f"{options.dockerfile}: the Dockerfile is empty (no FROM instruction)")
            stages = dfm.required_stages(df, options.target, options.build_args)
            for warning in substitution.unused_build_args(df, options.build_args, stages):
                self.write(warning)
            total = sum(1 + len(s.instructions) for s in stages)
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
        self.write(f"Successfully built {_short(final.id)}")
        for t in options.tags:
            self.write(f"Successfully tagged {references.parse(t)}")
        return BuildResult(final, tuple(options.tags), total, self.cached)

    # -- FROM ----------------------------------------------------------------

    def _from(self, df: dfm.Dockerfile, stage: dfm.Stage, built: dict[int, Image | None],
              build_args: Mapping[str, str], step: int, total: int) -> _Stage:
        scope0 = substitution.Scope.for_stage(df, build_args)
        frm = substitution.expand_instruction(stage.from_, scope0.global_args, escape=df.escape, file=df.file)
        assert isinstance(frm, dfm.From)
        self.write(f"Step {step}/{total} : {stage.from_.original}")
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
            self.write(f" ---> {_short(image.id)}")
        base_env = _env_list_to_dict(image.runtime_config.get("Env")) if image else {}
        st = _Stage(image, substitution.Scope.for_stage(df, build_args, base_env))
        triggers = list((image.runtime_config.get("OnBuild") or []) if image else [])
        if triggers:
            self.write(f"# Executing {len(triggers)} build trigger{'s' if len(triggers) > 1 else ''}")
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
        self.write(f"Step {step}/{total} : {instr.original}")
        self._run_instruction(ctx, df, stage, st, instr, built)

    def _run_instruction(self, ctx: BuildContext | None, df: dfm.Dockerfile, stage: dfm.Stage,
                         st: _Stage, instr: dfm.Instruction, built: dict[int, Image | None],
                         trigger: bool = False) -> None:
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
            if expanded.heredocs:
                raise Unsupported(f"{df.file}:{instr.line}: heredocs in {instr.keyword} are not supported yet")
            if any("://" in s for s in expanded.sources):
                raise Unsupported(f"{df.file}:{instr.line}: ADD of a URL is not supported yet")
            if from_image is None:
                sources = ctx.resolve(expanded.sources, instruction=instr.keyword, exclude=expanded.exclude)
                extra["sources"] = sources.digest
        key = self._cache_key(st.image, expanded, scope_before, extra)
        hit = None if self.no_cache else self._cache_lookup(key)
        if hit is not None:
            self.write(" ---> Using cache")
            self.cached += 1
            st.image = hit
        else:
            st.image = self._execute(st, expanded, instr, sources, from_image, df, scope_before)
            self.store.add_ref(CACHE_KIND, key, image_id=st.image.id,
                               layer_id=st.image.layers[-1] if st.image.layers else None,
                               data=json.dumps({"created_by": instr.original}))
        if isinstance(expanded, dfm.Cmd):
            st.cmd_set = True
        self.write(f" ---> {_short(st.image.id)}")

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
            "env": sorted(scope.run_env().items()),
            "extra": dict(extra),
            "sde": _sde(),
        }
        return blake3.blake3(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def _cache_lookup(self, key: str) -> Image | None:
        row = self.store.get_ref(CACHE_KIND, key)
        if row is None or row[1] is None:
            return None
        try:
            return self.store.image(row[1])
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
            tree = self.store.merged_tree(st.image) if st.image else MergedTree()
            if wd.strip("/") not in tree.entries:
                layer = self._layer_from_staging(st.image, tree, lambda up: self._ensure_dir(up, tree, wd.strip("/")))
        elif isinstance(e, (dfm.Copy, dfm.Add)):
            layer = self._copy(st, e, rc, sources, from_image)
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

    # -- staging layers -----------------------------------------------------

    def _layer_from_staging(self, base: Image | None, tree: MergedTree,
                            fill: Callable[[str], None]) -> str:
        from layerfs.store import transfer

        tmp = tempfile.mkdtemp(prefix="build-", dir=self.store.tmp_dir)
        try:
            upper = os.path.join(tmp, "upper")
            os.mkdir(upper)
            self._times = {}
            self._mirror(upper, tree, "")
            fill(upper)
            self._fix_dir_times(upper, base)
            return transfer.import_layer(self.store, upper, base, as_layer=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    _times: dict[str, int] = {}

    def _fix_dir_times(self, upper: str, base: Image | None) -> None:
        """Directory mtimes, set last (filling a dir changes its mtime):
        as below for mirrored dirs, as in the context for copied ones, and
        for new ones a time that depends only on the parent image (or
        SOURCE_DATE_EPOCH), so a rebuild gives the same layer id."""
        sde = _sde()
        if sde is not None:
            default = sde * 10**9
        else:
            default = int(img.parse_timestamp(base.config.get("created", "")) * 10**9) if base else 0
        for dirpath, _dirs, _files in os.walk(upper, topdown=False):
            rel = os.path.relpath(dirpath, upper)
            rel = "" if rel == "." else rel.replace(os.sep, "/")
            t = self._times.get(rel, default)
            if sde is not None:
                t = min(t, sde * 10**9)
            os.utime(dirpath, ns=(t, t))

    def _mirror(self, upper: str, tree: MergedTree, rel: str) -> None:
        """Make ``rel`` (a directory) in the upper look as it does below."""
        path = os.path.join(upper, rel) if rel else upper
        ent = tree.entries.get(rel)
        if not os.path.isdir(path):
            os.mkdir(path)
        if ent is not None and ent.kind == mf.DIR:
            os.chown(path, ent.uid, ent.gid)
            os.chmod(path, ent.mode & 0o7777)
            self._times[rel] = ent.mtime_ns
        else:
            os.chown(path, 0, 0)
            os.chmod(path, 0o755)

    def _ensure_dir(self, upper: str, tree: MergedTree, rel: str, owner: tuple[int, int] | None = None) -> None:
        """Create ``rel`` and its parents in the upper, mirroring existing dirs."""
        parts = [p for p in rel.split("/") if p]
        cur = ""
        for p in parts:
            cur = f"{cur}/{p}" if cur else p
            ent = tree.entries.get(cur)
            if ent is not None and ent.kind == mf.SYMLINK:
                raise Unsupported(f"destination path /{cur} is a symlink in the base image; not supported yet")
            if ent is not None and ent.kind != mf.DIR:
                raise InvalidInput(f"cannot create directory /{cur}: a {ent.kind} of that name exists")
            fresh = ent is None and not os.path.isdir(os.path.join(upper, cur))
            self._mirror(upper, tree, cur)
            if fresh:
                sde = _sde()
                if sde is not None:
                    os.utime(os.path.join(upper, cur), (sde, sde))
                if owner is not None:
                    os.chown(os.path.join(upper, cur), *owner)

    # -- COPY / ADD ------------------------------------------------------------

    def _copy(self, st: _Stage, e: dfm.Copy | dfm.Add, rc: dict[str, Any],
              sources: ResolvedSources | None, from_image: Image | None) -> str:
        tree = self.store.merged_tree(st.image) if st.image else MergedTree()
        owner = self._chown(tree, e.chown) if e.chown else (0, 0)
        chmod = None
        if e.chmod:
            try:
                chmod = int(e.chmod, 8)
            except ValueError:
                raise InvalidInput(f"{e.keyword} --chmod={e.chmod}: only octal modes are supported") from None
        tmp_src = None
        try:
            if from_image is not None:
                from layerfs.store import transfer

                tmp_src = tempfile.mkdtemp(prefix="build-from-", dir=self.store.tmp_dir)
                root = os.path.join(tmp_src, "rootfs")
                transfer.export_image(self.store, from_image, root)
                src_ctx = BuildContext(root)
                sources = src_ctx.resolve(e.sources, instruction=e.keyword, exclude=e.exclude)
                src_root = src_ctx.root
            else:
                assert sources is not None and self._ctx is not None
                src_root = self._ctx.root
            wd = rc.get("WorkingDir") or "/"
            dest = e.dest
            as_dir = dest.endswith("/") or dest in (".", "..") or len(sources.sources) > 1 \
                or any(s.kind == "dir" for s in sources.sources)
            dest_abs = posixpath.normpath(posixpath.join(wd, dest)).strip("/")
            existing = tree.entries.get(dest_abs)
            if existing is not None and existing.kind == mf.DIR:
                as_dir = True
            sde = _sde()

            def fill(upper: str) -> None:
                target_dir = dest_abs if as_dir else posixpath.dirname(dest_abs)
                self._ensure_dir(upper, tree, target_dir, owner)
                for src in sources.sources:
                    for rel, ent in src.entries:
                        if as_dir:
                            out_rel = posixpath.join(target_dir, rel) if target_dir else rel
                        else:
                            out_rel = dest_abs
                        out = os.path.join(upper, out_rel)
                        parent = posixpath.dirname(out_rel)
                        if parent and not os.path.isdir(os.path.join(upper, parent)):
                            self._ensure_dir(upper, tree, parent, owner)
                        abs_src = os.path.join(src_root, ent.path)
                        sst = os.lstat(abs_src)
                        if ent.kind == "dir":
                            if not os.path.isdir(out):
                                if os.path.lexists(out):
                                    os.unlink(out)
                                os.mkdir(out)
                            mode = ent.mode
                            self._times[out_rel] = sst.st_mtime_ns
                        elif ent.kind == "symlink":
                            if os.path.lexists(out):
                                os.unlink(out)
                            os.symlink(ent.link_target or os.readlink(abs_src), out)
                            os.lchown(out, *owner)
                            continue
                        elif isinstance(e, dfm.Add) and src.kind == "file" and e.unpack is not False \
                                and _is_local_tar(abs_src):
                            dest_dir = os.path.join(upper, target_dir if as_dir else parent)
                            _extract_tar(abs_src, dest_dir)
                            continue
                        else:
                            if os.path.isdir(out) and not os.path.islink(out):
                                shutil.rmtree(out)
                            elif os.path.lexists(out):
                                os.unlink(out)
                            shutil.copyfile(abs_src, out, follow_symlinks=False)
                            mode = ent.mode
                        os.chown(out, *owner)
                        os.chmod(out, chmod if chmod is not None else mode)
                        mtime = sst.st_mtime_ns
                        if sde is not None:
                            mtime = min(mtime, sde * 10**9)
                        os.utime(out, ns=(mtime, mtime))

            return self._layer_from_staging(st.image, tree, fill)
        finally:
            if tmp_src is not None:
                shutil.rmtree(tmp_src, ignore_errors=True)

    def _chown(self, tree: MergedTree, spec: str) -> tuple[int, int]:
        user, _, group = spec.partition(":")

        def lookup(name: str, path: str, field_no: int = 2) -> int:
            if name.isdigit():
                return int(name)
            ent = tree.entries.get(path)
            if ent is not None and ent.kind == mf.FILE:
                for line in self.store.objects.read(ent.digest).decode(errors="replace").splitlines():
                    parts = line.split(":")
                    if len(parts) > field_no and parts[0] == name and parts[field_no].isdigit():
                        return int(parts[field_no])
            raise InvalidInput(f"--chown={spec}: unable to find {name!r} in /{path} of the image")

        uid = lookup(user, "etc/passwd")
        if group:
            gid = lookup(group, "etc/group")
        elif user.isdigit():
            gid = uid
        else:
            gid = lookup(user, "etc/passwd", 3)
        return uid, gid

    # -- RUN -------------------------------------------------------------------

    def _run(self, st: _Stage, e: dfm.Run, rc: dict[str, Any], shell: list[str],
             scope: substitution.Scope) -> str:
        if e.heredocs:
            raise Unsupported("RUN with heredocs is not supported yet")
        if e.mounts:
            raise Unsupported("RUN --mount is not supported yet")
        if st.image is None:
            raise InvalidInput("RUN in a stage FROM scratch: there is no shell to run it with")
        try:
            from layerfs.fs.mount import mount_image, unmount
            from layerfs.runtime import ContainerSpec, run_container
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise Unsupported(f"RUN needs the layerfs FUSE filesystem and runtime: {exc}") from None
        from layerfs.store import transfer

        argv = list(e.command.args) if e.command.exec_form else shell + list(e.command.args)
        env = dict(_env_list_to_dict(rc.get("Env")))
        env.update(scope.run_env())
        if "PATH" not in env:
            env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        tmp = tempfile.mkdtemp(prefix="build-run-", dir=self.store.tmp_dir)
        mp = os.path.join(tmp, "rootfs")
        upper = os.path.join(tmp, "upper")
        state = os.path.join(tmp, "state")
        os.mkdir(mp)
        os.mkdir(state)
        mounted = False
        w_fd = -1
        pump: threading.Thread | None = None
        try:
            mount_image(self.store.root, st.image.id, mp, upper_dir=upper)
            mounted = True
            # The pipe is made after the FUSE daemon forked, so only the
            # container holds its write end and EOF means the step ended.
            r_fd, w_fd = os.pipe()
            pump = threading.Thread(target=self._pump, args=(r_fd,), daemon=True)
            pump.start()
            spec = ContainerSpec(rootfs=mp, args=tuple(argv), env=tuple(f"{k}={v}" for k, v in env.items()),
                                 cwd=rc.get("WorkingDir") or "/", user=rc.get("User") or "",
                                 network=e.network or self.network, hostname="buildkitsandbox")
            result = run_container(spec, state, stdout=w_fd, stderr=w_fd)
            os.close(w_fd)
            w_fd = -1
            pump.join()
            if result.exit_code != 0 or result.exec_error:
                why = result.exec_error or f"returned a non-zero code: {result.exit_code}"
                raise BuildError(f"The command '{' '.join(argv)}' {why}", exit_code=result.exit_code or 1)
            unmount(self.store.root, mp)
            mounted = False
            return transfer.import_layer(self.store, upper, st.image, as_layer=True)
        finally:
            if w_fd >= 0:
                os.close(w_fd)
            if pump is not None:
                pump.join(timeout=5)
            if mounted:
                try:
                    unmount(self.store.root, mp)
                except LayerfsError:
                    pass
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
                    self.write(line.decode(errors="replace"))
        if buf:
            self.write(buf.decode(errors="replace"))


def _is_local_tar(path: str) -> bool:
    from layerfs.store.tarlayer import is_tar_file

    try:
        return is_tar_file(path) and tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False


def _extract_tar(path: str, dest: str) -> None:
    """ADD's auto-extraction, with tar's safety filter (no escapes)."""
    os.makedirs(dest, exist_ok=True)
    try:
        with tarfile.open(path) as tf:
            tf.extractall(dest, numeric_owner=True, filter="tar")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidInput(f"ADD {os.path.basename(path)}: cannot extract: {exc}") from None
