"""CLI commands: build and builder prune."""

from __future__ import annotations

import os

import click

from layerfs.build import executor
from layerfs.errors import InvalidInput
from layerfs.store.store import Store
from layerfs_cli.common import with_store


def register(cli: click.Group) -> None:
    cli.add_command(build_cmd)
    cli.add_command(builder_grp)


def _build_args(items: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidInput(f"invalid --build-arg {item!r}: expected KEY=VALUE")
        if not sep:
            # docker: a bare KEY takes its value from the environment, if set.
            if key not in os.environ:
                continue
            value = os.environ[key]
        out[key] = value
    return out


@click.command("build")
@click.argument("context", type=click.Path())
@click.option("-t", "--tag", "tags", multiple=True, metavar="NAME:TAG", help="Name the image (repeatable).")
@click.option("-f", "--file", "dockerfile", default=None, metavar="PATH",
              help="The Dockerfile (default CONTEXT/Dockerfile).")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="Set a build-time variable.")
@click.option("--target", default=None, metavar="STAGE", help="Build this stage (and what it needs) only.")
@click.option("--no-cache", is_flag=True, help="Do not use the build cache.")
@click.option("--pull", type=click.Choice(["never"]), default="never", help="Only 'never' (images come from the store).")
@click.option("--network", type=click.Choice(["host", "none"]), default="host", show_default=True,
              help="Network for RUN steps.")
@click.option("--progress", type=click.Choice(["auto", "plain", "tty"]), default="auto", help="Progress output style.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@with_store
def build_cmd(store: Store, context: str, tags: tuple[str, ...], dockerfile: str | None,
              build_args: tuple[str, ...], target: str | None, no_cache: bool, pull: str,
              network: str, progress: str, quiet: bool) -> None:
    """Build an image from a Dockerfile and a context directory."""
    if dockerfile is None:
        df_rel = "Dockerfile"
    else:
        # -f is relative to the current directory, as with docker; the
        # context API wants it relative to the context.
        df_rel = os.path.relpath(os.path.abspath(dockerfile), os.path.realpath(context))
        if not os.path.exists(os.path.join(context, df_rel)):
            df_rel = os.path.relpath(os.path.realpath(dockerfile), os.path.realpath(context))
    options = executor.BuildOptions(context=context, dockerfile=df_rel, tags=tags,
                                    build_args=_build_args(build_args), target=target,
                                    no_cache=no_cache, network=network)
    write = (lambda line: None) if quiet else (lambda line: click.echo(line))
    result = executor.build(store, options, write)
    if quiet:
        click.echo(result.image.id)


@click.group("builder")
def builder_grp() -> None:
    """Manage the build cache."""


@builder_grp.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not ask (accepted for docker compatibility).")
@with_store
def prune_cmd(store: Store, force: bool) -> None:
    """Drop the build cache (run `layerfs gc` to free the space)."""
    n = executor.prune_cache(store)
    click.echo(f"Deleted {n} build cache record{'s' if n != 1 else ''}")
