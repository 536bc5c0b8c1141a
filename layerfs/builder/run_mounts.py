"""``RUN --mount`` and ``build --secret``: parsing the specs, and what a
RUN step's mounts need on the host.

The syntax and defaults are BuildKit's (Dockerfile reference, "RUN
--mount"; ``instructions/commands_runmount.go``):

* ``type=bind`` (the default): ``target``, ``source``, ``from`` (a stage
  or an image; default the build context), ``rw`` -- read-only unless
  ``rw``, and writes to a ``rw`` bind are thrown away;
* ``type=cache``: ``id`` (default the target), ``target``, ``ro``,
  ``sharing=shared|private|locked``, ``from``/``source`` (what a new cache
  starts with), ``mode``/``uid``/``gid`` of a new cache directory;
* ``type=tmpfs``: ``target``, ``size``;
* ``type=secret``: ``id`` (or ``source``; default the target's basename),
  ``target`` (default ``/run/secrets/<id>``), ``env`` (the secret as an
  environment variable instead of, or as well as, a file), ``required``,
  ``mode`` (default 0400), ``uid``, ``gid``.

What goes where: the mount specs are part of a step's cache key (the
executor keys on the expanded instruction), a bind's source content too,
but never a secret's or a cache's content. Secrets are written to a
private directory on a tmpfs (``/dev/shm``) when there is one, bound
read-only and deleted when the step ends; they never reach the layer,
the image config or the history. Cache mounts live under the store's
``cache-mounts/`` until ``builder prune``: each is a directory and a lock
file beside it (shared lock for ``shared``, exclusive for ``locked``, a
free instance of its own for ``private``).
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from layerfs.builder.context import ResolvedSources
from layerfs.builder.instruction_parser import mount_fields
from layerfs.errors import InvalidInput, NotFound, Unsupported
from layerfs.store.layout import StoreLayout
from layerfs.store.usage import tree_bytes

__all__ = [
    "MAX_SECRET_SIZE",
    "PreparedMounts",
    "RunMount",
    "SecretSource",
    "parse_mount",
    "parse_secret",
    "prepare",
    "prune_cache_mounts",
    "stage_context",
]

#: BuildKit's limit (secretsprovider.MaxSecretSize).
MAX_SECRET_SIZE = 500 * 1024
TYPES = ("bind", "cache", "tmpfs", "secret")
SHARING = ("shared", "private", "locked")
_NEW_GRACE = 3600.0
_TRUE = ("1", "t", "true")
_FALSE = ("0", "f", "false")


@dataclass(frozen=True)
class RunMount:
    """One ``--mount`` of a RUN step, validated, target absolute.

    ``target`` is empty only for a secret given as ``env`` alone.
    """

    type: str
    target: str
    source: str = ""
    from_: str | None = None
    readonly: bool = False
    id: str = ""
    sharing: str = "shared"
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    required: bool = False
    env: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class SecretSource:
    """``build --secret``: where secret ``id`` comes from (a file or a variable)."""

    id: str
    path: str = ""
    env: str = ""

    def read(self) -> bytes | None:
        """The secret's bytes, or None if its variable is unset."""
        if self.env:
            value = os.environ.get(self.env)
            return None if value is None else value.encode()
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_SECRET_SIZE + 1)
        except OSError as exc:
            raise InvalidInput(f"secret {self.id}: cannot read {self.path}: {exc.strerror}") from None
        if len(data) > MAX_SECRET_SIZE:
            raise InvalidInput(f"secret {self.id}: {self.path} is too big (max {MAX_SECRET_SIZE // 1024} KiB)")
        return data


# -- parsing ------------------------------------------------------------------

