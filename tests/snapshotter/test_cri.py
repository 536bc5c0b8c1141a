"""The seed's Deployment run the way a kubelet runs it: a CRI client
talking to containerd, whose CRI plugin takes root filesystems from
``layerfs snapshotter``. Pods use the host network (no CNI plugins), so
each replica listens on its own port; the pause image is built by layerfs."""

from __future__ import annotations

import os
import shutil
import urllib.request

import pytest

from layerfs.fs import mount as fsmount
from layerfs.snapshotter import mounts as mnt
from layerfs.snapshotter import proto, records
from layerfs.store.store import Store
from layerfs.store.usage import tree_bytes
from tests.oci.conftest import free_port
from tests.snapshotter.harness import short_tmpdir, wait_for
from tests.snapshotter.node import Node

REPLICAS = 3


@pytest.fixture(scope="module")
def cri():
    return proto.load(os.path.dirname(os.path.abspath(__file__)), "cri_subset.proto")


@pytest.fixture
def cri_node(registry, images):
    base = short_tmpdir("lfs")
    n = Node(base, registry, sandbox_image=images.pause, cri=True).start()
    yield n
    n.stop()
    shutil.rmtree(base, ignore_errors=True)


def sandbox_config(pb, node, i: int):
    logs = os.path.join(node.base, "logs", f"web-{i}")
    os.makedirs(logs, exist_ok=True)
    host = pb.NamespaceOption(network=pb.NODE)
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=f"web-{i}", uid=f"uid-web-{i}", namespace="default", attempt=0),
        log_directory=logs, labels={"app": "web"},
        linux=pb.LinuxPodSandboxConfig(cgroup_parent=f"/{node.containerd.cgroup_parent}",
                                       security_context=pb.LinuxSandboxSecurityContext(namespace_options=host)))


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def test_three_replicas_of_a_web_server_through_the_cri(cri_node, images, cri):
    import grpc

    pb, svc = cri
    channel = grpc.insecure_channel(f"unix://{cri_node.containerd.address}")
    runtime, image_svc = svc.RuntimeServiceStub(channel), svc.ImageServiceStub(channel)
    assert runtime.Version(pb.VersionRequest(version="v1")).runtime_name == "containerd"

    image_ref = image_svc.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=images.web))).image_ref
    pods, containers, ports = [], [], []
    for i in range(REPLICAS):
        cfg = sandbox_config(pb, cri_node, i)
        pod = runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
        pods.append(pod)
        port = free_port()
        ports.append(port)
        ccfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="web"), image=pb.ImageSpec(image=image_ref),
            args=["httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"], log_path="web.log",
            linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE))))
        cid = runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod, config=ccfg,
                                                                sandbox_config=cfg)).container_id
        runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
        containers.append(cid)

    for cid, port in zip(containers, ports):
        status = runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
        assert status.state == pb.CONTAINER_RUNNING, status
        wait_for(lambda: _serves(port), f"replica on port {port}", timeout=30)
        assert get(f"http://127.0.0.1:{port}/") == b"hello from layerfs\n"

    res = runtime.ExecSync(pb.ExecSyncRequest(container_id=containers[0], cmd=["cat", "/www/index.html"], timeout=30))
    assert res.exit_code == 0 and res.stdout == b"hello from layerfs\n", res

    # every pod's rootfs (pause and web) is a layerfs union over layers
    # stored once: the replicas' uppers hold none of the image's bytes
    with Store(cri_node.root) as store:
        snaps = records.all_snapshots(store)
        active = [s for s in snaps if s.kind == "active"]
        assert len(active) == 2 * REPLICAS and all(s.mode == "fuse" for s in active)
        web = max((s for s in snaps if s.kind == "committed"), key=lambda s: len(store.image(s.image_id).layers))
        image_bytes = sum(store.layer_info(lid)[0] for lid in store.image(web.image_id).layers)
        web_chain = len(store.image(web.image_id).layers)
        on_disk = sum(1 for _ in store.objects.iter_on_disk())
        assert on_disk == store.db.value("SELECT COUNT(*) FROM objects")  # one file per distinct content
    uppers = sum(tree_bytes(mnt.dirs(cri_node.root, s.id).upper) for s in active)
    assert image_bytes > 500_000 and uppers < image_bytes / 10, (uppers, image_bytes)
    # the pause image is the web image's busybox base: its one layer was
    # unpacked once, so the committed snapshots are exactly the web chain
    assert len([s for s in snaps if s.kind == "committed"]) == web_chain

    for cid in containers:
        runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2))
        runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    for pod in pods:
        runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
        runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    image_svc.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_ref)))
    channel.close()

    # containerd's GC removes the pods' snapshots; nothing stays mounted
    wait_for(lambda: not [s for s in _snapshots(cri_node.root) if s.kind == "active"],
             "containerd removing the pods' snapshots", timeout=60)
    assert fsmount.list_mounts(cri_node.root) == []
    prefix = os.path.realpath(cri_node.base)
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if prefix in line]


def _serves(port: int) -> bool:
    try:
        get(f"http://127.0.0.1:{port}/")
        return True
    except OSError:
        return False


def _snapshots(root: str) -> list[records.Snapshot]:
    with Store(root) as store:
        return records.all_snapshots(store)
