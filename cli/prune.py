"""Giving disk space back: ``image prune``, ``system prune``, and the gc
they (and ``layerfs gc``) run."""

from __future__ import annotations

import click

from layerfs.store import gc as gc_mod
from layerfs.store import prune
from layerfs.store.store import Store
from layerfs.store.usage import tree_bytes
from layerfs_cli.common import human_size, with_store


def register(cli: click.Group) -> None:
    cli.add_command(image_grp)
    cli.add_command(system_grp)


def collect_garbage(store: Store, dry_run: bool = False) -> gc_mod.GcResult:
    """gc as the CLI runs it: records of mount daemons that died go first
    (their mounts detached), so they keep nothing; a dry run changes
    nothing but counts as if they had gone, so it reports what gc does."""
    from layerfs.fs import registry

    if dry_run:
        stale = {(registry.REF_KIND, key) for key in registry.stale_mounts(store)}
        return gc_mod.collect(store, dry_run=True, ignore_refs=stale)
    registry.clean_stale(store)
    return gc_mod.collect(store)


def _confirm(force: bool, warning: str) -> bool:
    return force or click.confirm(f"WARNING! {warning}\nAre you sure you want to continue?", default=False)


def _prune_options(f):
    """The options image prune and system prune share."""
    f = click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")(f)
    return click.option("-a", "--all", "all_images", is_flag=True,
                        help="Remove all unused images, not just dangling ones.")(f)


def _images_pruned(all_images: bool) -> str:
    """What ``prune`` (-a or not) removes of the images, for its warning."""
    return "all images without at least one container associated to them" if all_images else "all dangling images"


def _echo_section(title: str, lines: list[str]) -> None:
    if lines:
        click.echo(title)
        for line in lines:
            click.echo(line)
        click.echo()


@click.group("image")
def image_grp() -> None:
    """Manage images."""


@image_grp.command("prune")
@_prune_options
@with_store
def image_prune_cmd(store: Store, all_images: bool, force: bool) -> None:
    """Remove unused images, then gc; says how much space came back."""
    if not _confirm(force, f"This will remove {_images_pruned(all_images)}."):
        return
    _echo_section("Deleted Images:", prune.prune_images(store, all_images))
    click.echo(f"Total reclaimed space: {human_size(collect_garbage(store).bytes_freed)}")


@click.group("system")
def system_grp() -> None:
    """Manage layerfs as a whole."""


@system_grp.command("prune")
@_prune_options
@with_store
def system_prune_cmd(store: Store, all_images: bool, force: bool) -> None:
    """Remove stopped containers, dangling (-a: unused) images and the
    build cache, then gc; says how much space came back."""
    if not _confirm(force, f"This will remove:\n  - all stopped containers\n  - {_images_pruned(all_images)}\n"
                           "  - all build cache\n"):
        return
    containers, freed = _prune_containers(store)
    _echo_section("Deleted Containers:", containers)
    _echo_section("Deleted Images:", prune.prune_images(store, all_images))
    from layerfs.builder import executor

    records = executor.prune_cache(store)
    if records:
        click.echo(f"Deleted build cache records: {records}")
        click.echo()
    freed += collect_garbage(store).bytes_freed
    click.echo(f"Total reclaimed space: {human_size(freed)}")


def _prune_containers(store: Store) -> tuple[list[str], int]:
    """Remove every container that is not running; (their ids, bytes freed)."""
    from layerfs.runtime import containers as records
    from layerfs.runtime import lifecycle

    removed, freed = [], 0
    for c in records.list_containers(store):
        if c.running:
            continue
        freed += tree_bytes(c.dir)
        lifecycle.remove_container(store, c)
        removed.append(c.id)
    return removed, freed
