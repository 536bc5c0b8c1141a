"""Containers as a user runs them: the real `layerfs` CLI, FUSE mounts, namespaces.

Every test gets its own store holding busybox (made once with
`layerfs bootstrap busybox`, copied per test) and must leave nothing
behind: no mounts below its tmp dir, no cgroups of its store, no
processes started with its LAYERFS_ROOT.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import one_line_error
from tests.runtime.cli_helpers import LAYERFS, Cli, wait_for_log

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.namespaces, pytest.mark.tools("busybox")]


def _records(cli: Cli) -> list[str]:
    base = os.path.join(cli.root, "containers")
    if not os.path.isdir(base):
        return []
    return [n for n in os.listdir(base) if not n.startswith(".")]


# -- run ---------------------------------------------------------------------------------
def test_run_rm_echo_hi(cli: Cli) -> None:
    proc = cli("run", "--rm", "busybox", "echo", "hi")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"hi\n", b"")
    assert cli.out("ps", "-aq") == "" and _records(cli) == []


@pytest.mark.parametrize("args,code", [
    (["sh", "-c", "exit 3"], 3),
    (["/etc"], 126),
    (["no-such-command"], 127),
])
def test_exit_codes(cli: Cli, args: list[str], code: int) -> None:
    proc = cli("run", "--rm", "busybox", *args)
    assert proc.returncode == code, proc.stderr
    if code in (126, 127):
        assert one_line_error(proc)


def test_oom_kill_is_137_and_shown_in_ps(cli: Cli) -> None:
    proc = cli("run", "--name", "hog", "--memory", "32m", "busybox",
               "sh", "-c", "head -c 200m /dev/zero | tail")
    assert proc.returncode == 137
    ps = cli.out("ps", "-a")
    assert "Exited (137)" in ps and "OOM killed" in ps and "hog" in ps
    state = json.loads(cli.out("ps", "-a", "--format", "json"))[0]
    assert state["OOMKilled"] is True and state["ExitCode"] == 137
    cli.out("rm", "hog")


def test_unknown_image_is_125_and_leaves_nothing(cli: Cli) -> None:
    proc = cli("run", "--rm", "nope:1", "true")
    assert proc.returncode == 125
    assert "no such image" in one_line_error(proc)
    assert _records(cli) == []


def test_image_config_is_applied(cli: Cli, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nFROM_FILE=yes\n")
    proc = cli("run", "--rm", "-e", "A=1", "--env-file", str(env_file), "-w", "/tmp/work",
               "-u", "1000:1000", "--hostname", "box", "busybox",
               "sh", "-c", "echo $A $FROM_FILE $PATH; pwd; id -u; id -g; hostname")
    lines = proc.stdout.decode().splitlines()
    assert proc.returncode == 0, proc.stderr
    assert lines[0].startswith("1 yes /") and lines[1:] == ["/tmp/work", "1000", "1000", "box"]
    # --entrypoint replaces the image's and drops its Cmd.
    proc = cli("run", "--rm", "--entrypoint", "echo", "busybox", "via", "entrypoint")
    assert proc.stdout == b"via entrypoint\n"


def test_interactive_stdin_and_networks(cli: Cli) -> None:
    proc = cli("run", "--rm", "-i", "busybox", "sh", "-c", "cat; ls /sys/class/net", input=b"hello\n")
    assert proc.stdout == b"hello\nlo\n"
    assert cli("run", "--rm", "busybox", "cat").stdout == b""  # no -i: stdin is /dev/null
    host = cli.out("run", "--rm", "--network", "host", "busybox", "ls", "/sys/class/net").split()
    assert sorted(host) == sorted(os.listdir("/sys/class/net"))


def test_signals_to_run_are_forwarded(cli: Cli) -> None:
    proc = subprocess.Popen([LAYERFS, "run", "--rm", "--name", "fg", "busybox", "sh", "-c",
                             "trap 'exit 9' TERM; echo ready; while :; do sleep 0.1; done"],
                            env=cli.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_volumes_and_read_only(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in").write_text("from host\n")
    proc = cli("run", "--rm", "--read-only", "-v", f"{data}:/data", "-v", f"{data}:/ro:ro",
               "busybox", "sh", "-c", "cat /data/in; echo out > /data/out; "
               "touch /x 2>/dev/null || echo rootfs-ro; touch /ro/y 2>/dev/null || echo vol-ro")
    assert proc.stdout.decode().splitlines() == ["from host", "rootfs-ro", "vol-ro"]
    assert (data / "out").read_text() == "out\n"


# -- detached lifecycle -------------------------------------------------------------------
LOOP = "echo started; trap 'echo got-term; exit 7' TERM; while :; do sleep 0.1; done"


def test_detached_ps_logs_stop_rm(cli: Cli) -> None:
    cid = cli.out("run", "-d", "--name", "web", "busybox", "sh", "-c", LOOP).strip()
    assert len(cid) == 64
    ps = cli.out("ps")
    assert cid[:12] in ps and "Up " in ps and "web" in ps
    assert cli.out("ps", "-q") == cid[:12] + "\n"
    wait_for_log(cli, "web", "started")
    # A running container is not removed without -f.
    proc = cli("rm", "web")
    assert proc.returncode == 1 and "stop it first" in one_line_error(proc)
    # stop sends SIGTERM, which this command traps.
    cli.out("stop", "-t", "5", "web")
    assert cli.out("wait", "web") == "7\n"
    assert "got-term" in cli.out("logs", "web")
    assert "Exited (7)" in cli.out("ps", "-a") and cli.out("ps", "-q") == ""
    # Started again, it keeps its upper dir; SIGKILL after the timeout.
    cli.out("start", "web")
    cli.out("exec", "web", "touch", "/kept")
    cli.out("kill", "-s", "KILL", "web")
    assert cli.out("wait", "web") == "137\n"
    cli.out("start", "web")
    assert cli("exec", "web", "test", "-e", "/kept").returncode == 0
    cli.out("rm", "-f", "web")
    assert cli.out("ps", "-aq") == "" and _records(cli) == []


def test_stop_kills_after_timeout(cli: Cli) -> None:
    cli.out("run", "-d", "--name", "stubborn", "busybox", "sleep", "600")
    start = time.monotonic()
    cli.out("stop", "-t", "1", "stubborn")  # PID 1 ignores SIGTERM it does not handle
    assert time.monotonic() - start < 30
    assert cli.out("wait", "stubborn") == "137\n"
    cli.out("rm", "stubborn")


def test_detached_rm_removes_itself(cli: Cli) -> None:
    cid = cli.out("run", "-d", "--rm", "busybox", "sh", "-c", "exit 4").strip()
    deadline = time.monotonic() + 20
    while _records(cli) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _records(cli) == [] and cid


def test_start_attach_reruns_with_its_exit_code(cli: Cli) -> None:
    proc = cli("run", "--name", "again", "busybox", "sh", "-c", "echo run >> /count; wc -l < /count; exit 3")
    assert (proc.returncode, proc.stdout) == (3, b"1\n")
    proc = cli("start", "-a", "again")
    assert (proc.returncode, proc.stdout) == (3, b"2\n")  # same upper dir
    assert cli.out("logs", "again") == "1\n2\n"
    cli.out("rm", "again")


def test_owner_killed_reads_as_exited_and_rm_cleans_up(cli: Cli) -> None:
    cid = cli.out("run", "-d", "--name", "victim", "busybox", "sleep", "600").strip()
    with open(os.path.join(cli.root, "containers", cid, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    os.kill(state["owner_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while "Exited (255)" not in cli.out("ps", "-a") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Exited (255)" in cli.out("ps", "-a")
    # The runtime killed the orphaned container. Its mount outlived the
    # owner; start cleans it up and runs the container again, rm too.
    assert not os.path.exists(f"/proc/{state['pid']}") or \
        open(f"/proc/{state['pid']}/stat").read().split()[2] in "ZX"
    cli.out("start", "victim")
    assert "Up " in cli.out("ps")
    cli.out("rm", "-f", "victim")


def test_logs_follow(cli: Cli) -> None:
    cli.out("run", "-d", "--name", "talk", "busybox", "sh", "-c",
            "for i in 1 2 3; do echo line$i; sleep 0.2; done")
    assert cli.out("logs", "-f", "talk").split() == ["line1", "line2", "line3"]
    cli.out("rm", "talk")


# -- exec ----------------------------------------------------------------------------------
def test_exec_joins_the_container(cli: Cli) -> None:
    cli.out("run", "-d", "--name", "box", "--hostname", "boxhost", "--pids-limit", "50",
            "busybox", "sh", "-c", LOOP)
    out = cli.out("exec", "box", "sh", "-c",
                  "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; "
                  "grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; id -u")
    lines = out.splitlines()
    assert lines[0] == "boxhost"
    assert lines[1].startswith("sh -c echo started")
    assert lines[2].endswith("00000000a80425fb") and lines[3].endswith("1")
    assert lines[4] == "0"
    assert cli.out("exec", "-u", "1000", "box", "id", "-u") == "1000\n"
    assert cli("exec", "box", "sh", "-c", "exit 9").returncode == 9
    proc = cli("exec", "box", "no-such-command")
    assert proc.returncode == 127 and b"not found" in proc.stderr
    # The exec'd process is in the container's cgroups, the root of its
    # cgroup namespace (elsewhere the paths would read "/../...").
    cgroups = cli.out("exec", "box", "cat", "/proc/self/cgroup").splitlines()
    pids = [line for line in cgroups if ":pids:" in line or line.startswith("0::")]
    assert pids and all(line.endswith(":/") for line in pids), cgroups
    cli.out("rm", "-f", "box")
    proc = cli("exec", "box", "true")
    assert proc.returncode == 125 and "no such container" in one_line_error(proc)


# -- commit and diff -------------------------------------------------------------------------
def test_diff_and_commit(cli: Cli) -> None:
    cli.out("run", "--name", "changer", "busybox", "sh", "-c",
            "echo new > /added; echo more >> /etc/passwd; rm /etc/os-release; mkdir -p /tmp/d")
    diff = cli.out("diff", "changer").splitlines()
    assert diff == ["A /added", "C /etc", "D /etc/os-release", "C /etc/passwd", "C /tmp",
                    "A /tmp/d"]
    image_id = cli.out("commit", "-m", "my change", "changer", "changed:1").strip()
    assert len(image_id) == 64
    out = cli.out("run", "--rm", "changed:1", "sh", "-c",
                  "cat /added; tail -1 /etc/passwd; test -e /etc/os-release || echo gone")
    assert out.splitlines() == ["new", "more", "gone"]
    history = cli.out("history", "changed:1")
    assert "layerfs commit changer" in history and "my change" in history
    # The image is in use by the container: rmi refuses, rm then rmi works.
    assert cli("rmi", "busybox").returncode != 0
    cli.out("rm", "changer")
    cli.out("rmi", "changed:1")


# -- storage: the seed's claim ----------------------------------------------------------------
def _du(path: str) -> int:
    # -x: stay on this filesystem, i.e. do not count through the FUSE mounts.
    out = subprocess.run(["du", "-sx", "--block-size=1", path], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def _settle_db(root: str) -> None:
    import sqlite3

    with sqlite3.connect(os.path.join(root, "db.sqlite")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_five_containers_cost_only_their_uppers(cli: Cli) -> None:
    image_bytes = _du(os.path.join(cli.root, "objects"))
    _settle_db(cli.root)
    before = _du(cli.root)
    payload = 64 * 1024
    # Five at once, from one image, each writing its own payload.
    starts = [subprocess.Popen([LAYERFS, "run", "-d", "--name", f"c{i}", "busybox", "sh", "-c",
                                f"head -c {payload} /dev/urandom > /payload{i}; echo done; "
                                "sleep 600"], env=cli.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
              for i in range(5)]
    try:
        assert [p.wait(timeout=120) for p in starts] == [0] * 5, [p.stderr.read() for p in starts]  # type: ignore[union-attr]
        for i in range(5):
            wait_for_log(cli, f"c{i}", "done")
        assert len(cli.out("ps", "-q").split()) == 5
        _settle_db(cli.root)
        growth = _du(cli.root) - before
        uppers = sum(_du(os.path.join(cli.root, "containers", cid, "upper"))
                     for cid in _records(cli))
        assert uppers >= 5 * payload
        # Besides the uppers only small records (config, state, log, work and
        # mountpoint dirs): far less than even one more copy of the image.
        overhead = growth - uppers
        assert 0 <= overhead < 5 * 64 * 1024 and overhead < image_bytes, (growth, uppers)
        df = cli.out("df", "-v")
        assert "shared image bytes (counted once)" in df
        section = df.split("Containers (")[1]
        assert all(f"c{i}" in section for i in range(5)) and section.count("Up ") == 5
    finally:
        for p in starts:
            p.stderr.close()  # type: ignore[union-attr]
        for i in range(5):
            cli("rm", "-f", f"c{i}")


# -- limits -------------------------------------------------------------------------------------
def test_pids_limit_contains_a_fork_bomb(cli: Cli) -> None:
    bomb = "for i in $(seq 40); do sleep 2 & done; echo all-forked"
    proc = cli("run", "--rm", "--pids-limit", "20", "busybox", "sh", "-c", bomb)
    assert proc.returncode != 0 and b"can't fork" in proc.stderr
    assert b"all-forked" not in proc.stdout
    proc = cli("run", "--rm", "--pids-limit", "100", "busybox", "sh", "-c", bomb)
    assert (proc.returncode, proc.stdout) == (0, b"all-forked\n"), proc.stderr


def test_memory_within_limit_runs(cli: Cli) -> None:
    proc = cli("run", "--rm", "--memory", "64m", "--cpus", "0.5", "busybox", "sh", "-c",
               "head -c 8m /dev/zero | tail | wc -c")
    assert (proc.returncode, proc.stdout) == (0, b"8388608\n")


# -- other runtimes ---------------------------------------------------------------------------
@pytest.mark.tools("runc")
def test_runtime_runc(cli: Cli) -> None:
    proc = cli("run", "--rm", "--runtime", "runc", "--hostname", "viarunc", "busybox",
               "sh", "-c", "echo hi; hostname; exit 4")
    assert (proc.returncode, proc.stdout) == (4, b"hi\nviarunc\n"), proc.stderr


@pytest.mark.tools("crun")
def test_runtime_crun(cli: Cli) -> None:
    proc = cli("run", "--rm", "--runtime", "crun", "busybox", "sh", "-c", "echo hi; exit 5")
    if b"hybrid mode not supported" in proc.stderr:
        pytest.skip("crun: cgroups in hybrid mode not supported here, even with cgroup2 hidden")
    assert (proc.returncode, proc.stdout) == (5, b"hi\n"), proc.stderr


@pytest.mark.tools("runc")
def test_bundle_runs_under_real_runc(cli: Cli, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    config = cli.out("bundle", "busybox", str(bundle), "sh", "-c",
                     "echo from-bundle; echo w > /written; exit 6").strip()
    assert config == str(bundle / "config.json")
    try:
        proc = subprocess.run(["runc", "--root", str(tmp_path / "runc"), "run", "--bundle",
                               str(bundle), f"lfs-test-{os.getpid()}"],
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        assert (proc.returncode, proc.stdout) == (6, b"from-bundle\n"), proc.stderr
        assert (bundle / "rootfs" / "written").read_text() == "w\n"  # through the mount
    finally:
        cli.out("umount", str(bundle / "rootfs"))


# -- a real terminal ---------------------------------------------------------------------------
def _drive_pty(cli: Cli, argv: list[str], lines: list[bytes]) -> tuple[int, bytes]:
    """Run `layerfs ARGV` on a new pty; type each line after the previous prompt."""
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes `layerfs ...`
        os.environ["LAYERFS_ROOT"] = cli.root
        os.execv(LAYERFS, [LAYERFS, *argv])
    output = b""

    def read_until(marker: bytes, timeout: float = 30) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    output += os.read(master, 4096)
                except OSError:  # EIO: the other side is gone
                    return

    try:
        for line in lines:
            read_until(b"# ")
            output_len = len(output)
            os.write(master, line + b"\r")
            read_until(line)  # echoed back by the container's line discipline
            assert len(output) > output_len
        read_until(b"\0never")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(master)
    return os.waitstatus_to_exitcode(status), output


def test_run_it_in_a_pty(cli: Cli) -> None:
    code, output = _drive_pty(cli, ["run", "--rm", "-it", "busybox", "sh"],
                              [b"echo $((6*7)); tty", b"exit 3"])
    assert b"42" in output and b"/dev/pts/0" in output, output
    assert code == 3, output


def test_exec_it_in_a_pty(cli: Cli) -> None:
    cli.out("run", "-d", "--name", "shell", "busybox", "sleep", "600")
    try:
        code, output = _drive_pty(cli, ["exec", "-it", "shell", "sh"],
                                  [b"echo $((6*7)) $(cat /proc/1/cmdline)", b"exit 4"])
        assert b"42 sleep600" in output, output
        assert code == 4, output
    finally:
        cli.out("rm", "-f", "shell")


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--memory", "12zz", "busybox", "true"], "invalid memory size"),
    (["--pids-limit", "12zz", "busybox", "true"], "invalid pids limit"),
    (["--cpus", "12zz", "busybox", "true"], "invalid cpus"),
    (["-v", "/no/such/path:/data", "busybox", "true"], "does not exist"),
    (["--entrypoint", "", "busybox"], "no command specified"),
    (["-w", "relative", "busybox", "true"], "not absolute"),
    (["--name", "bad/name", "busybox", "true"], "invalid container name"),
    (["-e", "=x", "busybox", "true"], "invalid environment variable"),
])
def test_bad_run_input(cli: Cli, args: list[str], message: str) -> None:
    proc = cli("run", "--rm", *args)
    assert proc.returncode == 125
    assert message in one_line_error(proc)
    assert _records(cli) == []


def test_name_in_use(cli: Cli) -> None:
    cli.out("run", "--name", "taken", "busybox", "true")
    proc = cli("run", "--name", "taken", "busybox", "true")
    assert proc.returncode == 125 and "already in use" in one_line_error(proc)
    assert len(_records(cli)) == 1
    cli.out("rm", "taken")


@pytest.mark.parametrize("command", [["rm", "ghost"], ["stop", "ghost"], ["kill", "ghost"],
                                     ["logs", "ghost"], ["wait", "ghost"], ["diff", "ghost"],
                                     ["commit", "ghost", "x:1"], ["start", "ghost"]])
def test_unknown_container(cli: Cli, command: list[str]) -> None:
    proc = cli(*command)
    assert proc.returncode in (1, 125)
    assert "no such container" in one_line_error(proc)


def test_escapes_are_contained(cli: Cli) -> None:
    script = ("echo c > /proc/sysrq-trigger 2>/dev/null && echo SYSRQ; "
              "mount -t tmpfs t /mnt 2>/dev/null && echo MOUNTED; "
              "test -e /containers && echo STORE; "
              f"test -e {cli.root} && echo HOSTPATH; "
              "ls /sys/fs/cgroup >/dev/null 2>&1; "
              "echo done")
    proc = cli("run", "--rm", "busybox", "sh", "-c", script)
    assert proc.stdout == b"done\n", proc.stdout
    # One container cannot see another's files.
    cli.out("run", "--name", "a", "busybox", "sh", "-c", "echo secret > /secret")
    assert cli("run", "--rm", "busybox", "test", "-e", "/secret").returncode == 1
    cli.out("rm", "a")
