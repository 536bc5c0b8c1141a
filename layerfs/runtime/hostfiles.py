"""The per-container /etc/hosts, /etc/hostname and /etc/resolv.conf.

They are generated into the caller's state directory and bind-mounted over
the image's files, as docker does, so the image is never edited and the
files can be rewritten while the container runs.
"""

from __future__ import annotations

import os

ETC_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")

_LOCALHOST = ("127.0.0.1\tlocalhost\n"
              "::1\tlocalhost ip6-localhost ip6-loopback\n"
              "fe00::0\tip6-localnet\n"
              "ff00::0\tip6-mcastprefix\n"
              "ff02::1\tip6-allnodes\n"
              "ff02::2\tip6-allrouters\n")


def write_host_files(state_dir: str, hostname: str, network: str) -> dict[str, str]:
    """Write the three files; return container path -> host path."""
    contents = {
        "/etc/hosts": _hosts(hostname, network),
        "/etc/hostname": hostname + "\n",
        "/etc/resolv.conf": _resolv_conf(network),
    }
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    paths = {}
    for target, text in contents.items():
        path = os.path.join(state_dir, os.path.basename(target))
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(path, 0o644)
        paths[target] = path
    return paths


def _hosts(hostname: str, network: str) -> str:
    if network == "host":
        return _host_file("/etc/hosts") or _LOCALHOST
    # No interface but lo: the name resolves to loopback so tools that look
    # up their own hostname keep working.
    return _LOCALHOST + f"127.0.1.1\t{hostname}\n"


def _resolv_conf(network: str) -> str:
    if network == "host":
        return _host_file("/etc/resolv.conf") or ""
    return "# network none: no resolvers\n"


def _host_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None
