"""Base images made from what the host has: busybox-static and debootstrap.

Both produce a tree in a temporary dir under the store and import it as a
one-layer image, so a new user has something runnable without a registry.
The busybox tree is deterministic (fixed mtimes), so bootstrapping twice
gives the same layer and image ids.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable

from layerfs.errors import InvalidInput, LayerfsError, NotFound, Unsupported
from layerfs.store import images as img
from layerfs.store import scratch, transfer
from layerfs.store.images import Image
from layerfs.store.store import Store

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = "root:x:0:\ndaemon:x:1:\ntty:x:5:\nnogroup:x:65534:\n"
Step = Callable[[str], None]   # told what a long operation is doing now
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_busybox() -> str:
    for path in BUSYBOX_CANDIDATES:
        if os.path.isfile(path) and _is_static(path):
            return path
    raise NotFound("no static busybox on this machine (apt-get install busybox-static)")


def _is_static(path: str) -> bool:
    try:
        proc = subprocess.run(["ldd", path], capture_output=True, text=True)
    except FileNotFoundError:
        return True
    out = proc.stdout + proc.stderr
    return "not a dynamic executable" in out or "statically linked" in out


def busybox_tree(dest: str, busybox: str | None = None) -> None:
    """Lay out a minimal busybox root filesystem at *dest*."""
    busybox = busybox or find_busybox()
    mtime = int(os.stat(busybox).st_mtime)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home", "tmp", "var/tmp", "proc", "sys", "dev",
              "var/log"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    os.chmod(os.path.join(dest, "tmp"), 0o1777)
    os.chmod(os.path.join(dest, "var/tmp"), 0o1777)
    os.chmod(os.path.join(dest, "root"), 0o700)
    shutil.copy2(busybox, os.path.join(dest, "bin/busybox"))
    os.chmod(os.path.join(dest, "bin/busybox"), 0o755)
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for path in applets:
        link = os.path.join(dest, path)
        if os.path.lexists(link) or path == "bin/busybox":
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath("/bin/busybox", "/" + os.path.dirname(path)), link)
    _write(dest, "etc/passwd", PASSWD)
    _write(dest, "etc/group", GROUP)
    _write(dest, "etc/hostname", "busybox\n")
    _write(dest, "etc/os-release", 'NAME="BusyBox"\nID=busybox\n')
    _set_mtimes(dest, mtime)


def _write(root: str, rel: str, text: str) -> None:
    with open(os.path.join(root, rel), "w") as f:
        f.write(text)


def _set_mtimes(root: str, mtime: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))


def import_tree(store: Store, tree: str, created_by: str, runtime: dict, tag: str) -> Image:
    created = img.timestamp(float(os.stat(tree).st_mtime))
    history = [img.history_entry(created_by, created=created)]
    with store.writing():
        lid = transfer.import_layer(store, tree)
        image = store.put_image(img.new_config([lid], runtime, history, created=created))
        store.tag(image.id, tag)
    return image


def bootstrap_busybox(store: Store, tag: str = "busybox:latest") -> Image:
    with store.writing():  # gc must not sweep the staging tree under tmp/
        return _bootstrap_busybox(store, tag)


def _bootstrap_busybox(store: Store, tag: str) -> Image:
    work = scratch.mkdtemp(store.tmp_dir, "bootstrap")
    try:
        tree = os.path.join(work, "rootfs")
        busybox_tree(tree)
        return import_tree(store, tree, "layerfs bootstrap busybox",
                           {"Env": [DEFAULT_PATH], "Cmd": ["sh"]}, tag)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def apt_mirror() -> str:
    """The Debian mirror this machine's apt already uses."""
    texts = []
    for path in ["/etc/apt/sources.list"] + [os.path.join("/etc/apt/sources.list.d", n)
                                            for n in sorted(os.listdir("/etc/apt/sources.list.d"))
                                            if os.path.isdir("/etc/apt/sources.list.d")]:
        try:
            with open(path) as f:
                texts.append(f.read())
        except OSError:
            continue
    for text in texts:
        for m in re.finditer(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+)", text, re.M):
            url = m.group(1)
            if "debian" in url and "security" not in url:
                return url
    return "http://deb.debian.org/debian"


def bootstrap_debian(store: Store, suite: str = "bookworm", tag: str | None = None,
                     mirror: str | None = None, on_step: Step | None = None) -> Image:
    """A debootstrap minbase image. *on_step* is told each phase as it
    starts (debootstrap's own "I:" lines, then the import), for progress."""
    if not re.fullmatch(r"[a-z0-9-]+", suite):
        raise InvalidInput(f"invalid suite name: {suite!r}")
    if shutil.which("debootstrap") is None:
        raise Unsupported("debootstrap is not installed (apt-get install debootstrap)")
    with store.writing():  # gc must not sweep the staging tree under tmp/
        return _bootstrap_debian(store, suite, tag, mirror, on_step or (lambda text: None))


def _bootstrap_debian(store: Store, suite: str, tag: str | None, mirror: str | None, on_step: Step) -> Image:
    work = scratch.mkdtemp(store.tmp_dir, "bootstrap")
    try:
        tree = os.path.join(work, "rootfs")
        _debootstrap(["debootstrap", "--variant=minbase", suite, tree, mirror or apt_mirror()], on_step)
        drop_apt_caches(tree)
        size, files = _tree_size(tree)
        on_step(f"Importing the root filesystem ({files} files, {size / 1e6:.1f} MB)")
        start = time.monotonic()
        image = import_tree(store, tree, f"layerfs bootstrap debian --suite {suite}",
                           {"Env": [DEFAULT_PATH], "Cmd": ["bash"]}, tag or f"debian:{suite}")
        secs = time.monotonic() - start
        on_step(f"Imported in {secs:.1f}s ({size / 1e6 / max(secs, 1e-3):.0f} MB/s)")
        return image
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _debootstrap(cmd: list[str], on_step: Step) -> None:
    """Run debootstrap, passing its "I:" progress lines on as steps."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail = (tail + [line])[-5:]
            if line.startswith("I: "):
                on_step("debootstrap: " + line[3:])
        code = proc.wait()
    except BaseException:
        # Interrupted: debootstrap got the same SIGINT from the terminal;
        # wait for it so it does not write into a tree being removed.
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        raise LayerfsError(f"debootstrap failed: {(tail or ['failed'])[-1]}")


def _tree_size(tree: str) -> tuple[int, int]:
    size = files = 0
    for dp, _, fns in os.walk(tree):
        for n in fns:
            st = os.lstat(os.path.join(dp, n))
            size += st.st_size
            files += 1
    return size, files


def drop_apt_caches(tree: str) -> None:
    """Leave apt's caches out of the image, as Debian's official images do
    (apt-get clean, then rm -rf /var/lib/apt/lists/*): downloaded .debs,
    the package caches (*.bin) and the package lists, which are stale the
    day after anyway. archives/lock and archives/partial/ stay, as after
    apt-get clean."""
    cache = os.path.join(tree, "var/cache/apt")
    for d, suffix in ((cache, ".bin"), (f"{cache}/archives", ".deb"), (f"{cache}/archives/partial", ".deb")):
        for name in _names(d):
            if name.endswith(suffix) and os.path.isfile(os.path.join(d, name)):
                os.unlink(os.path.join(d, name))
    lists = os.path.join(tree, "var/lib/apt/lists")
    for name in _names(lists):
        p = os.path.join(lists, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)


def _names(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
