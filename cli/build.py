"""CLI commands: build (placeholder until its issue lands)."""

import click


def register(cli: click.Group) -> None:
    pass