def _bool(key: str, value: str, spec: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise InvalidInput(f"--mount={spec}: invalid value {value!r} for {key} (want true or false)")


def _number(key: str, value: str, spec: str, base: int) -> int:
    try:
        n = int(value, base)
    except ValueError:
        n = -1
    if n < 0 or n > 0xFFFFFFFF:
        what = "an octal mode" if base == 8 else "a non-negative integer"
        raise InvalidInput(f"--mount={spec}: invalid {key} {value!r} (want {what})")
    return n


def parse_mount(spec: str, workdir: str = "/") -> RunMount:
    """Parse one ``--mount`` value (already variable-expanded).

    A relative target is relative to ``workdir``, as in BuildKit.

    Raises:
        InvalidInput: an unknown type or key, a bad value, a missing target.
        Unsupported: ``type=ssh``.
    """
    fields = mount_fields(spec)
    kind = "bind"
    for f in fields:
        key, eq, value = f.partition("=")
        if key.strip().lower() == "type":
            kind = value.strip().lower()
    if kind == "ssh":
        raise Unsupported(f"--mount={spec}: type=ssh is not supported")
    if kind not in TYPES:
        raise InvalidInput(f"--mount={spec}: unsupported mount type {kind!r} "
                           f"(want one of {', '.join(TYPES)})")
    opts: dict[str, Any] = {}
    readonly: bool | None = None
    for f in fields:
        key, eq, value = f.partition("=")
        key = key.strip().lower()
        if key == "type":
            continue
        if not eq:
            value = "true"
            if key not in ("ro", "readonly", "rw", "readwrite", "required"):
                raise InvalidInput(f"--mount={spec}: invalid field {f!r}: must be a key=value pair")
        if key in ("ro", "readonly"):
            readonly = _bool(key, value, spec)
        elif key in ("rw", "readwrite"):
            readonly = not _bool(key, value, spec)
        elif key in ("target", "dst", "destination"):
            opts["target"] = value
        elif key in ("source", "src"):
            opts["source"] = value
        elif key in ("from", "id", "env"):
            opts[key] = value
        elif key == "required":
            opts[key] = _bool(key, value, spec)
        elif key == "sharing":
            if value not in SHARING:
                raise InvalidInput(f"--mount={spec}: unsupported sharing value {value!r} "
                                   f"(want one of {', '.join(SHARING)})")
            opts[key] = value
        elif key == "mode":
            opts[key] = _number(key, value, spec, 8)
        elif key in ("uid", "gid"):
            opts[key] = _number(key, value, spec, 10)
        elif key == "size":
            from layerfs.runtime.spec import parse_memory

            opts[key] = parse_memory(value)
        else:
            raise InvalidInput(f"--mount={spec}: unexpected key {key!r}")
    return _build(kind, opts, readonly, spec, workdir)


# Options each type takes besides target/type/ro/rw (BuildKit's rules).
_ALLOWED = {
    "bind": {"source", "from"},
    "cache": {"source", "from", "id", "sharing", "mode", "uid", "gid"},
    "tmpfs": {"size"},
    "secret": {"source", "id", "env", "required", "mode", "uid", "gid"},
}


def _build(kind: str, opts: dict[str, Any], readonly: bool | None, spec: str, workdir: str) -> RunMount:
    for key in opts:
        if key not in _ALLOWED[kind] and key != "target":
            raise InvalidInput(f"--mount={spec}: {key} is not valid for type={kind}")
    target: str = opts.get("target", "")
    ident: str = opts.get("id", "")
    env: str | None = opts.get("env")
    if kind == "secret":
        if opts.get("source") and ident:
            raise InvalidInput(f"--mount={spec}: both source and id are set")
        ident = ident or opts.get("source", "") or posixpath.basename(target.rstrip("/"))
        if not ident:
            raise InvalidInput(f"--mount={spec}: a secret mount needs an id or a target")
        if not target and not env:
            target = "/run/secrets/" + posixpath.basename(ident)
        if env is not None and not env:
            raise InvalidInput(f"--mount={spec}: env needs a variable name")
    elif not target:
        raise InvalidInput(f"--mount={spec}: a {kind} mount needs a target")
    if target:
        target = posixpath.normpath(posixpath.join("/", workdir, target))
        if target == "/":
            raise InvalidInput(f"--mount={spec}: cannot mount over /")
    if kind == "cache":
        ident = ident or target
    if readonly is None:
        readonly = kind in ("bind", "secret")
    return RunMount(
        type=kind, target=target, source=opts.get("source", "") if kind != "secret" else "",
        from_=opts.get("from"), readonly=readonly, id=ident, sharing=opts.get("sharing", "shared"),
        mode=opts.get("mode"), uid=opts.get("uid"), gid=opts.get("gid"),
        required=opts.get("required", False), env=env, size=opts.get("size"))


def parse_secret(spec: str) -> SecretSource:
    """Parse ``build --secret``: ``id=NAME[,src=PATH|,env=VAR][,type=file|env]``.

    Without src or env, ``id`` names a variable if one is set, else a file
    (BuildKit's rule). A file must exist and be at most 500 KiB.
    """
    values: dict[str, str] = {}
    kind = ""
    for f in mount_fields(spec):
        key, eq, value = f.partition("=")
        key = key.strip().lower()
        if not eq:
            raise InvalidInput(f"--secret {spec}: invalid field {f!r}: must be a key=value pair")
        if key == "type":
            if value not in ("file", "env"):
                raise InvalidInput(f"--secret {spec}: unsupported secret type {value!r} (want file or env)")
            kind = value
        elif key in ("id", "env"):
            values[key] = value
        elif key in ("src", "source"):
            values["src"] = value
        else:
            raise InvalidInput(f"--secret {spec}: unexpected key {key!r}")
    ident = values.get("id", "")
    if not ident:
        raise InvalidInput(f"--secret {spec}: id is required")
    path, env = values.get("src", ""), values.get("env", "")
    if kind == "env" and not env:
        env, path = path or ident, ""
    if not path and not env:
        if kind != "file" and ident in os.environ:
            env = ident
        else:
            path = ident
    if path:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise InvalidInput(f"--secret {spec}: cannot use {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"--secret {spec}: {path} is not a regular file")
        if st.st_size > MAX_SECRET_SIZE:
            raise InvalidInput(f"--secret {spec}: {path} is too big (max {MAX_SECRET_SIZE // 1024} KiB)")
        path = os.path.abspath(path)
    return SecretSource(ident, path, env)


# -- the host side of one RUN step's mounts ------------------------------------

@dataclass
class PreparedMounts:
    """What the container gets: binds (host, target, ro), tmpfs (target,
    size), extra environment; and what to release when the step ends."""

    binds: list[tuple[str, str, bool]] = field(default_factory=list)
    tmpfs: list[tuple[str, int | None]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    _dirs: list[str] = field(default_factory=list)
    _locks: list[int] = field(default_factory=list)

    def mountpoints(self) -> list[tuple[str, bool]]:
        """Every path the runtime mounts on in the step: (path, is a dir)."""
        from layerfs.runtime.containers import RUNTIME_PATHS

        targets = [("/" + p, not p.startswith("etc/")) for p in RUNTIME_PATHS]
        targets += [(t, os.path.isdir(h)) for h, t, _ in self.binds]
        targets += [(t, True) for t, _ in self.tmpfs]
        return sorted(targets, key=lambda t: t[0].count("/"))

    def close(self) -> None:
        for fd in self._locks:
            os.close(fd)  # drops its flock
        self._locks = []
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs = []


#: Fills a new directory with the ``source`` subtree of a stage or image
#: (``from=``) or, for ``None``, of the build context.
Filler = Callable[[str | None, str, str, bool], None]


def prepare(mounts: tuple[RunMount, ...], *, store_root: str, tmp_dir: str,
            secrets: Mapping[str, SecretSource], fill: Filler,
            from_ids: Mapping[str, str]) -> PreparedMounts:
    """Make the host side of ``mounts``; the caller must ``close()`` it.

    ``fill(from, source, dest, copy)`` materialises a bind's or a cache's
    source in ``dest`` (``copy``: private files, for a ``rw`` bind);
    ``from_ids`` maps each ``from`` to the image id it names (a new cache
    with a different base is a different cache, as in BuildKit).
    """
    out = PreparedMounts()
    try:
        for m in mounts:
            if m.type == "tmpfs":
                out.tmpfs.append((m.target, m.size))
            elif m.type == "secret":
                _secret(m, secrets, out)
            elif m.type == "cache":
                base = from_ids.get(m.from_) if m.from_ else None
                path = _cache_dir(store_root, m, base, fill, out)
                out.binds.append((path, m.target, m.readonly))
            else:
                stage = tempfile.mkdtemp(prefix="build-bind-", dir=tmp_dir)
                out._dirs.append(stage)
                dest = os.path.join(stage, "src")
                fill(m.from_, m.source, dest, not m.readonly)
                out.binds.append((dest, m.target, m.readonly))
    except BaseException:
        out.close()
        raise
    return out


def stage_context(root: str, resolved: ResolvedSources, dest: str, copy: bool) -> None:
    """A bind's view of context files in ``dest``: hard links when it is
    read-only (cheap; a read-only bind cannot write through them), copies
    for ``rw``, whose writes must not reach the context."""
    if len(resolved.sources) != 1:
        raise InvalidInput("RUN --mount=type=bind: source must name one file or directory")
    (src,) = resolved.sources
    if src.kind == "file":
        ((_, ent),) = src.entries
        _place(os.path.join(root, ent.path), dest, ent.mode, copy)
        return
    os.mkdir(dest)
    for rel, ent in src.entries:
        out = os.path.join(dest, rel)
        if ent.kind == "dir":
            os.mkdir(out)
            os.chmod(out, ent.mode)
        elif ent.kind == "symlink":
            os.symlink(ent.link_target or os.readlink(os.path.join(root, ent.path)), out)
        else:
            _place(os.path.join(root, ent.path), out, ent.mode, copy)
    os.chmod(dest, os.stat(os.path.join(root, src.path)).st_mode & 0o7777)


def _place(src: str, dest: str, mode: int, copy: bool) -> None:
    if not copy:
        try:
            os.link(src, dest, follow_symlinks=False)
            return
        except OSError:
            pass  # another filesystem: copy
    shutil.copyfile(src, dest, follow_symlinks=False)
    os.chmod(dest, mode)


def _secret(m: RunMount, secrets: Mapping[str, SecretSource], out: PreparedMounts) -> None:
    src = secrets.get(m.id)
    data = src.read() if src is not None else None
    if data is None:
        if m.required:
            raise NotFound(f"secret {m.id} not found: pass it with --secret id={m.id},src=FILE")
        return  # BuildKit skips an optional secret that was not given
    if m.env:
        out.env[m.env] = data.decode(errors="replace")
    if not m.target:
        return
    # A tmpfs keeps the secret off the disk while the step runs.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    private = tempfile.mkdtemp(prefix="layerfs-secret-", dir=base)
    out._dirs.append(private)
    path = os.path.join(private, "secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fchown(fd, m.uid or 0, m.gid or 0)
        os.fchmod(fd, 0o400 if m.mode is None else m.mode)
    finally:
        os.close(fd)
    os.chmod(private, 0o711)  # the secret may belong to a non-root uid
    out.binds.append((path, m.target, True))


def _cache_name(m: RunMount, base: str | None) -> str:
    return blake3.blake3(f"{m.id}\0{base or ''}\0{m.source if base else ''}".encode()).hexdigest()[:32]


def _cache_dir(store_root: str, m: RunMount, base: str | None, fill: Filler, out: PreparedMounts) -> str:
    root = StoreLayout(store_root).cache_mounts
    os.makedirs(root, exist_ok=True)
    name = _cache_name(m, base)
    instance = 0
    while True:
        path = os.path.join(root, name if instance == 0 else f"{name}-{instance}")
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if m.sharing == "shared":
            fcntl.flock(fd, fcntl.LOCK_SH)
        elif m.sharing == "locked":
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Another writer has it: private means a cache of our own.
                os.close(fd)
                instance += 1
                continue
        out._locks.append(fd)
        break
    if not os.path.isdir(path):
        tmp = tempfile.mkdtemp(prefix=f".new-{name}-", dir=root)
        try:
            new = os.path.join(tmp, "d")
            if base is not None:
                fill(m.from_, m.source, new, True)
            else:
                os.mkdir(new)
            if not os.path.isdir(new):
                raise InvalidInput(f"--mount=type=cache,from={m.from_},source={m.source}: not a directory")
            os.chown(new, m.uid or 0, m.gid or 0)
            os.chmod(new, 0o755 if m.mode is None else m.mode)
            try:
                os.rename(new, path)
            except OSError:
                if not os.path.isdir(path):  # lost a race to a concurrent build
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def prune_cache_mounts(store_root: str) -> tuple[int, int]:
    """Delete every cache mount not in use; returns (how many, bytes)."""
    root = StoreLayout(store_root).cache_mounts
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return 0, 0
    count = freed = 0
    for name in names:
        path = os.path.join(root, name)
        if name.endswith(".lock"):
            continue
        if name.startswith(".new-"):
            # A cache being filled now, or debris of a build that died.
            if time.time() - os.lstat(path).st_mtime > _NEW_GRACE:
                shutil.rmtree(path, ignore_errors=True)
            continue
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a build is using it
            freed += tree_bytes(path)  # what removing it frees: like du, links once
            shutil.rmtree(path, ignore_errors=True)
            os.unlink(path + ".lock")
            count += 1
        finally:
            os.close(fd)
    return count, freed

