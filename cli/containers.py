"""Container commands: run, ps, start, stop, kill, wait, rm, logs, exec,
commit, diff, bundle; and the containers section of ``df -v``.

``run``, ``start`` and ``exec`` follow docker's exit codes: the command's
own, and 125 when layerfs itself fails (any LayerfsError).

Start-up matters here (``layerfs run --rm IMAGE true`` is mostly start-up),
so this module imports little at load time: the runtime modules are
imported inside the commands, and ``run`` / ``start -a`` first fork the
layerfs mount daemon (:func:`_prefork_mount`) so that its imports of trio
and pyfuse3 run on the other core while this process imports the runtime,
opens the store and records the container.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from layerfs.errors import LayerfsError
from layerfs_cli.common import ellipsize, emit_json, format_option, human_ago, human_size, open_store, table, with_store

if TYPE_CHECKING:
    from layerfs.runtime import containers as records
    from layerfs.store.store import Store

RUN_ERROR = 125
# layerfs.runtime.containers.RUNTIMES, spelled out so that building the
# options does not import the runtime (a test checks that they agree).
RUNTIMES = ("builtin", "runc", "crun")


def _prefork_mount() -> None:
    """Fork the mount daemon now if layerfs.fs.mount can (``prefork``).

    The daemon spends most of its start-up importing trio and pyfuse3; forked
    here, before this process imports the runtime and opens the store, that
    overlaps with our own work instead of following it. An unused daemon
    exits when we do (EOF on its pipe).
    """
    from layerfs.fs import mount as fsmount

    prefork = getattr(fsmount, "prefork", None)
    if prefork is not None:
        prefork()


def _exit_125(fn: Callable) -> Callable:
    """Report layerfs's own failures with docker's 125, not the class default."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LayerfsError as exc:
            exc.exit_code = RUN_ERROR
            raise

    return wrapper


def _exit_with(code: int, *, now: bool = False) -> None:
    # SystemExit passes through click and main(), which would otherwise
    # turn a normal return into 0.
    sys.stdout.flush()
    if now and _is_the_layerfs_program():
        # Nothing is left to clean up (the caller closed the store), and
        # tearing down an interpreter that imported the runtime takes ~20 ms.
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _is_the_layerfs_program() -> bool:
    """True in the `layerfs` console script, not when click runs in-process
    (tests, embedding), where os._exit would end the caller too."""
    from layerfs_cli import main as cli_main

    return getattr(sys.modules.get("__main__"), "main", None) is cli_main.main


# -- run ------------------------------------------------------------------------------
@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print the id.")
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits.")
@click.option("--name", help="Name the container.")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="Set an environment variable.")
@click.option("--env-file", multiple=True, metavar="FILE", help="Read environment variables from FILE.")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("-u", "--user", help="USER[:GROUP] (name or id).")
@click.option("--hostname", default="", help="Container host name (default: short id).")
@click.option("--network", type=click.Choice(["none", "host"]), default="none", show_default=True)
@click.option("-m", "--memory", help="Memory limit (e.g. 256m).")
@click.option("--cpus", help="Number of CPUs (e.g. 0.5).")
@click.option("--pids-limit", help="Maximum number of tasks.")
@click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:CTR[:ro]", help="Bind mount a host path.")
@click.option("--read-only", is_flag=True, help="Mount the root filesystem read-only.")
@click.option("--entrypoint", help="Override the image's ENTRYPOINT (drops its CMD too).")
@click.option("--runtime", type=click.Choice(list(RUNTIMES)), default="builtin", show_default=True)
@click.option("--backend", type=click.Choice(["fuse", "kernel"]), default=None,
              help="FUSE daemon or kernel overlayfs (default: $LAYERFS_BACKEND, ROOT/config.json, fuse).")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run_cmd(interactive: bool, tty: bool, detach: bool, auto_remove: bool,
            name: str | None, env: tuple[str, ...], env_file: tuple[str, ...], workdir: str | None,
            user: str | None, hostname: str, network: str, memory: str | None, cpus: str | None,
            pids_limit: str | None, volumes: tuple[str, ...], read_only: bool,
            entrypoint: str | None, runtime: str, backend: str | None, image: str,
            command: tuple[str, ...]) -> None:
    """Run COMMAND in a new container from IMAGE (docker run)."""
    if not detach and backend != "kernel":  # detached, the shim mounts; this process never does
        _prefork_mount()
    with open_store() as store:
        code = _run(store, interactive, tty, detach, auto_remove, name, env, env_file, workdir,
                    user, hostname, network, memory, cpus, pids_limit, volumes, read_only,
                    entrypoint, runtime, image, command, backend)
    if code is not None:
        _exit_with(code, now=True)


