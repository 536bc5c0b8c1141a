"""The store's file hashers: file_digest and hash_fd (from an offset, on
the caller's hasher) agree with blake3 of the bytes, holes included."""

from __future__ import annotations

import os

import blake3
import pytest

from layerfs.store.objects import HASH_BUF, file_digest, hash_fd


@pytest.mark.parametrize("size,hole", [(0, 0), (1, 0), (HASH_BUF, 0), (HASH_BUF * 2 + 5, 0),
                                       (HASH_BUF + 4096, HASH_BUF // 2)])
def test_file_digest_is_blake3_of_the_bytes(tmp_path, size, hole):
    path = tmp_path / "f"
    data = bytearray(os.urandom(size))
    with open(path, "wb") as f:
        f.write(data[:hole // 2])
        f.seek(hole // 2 + hole)  # a hole reads as zeros
        f.write(data[hole // 2 + hole:])
        f.truncate(size)
    data[hole // 2:hole // 2 + hole] = bytes(len(data[hole // 2:hole // 2 + hole]))
    assert file_digest(str(path)) == blake3.blake3(bytes(data)).hexdigest()


@pytest.mark.parametrize("off", [0, 1, HASH_BUF - 1, HASH_BUF + 3, 3 * HASH_BUF])
def test_hash_fd_feeds_the_rest_from_an_offset(tmp_path, off):
    data = os.urandom(2 * HASH_BUF + 1234)
    path = tmp_path / "f"
    path.write_bytes(data)
    h = blake3.blake3()
    h.update(b"prefix")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hash_fd(fd, h, off) is h
    finally:
        os.close(fd)
    assert h.hexdigest() == blake3.blake3(b"prefix" + data[off:]).hexdigest()
