"""CLI commands: save, load, push, pull, login, logout (see layerfs.oci)."""

from __future__ import annotations

import sys
import threading
import time

import click

from layerfs import oci
from layerfs.oci.media import Descriptor, Platform
from layerfs_cli.common import human_size, with_store


class TerminalProgress:
    """One status line on stderr, redrawn at most 10 times a second; the
    per-blob outcome is printed as its own line, like docker."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.active: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.last = 0.0

    def start(self, desc: Descriptor, what: str) -> None:
        with self.lock:
            self.active[desc.digest] = [0, desc.size]
        self._draw()

    def advance(self, desc: Descriptor, n: int) -> None:
        with self.lock:
            if desc.digest in self.active:
                self.active[desc.digest][0] += n
        if time.monotonic() - self.last > 0.1:
            self._draw()

    def done(self, desc: Descriptor, note: str) -> None:
        with self.lock:
            self.active.pop(desc.digest, None)
            text = {"done": f"{self.verb} complete"}.get(note, note)
            click.echo(f"\r\x1b[K{desc.short}: {text}", err=True)
        self._draw()

    def _draw(self) -> None:
        with self.lock:
            self.last = time.monotonic()
            if not self.active:
                return
            got = sum(a for a, _ in self.active.values())
            total = sum(t for _, t in self.active.values()) or 1
            width = 30
            fill = int(width * min(got, total) / total)
            line = (f"{self.verb} {len(self.active)} blob(s) [{'=' * fill}{' ' * (width - fill)}] "
                    f"{human_size(got)}/{human_size(total)}")
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()


def _progress(verb: str, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return oci.types.NoProgress()
    return TerminalProgress(verb)


def register(cli: click.Group) -> None:
    @cli.command("save")
    @click.argument("images", nargs=-1, required=True)
    @click.option("-o", "--output", required=True, metavar="FILE.tar", help="Archive to write.")
    @click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci", show_default=True,
                  help="OCI image layout tarball or docker-archive (docker save format).")
    @with_store
    def save_cmd(store, images, output, fmt):
        """Save images to an OCI layout tarball or a docker-archive."""
        oci.save(store, list(images), output, fmt=fmt)

    @cli.command("load")
    @click.option("-i", "--input", "path", required=True, metavar="FILE.tar|DIR",
                  help="OCI layout (tar or dir) or docker-archive.")
    @click.option("-q", "--quiet", is_flag=True, help="Only print image ids.")
    @click.option("--verify", is_flag=True,
                  help="Read and check every layer blob, even of layers the store already holds.")
    @with_store
    def load_cmd(store, path, quiet, verify):
        """Load images from an OCI layout or a docker-archive."""
        for item in oci.load(store, path, progress=_progress("Loading", quiet), verify=verify):
            for w in item.warnings:
                click.echo(f"Warning: {w}", err=True)
            if not quiet:
                for digest in item.reused:
                    click.echo(f"{digest[7:19]}: reusing verified local layer; the archive's blob was not read "
                               "(load --verify reads every blob)", err=True)
            if quiet:
                click.echo(item.image.id)
            elif item.names:
                for n in item.names:
                    click.echo(f"Loaded image: {n}")
            else:
                click.echo(f"Loaded image ID: blake3:{item.image.id}")

    @cli.command("push")
    @click.argument("image")
    @click.argument("destination", required=False, metavar="[REGISTRY/]REPO[:TAG]")
    @click.option("--insecure", is_flag=True, help="Allow plain http / unverified TLS.")
    @click.option("--compression", type=click.Choice(["gzip", "zstd"]), default="gzip", show_default=True)
    @click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci", show_default=True,
                  help="Manifest format: OCI or Docker schema 2.")
    @click.option("-q", "--quiet", is_flag=True)
    @with_store
    def push_cmd(store, image, destination, insecure, compression, fmt, quiet):
        """Push IMAGE to a registry (as DESTINATION, default its own name)."""
        r = oci.push(store, image, destination, insecure=insecure, compression=compression,
                     manifest_format=fmt, progress=_progress("Pushing", quiet))
        click.echo(f"{r.destination_ref}: digest: {r.manifest_digest} "
                   f"({r.blobs_sent} blob(s) sent, {human_size(r.bytes_sent)}; {r.blobs_reused} reused)")

    @cli.command("pull")
    @click.argument("ref", metavar="[REGISTRY/]REPO[:TAG|@DIGEST]")
    @click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
                  help="Image to pick from a multi-platform index (default linux/<host arch>).")
    @click.option("--insecure", is_flag=True, help="Allow plain http / unverified TLS.")
    @click.option("-q", "--quiet", is_flag=True)
    @with_store
    def pull_cmd(store, ref, platform, insecure, quiet):
        """Pull an image from a registry into the store."""
        item = oci.pull(store, ref, platform=Platform.parse(platform), insecure=insecure,
                        progress=_progress("Pulling", quiet))
        from layerfs_cli.images import prepare_for_mounts

        prepare_for_mounts(store, item.image)
        if quiet:
            click.echo(item.image.id)
        else:
            for n in item.names:
                click.echo(f"Pulled {n}")
            click.echo(f"Image ID: blake3:{item.image.id}")

    @cli.command("login")
    @click.argument("registry")
    @click.option("-u", "--username", required=True)
    @click.option("-p", "--password", default=None)
    @click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
    @click.option("--insecure", is_flag=True)
    @with_store
    def login_cmd(store, registry, username, password, password_stdin, insecure):
        """Log in to a registry (credentials are checked, then stored in ROOT/auth.json)."""
        if password_stdin:
            if password is not None:
                raise click.UsageError("--password and --password-stdin are mutually exclusive")
            password = sys.stdin.readline().rstrip("\r\n")
        if password is None:
            password = click.prompt("Password", hide_input=True, err=True)
        oci.login(store, registry, username, password, insecure=insecure)
        click.echo("Login Succeeded")

    @cli.command("logout")
    @click.argument("registry")
    @with_store
    def logout_cmd(store, registry):
        """Forget the stored credentials of a registry."""
        oci.logout(store, registry)
        click.echo(f"Removing login credentials for {registry}")
