"""Spec parsing and validation, path resolution in a rootfs, user lookup."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from layerfs.errors import InvalidInput, NotFound
from layerfs.runtime.rootpath import is_unused_mountpoint, make_mountpoint, secure_join
from layerfs.runtime.spec import (
    ContainerSpec,
    IdMap,
    Tmpfs,
    Volume,
    container_env,
    parse_cpus,
    parse_env,
    parse_id_map,
    parse_memory,
    parse_pids_limit,
    parse_volume,
    read_env_file,
)
from layerfs.runtime.users import ExecUser, resolve_user


@pytest.mark.parametrize("text, expected", [
    ("256m", 256 << 20), ("1g", 1 << 30), ("1G", 1 << 30), ("512k", 512 << 10),
    ("1024", 1024), ("1.5g", 3 << 29), ("64mb", 64 << 20), ("2 MiB", 2 << 20), ("10b", 10),
])
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["12zz", "", "m", "-1m", "0", "1.2.3g", "12 z"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid memory size"):
        parse_memory(text)


def test_parse_memory_names_the_bad_value() -> None:
    with pytest.raises(InvalidInput, match="'12zz'"):
        parse_memory("12zz")


def test_parse_cpus() -> None:
    assert parse_cpus("0.5", available=2) == 0.5
    assert parse_cpus("2", available=2) == 2.0
    for bad in ("abc", "0", "0.001", "3", "-1"):
        with pytest.raises(InvalidInput, match="cpus"):
            parse_cpus(bad, available=2)


def test_parse_pids_limit() -> None:
    assert parse_pids_limit("100") == 100
    for bad in ("x", "0", "-5", "1.5"):
        with pytest.raises(InvalidInput):
            parse_pids_limit(bad)


def test_parse_env() -> None:
    assert parse_env("A=1") == "A=1"
    assert parse_env("A=") == "A="
    assert parse_env("A=b=c") == "A=b=c"
    assert parse_env("HOSTVAR", {"HOSTVAR": "x"}) == "HOSTVAR=x"
    assert parse_env("MISSING", {}) is None
    for bad in ("=x", "A B=1", ""):
        with pytest.raises(InvalidInput):
            parse_env(bad)


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("# comment\n\nA=1\n  B=two words\nFROMHOST\nUNSET\n")
    assert read_env_file(str(path), {"FROMHOST": "h"}) == ["A=1", "B=two words", "FROMHOST=h"]
    path.write_text("GOOD=1\nBAD KEY=2\n")
    with pytest.raises(InvalidInput, match=":2:"):
        read_env_file(str(path))
    with pytest.raises(NotFound):
        read_env_file(str(tmp_path / "missing"))


def test_parse_volume(tmp_path: Path) -> None:
    assert parse_volume(f"{tmp_path}:/data") == Volume(str(tmp_path), "/data", False)
    assert parse_volume(f"{tmp_path}:/data/:ro") == Volume(str(tmp_path), "/data", True)
    assert parse_volume(f"{tmp_path}:/data:rw").readonly is False
    for bad in ("nocolon", f"{tmp_path}:relative", f"{tmp_path}:/x:rx", "named:/x",
                f"{tmp_path}:/", ":/x", f"{tmp_path}:/a:ro:extra"):
        with pytest.raises(InvalidInput):
            parse_volume(bad)
    with pytest.raises(NotFound, match="does not exist"):
        parse_volume(f"{tmp_path}/missing:/x")


def test_parse_id_map() -> None:
    assert parse_id_map("0:100000:65536") == IdMap(0, 100000, 65536)
    for bad in ("0:1", "a:b:c", "0:0:0", "-1:0:1"):
        with pytest.raises(InvalidInput):
            parse_id_map(bad)


def test_spec_validation() -> None:
    spec = ContainerSpec(rootfs="/r", args=["sh"], env=["A=1"])
    assert spec.args == ("sh",) and spec.env == ("A=1",)
    assert spec.rlimits[0].resource == resource.RLIMIT_NOFILE
    bad_fields: list[dict[str, object]] = [
        {"args": []}, {"cwd": "rel"}, {"network": "bridge"}, {"env": ["NOEQUALS"]},
        {"memory": 0}, {"cpus": -1.0}, {"pids_limit": 0}, {"hostname": "bad host"},
        {"cgroup_name": "../escape"}, {"volumes": [Volume("/tmp", "rel")]},
        {"tmpfs": [Tmpfs("rel")]}, {"tmpfs": [Tmpfs("/")]}, {"tmpfs": [Tmpfs("/t", 0)]},
    ]
    for fields in bad_fields:
        with pytest.raises(InvalidInput):
            ContainerSpec(rootfs="/r", **{"args": ["sh"], **fields})  # type: ignore[arg-type]


def test_container_env_adds_docker_defaults() -> None:
    spec = ContainerSpec(rootfs="/r", args=["sh"], env=["A=1", "HOME=/custom", "A=2"], tty=True)
    env = dict(item.split("=", 1) for item in container_env(spec, "box", "/root"))
    assert env["A"] == "2" and env["HOME"] == "/custom"
    assert env["HOSTNAME"] == "box" and env["TERM"] == "xterm" and "/bin" in env["PATH"]


@pytest.fixture
def hostile_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "real").mkdir()
    (root / "abs").symlink_to("/")
    (root / "up").symlink_to("../../../../..")
    (root / "etc" / "passwd").symlink_to("/etc/shadow-does-not-exist")
    (root / "loop").symlink_to("loop")
    (root / "rel").symlink_to("real")
    return root


def test_secure_join_stays_in_root(hostile_root: Path) -> None:
    root = str(hostile_root)
    assert secure_join(root, "/abs/etc") == os.path.join(root, "etc")
    assert secure_join(root, "/up/etc") == os.path.join(root, "etc")
    assert secure_join(root, "/../../etc") == os.path.join(root, "etc")
    assert secure_join(root, "rel/x") == os.path.join(root, "real", "x")
    assert secure_join(root, "/etc/passwd") == os.path.join(root, "etc/shadow-does-not-exist")
    assert secure_join(root, "/") == root
    with pytest.raises(InvalidInput, match="symbolic links"):
        secure_join(root, "/loop")


def test_make_mountpoint_creates_inside_root(hostile_root: Path) -> None:
    root = str(hostile_root)
    path = make_mountpoint(root, "/abs/new/dir", directory=True)
    assert path == os.path.join(root, "new", "dir") and os.path.isdir(path)
    path = make_mountpoint(root, "/up/file", directory=False)
    assert path == os.path.join(root, "file") and os.path.isfile(path)
    with pytest.raises(InvalidInput):
        make_mountpoint(root, "/abs", directory=True)


def test_unused_mountpoint_is_exactly_an_untouched_stub(tmp_path: Path) -> None:
    """The one rule commit, diff and RUN layers drop stubs by: what
    make_mountpoint made and nobody wrote or filled."""
    root = str(tmp_path)
    hosts = make_mountpoint(root, "/etc/hosts", directory=False)
    proc = make_mountpoint(root, "/proc", directory=True)
    assert is_unused_mountpoint(hosts) and is_unused_mountpoint(proc)
    Path(hosts).write_text("10.0.0.1 db\n")        # really written: kept
    (Path(proc) / "x").mkdir()                      # filled: kept
    assert not is_unused_mountpoint(hosts) and not is_unused_mountpoint(proc)
    os.symlink("/nowhere", tmp_path / "link")       # not a stub, whatever it points at
    os.symlink(proc + "/x", tmp_path / "dirlink")
    os.mkfifo(tmp_path / "fifo")
    for other in ("link", "dirlink", "fifo", "missing"):
        assert not is_unused_mountpoint(str(tmp_path / other)), other


@pytest.fixture
def user_root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nbad line\napp:x:1000:1001:App:/home/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text(
        "root:x:0:\napp:x:1001:\nwheel:x:10:app,other\naudio:x:29:other\n")
    return tmp_path


@pytest.mark.parametrize("user, expected", [
    ("", ExecUser(0, 0, (), "/root")),
    ("root", ExecUser(0, 0, (), "/root")),
    ("app", ExecUser(1000, 1001, (10,), "/home/app")),
    ("1000", ExecUser(1000, 1001, (10,), "/home/app")),
    ("1000:1000", ExecUser(1000, 1000, (10,), "/home/app")),
    ("app:audio", ExecUser(1000, 29, (10,), "/home/app")),
    ("4242", ExecUser(4242, 0, (), "/")),
    ("4242:7", ExecUser(4242, 7, (), "/")),
])
def test_resolve_user(user_root: Path, user: str, expected: ExecUser) -> None:
    assert resolve_user(str(user_root), user) == expected


def test_resolve_user_errors(user_root: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="unable to find user nosuch"):
        resolve_user(str(user_root), "nosuch")
    with pytest.raises(NotFound, match="unable to find group nogroup"):
        resolve_user(str(user_root), "app:nogroup")
    with pytest.raises(InvalidInput):
        resolve_user(str(user_root), ":0")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_user(str(empty), "0") == ExecUser(0, 0, (), "/")
