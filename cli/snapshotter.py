"""CLI command: snapshotter (containerd's snapshots API as a proxy plugin),
and the containerd snapshots section of ``df -v``."""

from __future__ import annotations

import sys

import click

from layerfs.store.store import Store
from layerfs_cli.common import Options, human_size


@click.command("snapshotter")
@click.option("--address", required=True, metavar="SOCK",
              help="Unix socket to serve on (containerd's proxy_plugins address).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="What to log on stderr.")
def snapshotter_cmd(address: str, log_level: str) -> None:
    """Serve containerd's snapshots API on SOCK until SIGTERM.

    Committed snapshots are layerfs layers in the store (--root); active
    ones are served by the layerfs union. See docs/kubernetes.md.
    """
    import logging

    from layerfs.snapshotter.server import serve
    from layerfs.store.store import default_root

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts: Options = click.get_current_context().find_object(Options)
    serve(opts.root or default_root(), address)


# -- df -v --------------------------------------------------------------------
USAGE_TITLE = "containerd snapshots (committed ones are the images above)"


def usage_section(store: Store) -> tuple[list[str], list[list[str]]]:
    from layerfs.snapshotter import records

    rows = []
    for s in records.all_snapshots(store):
        image = (s.image_id or "")[:12] or "-"
        rows.append([s.key, s.kind, image, human_size(s.size) if s.kind == records.COMMITTED else "-"])
    return ["KEY", "KIND", "CHAIN IMAGE", "LAYER SIZE"], rows


def _add_usage_section(images_cli) -> None:
    if not any(name == USAGE_TITLE for name, _ in images_cli.EXTRA_USAGE):
        images_cli.EXTRA_USAGE.append((USAGE_TITLE, usage_section))


if "layerfs_cli.images" in sys.modules:  # df imports us after itself
    _add_usage_section(sys.modules["layerfs_cli.images"])


def register(cli: click.Group) -> None:
    cli.add_command(snapshotter_cmd)
