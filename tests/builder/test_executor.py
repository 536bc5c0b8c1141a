"""The build executor against a real store, on a busybox base."""

from __future__ import annotations

import os

import pytest

from layerfs.builder import executor
from layerfs.builder.context import BuildContextError
from layerfs.builder.executor import BuildError, BuildOptions, build
from layerfs.errors import InvalidInput, NotFound
from tests.builder.helpers import make_context

pytestmark = [pytest.mark.root, pytest.mark.tools("busybox")]


_ctx = make_context


def _build(store, ctx, **kw):
    lines: list[str] = []
    result = build(store, BuildOptions(context=ctx, **kw), lines.append)
    return result, lines


def test_metadata_only(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nENV A=1 B=${A}x\nLABEL k=v\nEXPOSE 80 53/udp\n"
                         "VOLUME /data\nUSER 1000\nSTOPSIGNAL SIGTERM\nENTRYPOINT [\"sh\"]\nCMD echo hi\n"
                         "ARG X=1\nONBUILD ENV Z=1\nHEALTHCHECK --retries=2 CMD true\nSHELL [\"/bin/sh\", \"-ec\"]\n")
    result, lines = _build(store, ctx, tags=("meta:1",))
    image = result.image
    assert image.layers == base.layers
    rc = image.runtime_config
    # Like docker: a variable set on the same ENV line is not seen by it.
    assert "A=1" in rc["Env"] and "B=x" in rc["Env"]
    assert rc["Labels"] == {"k": "v"}
    assert rc["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert rc["Volumes"] == {"/data": {}}
    assert rc["User"] == "1000" and rc["StopSignal"] == "SIGTERM"
    assert rc["Entrypoint"] == ["sh"] and rc["Cmd"] == ["/bin/sh", "-c", "echo hi"]
    assert rc["OnBuild"] == ["ENV Z=1"]
    assert rc["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Retries": 2}
    assert rc["Shell"] == ["/bin/sh", "-ec"]
    new_rows = image.history[len(base.history):]
    assert len(new_rows) == 12 and all(h.get("empty_layer") for h in new_rows)
    assert lines[0] == "Step 1/13 : FROM busybox:latest"
    assert lines[-2:] == [f"Successfully built {image.id[:12]}", "Successfully tagged meta:1"]
    assert store.image("meta:1").id == image.id
    # ONBUILD triggers run in a child.
    child = _ctx(tmp_path, "FROM meta:1\nLABEL c=1\n", name="child")
    result2, _ = _build(store, child)
    assert "Z=1" in result2.image.runtime_config["Env"]
    assert "OnBuild" not in result2.image.runtime_config


def test_workdir_creates_layer_and_copy(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nWORKDIR /app\nCOPY a.txt ./\nCOPY --chown=7:8 --chmod=600 d /data/\n",
               {"a.txt": "hello\n", "d/sub/y": "y\n"})
    result, _ = _build(store, ctx)
    tree = store.merged_tree(result.image)
    assert tree.entries["app"].kind == "dir"
    assert store.objects.read(tree.entries["app/a.txt"].digest) == b"hello\n"
    y = tree.entries["data/sub/y"]
    assert (y.uid, y.gid, y.mode & 0o777) == (7, 8, 0o600)
    assert result.image.runtime_config["WorkingDir"] == "/app"
    assert len(result.image.layers) == len(base.layers) + 3


def test_copy_cache_hit_and_invalidation(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY a.txt /a\nCOPY b.txt /b\nENV X=1\n",
               {"a.txt": "a\n", "b.txt": "b\n"})
    first, _ = _build(store, ctx)
    again, lines = _build(store, ctx)
    assert again.image.id == first.image.id and again.image.layers == first.image.layers
    assert lines.count(" ---> Using cache") == 3
    with open(os.path.join(ctx, "b.txt"), "w") as f:
        f.write("changed\n")
    third, lines = _build(store, ctx)
    assert lines.count(" ---> Using cache") == 1  # COPY a.txt only
    assert third.image.layers[:-1] == first.image.layers[:-1]
    assert third.image.layers[-1] != first.image.layers[-1]
    # --no-cache: nothing reused, but byte-identical COPY gives the same layer.
    fourth, lines = _build(store, ctx, no_cache=True)
    assert " ---> Using cache" not in lines
    assert fourth.image.layers == third.image.layers
    assert executor.prune_cache(store) > 0
    _, lines = _build(store, ctx)
    assert " ---> Using cache" not in lines


def test_two_dockerfiles_share_layers(store, base, tmp_path):
    common = "FROM busybox:latest\nENV APP=/app\nWORKDIR $APP\nCOPY shared.txt ./\n"
    one = _ctx(tmp_path, common + "COPY one.txt ./\n", {"shared.txt": "s\n", "one.txt": "1\n"}, name="one")
    two = _ctx(tmp_path, common + "COPY two.txt ./\n", {"shared.txt": "s\n", "two.txt": "2\n"}, name="two")
    a, _ = _build(store, one, tags=("pair:one",))
    b, lines = _build(store, two, tags=("pair:two",))
    assert lines.count(" ---> Using cache") == 3
    assert a.image.layers[:-1] == b.image.layers[:-1]
    assert a.image.layers[-1] != b.image.layers[-1]
    assert a.image.history[:-1] == b.image.history[:-1]


def test_multistage_builds_only_required(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest AS unused\nLABEL u=1\n"
                         "FROM busybox:latest AS src\nCOPY a.txt /made\n"
                         "FROM scratch\nCOPY --from=src /made /copied\n", {"a.txt": "A\n"})
    result, lines = _build(store, ctx)
    assert not any("LABEL u=1" in line for line in lines)
    tree = store.merged_tree(result.image)
    assert store.objects.read(tree.entries["copied"].digest) == b"A\n"
    assert "bin" not in tree.entries


def test_source_date_epoch_clamps(store, base, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000")
    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY a.txt /a\nLABEL x=1\n", {"a.txt": "a\n"})
    r1, _ = _build(store, ctx)
    r2, _ = _build(store, ctx, no_cache=True)
    assert r1.image.id == r2.image.id
    assert store.merged_tree(r1.image).entries["a"].mtime_ns == 1000 * 10**9
    assert r1.image.history[-1]["created"] == "1970-01-01T00:16:40Z"


def test_missing_source(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY nope.txt /x\n")
    with pytest.raises(BuildContextError, match="nope.txt"):
        _build(store, ctx, tags=("bad:1",))
    with pytest.raises(NotFound):
        store.image("bad:1")


def test_escaping_source(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY ../secret /x\n")
    (tmp_path / "secret").write_text("s")
    with pytest.raises(BuildContextError, match="outside the build context"):
        _build(store, ctx)


def test_from_unknown_image(store, tmp_path):
    ctx = _ctx(tmp_path, "FROM nosuch:1\n")
    with pytest.raises(NotFound) as info:
        _build(store, ctx)
    assert "layerfs pull" in str(info.value) and "bootstrap" in str(info.value)


def test_empty_dockerfile(store, tmp_path):
    ctx = _ctx(tmp_path, "# nothing here\n")
    with pytest.raises(InvalidInput):
        _build(store, ctx)


def test_bad_tag_rejected_before_building(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\n")
    with pytest.raises(InvalidInput):
        _build(store, ctx, tags=("Bad Tag",))



@pytest.mark.fuse
def test_run_step(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nRUN echo hi > /x\n")
    result, lines = _build(store, ctx, tags=("run:1",))
    tree = store.merged_tree(result.image)
    assert store.objects.read(tree.entries["x"].digest) == b"hi\n"
    assert not os.listdir(store.tmp_dir)


@pytest.mark.fuse
def test_run_layer_has_no_runtime_mountpoints(store, base, tmp_path):
    """The runtime makes /etc/hosts, /etc/hostname, /etc/resolv.conf (and
    /proc, /dev, /sys on bases without them) to mount on; like commit, and
    like docker, the step's layer leaves them out."""
    from layerfs.store import fsck
    from layerfs.store.tree import diff

    ctx = _ctx(tmp_path, "FROM busybox:latest\nRUN echo x > /x\n")
    result, _ = _build(store, ctx)
    assert {e.path for e in store.layer_entries(result.image.layers[-1])} == {"", "x"}
    changed = diff(store.merged_tree(base), store.merged_tree(result.image))
    assert {e.path for e in changed} - {""} == {"x"}
    assert fsck.check(store).clean


@pytest.mark.fuse
def test_failed_run_tags_nothing(store, base, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:latest\nRUN echo oops; exit 3\n")
    lines: list[str] = []
    with pytest.raises(BuildError) as info:
        build(store, BuildOptions(context=ctx, tags=("fail:1",)), lines.append)
    # The step's status is in the message, not layerfs's exit status
    # (3 would mean "damaged store").
    assert info.value.exit_code == 1 and info.value.step_exit_code == 3
    assert "returned a non-zero code: 3" in str(info.value)
    assert "oops" in lines
    with pytest.raises(NotFound):
        store.image("fail:1")
    assert not os.listdir(store.tmp_dir)
    with open("/proc/mounts") as f:
        assert store.root not in f.read()


def test_chown_by_name_add_tar_and_from_image(store, base, tmp_path):
    import tarfile

    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY --chown=nobody:nogroup a.txt /owned\n"
                         "ADD pack.tar /unpacked/\nCOPY --from=busybox:latest /etc/group /g\n",
               {"a.txt": "a\n", "inner/f": "f\n"})
    with tarfile.open(os.path.join(ctx, "pack.tar"), "w") as tf:
        tf.add(os.path.join(ctx, "inner", "f"), arcname="dir/f")
    result, _ = _build(store, ctx)
    tree = store.merged_tree(result.image)
    assert (tree.entries["owned"].uid, tree.entries["owned"].gid) == (65534, 65534)
    assert store.objects.read(tree.entries["unpacked/dir/f"].digest) == b"f\n"
    assert tree.entries["g"].digest == tree.entries["etc/group"].digest
    assert not os.listdir(store.tmp_dir)


def test_target_and_build_arg(store, base, tmp_path):
    ctx = _ctx(tmp_path, "ARG BASE=busybox:latest\nFROM $BASE AS one\nARG V=default\nLABEL v=$V\n"
                         "FROM one AS two\nLABEL two=1\n")
    result, lines = _build(store, ctx, target="one", build_args={"V": "given", "UNUSED": "1"})
    assert result.image.runtime_config["Labels"] == {"v": "given"}
    assert not any("two=1" in line for line in lines)
    assert any("[UNUSED]" in line for line in lines)


def test_cli_build_and_prune(store_root, tmp_path):
    from tests.conftest import layerfs_cmd

    layerfs_cmd("bootstrap", "busybox", root=store_root, check=True)
    ctx = _ctx(tmp_path, "FROM busybox:latest\nCOPY a.txt /a\n", {"a.txt": "a\n"})
    out = layerfs_cmd("build", "-t", "cli:1", "-t", "cli:2", ctx, root=store_root, check=True).stdout.decode()
    assert "Step 2/2 : COPY a.txt /a" in out and "Successfully tagged cli:2" in out
    quiet = layerfs_cmd("build", "-q", ctx, root=store_root, check=True).stdout.decode().split()
    assert len(quiet) == 1 and len(quiet[0]) == 64
    assert "Deleted 1 build cache record" in layerfs_cmd("builder", "prune", root=store_root,
                                                          check=True).stdout.decode()
    bad = layerfs_cmd("build", str(tmp_path / "nowhere"), root=store_root)
    assert bad.returncode != 0 and b"Traceback" not in bad.stderr


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "busybox-pair")


@pytest.mark.fuse
def test_busybox_pair_example_shares_layers(store, base):
    a, _ = _build(store, EXAMPLES, dockerfile="Dockerfile.first", tags=("pair:first",))
    b, lines = _build(store, EXAMPLES, dockerfile="Dockerfile.second", tags=("pair:second",))
    assert lines.count(" ---> Using cache") == 5
    assert a.image.layers[:-1] == b.image.layers[:-1]
    assert a.image.layers[-1] != b.image.layers[-1]
    tree = store.merged_tree(b.image)
    assert store.objects.read(tree.entries["app/second.txt"].digest) == b"second\n"
