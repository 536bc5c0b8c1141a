"""A client for the distribution (registry v2) HTTP API, on http.client.

* Auth: the first 401 tells which scheme the registry wants.
  ``Basic`` sends the stored credentials; ``Bearer realm=...,service=...``
  fetches a token for the repository scope (with the credentials, if any)
  and caches it per scope, as docker does.
* Transport errors and 5xx/429 are retried with exponential backoff
  (``Retry-After`` honoured, capped); after the last attempt the error says
  what was tried and how often. A blob download that drops mid-way resumes
  with a Range request, so the caller's streaming digest check still covers
  every byte.
* Plain http is used only for ``--insecure`` or loopback registries, and
  then only when the registry does not speak TLS (docker's rule).
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from layerfs import __version__ as _version
from layerfs.errors import InvalidInput, LayerfsError, NotFound
from layerfs.oci import media

USER_AGENT = f"layerfs/{_version}"
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_TRANSIENT = (ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError)
DOCKER_HUB_API = "registry-1.docker.io"


class RegistryError(LayerfsError):
    """The registry refused a request or could not be reached."""


class AuthError(RegistryError):
    """Missing or wrong credentials, or no permission for the repository."""

    exit_code = 4


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""


# What OpenSSL says when the server answered a TLS hello in plain http.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG")


def is_loopback(host: str) -> bool:
    """Whether HOST[:PORT] names this machine: localhost, 127.0.0.0/8 or ::1.

    An address is parsed, not prefix-matched: "127.example.com" is a
    remote name like any other."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_http_allowed(host: str, insecure: bool) -> bool:
    """docker's rule: plain http (after TLS failed) only for registries
    the user marked insecure or for loopback ones."""
    return insecure or is_loopback(host)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'([A-Za-z_]+)="([^"]*)"', rest))
    return scheme.lower(), params


def _error_message(body: bytes) -> str:
    try:
        errs = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errs)
    except (ValueError, AttributeError, TypeError):
        return body[:200].decode("utf-8", "replace").strip()


