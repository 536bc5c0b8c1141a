"""A writer of EROFS images holding metadata only (no file contents).

The kernel backend's metadata layer is an EROFS image (see ``fs.metalayer``
for why not a directory tree). EROFS is simple enough to write directly,
as composefs does: ``mkfs.erofs`` would read every sparse file's zeros.

What is written (the on-disk format of the kernel's fs/erofs/erofs_fs.h,
4 KiB blocks, no compression):

* block 0 holds the superblock at byte 1024;
* blocks 1..D hold the full blocks of large directories;
* the metadata area follows: one 64-byte *extended* inode per node (32-bit
  owners, nanosecond mtimes), its inline xattrs, then either its data tail
  inline (directories, symlinks: ``FLAT_INLINE``) or, for a regular file,
  a chunk map of one hole (``CHUNK_BASED``): the file has its real size and
  no data, because overlayfs reads the data from the data-only layer. An
  inode record never straddles a block unless it alone is bigger than one.
* a node's *nid* is its offset in the metadata area / 32; the root comes
  first because the superblock holds its nid in 16 bits.

Directory blocks are dirents (nid, name offset, file type) followed by the
names, sorted bytewise across and within blocks: the kernel looks names up
by binary search. ``.`` and ``..`` are ordinary sorted entries.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field

from layerfs.errors import Unsupported

BLKSZ_BITS = 12
BLKSZ = 1 << BLKSZ_BITS
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
INCOMPAT_CHUNKED_FILE = 0x4
NULL_ADDR = 0xFFFFFFFF
INODE_SIZE = 64
DIRENT_SIZE = 12
FLAT_PLAIN, FLAT_INLINE, CHUNK_BASED = 0, 2, 4

# xattr name prefixes EROFS can store, by index; the longest match wins.
_PREFIXES = ((b"system.posix_acl_access", 2), (b"system.posix_acl_default", 3),
             (b"user.", 1), (b"trusted.", 4), (b"security.", 6))
_FTYPE = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5,
          stat.S_IFSOCK: 6, stat.S_IFLNK: 7}


@dataclass
class Node:
    """One inode of the image. ``children`` (directories) are (name, node
    number) pairs; a node listed in several directories is a hardlink."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0                     # regular files: the size reads will see
    rdev: int = 0
    target: bytes = b""               # symlinks
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    children: list[tuple[bytes, int]] = field(default_factory=list)
    parent: int = 0
    nlink: int = 1


def write_image(nodes: list[Node], uuid: bytes) -> bytes:
    """The EROFS image of *nodes* (``nodes[0]`` is the root directory)."""
    xbodies = [_xattr_body(n.xattrs) for n in nodes]
    dir_splits = [_split_dir(nodes, i) if stat.S_ISDIR(n.mode) else None for i, n in enumerate(nodes)]
    # Sizes and data placement first (they do not depend on nids)...
    layouts, tails, data_blocks = [], [], 0
    full_start: list[int] = []
    for i, n in enumerate(nodes):
        if n.size and n.mode & 0o170000 == stat.S_IFREG:
            layout, tail, nfull = CHUNK_BASED, 4, 0  # the common case, without a call
        else:
            layout, tail, nfull = _plan(n, xbodies[i], dir_splits[i])
        layouts.append(layout)
        tails.append(tail)
        full_start.append(1 + data_blocks if nfull else 0)
        data_blocks += nfull
    meta_blkaddr = 1 + data_blocks
    # ...then nids: records packed in order, none straddling a block.
    nids, pos = [], 0
    for i in range(len(nodes)):
        size = INODE_SIZE + len(xbodies[i]) + tails[i]
        pos = (pos + 31) & ~31
        if size <= BLKSZ and (pos % BLKSZ) + size > BLKSZ:
            pos = (pos + BLKSZ - 1) & ~(BLKSZ - 1)
        nids.append(pos >> 5)
        pos += size
    if nids[0] > 0xFFFF:
        raise AssertionError("the root inode must come first")
    total = meta_blkaddr * BLKSZ + ((pos + BLKSZ - 1) & ~(BLKSZ - 1))
    img = bytearray(total)
    meta = meta_blkaddr * BLKSZ
    for i, n in enumerate(nodes):
        off = meta + nids[i] * 32
        data = b""
        if dir_splits[i] is not None:
            blocks = _pack_dir(nodes, i, dir_splits[i], nids)
            n_full = len(blocks) - 1 if layouts[i] == FLAT_INLINE else len(blocks)
            for b, blk in enumerate(blocks[:n_full]):
                at = (full_start[i] + b) * BLKSZ
                img[at:at + len(blk)] = blk
            size = BLKSZ * (len(blocks) - 1) + len(blocks[-1])
            data = blocks[-1] if layouts[i] == FLAT_INLINE else b""
        elif stat.S_ISLNK(n.mode):
            size = len(n.target)
            if layouts[i] == FLAT_INLINE:
                data = n.target
            else:
                at = full_start[i] * BLKSZ
                img[at:at + size] = n.target
        elif layouts[i] == CHUNK_BASED:
            size = n.size
            data = _HOLE_MAP
        else:
            size = 0
        rec = _inode(n, layouts[i], size, full_start[i], i + 1, xbodies[i]) + xbodies[i] + data
        img[off:off + len(rec)] = rec
    img[SUPER_OFFSET:SUPER_OFFSET + 128] = _superblock(nids[0], len(nodes), total // BLKSZ,
                                                       meta_blkaddr, uuid)
    return bytes(img)


