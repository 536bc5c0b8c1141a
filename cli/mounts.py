"""CLI commands: mounts (placeholder until its issue lands)."""

import click


def register(cli: click.Group) -> None:
    pass