@_exit_125
def _run(store: Store, interactive: bool, tty: bool, detach: bool, auto_remove: bool,
         name: str | None, env: tuple[str, ...], env_file: tuple[str, ...], workdir: str | None,
         user: str | None, hostname: str, network: str, memory: str | None, cpus: str | None,
         pids_limit: str | None, volumes: tuple[str, ...], read_only: bool,
         entrypoint: str | None, runtime: str, image: str,
         command: tuple[str, ...], backend: str | None = None) -> int | None:
    """The body of ``run``: the container's exit code, None when detached."""
    from layerfs.runtime import containers as records
    from layerfs.runtime.spec import parse_cpus, parse_env, parse_memory, parse_pids_limit, parse_volume, read_env_file

    env_items: list[str] = []
    for path in env_file:
        env_items += read_env_file(path)
    for item in env:
        parsed = parse_env(item)
        if parsed is not None:
            env_items.append(parsed)
    c = records.create_container(
        store, image, cmd=command, entrypoint=entrypoint, name=name, env=env_items, cwd=workdir,
        user=user, hostname=hostname, network=network,
        memory=parse_memory(memory) if memory is not None else None,
        cpus=parse_cpus(cpus) if cpus is not None else None,
        pids_limit=parse_pids_limit(pids_limit) if pids_limit is not None else None,
        volumes=[parse_volume(v) for v in volumes], read_only=read_only, tty=tty,
        interactive=interactive and not detach, runtime=runtime, auto_remove=auto_remove, backend=backend)
    if detach:
        _start_detached(store, c)
        click.echo(c.id)
        return None
    return _run_attached(store, c)


def _start_detached(store: Store, c: records.Container) -> None:
    from layerfs.runtime import lifecycle

    try:
        exec_error = lifecycle.start_detached(store.root, c.id)
    except LayerfsError:
        if c.config.auto_remove:
            _discard(store, c.id)
        raise
    if exec_error:
        state = lifecycle.wait_container(store.root, c.id, 30)
        click.echo(f"Error: {exec_error}", err=True)
        _exit_with(state.exit_code if state and state.exit_code is not None else 127)


def _discard(store: Store, container_id: str) -> None:
    from layerfs.runtime import containers as records
    from layerfs.runtime import lifecycle

    try:
        lifecycle.remove_container(store, records.load(store.root, container_id), force=True)
    except LayerfsError:
        pass


def _run_attached(store: Store, c: records.Container) -> int:
    """Run ``c`` in the foreground; its exit code (the caller exits with it)."""
    from layerfs.runtime import lifecycle

    try:
        result = lifecycle.run_foreground(store.root, c.id, store=store)
    except LayerfsError:
        if c.config.auto_remove:
            _discard(store, c.id)
        raise
    if result.exec_error:
        click.echo(f"Error: {result.exec_error}", err=True)
    return result.exit_code


# -- ps -------------------------------------------------------------------------------
def _command_text(args: tuple[str, ...], no_trunc: bool) -> str:
    text = " ".join(args)
    return f'"{text if no_trunc else ellipsize(text, 20)}"'


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all containers (default: running).")
@click.option("-q", "--quiet", is_flag=True, help="Only show ids.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@format_option
@with_store
def ps_cmd(store: Store, show_all: bool, quiet: bool, no_trunc: bool, fmt: str) -> None:
    """List containers."""
    from layerfs.runtime import containers as records

    found = [c for c in records.list_containers(store) if show_all or c.running]
    if fmt == "json":
        emit_json([{"Id": c.id, "Name": c.name, "Image": c.config.image, "ImageId": c.config.image_id,
                    "Command": list(c.config.args), "Created": c.config.created,
                    "Status": records.status_text(c), "State": c.state.status,
                    "ExitCode": c.state.exit_code, "OOMKilled": c.state.oom_killed,
                    "Pid": c.state.pid, "Error": c.state.error} for c in found])
        return
    cut = (lambda x: x) if no_trunc else (lambda x: x[:12])
    if quiet:
        for c in found:
            click.echo(cut(c.id))
        return
    table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"],
          [(cut(c.id), c.config.image, _command_text(c.config.args, no_trunc),
            human_ago(c.config.created), records.status_text(c), c.name) for c in found])


