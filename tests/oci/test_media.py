"""Units: streams, descriptors, references, deterministic gzip."""

from __future__ import annotations

import gzip
import io
import random
import subprocess

import pytest

from layerfs.errors import Corrupt, InvalidInput, Unsupported
from layerfs.oci import media
from layerfs.oci.convert import ParallelGzip
from layerfs.oci.registry import parse_challenge
from layerfs.oci.registry_transport import RegistryRef


@pytest.mark.parametrize("n", [0, 7, 1 << 20, (3 << 20) + 17])
def test_parallel_gzip_is_deterministic_and_valid(n):
    data = random.Random(n).randbytes(n // 2) + b"abc" * (n // 6)
    outs = []
    for _ in range(2):
        g = ParallelGzip(6)
        out = b""
        for i in range(0, len(data), 1 << 20):
            out += g.compress(data[i:i + (1 << 20)])
        outs.append(out + g.flush())
    assert outs[0] == outs[1]
    assert gzip.decompress(outs[0]) == data
    assert subprocess.run(["gzip", "-t"], input=outs[0]).returncode == 0
    plain, kind = media.decompressed(io.BytesIO(outs[0]))
    assert kind == "gzip" and plain.read() == data


def test_verifying_reader():
    data = b"x" * 1000
    d = media.sha256_digest(data)
    v = media.VerifyingReader(io.BytesIO(data), d, 1000)
    assert v.finish() == d
    with pytest.raises(Corrupt, match="truncated"):
        media.VerifyingReader(io.BytesIO(data[:10]), d, 1000).finish()
    with pytest.raises(Corrupt, match="larger"):
        media.VerifyingReader(io.BytesIO(data + b"y"), d, 1000).finish()
    with pytest.raises(Corrupt, match="does not match"):
        media.VerifyingReader(io.BytesIO(b"y" * 1000), d, 1000).finish()


def test_truncated_gzip_is_invalid():
    blob = gzip.compress(b"a" * 100000)
    plain, _ = media.decompressed(io.BytesIO(blob[: len(blob) // 2]))
    with pytest.raises(InvalidInput, match="truncated"):
        plain.read()


def test_descriptors_and_manifests_are_validated():
    with pytest.raises(InvalidInput):
        media.Descriptor.parse({"mediaType": "x", "digest": "sha256:nothex", "size": 1}, "t")
    with pytest.raises(Unsupported):
        media.check_digest("sha512:" + "a" * 128)
    with pytest.raises(InvalidInput):
        media.Descriptor.parse({"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": -1}, "t")
    with pytest.raises(Unsupported, match="schema 1"):
        media.parse_manifest(b'{"schemaVersion":1,"name":"x"}')
    with pytest.raises(InvalidInput, match="JSON"):
        media.parse_manifest(b"{")


def test_platform_and_refs():
    assert str(media.Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    with pytest.raises(InvalidInput):
        media.Platform.parse("linux")
    r = RegistryRef.parse("localhost:5000/busybox:1")
    assert (r.host, r.repo, r.tag, r.digest) == ("localhost:5000", "busybox", "1", "")
    r = RegistryRef.parse("busybox")
    assert (r.host, r.repo, r.tag, r.name) == ("docker.io", "library/busybox", "latest", "busybox")
    r = RegistryRef.parse("127.0.0.1:5000/a/b@sha256:" + "a" * 64)
    assert r.reference == "sha256:" + "a" * 64 and r.tag == ""
    assert parse_challenge('Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"') == (
        "bearer", {"realm": "https://auth/token", "service": "reg", "scope": "repository:a:pull"})
