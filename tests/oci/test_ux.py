"""How pull, push and load behave for a user: what they print, progress,
Ctrl-C, --insecure. Driven through the real console script against a real
registry (a throttling proxy in front of it where a transfer must still be
running when the test interrupts it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from layerfs import oci
from layerfs.oci.registry import Client, RegistryError, is_loopback, plain_http_allowed
from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.store import Store
from tests.conftest import assert_fsck_clean, layerfs_cmd
from tests.oci.conftest import add_layer
from tests.oci.helpers import FaultProxy

LINE = re.compile(r"^[0-9a-f]{12}: ")


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1:5000", True),
    ("127.1.2.3", True),
    ("localhost:5000", True),
    ("LOCALHOST", True),
    ("[::1]:5000", True),
    ("registry.example:5000", False),
    ("127.example.com:5000", False),      # a name, not an address
    ("localhost.example", False),
    ("10.0.0.7:5000", False),
    ("[2001:db8::1]:5000", False),
])
def test_plain_http_only_for_loopback_or_insecure(host, loopback):
    assert is_loopback(host) is loopback
    assert plain_http_allowed(host, insecure=False) is loopback
    assert plain_http_allowed(host, insecure=True) is True


def test_tls_to_a_plain_http_registry_says_insecure(registry):
    """What a remote plain-http registry without --insecure gets: TLS only,
    and an error that names the flag (no retry loop)."""
    c = Client(registry.host, retries=5, backoff=5)
    c.scheme = "https"      # as for any non-loopback host without --insecure
    with pytest.raises(RegistryError, match="does not speak TLS; use --insecure"):
        c.request("GET", "/v2/")


def test_loopback_registry_needs_no_insecure(bb_store, busybox, registry, tmp_path):
    ref = f"{registry.host}/ux/plain:1"
    layerfs_cmd("push", "-q", "busybox:test", ref, root=bb_store.root, check=True)
    p = layerfs_cmd("pull", ref, root=str(tmp_path / "other"))
    assert p.returncode == 0, p.stderr


def test_pull_prints_only_the_reference_and_plain_progress(bb_store, busybox, registry, tmp_path):
    add_layer(bb_store, busybox, {"app/data.bin": os.urandom(300_000)}, tmp_path, "app:1")
    ref = f"{registry.host}/ux/app:1"
    p = layerfs_cmd("push", "app:1", ref, root=bb_store.root, check=True)
    push_lines = p.stderr.decode().splitlines()
    assert any(LINE.match(x) and ": Preparing (" in x for x in push_lines), push_lines
    assert sum(bool(LINE.match(x)) and ": Pushed (" in x for x in push_lines) == 2, push_lines

    other = str(tmp_path / "other")
    p = layerfs_cmd("pull", ref, root=other, check=True)
    assert p.stdout.decode() == ref + "\n"
    lines = p.stderr.decode().splitlines()
    # Not a terminal: one line as each layer starts and one as it ends,
    # with size and rate; no bars, no escape sequences.
    assert all(LINE.match(x) for x in lines), lines
    assert "\x1b" not in p.stderr.decode() and "[" not in p.stderr.decode()
    assert sum(": Downloading (" in x for x in lines) == 2
    done = [x for x in lines if ": Pull complete (" in x]
    assert len(done) == 2 and all(re.search(r"in \d+\.\ds, [\d.]+[kMG]?B/s\)$", x) for x in done), done

    again = layerfs_cmd("pull", ref, root=other, check=True)
    assert again.stdout.decode() == ref + "\n"
    assert sum(": Already exists" in x for x in again.stderr.decode().splitlines()) == 2

    quiet = layerfs_cmd("pull", "-q", ref, root=str(tmp_path / "third"), check=True)
    assert quiet.stdout.decode() == ref + "\n" and quiet.stderr == b""
    assert layerfs_cmd("push", "-q", "app:1", ref, root=bb_store.root, check=True).stderr == b""


def test_load_progress_and_quiet(bb_store, busybox, tmp_path):
    out = str(tmp_path / "bb.tar")
    oci.save(bb_store, ["busybox:test"], out)
    p = layerfs_cmd("load", "-i", out, root=str(tmp_path / "a"), check=True)
    assert p.stdout.decode() == "Loaded image: busybox:test\n"
    assert any(": Loaded (" in x for x in p.stderr.decode().splitlines()), p.stderr
    q = layerfs_cmd("load", "-q", "-i", out, root=str(tmp_path / "b"), check=True)
    assert q.stderr == b"" and len(q.stdout.decode().strip()) == 64


def _big_image(store: Store, tmp_path) -> str:
    """One small layer and two incompressible 24 MB ones."""
    layers = []
    for name, size in (("small", 4096), ("big1", 24 << 20), ("big2", 24 << 20)):
        d = tmp_path / name
        d.mkdir()
        (d / f"{name}.bin").write_bytes(os.urandom(size))
        layers.append(transfer.import_layer(store, str(d)))
    image = store.put_image(img.new_config(layers, {"Cmd": ["sh"]},
                                           [img.history_entry(f"ADD {n}") for n in ("a", "b", "c")],
                                           created="2024-01-01T00:00:00Z"))
    store.tag(image.id, "big:1")
    return image.id


def _interrupt_after(cmd: list[str], root: str, marker: str) -> tuple[int, str]:
    """Run the console script, SIGINT it once *marker* shows on stderr."""
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    # As from a terminal: a runner that started us in the background with
    # SIGINT ignored would pass that on, and Ctrl-C would never arrive.
    proc = subprocess.Popen([exe, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, LAYERFS_ROOT=root),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line.decode())
            if marker in seen[-1]:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + rest


def test_ctrl_c_stops_a_pull_and_keeps_finished_layers(bb_store, registry, tmp_path):
    _big_image(bb_store, tmp_path)
    ref = f"{registry.host}/ux/big:1"
    layerfs_cmd("push", "-q", "big:1", ref, root=bb_store.root, check=True)
    proxy = FaultProxy(registry.host)
    proxy.rules.append({"match": "GET /v2/ux/big/blobs/", "action": "slow", "times": 100})
    root = str(tmp_path / "puller")
    try:
        code, err = _interrupt_after(["pull", f"{proxy.host}/ux/big:1"], root, ": Pull complete")
    finally:
        proxy.close()
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"Error: interrupted: 1 of 3 layer\(s\) are complete at layerfs store \S+ and are kept "
                        r"there \(1 copied now\); run the same command again to finish", last), err
    assert "Traceback" not in err
    assert_fsck_clean(root)
    assert layerfs_cmd("images", "-q", root=root, check=True).stdout == b""
    # The next pull (straight from the registry) takes the kept layer from the store.
    p = layerfs_cmd("pull", ref, root=root, check=True)
    assert sum(": Already exists" in x for x in p.stderr.decode().splitlines()) == 1, p.stderr
    assert_fsck_clean(root)


def test_ctrl_c_stops_a_push(bb_store, registry, tmp_path):
    _big_image(bb_store, tmp_path)
    proxy = FaultProxy(registry.host)
    proxy.rules.append({"match": "PUT /v2/ux/bigpush/blobs/", "action": "slow", "times": 100})
    try:
        code, err = _interrupt_after(["push", "big:1", f"{proxy.host}/ux/bigpush:1"], bb_store.root, ": Pushed")
    finally:
        proxy.close()
    assert code == 130, err
    assert re.search(rf"Error: interrupted: 1 of 3 layer\(s\) are complete at {proxy.host}/ux/bigpush:1 "
                     r"and are kept", err), err
    assert_fsck_clean(bb_store.root)
    assert not [n for n in os.listdir(bb_store.tmp_dir)], "spooled blobs are removed"
    # What was uploaded is kept: pushing again sends only the rest.
    p = layerfs_cmd("push", "big:1", f"{registry.host}/ux/bigpush:1", root=bb_store.root, check=True)
    assert sum(": Layer already exists" in x for x in p.stderr.decode().splitlines()) == 1, p.stderr
    assert b"(2 blob(s) sent" in p.stdout, p.stdout
