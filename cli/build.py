"""CLI commands: build and builder prune."""

from __future__ import annotations

import collections
import os
import shutil
import sys
import threading
import time
from typing import TextIO

import click

from layerfs.builder import executor, run_mounts
from layerfs.errors import InvalidInput
from layerfs.store.store import Store
from layerfs_cli.common import ellipsize, human_size, with_store


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
@click.option("--secret", "secrets", multiple=True, metavar="id=ID,src=PATH|env=VAR",
              help="A secret for RUN --mount=type=secret (repeatable); never stored in the image.")
@click.option("--target", default=None, metavar="STAGE", help="Build this stage (and what it needs) only.")
@click.option("--no-cache", is_flag=True, help="Do not use the build cache.")
@click.option("--pull", type=click.Choice(["never"]), default="never",
              help="Only 'never' (images come from the store).")
@click.option("--network", type=click.Choice(["host", "none"]), default="host", show_default=True,
              help="Network for RUN steps.")
@click.option("--progress", type=click.Choice(["auto", "plain", "tty"]), default="auto", show_default=True,
              help="tty: a live status line for the running step, one line per finished step; "
                   "plain: the classic builder's stream with all RUN output; auto: tty on a terminal.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@click.option("--backend", type=click.Choice(["fuse", "kernel"]), default=None,
              help="How RUN steps mount their rootfs (default: $LAYERFS_BACKEND, ROOT/config.json, fuse).")
@with_store
def build_cmd(store: Store, context: str, tags: tuple[str, ...], dockerfile: str | None,
              build_args: tuple[str, ...], secrets: tuple[str, ...], target: str | None, no_cache: bool, pull: str,
              network: str, progress: str, quiet: bool, backend: str | None) -> None:
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
                                    no_cache=no_cache, network=network,
                                    secrets={s.id: s for s in map(run_mounts.parse_secret, secrets)},
                                    backend=backend)
    if quiet:
        result = executor.build(store, options)
        click.echo(result.image.id)
        return
    if progress == "auto":
        progress = "tty" if _is_terminal(sys.stdout) else "plain"
    if progress == "plain":
        executor.build(store, options, lambda line: click.echo(line))
        return
    display = TtyProgress(sys.stdout)
    try:
        executor.build(store, options, on_event=display.event)
    except BaseException:
        display.failed()
        raise
    finally:
        display.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


class TtyProgress:
    """A compact live display: one finished line per step
    (``[2/6] RUN ... DONE 3.1s`` / ``CACHED``) and, while a step runs, a
    status line redrawn in place with its elapsed time and last output line.
    If the build fails, the failing step's last output lines are shown."""

    TAIL = 25

    def __init__(self, out: TextIO, interval: float = 0.2):
        self.out = out
        self.lock = threading.Lock()
        self.current: str | None = None
        self.started = 0.0
        self.cached = False
        self.last = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=self.TAIL)
        self.build_started = time.monotonic()
        self.status_shown = False
        self.stop = threading.Event()
        self.ticker = threading.Thread(target=self._tick, args=(interval,), daemon=True)
        self.ticker.start()

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((80, 24)).columns)

    def _clear(self) -> None:
        if self.status_shown:
            self.out.write("\r\x1b[K")
            self.status_shown = False

    def _print(self, line: str) -> None:
        self._clear()
        self.out.write(line[: self._width() * 4] + "\n")
        self.out.flush()

    def _draw(self) -> None:
        if self.current is None:
            return
        elapsed = time.monotonic() - self.started
        line = f"{self.current}  {elapsed:.1f}s"
        if self.last:
            line += "  | " + self.last.replace("\t", " ")
        line = ellipsize(line, self._width() - 1)
        self.out.write("\r\x1b[K" + line)
        self.out.flush()
        self.status_shown = True

    def _tick(self, interval: float) -> None:
        while not self.stop.wait(interval):
            with self.lock:
                self._draw()

    def _finish_step(self, how: str) -> None:
        if self.current is None:
            return
        elapsed = time.monotonic() - self.started
        self._print(f"{self.current}  {'CACHED' if self.cached else how} {elapsed:.1f}s")
        self.current = None

    def event(self, ev: executor.BuildEvent) -> None:
        with self.lock:
            if ev.kind == "step":
                self._finish_step("DONE")
                text = ev.text.split(" : ", 1)[-1]
                self.current = f"[{ev.step}/{ev.total}] {text}"
                self.started = time.monotonic()
                self.cached = False
                self.last = ""
                self.tail.clear()
                self._draw()
            elif ev.kind == "cached":
                self.cached = True
            elif ev.kind == "done":
                self._finish_step("DONE")
            elif ev.kind == "output":
                self.tail.append(ev.text)
                # What a progress bar redrew last, without control characters.
                shown = "".join(c for c in ev.text.rsplit("\r", 1)[-1] if c >= " " or c == "\t").strip()
                if shown:
                    self.last = shown
            elif ev.kind == "built":
                self._finish_step("DONE")
                took = time.monotonic() - self.build_started
                self._print(f"{ev.text} in {took:.1f}s")
            else:  # warning, info, tagged
                self._print(ev.text)

    def failed(self) -> None:
        """Show what the failing step printed before the error line."""
        with self.lock:
            if self.current is None:
                return
            current = self.current
            elapsed = time.monotonic() - self.started
            self.current = None
            self._print(f"{current}  ERROR {elapsed:.1f}s")
            for line in self.tail:
                self._print(f"  {line}")

    def close(self) -> None:
        self.stop.set()
        self.ticker.join()
        with self.lock:
            self._clear()
            self.out.flush()


@click.group("builder")
def builder_grp() -> None:
    """Manage the build cache."""


@builder_grp.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not ask (accepted for docker compatibility).")
@with_store
def prune_cmd(store: Store, force: bool) -> None:
    """Drop the build cache and cache mounts (run `layerfs gc` to free the layers' space)."""
    mounts, freed = run_mounts.prune_cache_mounts(store.root)
    n = executor.prune_cache(store)
    click.echo(f"Deleted {n} build cache record{'s' if n != 1 else ''}")
    if mounts:
        click.echo(f"Deleted {mounts} cache mount{'s' if mounts != 1 else ''} ({human_size(freed)})")
