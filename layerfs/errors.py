"""The exceptions the library raises.

The library never prints and never exits: it raises one of these. Each class
carries the exit code the CLI uses for it, so the mapping lives in one place
(the way borg keeps ``exit_mcode`` on its error classes).
"""

from __future__ import annotations


class LayerfsError(Exception):
    """Base of every error layerfs reports to a user (no traceback)."""

    exit_code = 1


class NotFound(LayerfsError):
    """An image, layer, object, tag, container or path does not exist."""


class InvalidInput(LayerfsError):
    """Input from the user or from an untrusted source is malformed."""

    exit_code = 2


class Corrupt(LayerfsError):
    """Stored data fails its integrity check."""

    exit_code = 3


class Conflict(LayerfsError):
    """The operation conflicts with the current state (name in use, busy)."""


class Unsupported(LayerfsError):
    """The machine lacks a capability the operation needs."""


class Interrupted(LayerfsError):
    """The user interrupted the operation (Ctrl-C); the message says what was kept."""

    exit_code = 130
