"""CLI commands: mount, umount, mounts (the FUSE union filesystem)."""

from __future__ import annotations

import click

from layerfs.fs import mount as fsmount
from layerfs_cli.common import Options, emit_json, format_option, table


def _root() -> str:
    from layerfs.store.store import default_root

    opts: Options = click.get_current_context().find_object(Options)
    return opts.root or default_root()


@click.command("mount")
@click.argument("image")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--read-only", is_flag=True, help="Mount read-only (EROFS on writes).")
@click.option("--upper", "upper", metavar="DIR", help="Overlayfs-format upper dir that takes the writes.")
@click.option("--container", metavar="NAME", help="Use the upper dir of container NAME (created if missing).")
@click.option("--foreground", is_flag=True, help="Stay in the foreground until unmounted.")
@click.option("--debug", "fs_debug", is_flag=True, help="Log every FUSE request to the mount's log file.")
@click.option("--backend", type=click.Choice(["fuse", "kernel"]), default=None,
              help="FUSE daemon or kernel overlayfs (default: $LAYERFS_BACKEND, ROOT/config.json, fuse).")
def mount_cmd(image: str, mountpoint: str, read_only: bool, upper: str | None, container: str | None,
              foreground: bool, fs_debug: bool, backend: str | None) -> None:
    """Mount IMAGE at MOUNTPOINT; returns once the mount serves requests.

    Writes go to a copy-on-write upper dir: --upper DIR, the container's
    (--container NAME), or a private one that is removed at unmount.
    """
    if upper and container:
        raise click.UsageError("--upper and --container are mutually exclusive")
    fsmount.check_image(_root(), image)
    fsmount.mount_image(_root(), image, mountpoint, upper_dir=upper, read_only=read_only,
                        foreground=foreground, debug=fs_debug, container=container, backend=backend)


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
def umount_cmd(mountpoint: str) -> None:
    """Unmount a layerfs mount (also cleans up one whose daemon died)."""
    fsmount.unmount(_root(), mountpoint)


@click.command("mounts")
@format_option
def mounts_cmd(fmt: str) -> None:
    """List active layerfs mounts (stale ones are cleaned up)."""
    infos = fsmount.list_mounts(_root())
    if fmt == "json":
        emit_json([{"mountpoint": m.mountpoint, "pid": m.pid, "image": m.image, "image_id": m.image_id,
                    "upper": m.upper, "container": m.container, "read_only": m.read_only, "backend": m.backend}
                   for m in infos])
        return
    rows = [(m.mountpoint, m.image, m.image_id[:12], m.backend, m.pid, m.container or "",
             "(read-only)" if m.read_only and not m.upper else (m.upper or "")) for m in infos]
    table(("MOUNTPOINT", "IMAGE", "IMAGE ID", "BACKEND", "PID", "CONTAINER", "UPPER"), rows)


@click.group("mount-server")
def mount_server_cmd() -> None:
    """The warm mount server that answers `layerfs mount` (one per store).

    Started by the first mount, it exits by itself after 10 minutes without
    a request ($LAYERFS_MOUNT_SERVER_IDLE seconds); stopping it never
    touches existing mounts. LAYERFS_MOUNT_SERVER=off mounts without it.
    """


@mount_server_cmd.command("status")
def mount_server_status() -> None:
    """Print the server's pid, or "not running"."""
    from layerfs.fs import mountclient

    pid = mountclient.server_pid(_root())
    click.echo(pid if pid is not None else "not running")


@mount_server_cmd.command("stop")
def mount_server_stop() -> None:
    """Stop the server (SIGTERM); mounts it made keep serving."""
    from layerfs.fs import mountclient

    mountclient.stop_server(_root())


def register(cli: click.Group) -> None:
    cli.add_command(mount_server_cmd)
    cli.add_command(mount_cmd)
    cli.add_command(umount_cmd)
    cli.add_command(mounts_cmd)
