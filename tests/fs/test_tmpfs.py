"""A store and an upper dir on tmpfs (issue 9 item 3).

tmpfs answers ``preadv(RWF_NOWAIT)`` with EOPNOTSUPP where ext4 reads
from the page cache; every read must still work: lower objects small
and big, copied-up and new upper files.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.fs.conftest import layerfs_mount, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_reads_with_store_and_upper_on_tmpfs(fs_env_tmpfs):
    env = fs_env_tmpfs
    lower = env["lowers"][0]
    with open("/proc/self/mountinfo") as f:
        assert any(line.split()[4] == str(env["base"]) and " - tmpfs " in line for line in f)
    with layerfs_mount(env["root"], env["image"], str(env["base"] / "m"),
                       upper=str(env["base"] / "u")) as h:
        m = h.mountpoint
        assert open(f"{m}/a/sub/g", "rb").read() == b"g\n"                 # small object
        assert open(f"{m}/b/h", "rb").read() == b"compressible line\n" * 2000
        assert _sha(f"{m}/b/big") == _sha(f"{lower}/b/big")                 # big raw object
        with open(f"{m}/b/big", "rb") as f:                                 # reads at offsets
            f.seek(1 << 20)
            assert f.read(4096) == bytes(4096)
        with open(f"{m}/top", "a") as f:                                    # the repro
            f.write("more\n")
        assert open(f"{m}/top").read() == "top\nmore\n"
        with open(f"{m}/new", "wb") as f:
            f.write(os.urandom(3 << 20))
        assert _sha(f"{m}/new") == _sha(str(env["base"] / "u" / "new"))
        fd = os.open(f"{m}/a/f1", os.O_RDWR)                                 # copy-up while open
        try:
            os.pwrite(fd, b"ONE", 0)
            assert os.pread(fd, 100, 0) == b"ONE v2\n"
        finally:
            os.close(fd)
