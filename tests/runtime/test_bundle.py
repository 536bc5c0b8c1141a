"""OCI bundles: the generated config.json, and runc/crun running it unchanged."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from layerfs.errors import InvalidInput, NotFound
from layerfs.runtime import ContainerSpec, IdMap, UserNamespace, Volume, bundle_config, run_bundle, write_bundle
from layerfs.runtime.spec import Tmpfs

DOCKER_DEFAULT_CAPS = "00000000a80425fb"


def _config(rootfs: Path, **fields: object) -> dict:
    spec = ContainerSpec(rootfs=str(rootfs), args=["sh", "-c", "true"],
                         **fields)  # type: ignore[arg-type]
    return bundle_config(spec, hostname="h")


def test_config_shape(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "passwd").write_text("app:x:1000:1000::/home/app:/bin/sh\n")
    config = _config(rootfs, user="app", memory=64 << 20, cpus=0.5, pids_limit=50,
                     read_only=True, volumes=[Volume(str(tmp_path), "/data", True)])
    assert config["ociVersion"] == "1.0.2"
    process = config["process"]
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": []}
    assert process["noNewPrivileges"] is True and process["terminal"] is False
    assert "HOME=/home/app" in process["env"] and "HOSTNAME=h" in process["env"]
    assert len(process["capabilities"]["bounding"]) == 14
    assert process["capabilities"]["inheritable"] == []
    nofile = process["rlimits"][0]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert nofile["type"] == "RLIMIT_NOFILE"
    assert hard == resource.RLIM_INFINITY or nofile["hard"] <= hard
    assert config["root"] == {"path": str(rootfs), "readonly": True}
    destinations = [m["destination"] for m in config["mounts"]]
    assert destinations == ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys",
                            "/sys/fs/cgroup", "/data"]
    assert "ro" in config["mounts"][-1]["options"]
    linux = config["linux"]
    assert {n["type"] for n in linux["namespaces"]} == {"pid", "ipc", "uts", "mount", "cgroup",
                                                        "network"}
    assert linux["resources"]["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert linux["resources"]["cpu"] == {"quota": 50000, "period": 100000}
    assert linux["resources"]["pids"] == {"limit": 50}
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]


def test_config_user_namespace_and_host_network(tmp_path: Path) -> None:
    userns = UserNamespace((IdMap(0, 100000, 65536),), (IdMap(0, 100000, 65536),))
    config = _config(tmp_path, userns=userns, network="host")
    kinds = {n["type"] for n in config["linux"]["namespaces"]}
    assert "user" in kinds and "network" not in kinds
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 100000,
                                               "size": 65536}]


def test_run_bundle_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        run_bundle(str(tmp_path), "id", runtime="docker")
    with pytest.raises(InvalidInput):
        run_bundle(str(tmp_path), "../id")
    if shutil.which("runc"):
        with pytest.raises(NotFound):
            run_bundle(str(tmp_path), "id")


def _bundle(rootfs: Path, tmp_path: Path, script: str, **fields: object) -> str:
    bundle = tmp_path / "bundle"
    spec = ContainerSpec(rootfs=str(rootfs), args=["sh", "-c", script],
                         **fields)  # type: ignore[arg-type]
    write_bundle(spec, str(bundle), state_dir=str(tmp_path / "state"))
    return str(bundle)


def _run(runtime: str, bundle: str, tmp_path: Path, **options: object) -> tuple[int, str, str]:
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        code = run_bundle(bundle, f"layerfs-test-{uuid.uuid4().hex[:12]}", runtime,
                          stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                          timeout=60, **options)  # type: ignore[arg-type]
    return code, out.read_text(), err.read_text()


SCRIPT = ("echo hi; grep CapEff /proc/self/status; hostname; "
          "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null "
          "|| cat /sys/fs/cgroup/memory.max; ls /sys/class/net; exit 3")


def _check_output(out: str) -> None:
    lines = out.splitlines()
    assert lines[0] == "hi" and lines[1].endswith(DOCKER_DEFAULT_CAPS)
    assert lines[2] == "layerfs" and lines[3] == str(64 << 20) and lines[4:] == ["lo"]


@pytest.mark.root
@pytest.mark.namespaces
@pytest.mark.tools("busybox", "runc")
def test_runc_runs_the_bundle(rootfs: Path, tmp_path: Path) -> None:
    bundle = _bundle(rootfs, tmp_path, SCRIPT, memory=64 << 20, pids_limit=50)
    code, out, err = _run("runc", bundle, tmp_path)
    assert code == 3, err
    _check_output(out)


@pytest.mark.root
@pytest.mark.namespaces
@pytest.mark.tools("busybox", "crun")
def test_crun_runs_the_bundle(rootfs: Path, tmp_path: Path) -> None:
    bundle = _bundle(rootfs, tmp_path, SCRIPT, memory=64 << 20, pids_limit=50)
    # On a v1/v2 hybrid crun 1.8 refuses to start unless the cgroup2 tree is
    # hidden; hide_cgroup2 does that in a private mount namespace.
    hybrid = os.path.ismount("/sys/fs/cgroup/unified")
    code, out, err = _run("crun", bundle, tmp_path, hide_cgroup2=hybrid)
    if "hybrid mode not supported" in err:
        pytest.skip("crun: cgroups in hybrid mode not supported here, even with cgroup2 hidden")
    assert code == 3, err
    _check_output(out)


@pytest.mark.root
@pytest.mark.namespaces
@pytest.mark.tools("busybox", "runc")
def test_runc_mounts_a_tmpfs(rootfs: Path, tmp_path: Path) -> None:
    bundle = _bundle(rootfs, tmp_path, "grep ' /scratch tmpfs ' /proc/mounts",
                     tmpfs=[Tmpfs("/scratch", 1 << 20)])
    code, out, err = _run("runc", bundle, tmp_path)
    assert code == 0, err
    assert "size=1024k" in out and "nosuid" in out


@pytest.mark.root
@pytest.mark.namespaces
@pytest.mark.tools("busybox", "runc")
def test_runc_bundle_as_non_root_user_read_only(rootfs: Path, tmp_path: Path) -> None:
    bundle = _bundle(rootfs, tmp_path, "id -u; touch /x 2>/dev/null || echo ro; "
                     "grep CapEff /proc/self/status", user="1000", read_only=True)
    code, out, err = _run("runc", bundle, tmp_path)
    assert code == 0, err
    assert out.splitlines() == ["1000", "ro", "CapEff:\t0000000000000000"]