def _plan(n: Node, xbody: bytes, split: list[list[bytes]] | None) -> tuple[int, int, int]:
    """(data layout, bytes inline after the xattrs, full blocks in the data area)."""
    room = BLKSZ - INODE_SIZE - len(xbody)
    if split is not None:
        last = sum(DIRENT_SIZE + len(name) for name in split[-1])
        if last < BLKSZ and last <= room:
            return FLAT_INLINE, last, len(split) - 1
        return FLAT_PLAIN, 0, len(split)
    if stat.S_ISLNK(n.mode):
        if len(n.target) <= room:
            return FLAT_INLINE, len(n.target), 0
        return FLAT_PLAIN, 0, 1
    if stat.S_ISREG(n.mode) and n.size:
        return CHUNK_BASED, 4, 0
    return FLAT_PLAIN, 0, 0


def _names(nodes: list[Node], i: int) -> list[bytes]:
    return sorted([b".", b".."] + [name for name, _ in nodes[i].children])


def _split_dir(nodes: list[Node], i: int) -> list[list[bytes]]:
    blocks: list[list[bytes]] = [[]]
    used = 0
    for name in _names(nodes, i):
        need = DIRENT_SIZE + len(name)
        if blocks[-1] and used + need > BLKSZ:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += need
    return blocks


def _pack_dir(nodes: list[Node], i: int, split: list[list[bytes]], nids: list[int]) -> list[bytes]:
    node = nodes[i]
    target = {b".": i, b"..": node.parent} | dict(node.children)
    out = []
    for b, names in enumerate(split):
        nameoff = DIRENT_SIZE * len(names)
        dirents, tail = [], []
        for name in names:
            child = target[name]
            dirents.append(struct.pack("<QHBx", nids[child], nameoff, _FTYPE[stat.S_IFMT(nodes[child].mode)]))
            tail.append(name)
            nameoff += len(name)
        blk = b"".join(dirents) + b"".join(tail)
        out.append(blk if b == len(split) - 1 else blk.ljust(BLKSZ, b"\0"))
    return out


def _xattr_body(xattrs: list[tuple[bytes, bytes]]) -> bytes:
    if not xattrs:
        return b""
    parts = [_IBODY_HEADER]
    heads = _HEADS
    for name, value in xattrs:
        entry = heads.get(name) or _entry_head(name)
        if len(value) > 0xFFFF:
            raise Unsupported(f"xattr {name!r} is too long for the kernel backend's metadata layer")
        # entry: name_len + index bytes, suffix; then value_size, suffix, value, padding
        parts += (entry[0], len(value).to_bytes(2, "little"), entry[1], value,
                  _PAD[(len(entry[1]) + len(value)) % 4])
    return b"".join(parts)


_HEADS: dict[bytes, tuple[bytes, bytes]] = {}  # _entry_head's answers (the same few names repeat)


_IBODY_HEADER = struct.pack("<IB7x", 0, 0)  # no name filter, no shared xattrs
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_HOLE_MAP = struct.pack("<I", NULL_ADDR)  # a chunk map of one chunk, a hole


def _entry_head(name: bytes) -> tuple[bytes, bytes]:
    """(e_name_len + e_name_index bytes, name suffix) of an xattr entry,
    remembered in _HEADS (bounded: an image has few distinct names)."""
    index, suffix = _prefix(name)
    if len(suffix) > 255:
        raise Unsupported(f"xattr {name!r} is too long for the kernel backend's metadata layer")
    if len(_HEADS) < 4096:
        _HEADS[name] = (bytes((len(suffix), index)), suffix)
    return bytes((len(suffix), index)), suffix


def _prefix(name: bytes) -> tuple[int, bytes]:
    for prefix, index in _PREFIXES:
        if name.startswith(prefix) and (index > 3 or index == 1 or name == prefix):
            return index, name[len(prefix):]
    raise Unsupported(f"xattr {name.decode(errors='replace')!r} has a namespace the kernel backend "
                      "cannot store (use --backend fuse)")


def _inode(n: Node, layout: int, size: int, blkaddr: int, ino: int, xbody: bytes) -> bytes:
    fmt = stat.S_IFMT(n.mode)
    if layout == CHUNK_BASED:
        bits = max(BLKSZ_BITS, (n.size - 1).bit_length())
        if bits - BLKSZ_BITS > 31:
            raise Unsupported(f"a {n.size}-byte file is too big for the kernel backend")
        i_u = bits - BLKSZ_BITS  # chunk format: one chunk covers the file, 4-byte block map
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        i_u = _encode_dev(n.rdev)
    else:
        i_u = blkaddr
    icount = (len(xbody) - 12) // 4 + 1 if xbody else 0
    sec, nsec = divmod(n.mtime_ns, 1_000_000_000)
    return _INODE.pack(1 | (layout << 1), icount, n.mode & 0xFFFF, 0, size, i_u,
                       ino & 0xFFFFFFFF, n.uid, n.gid, sec, nsec, n.nlink)


_INODE = struct.Struct("<HHHHQIIIIqII16x")


def _encode_dev(rdev: int) -> int:
    # the kernel's new_encode_dev(), which EROFS stores
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _superblock(root_nid: int, inos: int, blocks: int, meta_blkaddr: int, uuid: bytes) -> bytes:
    return struct.pack("<IIIBBHQQIIII16s16sIHHHBBIQB3xIQ8x", MAGIC, 0, 0, BLKSZ_BITS, 0, root_nid, inos,
                       0, 0, blocks, meta_blkaddr, 0, uuid[:16].ljust(16, b"\0"), b"layerfs-meta",
                       INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