class Client:
    """One registry host; safe to share between threads."""

    def __init__(self, host: str, *, credentials: tuple[str, str] | None = None, insecure: bool = False,
                 retries: int = 5, backoff: float = 0.5, timeout: float = 120.0) -> None:
        self.host = DOCKER_HUB_API if host == "docker.io" else host
        self.credentials, self.insecure = credentials, insecure
        self.retries, self.backoff, self.timeout = max(1, retries), backoff, timeout
        self.scheme: str | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._tokens: dict[str, str] = {}

    # -- connections -------------------------------------------------------
    def _new_conn(self, scheme: str, netloc: str, timeout: float | None = None) -> http.client.HTTPConnection:
        t = timeout or self.timeout
        if scheme == "https":
            ctx = ssl.create_default_context()
            if self.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(netloc, timeout=t, context=ctx, blocksize=media.CHUNK)
        return http.client.HTTPConnection(netloc, timeout=t, blocksize=media.CHUNK)

    def _resolve_scheme(self) -> str:
        if self.scheme:
            return self.scheme
        scheme = "https"
        if plain_http_allowed(self.host, self.insecure):
            conn = self._new_conn("https", self.host, timeout=min(self.timeout, 10))
            try:
                conn.request("GET", "/v2/", headers={"User-Agent": USER_AGENT})
                conn.getresponse().read()
            except (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError):
                scheme = "http"
            finally:
                conn.close()
        self.scheme = scheme
        return scheme

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._new_conn(self._resolve_scheme(), self.host)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- auth --------------------------------------------------------------
    def _authorization(self, scope: str | None) -> str | None:
        with self._lock:
            challenge = self._challenge
        if challenge is None:
            return None
        scheme, params = challenge
        if scheme == "basic":
            return self._basic() if self.credentials else None
        if scheme == "bearer":
            key = scope or ""
            with self._lock:
                token = self._tokens.get(key)
            if token is None:
                token = self._fetch_token(params, scope)
                with self._lock:
                    self._tokens[key] = token
            return f"Bearer {token}" if token else None
        return None

    def _basic(self) -> str:
        user, pw = self.credentials
        return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    def _fetch_token(self, params: dict[str, str], scope: str | None) -> str:
        realm = params.get("realm", "")
        url = urllib.parse.urlsplit(realm)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise AuthError(f"registry {self.host} sent an unusable token realm {realm!r}")
        if url.scheme == "http" and not plain_http_allowed(url.netloc, self.insecure):
            raise AuthError(f"refusing to send credentials to a plain-http token realm {realm!r}")
        query = [("service", params["service"])] if params.get("service") else []
        for s in (scope or "").split(" "):
            if s:
                query.append(("scope", s))
        if self.credentials:
            query.append(("account", self.credentials[0]))
        path = (url.path or "/") + "?" + urllib.parse.urlencode(query)
        headers = {"User-Agent": USER_AGENT}
        if self.credentials:
            headers["Authorization"] = self._basic()
        last = ""
        for attempt in range(self.retries):
            conn = self._new_conn(url.scheme, url.netloc)
            try:
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
                body = r.read()
            except _TRANSIENT + (OSError,) as exc:
                last = str(exc) or type(exc).__name__
                self._sleep(attempt, None)
                continue
            finally:
                conn.close()
            if r.status in RETRY_STATUS:
                last = f"{r.status} {r.reason}"
                self._sleep(attempt, r.getheader("Retry-After"))
                continue
            if r.status in (401, 403):
                hint = f"run layerfs login {self.host}" if not self.credentials else "wrong username or password"
                raise AuthError(f"{self.host}: the token service rejected the credentials ({hint})")
            if r.status != 200:
                raise AuthError(f"{self.host}: token service answered {r.status} {r.reason}")
            try:
                doc = json.loads(body)
                return doc.get("token") or doc.get("access_token") or ""
            except (ValueError, AttributeError):
                raise AuthError(f"{self.host}: token service sent an invalid reply") from None
        raise RegistryError(f"{self.host}: token service {realm} unreachable after {self.retries} attempts ({last})")

    def _learn(self, header: str | None, scope: str | None) -> None:
        if not header:
            raise AuthError(f"{self.host}: 401 Unauthorized without a WWW-Authenticate challenge")
        scheme, params = parse_challenge(header)
        if scheme not in ("basic", "bearer"):
            raise AuthError(f"{self.host}: unsupported authentication scheme {scheme!r}")
        if scheme == "basic" and not self.credentials:
            raise AuthError(f"{self.host}: authentication required; run `layerfs login {self.host}`")
        with self._lock:
            self._challenge = (scheme, params)
            self._tokens.pop(scope or "", None)

    # -- requests ----------------------------------------------------------
    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        if attempt + 1 >= self.retries:
            return
        delay = self.backoff * (2 ** attempt)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 30.0))
        time.sleep(delay)

    def request(self, method: str, path: str, *, scope: str | None = None,
                headers: dict[str, str] | None = None, body: bytes | Callable[[], BinaryIO] | None = None,
                ok: tuple[int, ...] = (200,), stream: bool = False, retries: int | None = None,
                what: str = "") -> Any:
        """Send one request, with auth and retries; returns a :class:`Response`
        (or the open ``HTTPResponse`` if *stream*). *body* may be a callable
        returning a fresh file, so a retry can send it again."""
        what = what or f"{method} {path.split('?')[0]}"
        tries = retries or self.retries
        last = ""
        auth_tried = False
        attempt = 0
        while attempt < tries:
            hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
            auth = self._authorization(scope)
            if auth:
                hdrs["Authorization"] = auth
            try:
                r = self._send(method, path, hdrs, body)
            except _TRANSIENT + (OSError,) as exc:
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise RegistryError(f"{self.host}: TLS certificate not trusted ({exc.verify_message}); "
                                        "use --insecure for a test registry") from None
                if isinstance(exc, ssl.SSLError) and exc.reason in _NOT_TLS:
                    raise RegistryError(f"{self.host} does not speak TLS; use --insecure for a "
                                        "plain-http registry") from None
                self._drop()
                last = f"connection failed: {exc or type(exc).__name__}"
                self._sleep(attempt, None)
                attempt += 1
                continue
            if r.status == 401 and not auth_tried:
                r.read()
                auth_tried = True
                self._learn(r.getheader("WWW-Authenticate"), scope)
                continue
            if r.status in RETRY_STATUS:
                r.read()
                last = f"{r.status} {r.reason}"
                self._sleep(attempt, r.getheader("Retry-After"))
                attempt += 1
                continue
            headers_out = {k.lower(): v for k, v in r.getheaders()}
            if r.status in ok:
                if stream:
                    self._local.conn = None   # the caller owns this connection now
                    return r
                return Response(r.status, headers_out, r.read())
            # Always read the reply (b"" for HEAD): an unread response leaves
            # the kept-alive connection unusable, and the next request on it
            # failed and waited out a retry backoff.
            self._raise(r.status, r.reason, r.read(), what)
        raise RegistryError(f"{self.host}: {what} failed after {tries} attempts ({last})")

    def _send(self, method: str, path: str, hdrs: dict[str, str], body) -> http.client.HTTPResponse:
        conn = self._conn()
        data = body() if callable(body) else body
        try:
            conn.request(method, path, body=data, headers=hdrs)
            return conn.getresponse()
        except BaseException:
            # Half a request went out (or the body's source failed):
            # this connection cannot carry another one.
            self._drop()
            raise
        finally:
            if callable(body) and data is not None:
                data.close()

    def _raise(self, status: int, reason: str, body: bytes, what: str) -> None:
        msg = _error_message(body) or f"{status} {reason}"
        if status in (401, 403):
            hint = "" if self.credentials else f"; run `layerfs login {self.host}`"
            raise AuthError(f"{self.host}: {what}: {status} {reason}: {msg}{hint}")
        if status == 404:
            raise NotFound(f"{self.host}: {what}: {msg}")
        raise RegistryError(f"{self.host}: {what}: {status} {reason}: {msg}")

    # -- API ----------------------------------------------------------------
    def ping(self) -> None:
        self.request("GET", "/v2/", what="checking the registry")

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        r = self.request("GET", f"/v2/{repo}/manifests/{ref}", scope=pull_scope(repo),
                         headers={"Accept": media.ACCEPT}, what=f"reading manifest {repo}:{ref}"
                         if not ref.startswith("sha256:") else f"reading manifest {repo}@{ref}")
        if len(r.body) > media.MAX_MANIFEST:
            raise InvalidInput(f"{self.host}: manifest of {repo}:{ref} is too large")
        got = media.sha256_digest(r.body)
        if ref.startswith("sha256:") and got != ref:
            raise InvalidInput(f"{self.host}: manifest {repo}@{ref} does not match its digest (got {got})")
        return r.body, r.headers.get("content-type", "")

    def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str) -> str:
        r = self.request("PUT", f"/v2/{repo}/manifests/{ref}", scope=push_scope(repo),
                         headers={"Content-Type": media_type}, body=raw, ok=(200, 201),
                         what=f"writing manifest {repo}:{ref}")
        return r.headers.get("docker-content-digest", media.sha256_digest(raw))

    def blob_exists(self, repo: str, digest: str) -> bool:
        try:
            self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=push_scope(repo),
                         what=f"checking blob {digest[:19]}")
        except NotFound:
            return False
        return True

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        q = urllib.parse.urlencode({"mount": digest, "from": from_repo})
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/?{q}",
                         scope=f"{push_scope(repo)} {pull_scope(from_repo)}", ok=(201, 202),
                         headers={"Content-Length": "0"}, body=b"", what=f"mounting blob {digest[:19]}")
        if r.status == 202 and r.headers.get("location"):
            # The registry opened an upload instead; cancel it, best effort.
            try:
                self.request("DELETE", self._path(r.headers["location"]), scope=push_scope(repo),
                             ok=(204, 200, 404), retries=1)
            except LayerfsError:
                pass
        return r.status == 201

    def upload_blob(self, repo: str, desc: media.Descriptor, opener: Callable[[], BinaryIO]) -> None:
        """POST an upload session, PUT the bytes in one go; the whole
        sequence is retried on transient failure (a session may die with it)."""
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                r = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope=push_scope(repo), ok=(202,),
                                 headers={"Content-Length": "0"}, body=b"",
                                 what=f"starting upload of {desc.digest[:19]}")
                loc = r.headers.get("location")
                if not loc:
                    raise RegistryError(f"{self.host}: upload started without a Location")
                path = self._path(loc)
                path += ("&" if "?" in path else "?") + urllib.parse.urlencode({"digest": desc.digest})
                self.request("PUT", path, scope=push_scope(repo), ok=(201, 204), retries=1,
                             headers={"Content-Type": "application/octet-stream",
                                      "Content-Length": str(desc.size)},
                             body=opener, what=f"uploading blob {desc.digest[:19]}")
                return
            except RegistryError as exc:
                if isinstance(exc, AuthError) or " failed after " not in str(exc):
                    raise
                last = exc
                self._sleep(attempt, None)
        raise RegistryError(f"{self.host}: uploading blob {desc.digest} failed after {self.retries} attempts: {last}")

    def open_blob(self, repo: str, desc: media.Descriptor) -> BinaryIO:
        return io.BufferedReader(_BlobReader(self, repo, desc), media.CHUNK)

    def _get_blob(self, repo: str, digest: str, offset: int) -> http.client.HTTPResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        r = self.request("GET", f"/v2/{repo}/blobs/{digest}", scope=pull_scope(repo), headers=headers,
                         ok=(200, 206, 307, 302, 303), stream=True, what=f"reading blob {digest[:19]}")
        hops = 0
        while r.status in (302, 303, 307) and hops < 5:
            loc = r.getheader("Location")
            r.read()
            r.close()
            if not loc:
                raise RegistryError(f"{self.host}: blob redirect without a Location")
            u = urllib.parse.urlsplit(urllib.parse.urljoin(f"{self._resolve_scheme()}://{self.host}/", loc))
            conn = self._new_conn(u.scheme, u.netloc)
            conn.request("GET", u.path + ("?" + u.query if u.query else ""),
                         headers={"User-Agent": USER_AGENT, **headers})
            r = conn.getresponse()
            hops += 1
        if r.status not in (200, 206):
            self._raise(r.status, r.reason, r.read(), f"reading blob {digest[:19]}")
        return r

    def _path(self, location: str) -> str:
        u = urllib.parse.urlsplit(location)
        if u.netloc and u.netloc != self.host:
            raise RegistryError(f"{self.host}: upload location points at another host ({u.netloc})")
        return (u.path or "/") + ("?" + u.query if u.query else "")


