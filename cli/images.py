"""Image and store commands: import, images, history, inspect, tag, rmi,
export, df, gc, fsck, bootstrap."""

from __future__ import annotations

import os
import sys

import click

from layerfs import bootstrap as boot
from layerfs.errors import Corrupt, InvalidInput
from layerfs.store import fsck as fsck_mod
from layerfs.store import images as img
from layerfs.store import transfer, usage
from layerfs.store.images import Image
from layerfs.store.store import Store
from layerfs_cli.common import ellipsize, emit_json, format_option, human_ago, human_size, table, with_store


def register(cli: click.Group) -> None:
    for cmd in (import_cmd, images_cmd, history_cmd, inspect_cmd, tag_cmd, rmi_cmd, export_cmd,
                df_cmd, gc_cmd, fsck_cmd, bootstrap_grp):
        cli.add_command(cmd)


def image_size(store: Store, image: Image) -> int:
    return sum(store.layer_info(lid)[0] for lid in image.layers)


@click.command("import")
@click.argument("source", type=click.Path())
@click.option("-t", "--tag", "tags", multiple=True, required=True, metavar="NAME:TAG", help="Name the new image.")
@click.option("--base", metavar="IMAGE", help="Put the new layer on top of IMAGE.")
@click.option("--layer", "as_layer", is_flag=True,
              help="With --base: SOURCE is a layer as it is (overlayfs upper dir / OCI whiteouts), not a full tree.")
@click.option("-m", "--message", default="", help="Comment recorded in the history.")
@with_store
def import_cmd(store: Store, source: str, tags: tuple[str, ...], base: str | None, as_layer: bool,
               message: str) -> None:
    """Import a directory or tar archive as an image (or as a layer on --base)."""
    if as_layer and not base:
        raise InvalidInput("--layer needs --base")
    from layerfs.store import references

    for t in tags:
        references.parse(t)
    base_image = store.image(base) if base else None
    with store.writing():
        lid = transfer.import_layer(store, source, base_image, as_layer)
        hist = img.history_entry(f"layerfs import {os.path.basename(os.path.abspath(source))}", comment=message)
        image = store.put_image(img.with_layer(base_image.config if base_image else None, lid, hist))
        for t in tags:
            store.tag(image.id, t)
    prepare_for_mounts(store, image)
    click.echo(image.id)


def prepare_for_mounts(store: Store, image: Image) -> None:
    """Build the filesystem's merged index now, so the first mount of the
    image only loads it (mount latency is what users feel)."""
    from layerfs.fs.index import ensure_index_cache

    ensure_index_cache(store, image)


@click.command("images")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show intermediate images (build steps) too.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image ids.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate ids.")
@format_option
@with_store
def images_cmd(store: Store, show_all: bool, quiet: bool, no_trunc: bool, fmt: str) -> None:
    """List images."""
    rows = []
    # Like docker, untagged images that other images are made from (a
    # build's steps) are intermediate; an untagged leaf is dangling, shown.
    listing = store.images()
    intermediate: set[str] = set()
    if not show_all:
        from layerfs.store import prune

        intermediate = set(prune.lineage(store, listing).children)
    for image, tags in listing:
        if not tags and image.id in intermediate:
            continue
        size = image_size(store, image)
        for t in tags or ["<none>:<none>"]:
            name, _, tag = t.rpartition(":")
            rows.append((name, tag, image, size))
    if fmt == "json":
        emit_json([{"Repository": n, "Tag": t, "ID": i.id, "Created": img.timestamp(i.created),
                    "Size": s} for n, t, i, s in rows])
        return
    if quiet:
        for iid in dict.fromkeys(i.id if no_trunc else i.id[:12] for _, _, i, _ in rows):
            click.echo(iid)
        return
    table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
          [(n, t, i.id if no_trunc else i.id[:12], human_ago(i.created), human_size(s)) for n, t, i, s in rows])


