"""The ``layerfs`` command: a thin click front end over the library.

Each command group lives in its own module with a ``register(cli)``;
:data:`COMMANDS` says which module holds which command so that only the
module a command needs is imported (``layerfs mount`` must not pay for the
registry client). Library errors become one line on stderr and the exit
code their class carries; nothing else is caught, so bugs still show
tracebacks.
"""

from __future__ import annotations

import sys

if "mount" in sys.argv:
    # Answered by the warm mount server before click, the store or trio are
    # imported (exits here), unless the request is not one it takes.
    from layerfs_cli.fastpath import mount_fast

    mount_fast(sys.argv[1:])

import click  # noqa: E402

from layerfs.errors import LayerfsError  # noqa: E402
from layerfs_cli import common  # noqa: E402

COMMANDS = {
    "images": ("bootstrap", "df", "export", "fsck", "gc", "history", "images", "import", "inspect", "rmi", "tag"),
    "mounts": ("mount", "mount-server", "mounts", "umount"),
    "containers": ("bundle", "commit", "diff", "exec", "kill", "logs", "ps", "rm", "run", "start", "stop", "wait"),
    "build": ("build", "builder"),
    "oci": ("load", "login", "logout", "pull", "push", "save"),
    "prune": ("image", "system"),
    "snapshotter": ("snapshotter",),
}
MODULE_OF = {cmd: module for module, cmds in COMMANDS.items() for cmd in cmds}


class LazyGroup(click.Group):
    """Imports a command's module the first time the command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(MODULE_OF)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in MODULE_OF:
            import importlib

            importlib.import_module(f"layerfs_cli.{MODULE_OF[name]}").register(self)
        return self.commands.get(name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--root", envvar="LAYERFS_ROOT", metavar="DIR",
              help="Store root (default /var/lib/layerfs as root; env LAYERFS_ROOT).")
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks for errors.")
@click.version_option(package_name="layerfs")
@click.pass_context
def cli(ctx: click.Context, root: str | None, debug: bool) -> None:
    """layerfs: a layered, content-addressed image store with a FUSE union filesystem."""
    ctx.obj = common.Options(root=root, debug=debug)


def main() -> None:
    try:
        cli.main(prog_name="layerfs", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LayerfsError as exc:
        if "--debug" in sys.argv:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    sys.exit(0)


if __name__ == "__main__":
    main()
