"""Image configs: OCI-shaped JSON over an ordered list of layerfs layer ids.

The config follows the OCI image config (architecture, os, config.Env,
Cmd, Entrypoint, WorkingDir, User, ExposedPorts, Volumes, Labels,
StopSignal, history) with ``rootfs`` naming layerfs layer ids. Its
canonical bytes (sorted keys, compact) are hashed with blake3 to give the
image id, so identical images get identical ids wherever they are made.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass
from typing import Any

import blake3

from layerfs.errors import Corrupt

ROOTFS_TYPE = "layerfs"
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
           "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class Image:
    id: str
    config: dict[str, Any]
    created: float

    @property
    def layers(self) -> list[str]:
        return list(self.config["rootfs"]["layers"])

    @property
    def chain_key(self) -> str:
        """Digest of the ordered layer ids: what caches of the merged tree
        that ignore the config (the kernel backend's metadata layer) key on."""
        return blake3.blake3("\n".join(self.layers).encode()).hexdigest()

    @property
    def runtime_config(self) -> dict[str, Any]:
        return self.config.get("config") or {}

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.config.get("history") or [])


def canonical(config: dict[str, Any]) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def image_id(config: dict[str, Any]) -> str:
    return blake3.blake3(canonical(config)).hexdigest()


def decode(data: bytes) -> dict[str, Any]:
    try:
        cfg = json.loads(data)
        cfg["rootfs"]["layers"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Corrupt(f"image config cannot be decoded: {exc}") from None
    return cfg


def timestamp(epoch: float | None = None) -> str:
    """RFC 3339 UTC, as OCI wants; SOURCE_DATE_EPOCH wins when set."""
    if epoch is None:
        sde = os.environ.get("SOURCE_DATE_EPOCH")
        epoch = float(sde) if sde and sde.isdigit() else datetime.datetime.now(datetime.timezone.utc).timestamp()
    dt = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if dt.microsecond else dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> float:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return 0.0


def host_arch() -> str:
    return _GOARCH.get(platform.machine(), platform.machine())


def new_config(layers: list[str], runtime: dict[str, Any] | None = None,
               history: list[dict[str, Any]] | None = None, created: str | None = None) -> dict[str, Any]:
    return {
        "architecture": host_arch(),
        "os": "linux",
        "created": created or timestamp(),
        "config": dict(runtime or {}),
        "rootfs": {"type": ROOTFS_TYPE, "layers": list(layers)},
        "history": list(history or []),
    }


def history_entry(created_by: str, empty_layer: bool = False, comment: str = "",
                  created: str | None = None) -> dict[str, Any]:
    h: dict[str, Any] = {"created": created or timestamp(), "created_by": created_by}
    if comment:
        h["comment"] = comment
    if empty_layer:
        h["empty_layer"] = True
    return h


def with_layer(base: dict[str, Any] | None, layer: str | None, history: dict[str, Any],
               runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new config: *base* plus one history row and optionally one layer."""
    layers = list(base["rootfs"]["layers"]) if base else []
    if layer is not None:
        layers.append(layer)
    rc = dict(base.get("config") or {}) if base else {}
    if runtime is not None:
        rc = dict(runtime)
    hist = (list(base.get("history") or []) if base else []) + [history]
    return new_config(layers, rc, hist, created=history.get("created"))
