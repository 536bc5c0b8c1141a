"""Registry credentials: ``layerfs login`` writes them, pushes/pulls read them.

The file is ``ROOT/auth.json`` of the store (mode 0600), in the format
docker's config.json and containers-auth.json share::

    {"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}

Lookups fall back, read-only, to ``$REGISTRY_AUTH_FILE`` and
``~/.docker/config.json`` so credentials from other tools work as well
(plain ``auths`` entries only; credential helpers are not run).
"""

from __future__ import annotations

import base64
import json
import os

from layerfs.errors import InvalidInput
from layerfs.store.atomic import write_bytes

DOCKER_HUB = "docker.io"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")


def normalize_host(host: str) -> str:
    host = host.removeprefix("https://").removeprefix("http://").rstrip("/")
    return DOCKER_HUB if host in _HUB_ALIASES or host.startswith("index.docker.io") else host


class AuthFile:
    def __init__(self, path: str, fallbacks: list[str] | None = None) -> None:
        self.path = path
        if fallbacks is None:
            fallbacks = [p for p in (os.environ.get("REGISTRY_AUTH_FILE"),
                                     os.path.expanduser("~/.docker/config.json")) if p]
        self.fallbacks = fallbacks

    @staticmethod
    def _load(path: str) -> dict:
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as exc:
            raise InvalidInput(f"cannot read credentials file {path}: {exc}") from None
        return doc if isinstance(doc, dict) else {}

    def get(self, host: str) -> tuple[str, str] | None:
        host = normalize_host(host)
        for path in [self.path, *self.fallbacks]:
            auths = self._load(path).get("auths") or {}
            for key, entry in auths.items():
                if normalize_host(key) == host and isinstance(entry, dict) and entry.get("auth"):
                    try:
                        user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
                    except (ValueError, UnicodeDecodeError):
                        continue
                    return user, pw
        return None

    def set(self, host: str, user: str, password: str) -> None:
        doc = self._load(self.path)
        auths = doc.setdefault("auths", {})
        auths[normalize_host(host)] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        self._write(doc)

    def remove(self, host: str) -> bool:
        doc = self._load(self.path)
        auths = doc.get("auths") or {}
        key = normalize_host(host)
        if key not in auths:
            return False
        del auths[key]
        self._write(doc)
        return True

    def _write(self, doc: dict) -> None:
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, exist_ok=True)
        old = os.umask(0o077)
        try:
            write_bytes(self.path, json.dumps(doc, indent=2).encode() + b"\n", d)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
