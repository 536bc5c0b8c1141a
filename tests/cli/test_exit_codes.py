"""As a user sees it: one-line errors, non-zero exits, never a traceback."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import layerfs_cmd


def _err(proc) -> str:
    return proc.stderr.decode()


@pytest.mark.parametrize("args,code", [
    (["history", "nope:1"], 1),
    (["inspect", "nope"], 1),
    (["rmi", "nope"], 1),
    (["tag", "nope", "x:1"], 1),
    (["export", "nope", "-o", "/tmp/x-never"], 1),
    (["import", "/nonexistent/dir", "-t", "a:1"], 1),
    (["import", "/etc/hostname", "-t", "a:1"], 2),
    (["import", "/tmp", "-t", "Bad:Name!"], 2),
    (["import", "/tmp", "-t", "a:1", "--layer"], 2),
    (["import", "/tmp", "-t", "a:1", "--base", "nope"], 1),
    (["frobnicate"], 2),
])
def test_user_errors_are_one_line(tmp_path, args, code):
    p = layerfs_cmd(*args, root=str(tmp_path / "s"))
    assert p.returncode == code, _err(p)
    assert "Traceback" not in _err(p)
    lines = _err(p).strip().splitlines()
    assert lines and lines[-1].startswith("Error: ")
    assert len(lines) == 1 or lines[0].startswith("Usage:"), "library errors are one line"


def test_every_command_has_help(tmp_path):
    p = layerfs_cmd("--help", root=str(tmp_path))
    assert p.returncode == 0
    commands = [line.split()[0] for line in p.stdout.decode().split("Commands:")[1].splitlines() if line.strip()]
    expected = {"import", "images", "history", "inspect", "tag", "rmi", "gc", "fsck", "export", "df", "bootstrap"}
    assert expected <= set(commands)
    for c in commands:
        assert layerfs_cmd(c, "--help", root=str(tmp_path)).returncode == 0, c


def test_main_job(tmp_path):
    root = str(tmp_path / "s")
    layerfs_cmd("bootstrap", "busybox", root=root, check=True)
    for app in ("a", "b"):
        d = tmp_path / app
        (d / "usr/lib").mkdir(parents=True)
        (d / "usr/lib/shared.so").write_bytes(b"\x7fELF" + bytes(range(256)) * 4000)
        (d / app).write_text(app)
        layerfs_cmd("import", str(d), "--base", "busybox", "--layer", "-t", f"{app}:1", root=root, check=True)
    images = json.loads(layerfs_cmd("images", "--format", "json", root=root, check=True).stdout)
    assert {i["Repository"] for i in images} == {"busybox", "a", "b"}
    ha = json.loads(layerfs_cmd("history", "a:1", "--format", "json", root=root, check=True).stdout)
    hb = json.loads(layerfs_cmd("history", "b:1", "--format", "json", root=root, check=True).stdout)
    assert ha[-1]["Layer"] == hb[-1]["Layer"], "the base layer is shared"
    df = json.loads(layerfs_cmd("df", "--format", "json", root=root, check=True).stdout)
    assert df["FileLevel"] < df["LayerLevel"] < df["Logical"]
    assert "shared" in layerfs_cmd("df", "-v", root=root, check=True).stdout.decode().lower()
    assert layerfs_cmd("fsck", root=root).returncode == 0
    out = tmp_path / "export"
    layerfs_cmd("export", "a:1", "-o", str(out), root=root, check=True)
    assert (out / "bin/busybox").exists() and (out / "a").read_text() == "a"
    layerfs_cmd("export", "a:1", "-o", str(tmp_path / "a.tar"), root=root, check=True)
    assert os.path.getsize(tmp_path / "a.tar") > 1_000_000
    p = layerfs_cmd("export", "a:1", "-o", str(out), root=root)
    assert p.returncode != 0 and "not empty" in _err(p)


def test_fsck_exit_code_on_damage(tmp_path):
    root = str(tmp_path / "s")
    layerfs_cmd("bootstrap", "busybox", root=root, check=True)
    objs = os.path.join(root, "objects")
    victim = max((os.path.join(d, f) for d, _, fs in os.walk(objs) for f in fs), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.write(b"garbage")
    p = layerfs_cmd("fsck", root=root)
    assert p.returncode == 3 and "Traceback" not in _err(p)
    assert layerfs_cmd("fsck", "--repair", root=root).returncode == 0
    assert layerfs_cmd("fsck", root=root).returncode == 0


@pytest.mark.damages_store
def test_store_from_a_newer_layerfs_is_refused(tmp_path):
    import sqlite3

    from layerfs.errors import Unsupported
    from layerfs.store import schema

    root = str(tmp_path / "s")
    layerfs_cmd("images", root=root, check=True)
    db = os.path.join(root, "db.sqlite")
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value=? WHERE key='schema'", (str(schema.VERSION + 1),))
    c.close()
    for args in (["images"], ["gc"], ["fsck"]):
        p = layerfs_cmd(*args, root=root)
        assert p.returncode == Unsupported.exit_code, _err(p)
        assert "Traceback" not in _err(p)
        lines = _err(p).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "newer layerfs" in lines[0], lines
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (str(schema.VERSION + 1),)
    c.close()
