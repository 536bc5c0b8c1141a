"""Bad input through the real `layerfs build`: one `Error:` line on stderr,
a non-zero exit, no traceback, nothing tagged; and Ctrl-C during a RUN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import layerfs_cmd

pytestmark = [pytest.mark.root, pytest.mark.tools("busybox")]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli-build") / "store")
    layerfs_cmd("bootstrap", "busybox", root=root, check=True)
    return root


def _ctx(tmp_path, dockerfile: str, files: dict[str, str] | None = None) -> str:
    root = tmp_path / "ctx"
    root.mkdir()
    (root / "Dockerfile").write_text(dockerfile)
    for rel, text in (files or {}).items():
        (root / rel).write_text(text)
    return str(root)


def _fails(root: str, ctx: str, *args: str) -> str:
    proc = layerfs_cmd("build", "--progress", "plain", "-t", "bad:1", *args, ctx, root=root)
    err = proc.stderr.decode()
    assert proc.returncode != 0, proc.stdout.decode()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    images = layerfs_cmd("images", root=root, check=True).stdout.decode()
    assert "bad " not in images
    return lines[0]


@pytest.mark.parametrize("dockerfile, expected", [
    ("FROM busybox:latest\nRUN\n", "Dockerfile:2: RUN requires at least one argument: RUN"),
    ("FROM busybox:latest\nLABEL a=1\nFOO bar baz\n", "Dockerfile:3: unknown instruction: FOO: FOO bar baz"),
    ("FROM busybox:latest\nENV A ${B\n", "Dockerfile:2: "),
    ("FROM busybox:latest\nCOPY [\"a\"\n", "Dockerfile:2:"),
    ("RUN echo\n", "Dockerfile:1: "),
    ("", "Dockerfile: the Dockerfile cannot be empty"),
    ("# only a comment\n\n", "Dockerfile: the Dockerfile cannot be empty"),
])
def test_syntax_errors(seeded, tmp_path, dockerfile, expected):
    line = _fails(seeded, _ctx(tmp_path, dockerfile))
    assert expected in line


def test_missing_copy_source(seeded, tmp_path):
    line = _fails(seeded, _ctx(tmp_path, "FROM busybox:latest\nCOPY nope.txt /x\n"))
    assert "Dockerfile:2: COPY failed: file not found in build context" in line and "nope.txt" in line


def test_source_escaping_the_context(seeded, tmp_path):
    (tmp_path / "secret").write_text("s")
    line = _fails(seeded, _ctx(tmp_path, "FROM busybox:latest\nCOPY ../secret /x\n"))
    assert "Dockerfile:2: COPY failed: forbidden path outside the build context: ../secret" in line


def test_symlink_escaping_the_context(seeded, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY link /x\n")
    os.symlink("/etc/passwd", os.path.join(ctx, "link"))
    line = _fails(seeded, ctx)
    assert "outside the build context" in line


def test_from_unknown_image(seeded, tmp_path):
    line = _fails(seeded, _ctx(tmp_path, "FROM nosuch:1\n"))
    assert "Dockerfile:1: FROM nosuch:1: no such image" in line
    assert "layerfs pull nosuch:1" in line and "layerfs bootstrap" in line


def test_missing_dockerfile_and_context(seeded, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(seeded, str(tmp_path / "empty"))
    _fails(seeded, str(tmp_path / "nowhere"))


def test_bad_chmod(seeded, tmp_path):
    line = _fails(seeded, _ctx(tmp_path, "FROM busybox:latest\nCOPY --chmod=u+q f /f\n", {"f": "x"}))
    assert "--chmod=u+q" in line


def test_substitution_bomb_is_one_line(seeded, tmp_path, monkeypatch):
    bomb = "FROM busybox:latest\nENV A=x\n" + "ENV A=${A}${A}\n" * 40
    line = _fails(seeded, _ctx(tmp_path, bomb))
    # A reaches 1 MiB on line 22, and with the base's PATH the variables
    # pass the limit there.
    assert "Dockerfile:22: the variables in scope hold more than 1048576 characters" in line
    assert "LAYERFS_BUILD_MAX_EXPANSION" in line
    # The limit is configurable, both ways; it bounds growth, so a long
    # literal (a heredoc) passes.
    for sub in ("small", "big", "bad", "doc"):
        (tmp_path / sub).mkdir()
    monkeypatch.setenv("LAYERFS_BUILD_MAX_EXPANSION", "1000")
    line = _fails(seeded, _ctx(tmp_path / "small", "FROM busybox:latest\nENV A=" + "x" * 300 +
                               "\nENV B=${A}${A}${A}${A}\n"))
    assert "Dockerfile:3: expansion grows the word by more than 1000 characters" in line
    doc = "FROM busybox:latest\nARG V=1\nCOPY <<EOF /big\n" + "$V" + "y" * 3000 + "\nEOF\n"
    layerfs_cmd("build", "-q", _ctx(tmp_path / "doc", doc), root=seeded, check=True)
    monkeypatch.setenv("LAYERFS_BUILD_MAX_EXPANSION", str(4 << 20))
    ok = _ctx(tmp_path / "big", "FROM busybox:latest\nENV A=x\n" + "ENV A=${A}${A}\n" * 21)
    layerfs_cmd("build", "-q", ok, root=seeded, check=True)
    monkeypatch.setenv("LAYERFS_BUILD_MAX_EXPANSION", "lots")
    assert "expected a positive number" in _fails(seeded, _ctx(tmp_path / "bad", "FROM busybox:latest\nENV A=1\n"))


def test_variables_in_scope_are_limited_too(seeded, tmp_path):
    lines = "".join(f"ENV B{i}=$A\n" for i in range(3))
    line = _fails(seeded, _ctx(tmp_path, "FROM busybox:latest\nENV A=" + "x" * 400_000 + "\n" + lines))
    assert "Dockerfile:4: the variables in scope hold more than 1048576 characters" in line


@pytest.mark.fuse
@pytest.mark.fuse
def test_failed_run_exits_1_with_the_steps_code_in_the_message(seeded, tmp_path):
    proc = layerfs_cmd("build", "--progress", "plain", "-t", "bad:1",
                       _ctx(tmp_path, "FROM busybox:latest\nRUN exit 3\n"), root=seeded)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines() == ["Error: The command '/bin/sh -c exit 3' returned a non-zero code: 3"]
    assert layerfs_cmd("fsck", root=seeded).returncode == 0


def test_undeclared_build_arg_warns(seeded, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nARG USED\nLABEL u=$USED\n")
    proc = layerfs_cmd("build", "--progress", "plain", "--build-arg", "USED=1", "--build-arg", "NOPE=2",
                       ctx, root=seeded, check=True)
    out = proc.stdout.decode()
    assert "[Warning] One or more build-args [NOPE] were not consumed" in out
    assert "USED" not in out.split("were not consumed")[0].split("[Warning]")[1]


def test_quiet_prints_only_the_id(seeded, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nLABEL q=1\n")
    out = layerfs_cmd("build", "-q", "--build-arg", "NOPE=1", ctx, root=seeded, check=True).stdout.decode()
    assert len(out.split()) == 1 and len(out.strip()) == 64


def test_progress_tty_and_plain(seeded, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nLABEL p=1\n")
    tty = layerfs_cmd("build", "--progress", "tty", ctx, root=seeded, check=True).stdout.decode()
    assert "[2/2] LABEL p=1" in tty and "\x1b[K" in tty and "Successfully built" in tty
    # auto: not a terminal here, so the classic stream
    plain = layerfs_cmd("build", ctx, root=seeded, check=True).stdout.decode()
    assert "Step 2/2 : LABEL p=1" in plain and " ---> Using cache" in plain and "\x1b" not in plain



def _cgroup_dirs() -> set[str]:
    found = set()
    for base in ("/sys/fs/cgroup/layerfs", "/sys/fs/cgroup/unified/layerfs", "/sys/fs/cgroup/memory/layerfs",
                 "/sys/fs/cgroup/pids/layerfs", "/sys/fs/cgroup/cpu,cpuacct/layerfs"):
        if os.path.isdir(base):
            found.update(os.path.join(base, n) for n in os.listdir(base)
                         if os.path.isdir(os.path.join(base, n)))
    return found


def _marker_procs(marker: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


@pytest.mark.fuse
def test_ctrl_c_during_run_leaves_nothing(seeded, tmp_path):
    marker = "417.25"  # an unusual sleep length, to find the container's process
    ctx = _ctx(tmp_path, f"FROM busybox:latest\nRUN echo started; sleep {marker}\n")
    cgroups_before = _cgroup_dirs()
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    proc = subprocess.Popen([exe, "build", "--progress", "plain", "-t", "intr:1", ctx],
                            env=dict(os.environ, LAYERFS_ROOT=seeded),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not _marker_procs(f"sleep\x00{marker}") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        assert _marker_procs(f"sleep\x00{marker}"), "the RUN step never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    assert b"started" in out
    deadline = time.monotonic() + 10
    while _marker_procs(f"sleep\x00{marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _marker_procs(f"sleep\x00{marker}"), "the container outlived the build"
    with open("/proc/mounts") as f:
        assert seeded not in f.read()
    assert os.listdir(os.path.join(seeded, "tmp")) == []
    # Other suites on a shared machine may be creating containers meanwhile:
    # ignore the runtime tests' cgroups and give transient ones time to go.
    leftovers: set[str] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leftovers = {c for c in _cgroup_dirs() - cgroups_before
                     if not os.path.basename(c).startswith("layerfs-test-")}
        if not leftovers:
            break
        time.sleep(0.2)
    assert not leftovers, f"cgroups left behind: {sorted(leftovers)}"
    assert "intr " not in layerfs_cmd("images", root=seeded, check=True).stdout.decode()
