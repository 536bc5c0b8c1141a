"""Container records: an image, a private upper dir, a spec and a state.

A container lives in ``ROOT/containers/<id>/``::

    config.json     what to run (written once at create, never changed)
    state.json      status, pids, exit code (replaced atomically)
    container.log   the command's stdout and stderr
    upper/          its copy-on-write layer (overlayfs format), and upper.work/
    rootfs/         mountpoint of the layerfs mount while it runs
    runtime/        hosts, hostname, resolv.conf; the OCI bundle for runc/crun

and as a store reference of kind ``"container"`` keyed by its id (data:
its name), so gc keeps its image and ``rmi`` refuses to delete it. The
reference is the truth: a directory without one is debris.

Status is derived, not trusted: a state of "running" whose owner process
(the shim, or the foreground ``layerfs run``) is gone reads as exited with
code 255, the way docker reports containers whose daemon died.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from layerfs.errors import Conflict, InvalidInput, NotFound
from layerfs.procfs import alive as process_alive  # noqa: F401 - the runtime's name for it
from layerfs.procfs import start_time as process_start_time  # noqa: F401
from layerfs.runtime.spec import DEFAULT_PATH, ContainerSpec, Volume, check_name, check_volume_sources
from layerfs.store import refs
from layerfs.store.layout import StoreLayout
from layerfs.store.refs import Ref
from layerfs.store.store import Store
from layerfs.store.usage import tree_bytes  # noqa: F401 - used by the CLI's prune and df

REF_KIND = refs.CONTAINER
RUNTIMES = ("builtin", "runc", "crun")
# Files the runtime creates in the rootfs as mountpoints when the image
# lacks them; docker hides them (its "init layer"), so do diff and commit.
RUNTIME_PATHS = ("proc", "dev", "sys", "etc/hosts", "etc/hostname", "etc/resolv.conf")

_ADJECTIVES = ("brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid",
               "merry", "nifty", "quirky", "serene", "sharp", "tender", "vivid", "witty", "zen")
_NOUNS = ("babbage", "curie", "darwin", "euler", "fermi", "galois", "hopper", "kepler",
          "lovelace", "noether", "pascal", "ritchie", "shannon", "tesla", "turing", "wozniak")


@dataclass(frozen=True)
class ContainerConfig:
    """What a container runs; fixed when it is created.

    ``args`` is the resolved command (entrypoint + cmd, docker's rules);
    ``image`` is the reference as the user typed it, ``image_id`` what it
    resolved to.
    """

    id: str
    name: str
    image: str
    image_id: str
    created: float
    args: tuple[str, ...]
    env: tuple[str, ...] = (f"PATH={DEFAULT_PATH}",)
    cwd: str = "/"
    user: str = ""
    hostname: str = ""
    network: str = "none"
    memory: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    volumes: tuple[Volume, ...] = ()
    read_only: bool = False
    tty: bool = False
    interactive: bool = False
    runtime: str = "builtin"
    auto_remove: bool = False
    stop_signal: str = "SIGTERM"
    backend: str | None = None       # how the rootfs is mounted (None: the store's default)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["volumes"] = [[v.host, v.container, v.readonly] for v in self.volumes]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ContainerConfig":
        data = dict(data)
        data["volumes"] = tuple(Volume(h, c, bool(ro)) for h, c, ro in data.get("volumes", ()))
        for key in ("args", "env"):
            data[key] = tuple(data.get(key, ()))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ContainerState:
    """What happened to it so far (state.json)."""

    status: str = "created"          # created | starting | running | exited
    pid: int | None = None           # host pid of the container's PID 1
    owner_pid: int | None = None     # the process holding mount + cgroup
    owner_start: str | None = None
    cgroup_paths: tuple[str, ...] = ()
    runtime_root: str | None = None  # runc/crun --root
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Container:
    """A container as found in the store: paths, config and live state."""

    root: str
    config: ContainerConfig
    state: ContainerState

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def dir(self) -> str:
        return container_dir(self.root, self.id)

    @property
    def upper(self) -> str:
        return os.path.join(self.dir, "upper")

    @property
    def rootfs(self) -> str:
        return os.path.join(self.dir, "rootfs")

    @property
    def runtime_dir(self) -> str:
        return os.path.join(self.dir, "runtime")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "container.log")

    @property
    def running(self) -> bool:
        return self.state.status in ("starting", "running")

    @property
    def cgroup_name(self) -> str:
        return cgroup_name(self.root, self.id)

    def spec(self) -> ContainerSpec:
        c = self.config
        return ContainerSpec(rootfs=self.rootfs, args=c.args, env=c.env, cwd=c.cwd, user=c.user,
                             hostname=c.hostname, network=c.network, memory=c.memory,
                             cpus=c.cpus, pids_limit=c.pids_limit, volumes=c.volumes,
                             read_only=c.read_only, tty=c.tty, interactive=c.interactive,
                             cgroup_name=self.cgroup_name)


# -- paths and names -------------------------------------------------------
def containers_root(root: str) -> str:
    return StoreLayout(root).containers


def container_dir(root: str, container_id: str) -> str:
    return StoreLayout(root).container(container_id)


def store_tag(root: str) -> str:
    """A short tag naming the store in host-wide resources (cgroups)."""
    return "lfs" + hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:8]


def cgroup_name(root: str, container_id: str) -> str:
    """``<store tag>-<id>``: cgroups of one store can be told from others'."""
    return f"{store_tag(root)}-{container_id[:32]}"


def random_name() -> str:
    return f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NOUNS)}"


