"""Resolve a docker ``--user`` value against the rootfs's passwd and group.

Rules follow docker (moby/sys/user ``GetExecUser``): "name" and "uid" look up
passwd for the primary gid and home; an unknown numeric uid is allowed and
gets gid 0; ":group" overrides the primary group; supplementary groups are
the /etc/group entries listing the user by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerfs.errors import InvalidInput, NotFound
from layerfs.runtime.rootpath import read_root_file


@dataclass(frozen=True)
class ExecUser:
    """The identity the container command runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


@dataclass(frozen=True)
class _PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class _GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def resolve_user(rootfs: str, user: str) -> ExecUser:
    """Turn "uid[:gid]" or "name[:group]" (empty = root) into numeric ids."""
    return resolve_user_in(read_root_file(rootfs, "/etc/passwd") or "",
                           read_root_file(rootfs, "/etc/group") or "", user)


def resolve_user_in(passwd_text: str, group_text: str, user: str) -> ExecUser:
    """:func:`resolve_user` given the texts of /etc/passwd and /etc/group
    (for callers that read them from elsewhere than a rootfs on disk)."""
    user_part, _, group_part = (user or "0").partition(":")
    if not user_part:
        raise InvalidInput(f"invalid user {user!r}: missing user before ':'")
    passwd = _parse_passwd(passwd_text)
    entry = _find_user(passwd, user_part)
    if entry is None:
        uid = _numeric(user_part)
        if uid is None:
            raise NotFound(f"unable to find user {user_part}: no matching entries in passwd file")
        entry = _PasswdEntry(user_part, uid, 0, "/")
    groups = _parse_group(group_text)
    gid = entry.gid if not group_part else _resolve_group(groups, group_part)
    supplementary = tuple(sorted({g.gid for g in groups if entry.name in g.members} - {gid}))
    return ExecUser(entry.uid, gid, supplementary, entry.home or "/")


def _numeric(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    if value >= 2**32 - 1:
        raise InvalidInput(f"invalid id {text}: out of range")
    return value


def _find_user(entries: list[_PasswdEntry], user: str) -> _PasswdEntry | None:
    uid = _numeric(user)
    for entry in entries:
        if entry.name == user or (uid is not None and entry.uid == uid):
            return entry
    return None


def _resolve_group(groups: list[_GroupEntry], group: str) -> int:
    gid = _numeric(group)
    if gid is not None:
        return gid
    for entry in groups:
        if entry.name == group:
            return entry.gid
    raise NotFound(f"unable to find group {group}: no matching entries in group file")


def _parse_passwd(text: str) -> list[_PasswdEntry]:
    entries = []
    for fields in _colon_lines(text, 7):
        uid, gid = _numeric(fields[2]), _numeric(fields[3])
        if uid is not None and gid is not None:
            entries.append(_PasswdEntry(fields[0], uid, gid, fields[5]))
    return entries


def _parse_group(text: str) -> list[_GroupEntry]:
    entries = []
    for fields in _colon_lines(text, 4):
        gid = _numeric(fields[2])
        if gid is not None:
            members = tuple(m for m in fields[3].split(",") if m)
            entries.append(_GroupEntry(fields[0], gid, members))
    return entries


def _colon_lines(text: str, width: int) -> list[list[str]]:
    # Malformed lines are skipped, as libc's getpwent does.
    rows = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            fields = line.split(":")
            if len(fields) >= width:
                rows.append(fields)
    return rows
