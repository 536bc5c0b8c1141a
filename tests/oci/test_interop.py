"""Images pushed by layerfs, unpacked by containerd and buildah exactly as
`layerfs export` lays them out: hardlinked executables, setuid, file
capabilities, user xattrs, odd directory modes, owners and nanosecond
times. Each tool really runs: the registry, containerd (its own instance)
and runc via `ctr run`, buildah on a temp vfs storage."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile

import pytest

from layerfs.store import images as img
from layerfs.store import manifest as mf
from layerfs.store import tarlayer, transfer
from layerfs.store.manifest import Entry
from tests import capabilities
from tests.conftest import layerfs_cmd
from tests.oci.conftest import make_busybox_tree
from tests.oci.interop import Buildah, Containerd, diff_signatures, full_signature

T0 = 1_600_000_000_123_456_789
# A v2 file capability: cap_net_bind_service permitted and effective.
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def test_hardlink_headers_carry_the_files_metadata(bb_store):
    """docker's writer stats the shared inode for every name; a link header
    with 0644 / mtime 0 would reset the file when an unpacker applies it."""
    digest = bb_store.objects.put_bytes(b"#!/bin/sh\n").digest
    xattrs = (("security.capability", CAP_NET_BIND), ("user.k", b"v"))
    entries = [
        Entry("", mf.DIR, 0o755),
        Entry("bin", mf.DIR, 0o755),
        Entry("bin/a", mf.FILE, 0o4750, uid=7, gid=8, mtime_ns=T0, size=10, digest=digest, xattrs=xattrs),
        Entry("bin/b", mf.HARDLINK, target="bin/a"),
    ]
    for layer in (True, False):
        out = io.BytesIO()
        tarlayer.write_tar(entries, out, bb_store.objects.open, layer=layer)
        out.seek(0)
        with tarfile.open(fileobj=out) as tf:
            a, b = tf.getmember("bin/a"), tf.getmember("bin/b")
        assert b.islnk() and b.linkname == "bin/a" and b.size == 0
        assert (b.mode, b.uid, b.gid, b.mtime) == (a.mode, a.uid, a.gid, a.mtime) == (0o4750, 7, 8, T0 / 1e9)
        assert b.pax_headers == a.pax_headers
        assert a.pax_headers["SCHILY.xattr.user.k"] == "v"


def _odd_tree(dest: str) -> None:
    """busybox plus everything unpackers get wrong with hardlinks."""
    make_busybox_tree(dest)
    os.makedirs(f"{dest}/usr/local/bin")
    os.makedirs(f"{dest}/usr/local/sbin")
    # Hardlinked executables named after applets, so each name runs.
    os.link(f"{dest}/bin/busybox", f"{dest}/usr/local/bin/sh")
    os.link(f"{dest}/bin/busybox", f"{dest}/usr/local/bin/cat")
    # A setuid, group-restricted executable with a capability, linked twice.
    shutil.copy(f"{dest}/bin/busybox", f"{dest}/usr/local/sbin/ls")
    os.chown(f"{dest}/usr/local/sbin/ls", 0, 50)
    os.chmod(f"{dest}/usr/local/sbin/ls", 0o4750)
    os.setxattr(f"{dest}/usr/local/sbin/ls", "security.capability", CAP_NET_BIND)
    os.setxattr(f"{dest}/usr/local/sbin/ls", "user.origin", b"layerfs-test")
    os.link(f"{dest}/usr/local/sbin/ls", f"{dest}/usr/local/bin/ls")
    # A plain data file group owned by someone else, read-only.
    os.makedirs(f"{dest}/srv/data")
    with open(f"{dest}/srv/data/a.txt", "w") as f:
        f.write("shared\n")
    os.chmod(f"{dest}/srv/data/a.txt", 0o440)
    os.chown(f"{dest}/srv/data/a.txt", 1000, 1001)
    os.link(f"{dest}/srv/data/a.txt", f"{dest}/srv/b.txt")
    # Directories with odd modes and owners.
    for d, mode, uid in (("srv/drop", 0o1733, 0), ("srv/team", 0o2770, 1000), ("srv/private", 0o700, 33)):
        os.makedirs(f"{dest}/{d}", exist_ok=True)
        os.chown(f"{dest}/{d}", uid, uid)
        os.chmod(f"{dest}/{d}", mode)
    for i, (dp, dns, fns) in enumerate(sorted(os.walk(dest), reverse=True)):
        for name in fns + dns:
            os.utime(os.path.join(dp, name), ns=(T0, T0 + i * 1_000_001), follow_symlinks=False)


def _image(store, tmp_path, name: str) -> img.Image:
    tree = str(tmp_path / "tree")
    _odd_tree(tree)
    base = transfer.import_layer(store, tree)
    # A second layer with its own hardlink group, on top of the first.
    top = tmp_path / "top"
    (top / "opt").mkdir(parents=True)
    (top / "opt" / "tool").write_bytes(b"#!/bin/sh\necho tool ok\n")
    os.chmod(top / "opt" / "tool", 0o755)
    os.link(top / "opt" / "tool", top / "opt" / "tool-alias")
    os.utime(top / "opt" / "tool", ns=(T0, T0 + 7))
    os.utime(top / "opt", ns=(T0, T0 + 9))
    lid = transfer.import_layer(store, str(top), as_layer=True)
    cfg = img.new_config([base, lid], {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["sh"]},
                         [img.history_entry("ADD tree /"), img.history_entry("ADD top /")],
                         created="2024-01-01T00:00:00Z")
    image = store.put_image(cfg)
    store.tag(image.id, name)
    return image


@pytest.fixture
def pushed(bb_store, registry, tmp_path):
    """(store root, remote ref, `layerfs export` signature) of the odd image."""
    if (reason := capabilities.root() or capabilities.tools("busybox")) is not None:
        pytest.skip(reason)
    _image(bb_store, tmp_path, "odd:1")
    root = bb_store.root
    ref = f"{registry.host}/interop/odd:1"
    layerfs_cmd("push", "-q", "odd:1", ref, root=root, check=True)
    layerfs_cmd("export", "odd:1", "-o", str(tmp_path / "export"), root=root, check=True)
    return root, ref, full_signature(str(tmp_path / "export"))


@pytest.fixture
def containerd():
    c = Containerd()
    yield c
    c.stop()


@pytest.fixture
def buildah():
    b = Buildah()
    yield b
    b.stop()


def test_containerd_runs_and_unpacks_like_export(pushed, containerd, tmp_path):
    root, ref, want = pushed
    containerd.ctr("images", "pull", "--plain-http", ref)
    # The hardlinked executables run, and the setuid link keeps its bits.
    out = containerd.ctr("run", "--rm", ref, "interop-run", "/usr/local/bin/sh", "-c",
                         "/usr/local/bin/cat /srv/b.txt && /opt/tool-alias && /usr/local/bin/ls -ln /usr/local/bin/ls")
    assert out.stdout.splitlines()[:2] == ["shared", "tool ok"], out.stdout + out.stderr
    assert out.stdout.splitlines()[2].startswith("-rwsr-x---"), out.stdout
    mnt = tmp_path / "ctr-mnt"
    mnt.mkdir()
    containerd.ctr("images", "mount", ref, str(mnt))
    try:
        got = full_signature(str(mnt))
    finally:
        containerd.ctr("images", "unmount", "--rm", str(mnt))
    assert not diff_signatures(want, got), "\n".join(diff_signatures(want, got))


def test_buildah_unpacks_like_export(pushed, buildah):
    root, ref, want = pushed
    cid = buildah.run("from", "--tls-verify=false", "--pull-always", "--quiet", f"docker://{ref}")
    path = buildah.run("mount", cid)
    try:
        got = full_signature(path)
    finally:
        buildah.run("umount", cid)
    assert not diff_signatures(want, got), "\n".join(diff_signatures(want, got))