# -- start / stop / kill / wait / rm / logs ---------------------------------------------
@click.command("start")
@click.option("-a", "--attach", is_flag=True, help="Attach STDOUT/STDERR and forward signals.")
@click.argument("containers", nargs=-1, required=True)
def start_cmd(attach: bool, containers: tuple[str, ...]) -> None:
    """Start stopped containers."""
    if attach and len(containers) > 1:
        raise click.UsageError("you cannot start and attach multiple containers at once")
    if attach:
        _prefork_mount()
    with open_store() as store:
        code = _start(store, attach, containers)
    if code is not None:
        _exit_with(code, now=True)


@_exit_125
def _start(store: Store, attach: bool, containers: tuple[str, ...]) -> int | None:
    """The body of ``start``: with ``attach``, the container's exit code."""
    from layerfs.runtime import containers as records

    for ref in containers:
        c = records.find_container(store, ref)
        if attach:
            return _run_attached(store, c)
        if c.running:
            click.echo(ref)
            continue
        _start_detached(store, c)
        click.echo(ref)
    return None


@click.command("stop")
@click.option("-t", "--time", "timeout", type=float, default=10, show_default=True,
              help="Seconds to wait before killing it.")
@click.argument("containers", nargs=-1, required=True)
@with_store
def stop_cmd(store: Store, timeout: float, containers: tuple[str, ...]) -> None:
    """Stop running containers (stop signal, then SIGKILL)."""
    from layerfs.runtime import containers as records
    from layerfs.runtime import lifecycle

    for ref in containers:
        lifecycle.stop_container(records.find_container(store, ref), timeout)
        click.echo(ref)


@click.command("kill")
@click.option("-s", "--signal", "sig", default="KILL", show_default=True, help="Signal to send.")
@click.argument("containers", nargs=-1, required=True)
@with_store
def kill_cmd(store: Store, sig: str, containers: tuple[str, ...]) -> None:
    """Send a signal to running containers."""
    from layerfs.runtime import containers as records
    from layerfs.runtime import lifecycle

    number = records.parse_signal(sig)
    for ref in containers:
        lifecycle.kill_container(records.find_container(store, ref), number)
        click.echo(ref)


@click.command("wait")
@click.argument("containers", nargs=-1, required=True)
@with_store
def wait_cmd(store: Store, containers: tuple[str, ...]) -> None:
    """Block until containers stop; print their exit codes."""
    from layerfs.runtime import containers as records
    from layerfs.runtime import lifecycle

    for ref in containers:
        c = records.find_container(store, ref)
        state = lifecycle.wait_container(store.root, c.id)
        click.echo(state.exit_code if state and state.exit_code is not None else -1)


