"""What to run and how: the container spec and the parsers for its CLI forms.

``ContainerSpec`` is the runtime's whole input besides the state directory.
The ``parse_*`` helpers turn docker-style strings ("256m", "0.5",
"-v /a:/b:ro", "-e K=V", env files) into spec fields and raise
``InvalidInput`` with a message that names the bad value.
"""

from __future__ import annotations

import os
import posixpath
import re
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from layerfs.errors import InvalidInput, NotFound

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETWORK_MODES = ("none", "host")
# docker's default NOFILE; applied capped at the caller's hard limit because
# root here may lack CAP_SYS_RESOURCE.
DEFAULT_NOFILE = 1048576

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ENV_KEY_RE = re.compile(r"^[^=\s]+$")
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
                 "t": 1 << 40, "p": 1 << 50}


@dataclass(frozen=True)
class Volume:
    """A host path bind-mounted into the container."""

    host: str
    container: str
    readonly: bool = False


@dataclass(frozen=True)
class Tmpfs:
    """A fresh tmpfs at ``container`` (docker's ``--tmpfs``, ``RUN --mount=type=tmpfs``);
    ``size`` in bytes, None for the kernel's default (half of RAM)."""

    container: str
    size: int | None = None


@dataclass(frozen=True)
class IdMap:
    """One line of a uid_map/gid_map: ``size`` ids from ``container_id`` on."""

    container_id: int
    host_id: int
    size: int


@dataclass(frozen=True)
class UserNamespace:
    """Run in a new user namespace with these id mappings."""

    uid_map: tuple[IdMap, ...]
    gid_map: tuple[IdMap, ...]

    def maps_gid(self, gid: int) -> bool:
        return any(m.container_id <= gid < m.container_id + m.size for m in self.gid_map)


@dataclass(frozen=True)
class Rlimit:
    """A resource limit; values above the caller's hard limit are capped."""

    resource: int
    soft: int
    hard: int


@dataclass(frozen=True)
class ContainerSpec:
    """Everything about one container run except where its state lives.

    ``user`` is "uid[:gid]" or "name[:group]" resolved against the rootfs's
    /etc/passwd and /etc/group. ``hostname`` empty means "use the container
    id". ``memory`` is bytes, ``cpus`` a fraction of CPUs, ``pids_limit`` a
    task count; None means unlimited. ``cgroup_name`` empty means "use the
    container id".
    """

    rootfs: str
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
    tmpfs: tuple[Tmpfs, ...] = ()
    read_only: bool = False
    tty: bool = False
    interactive: bool = False
    userns: UserNamespace | None = None
    cgroup_name: str = ""
    rlimits: tuple[Rlimit, ...] = field(default=(
        Rlimit(resource.RLIMIT_NOFILE, DEFAULT_NOFILE, DEFAULT_NOFILE),))

    def __post_init__(self) -> None:
        # Accept lists from callers but keep the record immutable.
        for name in ("args", "env", "volumes", "tmpfs", "rlimits"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _validate(self)


def _validate(spec: ContainerSpec) -> None:
    if not spec.args:
        raise InvalidInput("no command given to run in the container")
    if not posixpath.isabs(spec.cwd):
        raise InvalidInput(f"working directory {spec.cwd!r} is not absolute")
    if spec.network not in NETWORK_MODES:
        raise InvalidInput(f"network {spec.network!r} not supported (use none or host)")
    for item in spec.env:
        if "=" not in item or not _ENV_KEY_RE.match(item.split("=", 1)[0]):
            raise InvalidInput(f"invalid environment variable {item!r} (want KEY=VALUE)")
    if spec.memory is not None and spec.memory <= 0:
        raise InvalidInput(f"memory limit must be positive, got {spec.memory}")
    if spec.cpus is not None and spec.cpus <= 0:
        raise InvalidInput(f"cpus must be positive, got {spec.cpus}")
    if spec.pids_limit is not None and spec.pids_limit <= 0:
        raise InvalidInput(f"pids limit must be positive, got {spec.pids_limit}")
    if spec.hostname and not _NAME_RE.match(spec.hostname):
        raise InvalidInput(f"invalid hostname {spec.hostname!r}")
    if spec.cgroup_name:
        check_name(spec.cgroup_name, "cgroup name")
    for volume in spec.volumes:
        _check_container_path(volume.container)
    for tmpfs in spec.tmpfs:
        _check_container_path(tmpfs.container)
        if tmpfs.size is not None and tmpfs.size <= 0:
            raise InvalidInput(f"tmpfs size must be positive, got {tmpfs.size}")


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is safe as a path component, else raise."""
    if not _NAME_RE.match(name):
        raise InvalidInput(f"invalid {what} {name!r}: use letters, digits, '_', '.', '-'")
    return name


def _check_container_path(path: str) -> str:
    if not posixpath.isabs(path):
        raise InvalidInput(f"container path {path!r} is not absolute")
    normal = posixpath.normpath(path)
    if normal == "/":
        raise InvalidInput("cannot mount a volume over the container's /")
    return normal


def check_volume_sources(volumes: Sequence[Volume]) -> None:
    """Raise ``NotFound`` for a volume whose host path does not exist."""
    for volume in volumes:
        if not os.path.exists(volume.host):
            raise NotFound(f"volume source {volume.host!r} does not exist")


def parse_memory(text: str) -> int:
    """Parse docker's memory sizes: "512", "256m", "1g", "1.5G", "64kb"."""
    match = _MEMORY_RE.match(text)
    if not match:
        raise InvalidInput(
            f"invalid memory size {text!r}: expected a number with an optional "
            "unit b, k, m, g, t (e.g. 256m)")
    value = int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()])
    if value <= 0:
        raise InvalidInput(f"invalid memory size {text!r}: must be positive")
    return value


