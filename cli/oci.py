"""CLI commands: save, load, push, pull, login, logout (see layerfs.oci)."""

from __future__ import annotations

import sys

import click

from layerfs import oci
from layerfs.oci.media import Platform
from layerfs_cli import progress as prog
from layerfs_cli.common import human_size, with_store


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
    @click.option("-q", "--quiet", is_flag=True, help="No progress; only print image ids.")
    @click.option("--verify", is_flag=True,
                  help="Read and check every layer blob, even of layers the store already holds.")
    @with_store
    def load_cmd(store, path, quiet, verify):
        """Load images from an OCI layout or a docker-archive."""
        for item in oci.load(store, path, progress=prog.view(prog.LOAD, quiet), verify=verify):
            for w in item.warnings:
                click.echo(f"Warning: {w}", err=True)
            if item.reused and not quiet:
                # Progress shows these as "Already exists"; say what that means here.
                click.echo(f"Reusing verified local layers for {', '.join(d[7:19] for d in item.reused)}: "
                           "their blobs were not read from the archive (load --verify reads every blob)", err=True)
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
    @click.option("-q", "--quiet", is_flag=True, help="No progress.")
    @with_store
    def push_cmd(store, image, destination, insecure, compression, fmt, quiet):
        """Push IMAGE to a registry (as DESTINATION, default its own name)."""
        r = oci.push(store, image, destination, insecure=insecure, compression=compression,
                     manifest_format=fmt, progress=prog.view(prog.PUSH, quiet))
        click.echo(f"{r.destination_ref}: digest: {r.manifest_digest} "
                   f"({r.blobs_sent} blob(s) sent, {human_size(r.bytes_sent)}; {r.blobs_reused} reused)")

    @cli.command("pull")
    @click.argument("ref", metavar="[REGISTRY/]REPO[:TAG|@DIGEST]")
    @click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
                  help="Image to pick from a multi-platform index (default linux/<host arch>).")
    @click.option("--insecure", is_flag=True, help="Allow plain http / unverified TLS.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress; print only the reference.")
    @with_store
    def pull_cmd(store, ref, platform, insecure, quiet):
        """Pull an image from a registry into the store."""
        item = oci.pull(store, ref, platform=Platform.parse(platform), insecure=insecure,
                        progress=prog.view(prog.PULL, quiet))
        from layerfs_cli.images import prepare_for_mounts

        prepare_for_mounts(store, item.image)
        # Like docker: stdout is the reference pulled, nothing else, so
        # scripts can use it; progress went to stderr.
        click.echo(item.reference)

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