def pull_scope(repo: str) -> str:
    return f"repository:{repo}:pull"


def push_scope(repo: str) -> str:
    return f"repository:{repo}:pull,push"


class _BlobReader(io.RawIOBase):
    """A blob download that resumes (Range) when the connection drops."""

    def __init__(self, client: Client, repo: str, desc: media.Descriptor) -> None:
        self.client, self.repo, self.desc = client, repo, desc
        self.offset = 0
        self.failures = 0
        self.r: http.client.HTTPResponse | None = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        r = self.client._get_blob(self.repo, self.desc.digest, self.offset)
        if self.offset and r.status == 200:
            skip = self.offset   # server ignored Range: skip what we have
            while skip:
                chunk = r.read(min(skip, media.CHUNK))
                if not chunk:
                    raise RegistryError(f"{self.client.host}: blob {self.desc.digest} ended early")
                skip -= len(chunk)
        self.r = r

    def readinto(self, b) -> int:
        while True:
            if self.offset >= self.desc.size and self.r is None:
                return 0
            try:
                if self.r is None:
                    self._open()
                n = self.r.readinto(b)
                if n == 0 and self.offset < self.desc.size:
                    raise http.client.IncompleteRead(b"", self.desc.size - self.offset)
            except _TRANSIENT + (OSError,) as exc:
                self._close_response()
                self.failures += 1
                if self.failures >= self.client.retries:
                    raise RegistryError(f"{self.client.host}: download of blob {self.desc.digest} kept failing "
                                        f"({exc or type(exc).__name__}) after {self.failures} attempts") from None
                self.client._sleep(self.failures - 1, None)
                continue
            self.offset += n
            if n == 0:
                self._close_response()
            return n

    def _close_response(self) -> None:
        if self.r is not None:
            try:
                self.r.close()
            except OSError:
                pass
            self.r = None

    def close(self) -> None:
        self._close_response()
        super().close()
