"""The ``layerfs`` command: a thin click front end over the library.

Each command group lives in its own module and registers itself in
:data:`GROUPS`. Library errors become one line on stderr and the exit code
their class carries; nothing else is caught, so bugs still show tracebacks.
"""

from __future__ import annotations

import sys

import click

from layerfs.errors import LayerfsError
from layerfs_cli import common

GROUPS = ("images", "mounts", "containers", "build", "oci")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--root", envvar="LAYERFS_ROOT", metavar="DIR",
              help="Store root (default /var/lib/layerfs as root; env LAYERFS_ROOT).")
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks for errors.")
@click.version_option(package_name="layerfs")
@click.pass_context
def cli(ctx: click.Context, root: str | None, debug: bool) -> None:
    """layerfs: a layered, content-addressed image store with a FUSE union filesystem."""
    ctx.obj = common.Options(root=root, debug=debug)


def _register() -> None:
    import importlib

    for name in GROUPS:
        module = importlib.import_module(f"layerfs_cli.{name}")
        module.register(cli)


_register()


def main() -> None:
    try:
        cli.main(standalone_mode=False)
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
    code = click.get_current_context(silent=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
