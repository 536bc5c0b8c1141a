"""POSIX ACLs on a FUSE mount: enforced by the kernel, inherited from
default ACLs, and the umask applied only where no default ACL is, as on
the upper dir's own filesystem (the reference: the same steps in a plain
dir beside the upper)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from tests.fs.conftest import layerfs_mount, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root, pytest.mark.tools("setfacl", "getfacl")]

# Run in both trees: a/f1 is a lower file in the mount (so making it again
# after rm makes it over a whiteout), made first in the reference dir.
STEPS = """
setfacl -d -m u:nobody:rwx,g::r-x a
rm a/f1
(umask 077; touch a/f1; mkdir a/newd; touch a/plain; mkfifo a/fifo)
(umask 027; touch um; mkdir umd)
mkdir a/newd/deeper
chmod 2750 a/newd
"""


def _sh(cwd: str, script: str) -> None:
    subprocess.run(["sh", "-ec", script], cwd=cwd, check=True)


def _acls(top: str, names: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for name in names:
        path = os.path.join(top, name)
        facl = subprocess.run(["getfacl", "-cp", path], capture_output=True, text=True, check=True).stdout
        out[name] = (oct(os.lstat(path).st_mode), facl)
    return out


def _as_nobody(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", cmd],
                          capture_output=True, text=True)


def test_default_acls_and_umask_as_on_the_upper_fs(fs_env, tmp_path):
    ref = tmp_path / "ref"
    (ref / "a").mkdir(parents=True)
    (ref / "a" / "f1").write_text("f1\n")
    _sh(str(ref), STEPS)
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), upper=str(tmp_path / "up")) as h:
        _sh(h.mountpoint, STEPS)
        names = ["a", "a/f1", "a/newd", "a/newd/deeper", "a/plain", "a/fifo", "um", "umd"]
        assert _acls(h.mountpoint, names) == _acls(str(ref), names)


def test_an_acl_allows_and_denies(fs_env, tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to act as another user")
    # a mountpoint other users can reach (pytest's tmp dirs are 0700)
    reachable = tempfile.mkdtemp(prefix="layerfs-acl-", dir="/tmp")
    os.chmod(reachable, 0o755)
    try:
        _allows_and_denies(fs_env, os.path.join(reachable, "mnt"), str(tmp_path / "up"))
    finally:
        shutil.rmtree(reachable, ignore_errors=True)


def _allows_and_denies(fs_env, mnt: str, up: str) -> None:
    with layerfs_mount(fs_env["root"], fs_env["image"], mnt, upper=up) as h:
        mp = h.mountpoint
        os.chmod(mp, 0o755)
        _sh(mp, "echo no > denied; chmod 644 denied; setfacl -m u:nobody:--- denied;"
                "echo yes > granted; chmod 600 granted; setfacl -m u:nobody:r granted;"
                "setfacl -m u:nobody:--- top")  # a lower file: copied up with its ACL set
        assert _as_nobody(f"cat {mp}/granted").stdout == "yes\n"
        for name in ("denied", "top"):
            r = _as_nobody(f"cat {mp}/{name}")
            assert r.returncode != 0 and "Permission denied" in r.stderr, (name, r)
        _sh(mp, "setfacl -b denied")  # ACL removed: the mode's 644 again
        assert _as_nobody(f"cat {mp}/denied").stdout == "no\n"