@click.command("rm")
@click.option("-f", "--force", is_flag=True, help="Kill and remove a running container.")
@click.argument("containers", nargs=-1, required=True)
@with_store
def rm_cmd(store: Store, force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers: record, upper dir, mount and cgroup."""
    from layerfs.runtime import containers as records
    from layerfs.runtime import lifecycle

    for ref in containers:
        lifecycle.remove_container(store, records.find_container(store, ref), force)
        click.echo(ref)


@click.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Follow the output until the container stops.")
@click.argument("container")
@with_store
def logs_cmd(store: Store, follow: bool, container: str) -> None:
    """Show what a container wrote to stdout and stderr."""
    from layerfs.runtime import containers as records
    from layerfs.runtime import lifecycle

    lifecycle.copy_log(records.find_container(store, container), sys.stdout.buffer, follow)


# -- exec / commit / diff / bundle -----------------------------------------------------
@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-u", "--user", help="USER[:GROUP] (default: the container's).")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="Set an environment variable.")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@with_store
@_exit_125
def exec_cmd(store: Store, interactive: bool, tty: bool, user: str | None, env: tuple[str, ...],
             workdir: str | None, container: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a running container."""
    from layerfs.runtime import containers as records
    from layerfs.runtime import lifecycle
    from layerfs.runtime.exec import exec_in_container
    from layerfs.runtime.spec import parse_env

    c = records.find_container(store, container)
    lifecycle.require_builtin(c, "exec")
    items = [p for p in (parse_env(e) for e in env) if p is not None]
    code = exec_in_container(c, command, tty=tty, interactive=interactive, user=user,
                             env=items, cwd=workdir)
    _exit_with(code)


@click.command("commit")
@click.option("-m", "--message", default="", help="Commit message.")
@click.option("-a", "--author", default="", help="Author.")
@click.argument("container")
@click.argument("reference", metavar="NAME:TAG")
@with_store
def commit_cmd(store: Store, message: str, author: str, container: str, reference: str) -> None:
    """Make an image from a container's changes (its upper dir as a new layer)."""
    from layerfs.runtime import containers as records
    from layerfs.runtime.changes import commit_container

    image = commit_container(store, records.find_container(store, container), reference,
                             message, author)
    click.echo(image.id)


@click.command("diff")
@click.argument("container")
@with_store
def diff_cmd(store: Store, container: str) -> None:
    """List the files a container added (A), changed (C) or deleted (D)."""
    from layerfs.runtime import containers as records
    from layerfs.runtime.changes import container_changes

    for change in container_changes(store, records.find_container(store, container)):
        click.echo(str(change))


@click.command("bundle", context_settings={"allow_interspersed_args": False})
@click.option("--container", metavar="NAME", help="Write into this container's upper dir.")
@click.option("--backend", type=click.Choice(["fuse", "kernel"]), default=None,
              help="FUSE daemon or kernel overlayfs (default: $LAYERFS_BACKEND, ROOT/config.json, fuse).")
@click.argument("image")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@with_store
def bundle_cmd(store: Store, container: str | None, backend: str | None, image: str, directory: str,
               command: tuple[str, ...]) -> None:
    """Write an OCI runtime bundle (rootfs = a layerfs mount) for runc/crun.

    Run it with `runc run --bundle DIR ID`; afterwards unmount the rootfs
    with `layerfs umount DIR/rootfs`.
    """
    from layerfs.runtime import lifecycle

    config = lifecycle.make_bundle(store, image, directory, container=container, cmd=command, backend=backend)
    click.echo(config)


# -- df -v ------------------------------------------------------------------------------
USAGE_TITLE = "Containers (each upper is private; shared image bytes counted once)"


def usage_section(store: Store) -> tuple[list[str], list[list[str]]]:
    from layerfs.runtime import containers as records

    rows, shared = records.container_usage(store)
    out = [[r.id[:12], r.name, r.image, human_size(r.upper_bytes), r.status] for r in rows]
    total = sum(r.upper_bytes for r in rows)
    out.append([f"{len(rows)} containers", "", "uppers total", human_size(total), ""])
    out.append(["", "", "shared image bytes (counted once)", human_size(shared), ""])
    return ["CONTAINER ID", "NAMES", "IMAGE", "UPPER SIZE", "STATUS"], out


COMMANDS = (run_cmd, ps_cmd, start_cmd, stop_cmd, kill_cmd, wait_cmd, rm_cmd, logs_cmd, exec_cmd,
            commit_cmd, diff_cmd, bundle_cmd)


def _add_usage_section(images_cli: Any) -> None:
    if not any(name == USAGE_TITLE for name, _ in images_cli.EXTRA_USAGE):
        images_cli.EXTRA_USAGE.append((USAGE_TITLE, usage_section))


class _OnImagesImport:
    """A meta path finder that adds our ``df -v`` section to
    ``layerfs_cli.images`` once that is imported, so that this module need
    not import it (and all it imports) for ``run``. ``df`` itself imports
    this module (images.USAGE_CONTRIBUTORS); this covers the other order,
    several commands in one process."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
        if name != "layerfs_cli.images":
            return None
        import importlib.util

        sys.meta_path.remove(_OnImagesImport)  # one-shot; and not asked again below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _add_usage_section(module)

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


if "layerfs_cli.images" in sys.modules:
    _add_usage_section(sys.modules["layerfs_cli.images"])
elif _OnImagesImport not in sys.meta_path:
    sys.meta_path.insert(0, _OnImagesImport)


def register(cli: click.Group) -> None:
    for cmd in COMMANDS:
        cli.add_command(cmd)
