"""The container runtime: a thin exec wrapper around kernel isolation.

layerfs sets up namespaces, mounts, cgroups and privileges, then execs the
command and gets out of the way. Public API:

* ``ContainerSpec`` and the ``parse_*`` helpers (spec.py): what to run.
* ``run_container`` / ``start_container`` -> ``ContainerResult`` /
  ``ContainerProcess`` (process.py): run it in the foreground, or start it
  and manage it.
* ``write_bundle`` / ``run_bundle`` (bundle.py): the same spec as an OCI
  runtime bundle for runc or crun.
* ``create_cgroup`` (cgroups.py): per-container cgroups, v2 or v1/hybrid.

Containers as records in a store (imported on demand, not from here):
``containers`` (create/find/list, state, df usage), ``lifecycle`` (owner
and shim: run, start -d, stop, kill, wait, rm, logs, bundle), ``exec``
(setns into a running container), ``changes`` (diff, commit).
"""

from layerfs.runtime.bundle import bundle_config, run_bundle, write_bundle
from layerfs.runtime.cgroups import CgroupLimits, CgroupStats, cgroup_version, create_cgroup
from layerfs.runtime.errors import ContainerSetupError
from layerfs.runtime.process import (ContainerProcess, ContainerResult, new_container_id,
                                     run_container, start_container)
from layerfs.runtime.spec import (ContainerSpec, IdMap, Rlimit, UserNamespace, Volume,
                                  parse_cpus, parse_env, parse_id_map, parse_memory,
                                  parse_pids_limit, parse_volume, read_env_file)

__all__ = [
    "CgroupLimits", "CgroupStats", "ContainerProcess", "ContainerResult",
    "ContainerSetupError", "ContainerSpec", "IdMap", "Rlimit", "UserNamespace", "Volume",
    "bundle_config", "cgroup_version", "create_cgroup", "new_container_id", "parse_cpus",
    "parse_env", "parse_id_map", "parse_memory", "parse_pids_limit", "parse_volume",
    "read_env_file", "run_bundle", "run_container", "start_container", "write_bundle",
]
