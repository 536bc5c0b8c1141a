"""What every command shares: options, opening the store, output formatting."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from layerfs.store.store import Store, default_root


@dataclass(frozen=True)
class Options:
    root: str | None
    debug: bool


def open_store() -> Store:
    opts: Options = click.get_current_context().find_object(Options)
    return Store(opts.root or default_root())


def with_store(fn: Callable) -> Callable:
    """Open the store for the command and close it afterwards."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with open_store() as store:
            return fn(store, *args, **kwargs)

    return wrapper


format_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                             show_default=True, help="Output format.")


def human_size(n: float) -> str:
    """Docker's units: decimal (kB, MB, GB), three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}"


def human_ago(ts: float) -> str:
    delta = max(0.0, time.time() - ts)
    for size, unit in ((86400 * 365, "year"), (86400 * 30, "month"), (86400 * 7, "week"),
                       (86400, "day"), (3600, "hour"), (60, "minute")):
        if delta >= size:
            n = int(delta // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a minute ago" if delta >= 1 else "Less than a second ago"


def ellipsize(text: str, width: int) -> str:
    """*text* cut to *width* characters, the last one an ellipsis, as docker does."""
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print columns separated by at least three spaces, like docker."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        line = "   ".join(c.ljust(w) for c, w in zip(r, widths))
        click.echo(line.rstrip())


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))
