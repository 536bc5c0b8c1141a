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

# The names below are imported on first use (PEP 562), so that importing
# a submodule (``layerfs.runtime.containers`` for ``layerfs ps``, say) does
# not pay for all of them: the CLI's start-up is part of every command.
_EXPORTS = {
    "bundle": ("bundle_config", "run_bundle", "write_bundle"),
    "cgroups": ("CgroupLimits", "CgroupStats", "cgroup_version", "create_cgroup"),
    "errors": ("ContainerSetupError",),
    "process": ("ContainerProcess", "ContainerResult", "new_container_id", "run_container",
                "start_container"),
    "spec": ("ContainerSpec", "IdMap", "Rlimit", "UserNamespace", "Volume", "parse_cpus",
             "parse_env", "parse_id_map", "parse_memory", "parse_pids_limit", "parse_volume",
             "read_env_file"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CgroupLimits", "CgroupStats", "ContainerProcess", "ContainerResult",
    "ContainerSetupError", "ContainerSpec", "IdMap", "Rlimit", "UserNamespace", "Volume",
    "bundle_config", "cgroup_version", "create_cgroup", "new_container_id", "parse_cpus",
    "parse_env", "parse_id_map", "parse_memory", "parse_pids_limit", "parse_volume",
    "read_env_file", "run_bundle", "run_container", "start_container", "write_bundle",
]
