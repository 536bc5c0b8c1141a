"""What an instruction does to the image's runtime config: a pure function.

:func:`apply` takes the runtime config (the OCI image config's ``config``
object: ``Env``, ``Cmd``, ``WorkingDir``, ...) and one instruction, already
expanded, and returns the new config; the input is never modified. It does
no I/O, so it is tested without root, a store or a mount. What else a step
does (WORKDIR creating its directory, COPY/ADD/RUN making a layer,
MAINTAINER setting the image's ``author``) is the executor's job.

The rules are docker's (moby ``builder/dockerfile/dispatchers.go``): ENV and
LABEL add or replace keys in order, EXPOSE defaults the protocol to tcp,
WORKDIR is resolved against the current one, CMD/ENTRYPOINT/HEALTHCHECK in
shell form run under the current SHELL, and ENTRYPOINT clears a CMD
inherited from the base image (not one set earlier in the same stage).
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from layerfs.builder import dockerfile as dfm

__all__ = ["DEFAULT_SHELL", "apply", "env_dict", "shell_command"]

DEFAULT_SHELL = ("/bin/sh", "-c")

RuntimeConfig = dict[str, Any]


def env_dict(env: Sequence[str] | None) -> dict[str, str]:
    """``["K=V", ...]`` (the config's ``Env``) as a dict, order kept."""
    out: dict[str, str] = {}
    for item in env or ():
        k, _, v = item.partition("=")
        out[k] = v
    return out


def shell_command(config: Mapping[str, Any], command: dfm.Command) -> list[str]:
    """The argv of a RUN/CMD/ENTRYPOINT: exec form as written, shell form
    under the config's ``Shell`` (``/bin/sh -c`` by default)."""
    if command.exec_form:
        return list(command.args)
    return list(config.get("Shell") or DEFAULT_SHELL) + list(command.args)


def apply(config: Mapping[str, Any], instruction: dfm.Instruction, *, cmd_set: bool = False) -> RuntimeConfig:
    """The runtime config after ``instruction``.

    ``cmd_set`` says whether a CMD came earlier in this stage: only then
    does an ENTRYPOINT keep it. Instructions that do not touch the config
    (RUN, COPY, ADD, ARG, MAINTAINER, FROM) return an equal copy.
    """
    rc: RuntimeConfig = copy.deepcopy(dict(config))
    handler = _HANDLERS.get(type(instruction))
    if handler is not None:
        handler(rc, instruction, cmd_set)
    return rc


def _env(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    env = env_dict(rc.get("Env"))
    env.update(e.pairs)
    rc["Env"] = [f"{k}={v}" for k, v in env.items()]


def _label(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    labels = dict(rc.get("Labels") or {})
    labels.update(e.pairs)
    rc["Labels"] = labels


def _expose(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    ports = dict(rc.get("ExposedPorts") or {})
    for p in e.ports:
        ports[p if "/" in p else f"{p}/tcp"] = {}
    rc["ExposedPorts"] = ports


def _volume(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    vols = dict(rc.get("Volumes") or {})
    for p in e.paths:
        vols[p] = {}
    rc["Volumes"] = vols


def _workdir(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    rc["WorkingDir"] = posixpath.normpath(posixpath.join(rc.get("WorkingDir") or "/", e.path))


def _user(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    rc["User"] = e.user


def _cmd(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    rc["Cmd"] = shell_command(rc, e.command)


def _entrypoint(rc: RuntimeConfig, e: Any, cmd_set: bool) -> None:
    rc["Entrypoint"] = shell_command(rc, e.command)
    if not cmd_set:
        rc.pop("Cmd", None)


def _stopsignal(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    rc["StopSignal"] = e.signal


def _shell(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    rc["Shell"] = list(e.args)


def _onbuild(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
    # The trigger is kept as written (unexpanded): it is expanded in the
    # child's build, with the child's variables.
    rc["OnBuild"] = list(rc.get("OnBuild") or []) + [e.original.split(None, 1)[1]]


def _healthcheck(rc: RuntimeConfig, e: Any, _cmd_set: bool) -> None:
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


_HANDLERS = {
    dfm.Env: _env,
    dfm.Label: _label,
    dfm.Expose: _expose,
    dfm.Volume: _volume,
    dfm.Workdir: _workdir,
    dfm.User: _user,
    dfm.Cmd: _cmd,
    dfm.Entrypoint: _entrypoint,
    dfm.Stopsignal: _stopsignal,
    dfm.Shell: _shell,
    dfm.Onbuild: _onbuild,
    dfm.Healthcheck: _healthcheck,
}
