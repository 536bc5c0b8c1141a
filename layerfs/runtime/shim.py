"""Entry point of a detached container's owner: ``python -m layerfs.runtime.shim ROOT ID FD``.

Started by ``lifecycle.start_detached`` after a double fork and setsid; it
holds the container's mount, starts and waits for it and records its exit
(see ``lifecycle.own``). FD is the pipe on which it reports "started".
"""

from __future__ import annotations

import sys

from layerfs.runtime.lifecycle import shim_main

if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m layerfs.runtime.shim ROOT CONTAINER_ID READY_FD")
    sys.exit(shim_main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
