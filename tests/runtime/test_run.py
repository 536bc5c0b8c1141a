"""Containers on the real kernel: namespaces, mounts, cgroups, privileges."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from layerfs.errors import InvalidInput, NotFound
from layerfs.runtime import ContainerSetupError, ContainerSpec, IdMap, UserNamespace, Volume, start_container
from layerfs.runtime.cgroups import V1Cgroup, V2Cgroup, parent_dirs
from tests.runtime.conftest import Ran, root_tests

pytestmark = root_tests
Run = Callable[..., Ran]
DOCKER_DEFAULT_CAPS = "00000000a80425fb"


def test_echo_hi(run: Run) -> None:
    ran = run(["echo", "hi"])
    assert (ran.out, ran.code, ran.result.oom_killed, ran.result.signal) == ("hi\n", 0, False, None)


@pytest.mark.parametrize("code", [0, 3, 126, 127])
def test_command_exit_code_is_returned(run: Run, code: int) -> None:
    ran = run(f"exit {code}")
    assert ran.code == code and ran.result.exec_error is None


def test_command_not_found_is_127(run: Run) -> None:
    ran = run(["no-such-command"])
    assert ran.code == 127
    assert ran.result.exec_error == 'exec: "no-such-command": executable file not found in $PATH'
    assert run(["/no/such/path"]).result.exec_error == "exec /no/such/path: no such file or directory"


def test_not_executable_is_126(run: Run, rootfs: Path) -> None:
    (rootfs / "script").write_text("#!/bin/sh\necho never\n")
    ran = run(["/script"])
    assert ran.code == 126 and "permission denied" in (ran.result.exec_error or "")
    assert run(["/etc"]).code == 126


def test_oom_kill_is_137(run: Run) -> None:
    ran = run("head -c 100m /dev/zero | tail", memory=32 << 20)
    assert ran.code == 137 and ran.result.oom_killed


def test_memory_within_limit_is_not_oom(run: Run) -> None:
    ran = run("head -c 1m /dev/zero | tail | wc -c", memory=32 << 20)
    assert (ran.code, ran.out.strip(), ran.result.oom_killed) == (0, "1048576", False)


def test_killed_by_signal_is_128_plus_n(rootfs: Path, state_dir: str) -> None:
    proc = start_container(ContainerSpec(rootfs=str(rootfs), args=["sleep", "30"]), state_dir)
    proc.kill(signal.SIGKILL)
    result = proc.wait()
    assert (result.exit_code, result.signal, result.oom_killed) == (137, 9, False)
    proc.kill(signal.SIGKILL)  # no-op after exit
    assert proc.wait() is result


def test_kill_reaches_a_trapping_pid1(rootfs: Path, state_dir: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    spec = ContainerSpec(rootfs=str(rootfs), args=[
        "sh", "-c", 'trap "exit 7" TERM; echo ready; while :; do sleep 0.05; done'])
    with open(ready, "wb") as out:
        proc = start_container(spec, state_dir, stdout=out)
        _wait_for(lambda: ready.read_text() == "ready\n")
        assert proc.poll() is None
        proc.kill(signal.SIGTERM)
        assert proc.wait().exit_code == 7


@pytest.mark.parametrize("taken_by,tty", [("main thread", False), ("another thread", False),
                                         ("another thread", True)])
def test_signals_to_the_caller_are_forwarded(rootfs: Path, state_dir: str, tmp_path: Path, taken_by: str,
                                             tty: bool) -> None:
    """Also when the signal lands while the caller's wait is already in a
    blocking call: Python's C-level handler then only sets a flag, and a
    wait that stays in recv() (or, with a tty, in the relay's select) never
    lets the handler that forwards the signal run (seen as a rare hang). A
    signal another thread takes is that case every time."""
    prelude = ""
    if taken_by == "another thread":
        prelude = ("threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
                   "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])\n")
    script = tmp_path / "runner.py"
    script.write_text(
        "import signal, sys, threading\nfrom layerfs.runtime import ContainerSpec, run_container\n" + prelude +
        f"spec = ContainerSpec(rootfs={str(rootfs)!r}, tty={tty}, args=['sh', '-c', "
        "'trap \"exit 9\" USR1; echo ready; while :; do sleep 0.05; done'])\n"
        f"sys.exit(run_container(spec, {state_dir!r}).exit_code)\n")
    runner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert runner.stdout is not None and runner.stdout.readline().rstrip(b"\r\n") == b"ready"
        runner.send_signal(signal.SIGUSR1)
        assert runner.wait(timeout=10) == 9
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_dead_caller_takes_the_container_down(rootfs: Path, state_dir: str,
                                             tmp_path: Path) -> None:
    script = tmp_path / "runner.py"
    script.write_text(
        "import sys\nfrom layerfs.runtime import ContainerSpec, run_container\n"
        f"spec = ContainerSpec(rootfs={str(rootfs)!r}, cgroup_name='layerfs-test-orphan', "
        "args=['sh', '-c', 'echo $PPID; sleep 30'])\n"
        f"run_container(spec, {state_dir!r})\n")
    runner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert runner.stdout is not None and runner.stdout.readline() == b"0\n"
        cgroups = [os.path.join(p, "layerfs-test-orphan") for p in parent_dirs()]
        assert all(os.path.isdir(p) for p in cgroups)
    finally:
        runner.kill()  # SIGKILL: the runner cannot clean up itself
        runner.wait()
    # The shim notices the hang-up, kills the container and removes its cgroup.
    _wait_for(lambda: not any(os.path.exists(p) for p in cgroups))


def test_command_is_pid_1(run: Run) -> None:
    assert run("echo $$; cat /proc/1/comm; true").out == "1\nsh\n"


def test_hostname(run: Run) -> None:
    ran = run("hostname; cat /etc/hostname; grep -c box /etc/hosts", hostname="box")
    assert ran.out == "box\nbox\n1\n"


def test_default_hostname_is_the_id_prefix(rootfs: Path, state_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as handle:
        proc = start_container(ContainerSpec(rootfs=str(rootfs), args=["hostname"]), state_dir,
                               container_id="a" * 64, stdout=handle)
        proc.wait()
    assert out.read_text() == "a" * 12 + "\n"


def test_network_none_has_only_loopback_up(run: Run) -> None:
    ran = run("ls /sys/class/net; cat /sys/class/net/lo/operstate; ip -o -4 addr")
    lines = ran.out.splitlines()
    assert lines[0] == "lo" and lines[1] in ("unknown", "up")
    assert "127.0.0.1" in lines[2] and len(lines) == 3


def test_network_host_sees_host_interfaces(run: Run) -> None:
    ran = run("ls /sys/class/net", network="host")
    assert sorted(ran.out.split()) == sorted(os.listdir("/sys/class/net"))


def test_proc_is_the_containers(run: Run) -> None:
    ran = run("ls /proc | grep -c '^[0-9]'; grep -c . /proc/mounts >/dev/null && echo ok")
    count, ok = ran.out.split()
    # sh, ls and grep at most: the host's processes are invisible.
    assert int(count) <= 3 and ok == "ok"


def test_dev_holds_only_the_docker_devices(run: Run) -> None:
    ran = run("ls /dev; echo x > /dev/null && head -c 4 /dev/zero | wc -c")
    names = set(ran.out.split()[:-1])
    assert names == {"core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm",
                     "stderr", "stdin", "stdout", "tty", "urandom", "zero"}
    assert ran.out.split()[-1] == "4"


def test_mknod_device_cannot_be_opened(run: Run) -> None:
    # MKNOD is in docker's set, but nodev (and the v1 devices cgroup) make the
    # node useless: the host's disk stays out of reach.
    ran = run("mknod /tmp/disk b 254 0 && head -c 1 /tmp/disk; echo rc=$?")
    assert "rc=0" not in ran.out


def test_proc_sys_and_sysrq_are_read_only(run: Run) -> None:
    ran = run("echo b > /proc/sysrq-trigger; echo sysrq=$?; "
              "echo x > /proc/sys/kernel/hostname; echo sys=$?; "
              "grep -c ' /proc/sys proc ro,' /proc/mounts")
    assert "sysrq=0" not in ran.out and "sys=1" in ran.out
    assert ran.out.splitlines()[-1] == "1"
    assert "Read-only file system" in ran.err


def test_masked_paths(run: Run) -> None:
    ran = run("find /proc/acpi /sys/firmware -mindepth 1 2>/dev/null | wc -l; "
              "cat /proc/keys /proc/timer_list 2>/dev/null | wc -c")
    assert ran.out.split() == ["0", "0"]


def test_mount_is_denied(run: Run) -> None:
    ran = run("mount -t tmpfs none /mnt; echo rc=$?; grep -c ' /mnt ' /proc/mounts")
    assert "rc=0" not in ran.out and ran.out.splitlines()[-1] == "0"
    assert "denied" in ran.err or "not permitted" in ran.err


def test_host_is_invisible(run: Run, rootfs: Path) -> None:
    (rootfs.parent / "host-secret").write_text("secret")
    ran = run("ls -a /; ls /..; cat /proc/1/root/../host-secret; ls /work /tmp/pytest-of-root")
    listing = set(ran.out.split())
    assert listing == {".", "..", "bin", "dev", "etc", "home", "mnt", "proc", "root", "sys", "tmp"}
    assert "secret" not in ran.out


def test_pids_limit_stops_a_fork_bomb(run: Run) -> None:
    # Bounded: 40 short sleeps at most, and when sh (PID 1) gives up the
    # kernel kills the whole pid namespace.
    ran = run("for i in $(seq 40); do sleep 5 & echo started; done; wait", pids_limit=10)
    assert ran.code != 0 and "can't fork" in ran.err
    assert 1 <= ran.out.count("started") <= 9
    assert subprocess.run(["true"], check=False).returncode == 0  # the host still forks


def test_read_only_rootfs(run: Run) -> None:
    ran = run("touch /x; echo root=$?; touch /dev/shm/x; echo shm=$?", read_only=True)
    assert ran.out.split() == ["root=1", "shm=0"]
    assert "Read-only file system" in ran.err


def test_volumes_read_only_and_read_write(run: Run, tmp_path: Path) -> None:
    ro_dir, rw_dir = tmp_path / "ro", tmp_path / "rw"
    ro_dir.mkdir()
    rw_dir.mkdir()
    (ro_dir / "in").write_text("from host\n")
    single = tmp_path / "single.txt"
    single.write_text("one file\n")
    ran = run("cat /in/in /deep/file.txt; touch /in/x; echo ro=$?; "
              "echo hi > /out/made; echo rw=$?",
              volumes=[Volume(str(ro_dir), "/in", True), Volume(str(rw_dir), "/out", False),
                       Volume(str(single), "/deep/file.txt", True)])
    assert ran.out.split("\n")[:2] == ["from host", "one file"]
    assert "ro=1" in ran.out and "rw=0" in ran.out
    assert (rw_dir / "made").read_text() == "hi\n" and not (ro_dir / "x").exists()


def test_missing_volume_source_is_not_found(run: Run, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        run("true", volumes=[Volume(str(tmp_path / "nope"), "/x")])


@pytest.mark.parametrize("user, expected", [
    ("1000:1000", "1000 1000 1000 2000"),  # "user" (uid 1000) is listed in group extra
    ("user", "1000 1000 1000 2000"),
    ("nobody", "65534 65534 65534"),
    ("", "0 0 0"),
])
def test_user(run: Run, user: str, expected: str) -> None:
    assert run("echo $(id -u) $(id -g) $(id -G)", user=user).out.strip() == expected


def test_unknown_user_is_not_found(run: Run) -> None:
    with pytest.raises(NotFound, match="unable to find user ghost"):
        run("true", user="ghost")


def test_capabilities_match_docker(run: Run) -> None:
    status = dict(line.split(":\t") for line in run("grep -E 'Cap|NoNewPrivs' /proc/self/status")
                  .out.splitlines())
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == DOCKER_DEFAULT_CAPS
    assert status["CapInh"] == status["CapAmb"] == "0" * 16
    assert status["NoNewPrivs"] == "1"


def test_non_root_user_has_no_capabilities(run: Run) -> None:
    status = dict(line.split(":\t") for line in run("grep Cap /proc/self/status", user="1000")
                  .out.splitlines())
    assert status["CapEff"] == status["CapPrm"] == "0" * 16
    assert status["CapBnd"] == DOCKER_DEFAULT_CAPS


def test_env_and_cwd(run: Run) -> None:
    ran = run(["sh", "-c", "pwd; echo $A $B $HOME $HOSTNAME; echo $PATH"],
              env=["A=1", "B=two words", "PATH=/bin"], cwd="/work/dir", hostname="h")
    assert ran.out.splitlines() == ["/work/dir", "1 two words /root h", "/bin"]


def test_stdin_only_with_interactive(run: Run, rootfs: Path, state_dir: str,
                                     tmp_path: Path) -> None:
    assert run(["cat"]).out == ""  # /dev/null without -i
    source = tmp_path / "in"
    source.write_text("typed\n")
    with open(source, "rb") as stdin:
        spec = ContainerSpec(rootfs=str(rootfs), args=["cat"], interactive=True)
        out = tmp_path / "cat-out"
        with open(out, "wb") as stdout:
            proc = start_container(spec, state_dir, stdin=stdin, stdout=stdout)
            assert proc.wait().exit_code == 0
    assert out.read_text() == "typed\n"


def test_nofile_rlimit_capped_at_hard_limit(run: Run) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 1048576 if hard == resource.RLIM_INFINITY else min(hard, 1048576)
    assert run("ulimit -n").out.strip() == str(expected)


def test_cgroup_limits_applied_then_removed(rootfs: Path, state_dir: str) -> None:
    spec = ContainerSpec(rootfs=str(rootfs), args=["sleep", "30"], memory=64 << 20,
                         cpus=0.5, pids_limit=20, cgroup_name="layerfs-test-limits")
    proc = start_container(spec, state_dir)
    try:
        group = proc.cgroup
        if isinstance(group, V1Cgroup):
            paths = set(group.dirs.values())
            assert _read(group.dirs["memory"], "memory.limit_in_bytes") == str(64 << 20)
            assert _read(group.dirs["cpu"], "cpu.cfs_quota_us") == "50000"
            assert _read(group.dirs["pids"], "pids.max") == "20"
            assert str(proc.pid) in _read(group.dirs["memory"], "cgroup.procs").split()
        else:
            assert isinstance(group, V2Cgroup)
            paths = {group.path}
            assert _read(group.path, "memory.max") == str(64 << 20)
        stats = proc.stats()
        assert stats is not None and stats.pids == 1 and (stats.memory_bytes or 0) > 0
    finally:
        proc.kill()
        proc.wait()
    assert not any(os.path.exists(path) for path in paths)
    assert proc.stats() is None


def test_user_namespace(run: Run) -> None:
    userns = UserNamespace((IdMap(0, 100000, 65536),), (IdMap(0, 100000, 65536),))
    ran = run("id -u; cat /proc/self/uid_map; stat -c %u /bin/busybox; "
              "grep CapEff /proc/self/status", userns=userns)
    lines = ran.out.splitlines()
    assert lines[0] == "0" and lines[1].split() == ["0", "100000", "65536"]
    assert lines[2] == "65534"  # host root's files belong to nobody in here
    assert lines[3].endswith(DOCKER_DEFAULT_CAPS)


def test_symlinked_proc_is_refused(run: Run, rootfs: Path) -> None:
    (rootfs / "proc").symlink_to("/etc")
    with pytest.raises(InvalidInput, match="/proc"):
        run("true")


def test_setup_failure_raises_and_cleans_up(run: Run, rootfs: Path, tmp_path: Path) -> None:
    # A file where a directory volume must go: the bind mount fails in the shim.
    (rootfs / "clash").write_text("")
    source = tmp_path / "dir"
    source.mkdir()
    with pytest.raises(ContainerSetupError, match="clash"):
        run("true", volumes=[Volume(str(source), "/clash")])


def test_init_failure_raises_setup_error(run: Run, rootfs: Path) -> None:
    # /root is 0700 root: user 1000 cannot chdir there, after the privilege drop.
    os.chmod(rootfs / "root", 0o700)
    with pytest.raises(ContainerSetupError, match="chdir to working directory /root"):
        run("true", user="1000", cwd="/root")


def test_no_mount_leaks_to_the_host(run: Run, rootfs: Path) -> None:
    # Other tests on the host may mount things meanwhile, so look only for ours.
    run("true", volumes=[Volume("/tmp", "/hosttmp", True)], read_only=True)
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        assert str(rootfs) not in handle.read()


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name), encoding="ascii") as handle:
        return handle.read().strip()


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
