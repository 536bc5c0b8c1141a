"""``layerfs mount`` answered by the warm mount server, before click loads.

``main.py`` calls :func:`mount_fast` first thing. It understands exactly

    layerfs [--root DIR] mount IMAGE MOUNTPOINT [--read-only] [--upper DIR]
            [--container NAME] [--debug] [--backend fuse]

(options in any order after ``mount``, each at most once). Anything else
(``--help``, ``--foreground``, the kernel backend, ``--opt=value``, an
unknown option, ``--upper`` with ``--container``, a MOUNTPOINT that is a
file) returns to the click CLI, as does a server that cannot be had or that
says the request is not its (``fallback``), and everything when
``LAYERFS_MOUNT_SERVER=off``; for a FUSE mount the daemon is then forked
before click loads (``fs.mount.prefork``), as before the server existed.

The server runs the click command's own checks and ``mount_image``, so
errors are the same one ``Error: ...`` line and exit code; on success
nothing is printed.

Imports here are what the fast path pays for: ``os``, ``sys`` and
``fs.mountclient`` only.
"""

from __future__ import annotations

import os
import sys

OFF_ENV = "LAYERFS_MOUNT_SERVER"
_FLAGS = {"--read-only": "read_only", "--debug": "debug"}
_VALUES = {"--upper": "upper", "--container": "container", "--backend": "backend"}


def parse(argv: list[str]) -> dict | None:
    """The mount request *argv* (``sys.argv[1:]``) asks for, or None if it
    is not one this parser is sure of."""
    root = None
    if os.environ.get(OFF_ENV) == "off":
        return None
    try:
        at = argv.index("mount")
    except ValueError:
        return None
    head, rest = argv[:at], argv[at + 1:]
    if head:
        if len(head) != 2 or head[0] != "--root" or not head[1] or head[1].startswith("-"):
            return None
        root = head[1]
    request: dict = {"op": "mount", "read_only": False, "debug": False}
    positional: list[str] = []
    args = iter(rest)
    for arg in args:
        if arg in _FLAGS:
            request[_FLAGS[arg]] = True
        elif arg in _VALUES:
            value = next(args, None)
            if value is None or value.startswith("-") or _VALUES[arg] in request:
                return None
            request[_VALUES[arg]] = value
        elif arg.startswith("-") or len(positional) == 2:
            return None
        else:
            positional.append(arg)
    if len(positional) != 2 or request.get("backend", "fuse") != "fuse" or \
            ("upper" in request and "container" in request):
        return None
    request["image"], request["mountpoint"] = positional
    mp = request["mountpoint"]
    if os.path.exists(mp) and not (os.path.isdir(mp) and os.access(mp, os.R_OK)):
        return None  # click's Path(file_okay=False) says so, with its usage text
    request["root"] = root or os.environ.get("LAYERFS_ROOT") or None
    return request


def mount_fast(argv: list[str]) -> None:
    """Exit with the server's answer to *argv*, or return to let click run."""
    request = parse(argv)
    if request is None:
        return
    from layerfs.fs import mountclient
    from layerfs.store.rootdir import default_root

    try:
        root = os.path.abspath(request.pop("root") or default_root())
        if not os.path.isdir(root):
            return  # a store not made yet: click's path makes it as always
        request |= {"cwd": os.getcwd(), "umask": _umask(), **mountclient.caller_namespace(),
                    "env": {k: v for k, v in os.environ.items() if k.startswith("LAYERFS_")}}
    except OSError:  # no cwd, no /proc: click's path says what it says
        return
    try:
        answer = mountclient.call(root, request)
    except mountclient.Unavailable:
        _prefork()
        return
    except mountclient.Failed as exc:
        answer = {"error": str(exc), "code": exc.exit_code}
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)
    done = mountclient.outcome(answer, request["debug"])
    if done is None:
        if answer.get("backend") != "kernel":
            _prefork()
        return
    sys.stderr.write(done[1])
    _exit(done[0])


def _exit(code: int) -> None:
    """Exit without the interpreter's teardown (freeing what the process
    is about to drop anyway): nothing here needs it once the output is
    flushed."""
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def _prefork() -> None:
    """The click path will mount with the FUSE daemon: fork it now, so its
    imports overlap click's (``fs.mount.prefork``)."""
    from layerfs.fs.mount import prefork

    prefork()


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
