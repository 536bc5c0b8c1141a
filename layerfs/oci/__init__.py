"""OCI interop: image layouts, docker-archives and registries.

Public API::

    save(store, images, output, fmt="oci"|"docker", **ctx)   -> [CopyResult]
    load(store, path, **ctx)                                 -> [Loaded]
    push(store, image, dest=None, compression=, manifest_format=, insecure=, ...) -> CopyResult
    pull(store, ref, platform=Platform, insecure=, ...)      -> Loaded
    login(store, registry, user, password, insecure=False); logout(store, registry)
    copy("transport:ref", "transport:ref", ctx)              -> [CopyResult]
    TRANSPORTS, ImageSource, ImageDestination, Context, Platform

``**ctx`` are :class:`~layerfs.oci.types.Context` fields (progress,
retries, backoff, jobs, ...). Transports: layerfs:, oci:, oci-archive:,
docker-archive:, docker://.
"""

from layerfs.oci.media import Platform
from layerfs.oci.registry import AuthError, RegistryError
from layerfs.oci.transports import TRANSPORTS, Loaded, context, copy, load, login, logout, pull, push, save
from layerfs.oci.types import Context, CopyResult, ImageDestination, ImageSource, Progress

__all__ = ["TRANSPORTS", "AuthError", "Context", "CopyResult", "ImageDestination", "ImageSource", "Loaded",
           "Platform", "Progress", "RegistryError", "context", "copy", "load", "login", "logout", "pull",
           "push", "save"]
