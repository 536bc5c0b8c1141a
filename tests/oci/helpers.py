"""Tree comparison and a misbehaving HTTP proxy for fault injection."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import stat
import threading
import time

SLOW_RATE = 4 << 20     # bytes a second through a "slow" rule
SLOW_CHUNK = 64 << 10


def tree_signature(root: str) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, content sha256 / link target)."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for name in dns + fns:
            p = os.path.join(dp, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            extra = ""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = str(st.st_rdev)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra)
    return out


class FaultProxy:
    """An HTTP proxy in front of a real registry that misbehaves on request.

    ``rules`` is a list of dicts: {"match": substring of "METHOD path",
    "action": "503" | "drop" | "cut" | "corrupt" | "404" | "slow", "times": n}.
    "slow" passes the request body and the reply through at ``SLOW_RATE``
    bytes a second (a far registry, for interrupting transfers).
    With ``bearer`` set it also plays a token server: /v2/ needs
    ``Authorization: Bearer good-token``, handed out by /token for the
    given basic credentials.
    """

    def __init__(self, upstream: str, bearer: tuple[str, str] | None = None) -> None:
        self.upstream, self.bearer = upstream, bearer
        self.rules: list[dict] = []
        self.log: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                proxy.handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _rule(self, key: str) -> str | None:
        for r in self.rules:
            if r["match"] in key and r.get("times", 1) > 0:
                r["times"] = r.get("times", 1) - 1
                return r["action"]
        return None

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        key = f"{h.command} {h.path}"
        self.log.append(key + (f" Range={h.headers['Range']}" if h.headers.get("Range") else ""))
        action = self._rule(key)
        length = int(h.headers.get("Content-Length") or 0)
        body = self._slow_read(h.rfile, length) if action == "slow" else (h.rfile.read(length) if length else b"")
        if self.bearer is not None:
            if h.path.startswith("/token"):
                import base64

                want = "Basic " + base64.b64encode(f"{self.bearer[0]}:{self.bearer[1]}".encode()).decode()
                if h.headers.get("Authorization") != want:
                    return self._reply(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"bad creds"}]}')
                return self._reply(h, 200, json.dumps({"token": "good-token"}).encode())
            if h.headers.get("Authorization") != "Bearer good-token":
                return self._reply(h, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                    "WWW-Authenticate": f'Bearer realm="http://{self.host}/token",service="test"'})
        if action == "503":
            return self._reply(h, 503, b"busy")
        if action == "404":
            return self._reply(h, 404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}')
        if action == "drop":
            h.close_connection = True
            h.connection.shutdown(2)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "authorization", "connection")}
        conn.request(h.command, h.path, body=body if h.command not in ("GET", "HEAD") else None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        out_headers = {k: v for k, v in r.getheaders()
                       if k.lower() not in ("content-length", "connection", "transfer-encoding")}
        if "Location" in out_headers:
            out_headers["Location"] = out_headers["Location"].replace(self.upstream, self.host)
        if action == "corrupt" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if action == "cut" and len(data) > 10:
            h.send_response(r.status)
            for k, v in out_headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if action == "slow" and h.command != "HEAD":
            h.send_response(r.status)
            for k, v in out_headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            try:
                for i in range(0, len(data), SLOW_CHUNK):
                    h.wfile.write(data[i:i + SLOW_CHUNK])
                    time.sleep(SLOW_CHUNK / SLOW_RATE)
            except OSError:
                h.close_connection = True   # the client went away
            return
        self._reply(h, r.status, data, out_headers, head=h.command == "HEAD",
                    length=int(r.getheader("Content-Length") or len(data)))

    @staticmethod
    def _slow_read(f, length: int) -> bytes:
        parts = []
        while length > 0:
            part = f.read(min(SLOW_CHUNK, length))
            if not part:
                break
            parts.append(part)
            length -= len(part)
            time.sleep(len(part) / SLOW_RATE)
        return b"".join(parts)

    @staticmethod
    def _reply(h, status: int, data: bytes, headers: dict | None = None, head: bool = False,
               length: int | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data) if length is None else length))
        h.end_headers()
        if not head:
            h.wfile.write(data)