@click.command("history")
@click.argument("image")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-q", "--quiet", is_flag=True, help="Only show layer ids.")
@format_option
@with_store
def history_cmd(store: Store, image: str, no_trunc: bool, quiet: bool, fmt: str) -> None:
    """Show the history of an image, newest first, with the layer of each step."""
    im = store.image(image)
    rows = _history_rows(store, im)
    if fmt == "json":
        emit_json([{"Image": i, "Layer": lid, "CreatedAt": c, "CreatedBy": b, "Size": s, "Comment": m}
                   for i, lid, c, b, s, m in rows])
        return
    cut = (lambda x: x) if no_trunc else (lambda x: x[:12])
    if quiet:
        for _, lid, *_ in rows:
            click.echo(cut(lid) if lid else "<missing>")
        return
    def by(text: str) -> str:
        return text if no_trunc else ellipsize(text, 45)

    table(["IMAGE", "LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
          [(cut(i) if i else "<missing>", cut(lid) if lid else "<none>", human_ago(img.parse_timestamp(c)) if c else "",
            by(b), human_size(s), m) for i, lid, c, b, s, m in rows])


def _history_rows(store: Store, im: Image) -> list[tuple[str, str, str, str, int, str]]:
    layers = list(im.layers)
    hist = im.history or [img.history_entry("", created=im.config.get("created", ""))] * len(layers)
    rows = []
    li = 0
    for h in hist:
        lid = ""
        if not h.get("empty_layer") and li < len(layers):
            lid = layers[li]
            li += 1
        size = store.layer_info(lid)[0] if lid else 0
        rows.append(["", lid, h.get("created", ""), h.get("created_by", ""), size, h.get("comment", "")])
    rows.reverse()
    if rows:
        rows[0][0] = im.id
    return [tuple(r) for r in rows]


@click.command("inspect")
@click.argument("names", nargs=-1, required=True)
@with_store
def inspect_cmd(store: Store, names: tuple[str, ...]) -> None:
    """Show low-level information on images or layers (JSON)."""
    from layerfs.errors import NotFound

    out = []
    for name in names:
        try:
            out.append(_inspect_image(store, store.image(name)))
        except NotFound:
            try:
                lid = store.resolve_layer(name)
            except NotFound:
                raise NotFound(f"no such image or layer: {name}") from None
            size, entries, created = store.layer_info(lid)
            out.append({"Id": lid, "Type": "layer", "Size": size, "Entries": entries,
                        "Created": img.timestamp(created)})
    emit_json(out)


def _inspect_image(store: Store, im: Image) -> dict:
    c = im.config
    return {"Id": im.id, "Type": "image", "RepoTags": store.tags_of(im.id), "Created": c.get("created"),
            "Size": image_size(store, im), "Architecture": c.get("architecture"), "Os": c.get("os"),
            "Config": c.get("config", {}), "RootFS": {"Type": "layerfs", "Layers": im.layers},
            "History": im.history}


@click.command("tag")
@click.argument("source")
@click.argument("target")
@with_store
def tag_cmd(store: Store, source: str, target: str) -> None:
    """Create a tag TARGET that refers to SOURCE."""
    store.tag(store.image(source).id, target)


@click.command("rmi")
@click.argument("images", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove even if tagged in several repositories.")
@with_store
def rmi_cmd(store: Store, images: tuple[str, ...], force: bool) -> None:
    """Remove images, with their untagged parents nothing else uses (a
    build's intermediate steps); gc then reclaims their bytes."""
    from layerfs.store import prune

    for name in images:
        for line in prune.remove_image(store, name, force=force):
            click.echo(line)


@click.command("export")
@click.argument("image")
@click.option("-o", "--output", required=True, metavar="DIR|TAR|-",
              help="A new directory, a .tar file, or - for a tar on stdout.")
@with_store
def export_cmd(store: Store, image: str, output: str) -> None:
    """Export an image's flattened root filesystem."""
    im = store.image(image)
    if output == "-":
        if sys.stdout.isatty():
            raise InvalidInput("refusing to write a tar to a terminal; redirect stdout or use -o FILE")
        transfer.export_tar_stream(store, im, sys.stdout.buffer)
    else:
        transfer.export_image(store, im, output)


@click.command("df")
@click.option("-v", "--verbose", is_flag=True, help="Per image detail.")
@click.option("--no-trunc", is_flag=True, help="Don't cut long TAGS columns.")
@format_option
@with_store
def df_cmd(store: Store, verbose: bool, no_trunc: bool, fmt: str) -> None:
    """Show disk usage and what sharing saves, at layer and at file level."""
    _load_usage_contributors()
    u = usage.measure(store)
    steps = [r for r in u.images if r.build_step]
    if fmt == "json":
        emit_json({"Logical": u.logical, "LayerLevel": u.layer_level, "FileLevel": u.file_level,
                   "Physical": u.physical, "Objects": u.objects, "Layers": u.layers,
                   "BuildStepImages": len(steps), "BuildStepOnly": u.build_step_only,
                   "Images": [vars(r) | {"tags": list(r.tags)} for r in u.images],
                   "Extra": _extra_usage(store)})
        return
    table(["TYPE", "BYTES", "WHAT IT COUNTS"], [
        ("logical", human_size(u.logical), "every image stored alone (full copies; build steps: their own layers)"),
        ("layer-level", human_size(u.layer_level), f"each distinct layer once, as docker stores ({u.layers} layers)"),
        ("file-level", human_size(u.file_level), f"each distinct file content once ({u.objects} objects)"),
        ("physical", human_size(u.physical), "on disk: objects (zstd, holes) + manifests + db"),
    ])
    click.echo()
    click.echo(f"Saving from sharing layers: {_pct(u.logical, u.layer_level)}; "
               f"from sharing files too: {_pct(u.logical, u.file_level)}; "
               f"on disk vs logical: {_pct(u.logical, u.physical)}; "
               f"on disk vs layer-level (docker): {_pct(u.layer_level, u.physical)}")
    if steps:
        click.echo(f"Build-step images (hidden like docker's intermediate images): {len(steps)}, "
                   f"holding {human_size(u.build_step_only)} that no other image holds")
    if verbose:
        def tags(r: usage.ImageUsage) -> str:
            text = ",".join(r.tags) or "<none>"
            return text if no_trunc else ellipsize(text, DF_TAGS_WIDTH)

        headers = ["IMAGE ID", "TAGS", "LOGICAL", "SHARED LAYERS", "SHARED FILES", "UNIQUE"]
        for title, rows in (("Images:", [r for r in u.images if not r.build_step]), ("Build-step images:", steps)):
            if not rows:
                continue
            click.echo()
            click.echo(title)
            table(headers, [(r.image_id[:12], tags(r), human_size(r.logical), human_size(r.shared_layers),
                             human_size(r.shared_files), human_size(r.unique)) for r in rows])
        for title, headers, rows in _extra_usage_tables(store):
            if not rows:
                continue    # no containers, no snapshots: no empty table
            click.echo()
            click.echo(title)
            table(headers, rows)


DF_TAGS_WIDTH = 40   # docker cuts long cells with an ellipsis; --no-trunc shows them whole


def _pct(whole: int, part: int) -> str:
    return f"{100 * (1 - part / whole):.1f}%" if whole else "0%"


# Other command groups add their own df sections here when imported;
# the CLI loads groups lazily, so df imports the ones that contribute.
EXTRA_USAGE: list = []
USAGE_CONTRIBUTORS = ("layerfs_cli.containers", "layerfs_cli.snapshotter")


def _load_usage_contributors() -> None:
    import importlib

    for name in USAGE_CONTRIBUTORS:
        importlib.import_module(name)


def _extra_usage(store: Store) -> dict:
    return {name: fn(store)[1] for name, fn in EXTRA_USAGE}


def _extra_usage_tables(store: Store) -> list:
    out = []
    for name, fn in EXTRA_USAGE:
        headers, rows = fn(store)
        out.append((name, headers, [list(r.values()) if isinstance(r, dict) else r for r in rows]))
    return out


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would go (exactly what gc then does).")
@with_store
def gc_cmd(store: Store, dry_run: bool) -> None:
    """Remove layers and objects nothing references any more, and leftovers
    (records of dead mounts, interrupted writes); never what a live mount uses."""
    from layerfs_cli.prune import collect_garbage

    r = collect_garbage(store, dry_run=dry_run)
    verb = "Would remove" if dry_run else "Removed"
    click.echo(f"{verb} {r.layers_removed} layers, {r.objects_removed} objects, "
               f"{human_size(r.bytes_freed)} freed; {r.debris_removed} leftover files swept")


@click.command("fsck")
@click.option("--repair", is_flag=True, help="Drop what is unreachable or broken.")
@with_store
def fsck_cmd(store: Store, repair: bool) -> None:
    """Verify every object, layer, image and reference (exit 3 on damage)."""
    r = fsck_mod.check(store, repair=repair)
    for p in r.problems:
        click.echo(p.message)
    click.echo(f"checked {r.objects} objects, {r.layers} layers, {r.images} images: "
               + ("clean" if r.clean else f"{len(r.problems)} problems" + (", repaired" if r.repaired else "")))
    if not r.clean and not r.repaired:
        raise Corrupt("store is damaged; run 'layerfs fsck --repair' to drop what is broken")


@click.group("bootstrap")
def bootstrap_grp() -> None:
    """Make a base image from what this machine has."""


@bootstrap_grp.command("busybox")
@click.option("-t", "--tag", default="busybox:latest", show_default=True)
@with_store
def bootstrap_busybox(store: Store, tag: str) -> None:
    """A runnable image from the host's static busybox."""
    click.echo(boot.bootstrap_busybox(store, tag).id)


@bootstrap_grp.command("debian")
@click.option("--suite", default="bookworm", show_default=True)
@click.option("-t", "--tag", default=None, help="Default debian:SUITE.")
@click.option("--mirror", default=None, help="Default: the mirror this machine's apt uses.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; only print the image id.")
@with_store
def bootstrap_debian(store: Store, suite: str, tag: str | None, mirror: str | None, quiet: bool) -> None:
    """A debootstrap minbase image (about a minute and ~120 MB)."""
    from layerfs_cli import progress

    view = progress.view(progress.BOOTSTRAP, quiet)
    image = boot.bootstrap_debian(store, suite, tag, mirror, on_step=view.step)
    view.close()
    click.echo(image.id)
