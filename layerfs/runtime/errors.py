"""Errors specific to running containers."""

from __future__ import annotations

from layerfs.errors import LayerfsError


class ContainerSetupError(LayerfsError):
    """Setting the container up failed before its command could run.

    Raised in the caller when a namespace, mount, cgroup write or privilege
    drop fails inside the child. Exit code 125, docker's code for "the
    runtime failed", so a user can tell it from the command's own codes.
    """

    exit_code = 125
