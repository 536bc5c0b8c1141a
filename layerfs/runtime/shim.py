"""Entry point of a detached container's owner: ``python -m layerfs.runtime.shim ROOT ID FD``.

Started by ``lifecycle.start_detached`` after a double fork and setsid; it
holds the container's mount, starts and waits for it and records its exit
(see ``lifecycle.own``). FD is the pipe on which it reports "started".
"""

from __future__ import annotations

import sys


def main() -> int:
    if len(sys.argv) != 4:
        sys.exit("usage: python -m layerfs.runtime.shim ROOT CONTAINER_ID READY_FD")
    # The shim mounts the image first thing: fork the mount daemon before
    # importing the runtime, so that its imports (trio, pyfuse3) overlap ours.
    from layerfs.fs import mount as fsmount

    prefork = getattr(fsmount, "prefork", None)
    if prefork is not None:
        prefork()
    from layerfs.runtime.lifecycle import shim_main

    return shim_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))


if __name__ == "__main__":
    sys.exit(main())