def parse_cpus(text: str, available: int | None = None) -> float:
    """Parse ``--cpus`` ("0.5", "2"); must be within the machine's CPUs."""
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"invalid cpus {text!r}: expected a number like 0.5") from None
    limit = available or os.cpu_count() or 1
    if not 0.01 <= value <= limit:
        raise InvalidInput(f"invalid cpus {text!r}: range is 0.01 to {limit}.00")
    return value


def parse_pids_limit(text: str) -> int:
    """Parse ``--pids-limit``: a positive task count."""
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"invalid pids limit {text!r}: expected an integer") from None
    if value <= 0:
        raise InvalidInput(f"invalid pids limit {text!r}: must be positive")
    return value


def parse_env(item: str, host_env: Mapping[str, str] | None = None) -> str | None:
    """Parse one ``-e`` value. "K" alone takes K from the host (None if unset)."""
    key, sep, value = item.partition("=")
    if not key or not _ENV_KEY_RE.match(key):
        raise InvalidInput(f"invalid environment variable {item!r} (want KEY=VALUE)")
    if sep:
        return f"{key}={value}"
    env = os.environ if host_env is None else host_env
    return f"{key}={env[key]}" if key in env else None


def read_env_file(path: str, host_env: Mapping[str, str] | None = None) -> list[str]:
    """Read a docker ``--env-file``: KEY=VALUE lines, '#' comments, blanks."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise NotFound(f"env file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read env file {path!r}: {exc}") from None
    result = []
    for number, line in enumerate(lines, 1):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            parsed = parse_env(stripped, host_env)
        except InvalidInput as exc:
            raise InvalidInput(f"{path}:{number}: {exc}") from None
        if parsed is not None:
            result.append(parsed)
    return result


def parse_volume(text: str) -> Volume:
    """Parse ``-v HOST:CTR[:ro|rw]``; HOST must be an existing absolute path."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise InvalidInput(f"invalid volume {text!r}: want HOST:CONTAINER[:ro|rw]")
    host, container = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise InvalidInput(f"invalid volume mode {mode!r} in {text!r}: want ro or rw")
    if not os.path.isabs(host):
        raise InvalidInput(f"invalid volume {text!r}: host path must be absolute "
                           "(named volumes are not supported)")
    volume = Volume(os.path.normpath(host), _check_container_path(container), mode == "ro")
    check_volume_sources([volume])
    return volume


def parse_id_map(text: str) -> IdMap:
    """Parse "CONTAINER_ID:HOST_ID:SIZE" (docker's --userns-remap style)."""
    try:
        container_id, host_id, size = (int(part) for part in text.split(":"))
    except ValueError:
        raise InvalidInput(f"invalid id map {text!r}: want CONTAINER_ID:HOST_ID:SIZE") from None
    if container_id < 0 or host_id < 0 or size <= 0:
        raise InvalidInput(f"invalid id map {text!r}: ids must be >= 0 and size > 0")
    return IdMap(container_id, host_id, size)


def container_env(spec: ContainerSpec, hostname: str, home: str) -> tuple[str, ...]:
    """The environment the command sees: the spec's plus docker's defaults.

    Docker adds PATH, HOSTNAME, HOME (from passwd) and TERM (with a tty) when
    the image and the user did not set them; later entries win on duplicates.
    """
    merged: dict[str, str] = {}
    for item in spec.env:
        key, _, value = item.partition("=")
        merged[key] = value
    defaults = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, "HOME": home or "/"}
    if spec.tty:
        defaults["TERM"] = "xterm"
    for key, value in defaults.items():
        merged.setdefault(key, value)
    return tuple(f"{key}={value}" for key, value in merged.items())
