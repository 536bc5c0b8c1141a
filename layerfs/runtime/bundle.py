"""OCI runtime bundles: the same ``ContainerSpec`` for runc or crun.

``write_bundle(spec, dir)`` writes ``dir/config.json`` (runtime-spec 1.0.2)
with the layout ``runc spec`` generates and docker's defaults: proc, a
tmpfs /dev, devpts, shm, mqueue, read-only sysfs and cgroup; pid, ipc, uts,
mount and cgroup namespaces (network too for ``network="none"``, user with
id mappings when ``spec.userns``); docker's capability set, no_new_privs,
masked and read-only paths; memory/cpu/pids limits; RLIMIT_NOFILE capped
at the caller's hard limit (runc fails on a limit it cannot raise).
``root.path`` is the absolute rootfs path, so the rootfs need not live in
the bundle.

``run_bundle(dir, id, runtime="crun")`` runs it in the foreground and
returns the exit status the runtime reports (the command's, or 128+N).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from typing import Any

from layerfs.errors import InvalidInput, NotFound, Unsupported
from layerfs.runtime.caps import DEFAULT_CAPABILITIES
from layerfs.runtime.cgroups import CPU_PERIOD_US
from layerfs.runtime.hostfiles import write_host_files
from layerfs.runtime.rootfs import MASKED_PATHS, READONLY_PATHS
from layerfs.runtime.spec import ContainerSpec, IdMap, check_name, check_volume_sources, container_env
from layerfs.runtime.users import resolve_user

OCI_VERSION = "1.0.2"
RUNTIMES = ("runc", "crun")
# Explicit, because the resource module also has aliases (RLIMIT_OFILE).
_RLIMIT_NAMES = {getattr(resource, name): name for name in (
    "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC",
    "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK")
    if hasattr(resource, name)}
# crun 1.8 refuses v1/v2 hybrids whose cgroup2 tree is mounted; hiding it in
# a private mount namespace makes the host look like plain v1 to it.
_HIDE_CGROUP2 = ("unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                 'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec "$@"',
                 "layerfs-hide-cgroup2")
_NOSUID_NOEXEC_NODEV = ["nosuid", "noexec", "nodev"]


def bundle_config(spec: ContainerSpec, *, hostname: str = "layerfs",
                  state_dir: str | None = None,
                  cgroups_path: str | None = None) -> dict[str, Any]:
    """The config.json document for ``spec``.

    With ``state_dir``, hosts/hostname/resolv.conf are generated there and
    bind-mounted like ``run_container`` does.
    """
    check_volume_sources(spec.volumes)
    rootfs = os.path.realpath(spec.rootfs)
    if not os.path.isdir(rootfs):
        raise NotFound(f"rootfs {spec.rootfs!r} is not a directory")
    name = spec.hostname or hostname
    user = resolve_user(rootfs, spec.user)
    caps = [f"CAP_{cap}" for cap in DEFAULT_CAPABILITIES]
    linux: dict[str, Any] = {
        "namespaces": _namespaces(spec),
        "resources": _resources(spec),
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if spec.userns is not None:
        linux["uidMappings"] = [_id_map(m) for m in spec.userns.uid_map]
        linux["gidMappings"] = [_id_map(m) for m in spec.userns.gid_map]
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": spec.tty,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.groups)},
            "args": list(spec.args),
            "env": list(container_env(spec, name, user.home)),
            "cwd": spec.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
                             "inheritable": [], "ambient": []},
            "rlimits": _rlimits(spec),
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": spec.read_only},
        "hostname": name,
        "mounts": _mounts(spec, name, state_dir),
        "linux": linux,
    }


def _namespaces(spec: ContainerSpec) -> list[dict[str, str]]:
    kinds = ["pid", "ipc", "uts", "mount", "cgroup"]
    if spec.network == "none":
        kinds.append("network")
    if spec.userns is not None:
        kinds.append("user")
    return [{"type": kind} for kind in kinds]


def _resources(spec: ContainerSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.memory is not None:
        # OCI "swap" is memory+swap: equal to the limit means no swap.
        resources["memory"] = {"limit": spec.memory, "swap": spec.memory}
    if spec.cpus is not None:
        resources["cpu"] = {"quota": int(spec.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US}
    if spec.pids_limit is not None:
        resources["pids"] = {"limit": spec.pids_limit}
    return resources


def _id_map(m: IdMap) -> dict[str, int]:
    return {"containerID": m.container_id, "hostID": m.host_id, "size": m.size}


def _rlimits(spec: ContainerSpec) -> list[dict[str, Any]]:
    result = []
    for limit in spec.rlimits:
        _, hard_now = resource.getrlimit(limit.resource)
        hard = limit.hard if hard_now == resource.RLIM_INFINITY else min(limit.hard, hard_now)
        result.append({"type": _RLIMIT_NAMES[limit.resource], "hard": hard,
                       "soft": min(limit.soft, hard)})
    return result


def _mounts(spec: ContainerSpec, hostname: str, state_dir: str | None) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
         + (["gid=5"] if spec.userns is None or spec.userns.maps_gid(5) else [])},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": _NOSUID_NOEXEC_NODEV + ["mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": list(_NOSUID_NOEXEC_NODEV)},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": _NOSUID_NOEXEC_NODEV + ["ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": _NOSUID_NOEXEC_NODEV + ["relatime", "ro"]},
    ]
    volume_targets = {v.container for v in spec.volumes}
    if state_dir is not None:
        for target, host in write_host_files(state_dir, hostname, spec.network).items():
            if target not in volume_targets:
                mounts.append(_bind(host, target, readonly=False))
    for volume in sorted(spec.volumes, key=lambda v: v.container.count("/")):
        mounts.append(_bind(volume.host, volume.container, volume.readonly))
    for tmpfs in spec.tmpfs:
        size = [f"size={tmpfs.size}"] if tmpfs.size else []
        mounts.append({"destination": tmpfs.container, "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777", *size]})
    return mounts


def _bind(source: str, destination: str, readonly: bool) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": source,
            "options": ["rbind", "rprivate", "ro" if readonly else "rw"]}


def write_bundle(spec: ContainerSpec, bundle_dir: str, **options: Any) -> str:
    """Write ``bundle_dir/config.json`` for ``spec``; return its path.

    ``options`` are those of ``bundle_config``.
    """
    config = bundle_config(spec, **options)
    os.makedirs(bundle_dir, exist_ok=True)
    path = os.path.join(bundle_dir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    os.replace(tmp, path)
    return path


def run_bundle(bundle_dir: str, container_id: str, runtime: str = "runc", *,
               stdin: Any = None, stdout: Any = None, stderr: Any = None,
               runtime_root: str | None = None, hide_cgroup2: bool = False,
               timeout: float | None = None) -> int:
    """Run the bundle with ``runtime`` (runc or crun) and return its exit status.

    ``runtime_root`` is the runtime's ``--root`` state directory.
    ``hide_cgroup2`` runs the runtime in a private mount namespace without
    /sys/fs/cgroup/unified (see _HIDE_CGROUP2). A status of 128+N means
    the command, or the runtime, died of signal N.
    """
    if runtime not in RUNTIMES:
        raise InvalidInput(f"unknown OCI runtime {runtime!r} (use {' or '.join(RUNTIMES)})")
    check_name(container_id, "container id")
    binary = shutil.which(runtime)
    if binary is None:
        raise Unsupported(f"OCI runtime {runtime} is not installed")
    if not os.path.exists(os.path.join(bundle_dir, "config.json")):
        raise NotFound(f"no config.json in bundle {bundle_dir!r}")
    argv = [binary] + (["--root", runtime_root] if runtime_root else [])
    argv += ["run", "--bundle", bundle_dir, container_id]
    if hide_cgroup2:
        argv = [*_HIDE_CGROUP2, *argv]
    completed = subprocess.run(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                               timeout=timeout, check=False)
    code = completed.returncode
    return 128 - code if code < 0 else code
