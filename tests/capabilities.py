"""What a test needs from the machine, checked in one place.

Tests declare needs with markers; the hook in tests/conftest.py skips a
test whose need is missing, with the reason. In CI (root, /dev/fuse, every
tool installed by scripts/setup.sh test) nothing is skipped.

    @pytest.mark.root                  # euid 0 (device nodes, chown, trusted.* xattrs)
    @pytest.mark.fuse                  # root and /dev/fuse
    @pytest.mark.namespaces            # root and the kernel's namespaces
    @pytest.mark.tools("runc", ...)    # programs on PATH
"""

from __future__ import annotations

import functools
import os
import shutil

from _pytest.mark.structures import Mark

# Debian package that ships each tool, for the skip message.
PACKAGES = {
    "busybox": "busybox-static", "runc": "runc", "crun": "crun", "skopeo": "skopeo",
    "umoci": "umoci", "buildah": "buildah", "containerd": "containerd",
    "fuse-overlayfs": "fuse-overlayfs", "debootstrap": "debootstrap", "tar": "tar",
    "docker-registry": "docker-registry", "htpasswd": "apache2-utils", "setfacl": "acl", "getfacl": "acl",
}


@functools.cache
def root() -> str | None:
    return None if os.geteuid() == 0 else "needs root (device nodes, chown, mounts, trusted.* xattrs)"


@functools.cache
def fuse() -> str | None:
    return root() or (None if os.path.exists("/dev/fuse") else "needs /dev/fuse")


@functools.cache
def namespaces() -> str | None:
    return root() or (None if os.path.exists("/proc/self/ns/user") else "kernel lacks namespaces")


def tools(*names: str) -> str | None:
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return None
    return "needs " + ", ".join(f"{n} (apt-get install {PACKAGES.get(n, n)})" for n in missing)


CHECKS = {"root": root, "fuse": fuse, "namespaces": namespaces, "tools": tools}


def missing(mark: Mark) -> str | None:
    """Why the need *mark* declares is not met here, or None."""
    check = CHECKS.get(mark.name)
    return check(*mark.args) if check is not None else None