@contextlib.contextmanager
def _names_lock(root: str) -> Iterator[None]:
    """Serialises creates so two containers never get the same name."""
    base = containers_root(root)
    os.makedirs(base, exist_ok=True)
    fd = os.open(os.path.join(base, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- image config -> what to run ---------------------------------------------
def resolve_command(image_config: dict[str, Any], cmd: Sequence[str],
                    entrypoint: str | None) -> tuple[str, ...]:
    """docker's rules: ENTRYPOINT + CMD; ``--entrypoint`` also drops the image's CMD."""
    if entrypoint is not None:
        ep = [entrypoint] if entrypoint else []
        args = ep + list(cmd)
    else:
        ep = list(image_config.get("Entrypoint") or [])
        args = ep + (list(cmd) if cmd else list(image_config.get("Cmd") or []))
    if not args:
        raise InvalidInput("no command specified (the image has no Cmd or Entrypoint)")
    return tuple(args)


def merge_env(image_env: Sequence[str], extra: Sequence[str]) -> tuple[str, ...]:
    """Image Env first, then -e/--env-file; later values of a key win."""
    merged: dict[str, str] = {}
    for item in list(image_env) + list(extra):
        key, _, value = item.partition("=")
        merged[key] = value
    return tuple(f"{k}={v}" for k, v in merged.items())


# -- records -------------------------------------------------------------------
def create_container(store: Store, image_ref: str, *, cmd: Sequence[str] = (),
                     entrypoint: str | None = None, name: str | None = None,
                     env: Sequence[str] = (), cwd: str | None = None, user: str | None = None,
                     hostname: str = "", network: str = "none", memory: int | None = None,
                     cpus: float | None = None, pids_limit: int | None = None,
                     volumes: Sequence[Volume] = (), read_only: bool = False, tty: bool = False,
                     interactive: bool = False, runtime: str = "builtin",
                     auto_remove: bool = False, backend: str | None = None) -> Container:
    """``docker create``: resolve the image and options, record the container.

    Everything is validated before anything is written, so a bad option
    leaves nothing behind.
    """
    if runtime not in RUNTIMES:
        raise InvalidInput(f"unknown runtime {runtime!r} (use {', '.join(RUNTIMES)})")
    if backend is not None:
        from layerfs.fs import backend as backends

        backends.resolve(store.root, backend)  # validates the name
    if name is not None:
        check_name(name, "container name")
    image = store.image(image_ref)
    rc = image.runtime_config
    check_volume_sources(volumes)
    cid = secrets.token_hex(32)
    config = ContainerConfig(
        id=cid, name=name or "", image=image_ref, image_id=image.id, created=time.time(),
        args=resolve_command(rc, cmd, entrypoint),
        env=merge_env(rc.get("Env") or [f"PATH={DEFAULT_PATH}"], env),
        cwd=cwd or rc.get("WorkingDir") or "/", user=user if user is not None else rc.get("User") or "",
        hostname=hostname, network=network, memory=memory, cpus=cpus, pids_limit=pids_limit,
        volumes=tuple(volumes), read_only=read_only, tty=tty, interactive=interactive,
        runtime=runtime, auto_remove=auto_remove, stop_signal=rc.get("StopSignal") or "SIGTERM",
        backend=backend)
    parse_signal(config.stop_signal)
    probe = Container(store.root, config, ContainerState())
    probe.spec()  # ContainerSpec validates cwd, env, network, limits, volumes
    with _names_lock(store.root):
        taken = {_ref_name(ref.data) for ref in store.refs(REF_KIND)}
        if name is None:
            name = next((n for n in (random_name() for _ in range(50)) if n not in taken),
                        f"container_{cid[:12]}")
        elif name in taken:
            raise Conflict(f'the container name "{name}" is already in use; '
                           "remove that container or choose another name")
        config = replace(config, name=name)
        directory = container_dir(store.root, cid)
        os.makedirs(os.path.join(directory, "rootfs"))
        try:
            os.mkdir(os.path.join(directory, "runtime"))
            _write_json(os.path.join(directory, "config.json"), config.to_json())
            write_state(store.root, cid, ContainerState())
            store.add_ref(Ref(REF_KIND, cid, image_id=image.id, data=json.dumps({"name": name}), in_use=True))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    return Container(store.root, config, ContainerState())


def _ref_name(data: str | None) -> str:
    try:
        return json.loads(data or "{}").get("name", "")
    except ValueError:
        return ""


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def write_state(root: str, container_id: str, state: ContainerState) -> None:
    data = asdict(state)
    data["cgroup_paths"] = list(state.cgroup_paths)
    _write_json(os.path.join(container_dir(root, container_id), "state.json"), data)


def read_state(root: str, container_id: str) -> ContainerState:
    try:
        with open(os.path.join(container_dir(root, container_id), "state.json"),
                  encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise NotFound(f"no such container: {container_id}") from None
    data["cgroup_paths"] = tuple(data.get("cgroup_paths") or ())
    known = {f for f in ContainerState.__dataclass_fields__}
    return _reconcile(ContainerState(**{k: v for k, v in data.items() if k in known}))


def update_state(root: str, container_id: str, **changes: Any) -> ContainerState:
    """Read-modify-write of state.json (only the owner process writes it)."""
    try:
        with open(os.path.join(container_dir(root, container_id), "state.json"),
                  encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise NotFound(f"no such container: {container_id}") from None
    data["cgroup_paths"] = tuple(data.get("cgroup_paths") or ())
    state = replace(ContainerState(**data), **changes)
    write_state(root, container_id, state)
    return state


def _reconcile(state: ContainerState) -> ContainerState:
    if state.status in ("starting", "running") and not process_alive(state.owner_pid,
                                                                     state.owner_start):
        return replace(state, status="exited", exit_code=255 if state.exit_code is None
                       else state.exit_code, error=state.error or "the owner process died",
                       finished=state.finished or state.started)
    return state


def load(root: str, container_id: str) -> Container:
    directory = container_dir(root, container_id)
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            config = ContainerConfig.from_json(json.load(handle))
    except FileNotFoundError:
        raise NotFound(f"no such container: {container_id}") from None
    return Container(os.path.abspath(root), config, read_state(root, container_id))


def find_container(store: Store, ref: str) -> Container:
    """By full id, name, or unique id prefix (docker's order)."""
    records = store.refs(REF_KIND)
    ids = [record.key for record in records]
    if ref in ids:
        return load(store.root, ref)
    for record in records:
        if _ref_name(record.data) == ref:
            return load(store.root, record.key)
    matches = [key for key in ids if ref and key.startswith(ref)]
    if len(matches) > 1:
        raise InvalidInput(f"ambiguous container id prefix: {ref}")
    if not matches:
        raise NotFound(f"no such container: {ref}")
    return load(store.root, matches[0])


def list_containers(store: Store) -> list[Container]:
    """Every container, newest first."""
    out = []
    for record in store.refs(REF_KIND):
        with contextlib.suppress(NotFound):
            out.append(load(store.root, record.key))
    return sorted(out, key=lambda c: c.config.created, reverse=True)


def forget_container(store: Store, container: Container) -> None:
    """Drop the record and its files (the caller made sure nothing runs)."""
    store.drop_refs(REF_KIND, container.id)
    remove_tree(container.dir)


def remove_tree(path: str) -> None:
    """``rm -rf path``, read-only directories included; no error if it is missing."""

    def onerror(func: Any, failed: str, _exc: Any) -> None:
        # Directories copied up read-only (e.g. mode 0555) still go.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


# -- processes -------------------------------------------------------------------
def parse_signal(text: str | int) -> int:
    """"TERM", "SIGTERM", "15" -> 15."""
    if isinstance(text, int):
        return text
    value = text.strip().upper()
    if value.isdigit():
        number = int(value)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = value if value.startswith("SIG") else "SIG" + value
        sig = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if sig is not None:
            return int(sig)
    raise InvalidInput(f"invalid signal: {text}")


# -- status as docker prints it ------------------------------------------------
def human_duration(seconds: float) -> str:
    """docker's units.HumanDuration."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    return f"{hours // 24} days"


def status_text(container: Container, now: float | None = None) -> str:
    state = container.state
    now = time.time() if now is None else now
    if state.status == "created":
        return "Created"
    if state.status in ("starting", "running"):
        return f"Up {human_duration(now - (state.started or now))}"
    text = f"Exited ({state.exit_code}) {human_duration(now - (state.finished or now))} ago"
    return text + " (OOM killed)" if state.oom_killed else text


# -- disk usage (df -v) ---------------------------------------------------------
@dataclass(frozen=True)
class ContainerUsage:
    """One container's private bytes (its upper) next to its shared image."""

    id: str
    name: str
    image: str
    image_id: str
    upper_bytes: int
    status: str


def container_usage(store: Store) -> tuple[list[ContainerUsage], int]:
    """Each container's upper size, and the bytes of the images they share.

    The image bytes are each distinct layer's size counted once, however
    many containers use it: that is what the containers cost together
    besides their uppers.
    """
    rows = []
    layers: set[str] = set()
    for c in list_containers(store):
        upper = tree_bytes(c.upper) if os.path.isdir(c.upper) else 0
        work = c.upper + ".work"
        upper += tree_bytes(work) if os.path.isdir(work) else 0
        rows.append(ContainerUsage(c.id, c.name, c.config.image, c.config.image_id, upper,
                                   status_text(c)))
        with contextlib.suppress(NotFound):
            layers.update(store.image(c.config.image_id).layers)
    shared = 0
    for lid in layers:
        with contextlib.suppress(NotFound):
            shared += store.layer_info(lid)[0]
    return rows, shared
