"""RUN --mount (secret, cache, bind, tmpfs), build --secret, RUN --network
and the predefined proxy args, through real builds on a busybox base."""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from layerfs.builder import run_mounts
from layerfs.builder.executor import BuildError, BuildOptions, build, prune_cache
from layerfs.builder.run_mounts import RunMount, SecretSource, parse_mount, parse_secret
from layerfs.errors import InvalidInput, NotFound, Unsupported
from layerfs.store.layout import StoreLayout
from tests.builder.helpers import make_context
from tests.conftest import layerfs_cmd

needs_fuse = [pytest.mark.fuse, pytest.mark.tools("busybox")]


def _fuse(fn):
    for m in needs_fuse:
        fn = m(fn)
    return fn


def _build(store, ctx, **kw):
    lines: list[str] = []
    result = build(store, BuildOptions(context=ctx, **kw), lines.append)
    return result, lines


def _layer_paths(store, image) -> set[str]:
    return {e.path for e in store.layer_entries(image.layers[-1])}


def _all_layer_bytes(store, image) -> bytes:
    """Every file's content in every layer, and every manifest and config."""
    out = [json.dumps(image.config).encode()]
    for lid in image.layers:
        with open(store.layer_manifest_path(lid), "rb") as f:
            out.append(f.read())
        for e in store.layer_entries(lid):
            if e.digest:
                out.append(store.objects.read(e.digest))
    return b"\n".join(out)


# -- parsing ---------------------------------------------------------------------

def test_parse_defaults():
    assert parse_mount("target=/x") == RunMount("bind", "/x", readonly=True)
    assert parse_mount("type=bind,src=a,dst=/x,rw") == RunMount("bind", "/x", source="a", readonly=False)
    cache = parse_mount("type=cache,target=/root/.cache")
    assert (cache.id, cache.sharing, cache.readonly, cache.mode) == ("/root/.cache", "shared", False, None)
    assert parse_mount("type=cache,target=rel,id=c,ro", workdir="/app").target == "/app/rel"
    secret = parse_mount("type=secret,id=aws")
    assert (secret.target, secret.readonly, secret.required) == ("/run/secrets/aws", True, False)
    assert parse_mount("type=secret,target=/root/.netrc,required").id == ".netrc"
    assert parse_mount("type=secret,source=tok,env=TOKEN") == RunMount("secret", "", readonly=True,
                                                                     id="tok", env="TOKEN")
    assert parse_mount("type=secret,id=k,mode=0440,uid=1,gid=2").mode == 0o440
    assert parse_mount("type=tmpfs,target=/t,size=1m").size == 1 << 20
    assert parse_mount("type=cache,target=/c,from=stage,source=sub").from_ == "stage"


@pytest.mark.parametrize("spec, message", [
    ("type=foo,target=/x", "unsupported mount type 'foo'"),
    ("type=cache", "a cache mount needs a target"),
    ("type=bind,target=/x,bogus=1", "unexpected key 'bogus'"),
    ("type=cache,target=/x,sharing=all", "unsupported sharing value 'all'"),
    ("type=tmpfs,target=/x,mode=0700", "mode is not valid for type=tmpfs"),
    ("type=bind,target=/x,sharing=locked", "sharing is not valid for type=bind"),
    ("type=secret", "a secret mount needs an id or a target"),
    ("type=secret,id=a,source=b", "both source and id are set"),
    ("type=cache,target=/x,mode=999", "invalid mode '999'"),
    ("type=cache,target=/x,uid=-1", "invalid uid '-1'"),
    ("type=bind,target=/x,ro=maybe", "invalid value 'maybe' for ro"),
    ("type=tmpfs,target=/x,size=lots", "invalid memory size 'lots'"),
    ("type=bind,target=/", "cannot mount over /"),
    ("type=bind,target", "invalid field 'target'"),
    ('type=bind,"target=/x', "--mount="),
])
def test_parse_rejects(spec, message):
    with pytest.raises(InvalidInput) as info:
        parse_mount(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_parse_ssh_is_unsupported():
    with pytest.raises(Unsupported):
        parse_mount("type=ssh")


def test_parse_secret(tmp_path, monkeypatch):
    f = tmp_path / "s"
    f.write_text("x")
    assert parse_secret(f"id=a,src={f}") == SecretSource("a", str(f))
    assert parse_secret("id=a,env=HOME") == SecretSource("a", env="HOME")
    assert parse_secret("id=HOME,type=env") == SecretSource("HOME", env="HOME")
    monkeypatch.setenv("LAYERFS_TEST_SECRET", "v")
    assert parse_secret("id=LAYERFS_TEST_SECRET") == SecretSource("LAYERFS_TEST_SECRET", env="LAYERFS_TEST_SECRET")
    monkeypatch.chdir(tmp_path)
    assert parse_secret("id=s") == SecretSource("s", str(f))  # no such variable: a file
    big = tmp_path / "big"
    big.write_bytes(b"0" * (run_mounts.MAX_SECRET_SIZE + 1))
    for bad, message in ((f"src={f}", "id is required"), ("id=a,src=/nonexistent", "cannot use /nonexistent"),
                         ("id=a,type=socket", "unsupported secret type"), ("id=a,bogus=1", "unexpected key"),
                         (f"id=a,src={tmp_path}", "not a regular file"), (f"id=a,src={big}", "too big")):
        with pytest.raises(InvalidInput, match=message):
            parse_secret(bad)


def test_cache_sharing_private_takes_a_free_instance(tmp_path):
    def prep(sharing):
        m = RunMount("cache", "/c", id="one", sharing=sharing)
        return run_mounts.prepare((m,), store_root=str(tmp_path), tmp_dir=str(tmp_path),
                                  secrets={}, fill=None, from_ids={})  # type: ignore[arg-type]

    first, second = prep("private"), prep("private")
    try:
        assert first.binds[0][0] != second.binds[0][0]  # the first is still held
    finally:
        first.close()
        second.close()
    shared = [prep("shared"), prep("shared")]
    try:
        assert shared[0].binds[0][0] == shared[1].binds[0][0] == first.binds[0][0]
        assert run_mounts.prune_cache_mounts(str(tmp_path))[0] == 1  # the one in use stays
    finally:
        for p in shared:
            p.close()
    assert run_mounts.prune_cache_mounts(str(tmp_path))[0] == 1
    assert not os.listdir(StoreLayout(str(tmp_path)).cache_mounts)


# -- real builds -----------------------------------------------------------------

@_fuse
def test_secret_readable_in_run_absent_from_image(store, base, tmp_path):
    secret = "s3cr3t-" + os.urandom(8).hex()
    src = tmp_path / "token"
    src.write_text(secret)
    ctx = make_context(tmp_path, "FROM busybox:latest\n"
                       "RUN --mount=type=secret,id=tok cat /run/secrets/tok; echo; "
                       "stat -c %a:%u:%g /run/secrets/tok; echo built > /out\n"
                       "RUN --mount=type=secret,id=tok,target=/etc/tok,mode=0440,uid=5,gid=6 "
                       "--mount=type=secret,id=tok,env=TOK,target= "
                       "stat -c %a:%u:%g /etc/tok; echo \"env:$TOK\"\n")
    secrets = {"tok": SecretSource("tok", str(src))}
    result, lines = _build(store, ctx, secrets=secrets, tags=("sec:1",))
    assert secret in lines and "400:0:0" in lines
    assert "440:5:6" in lines and f"env:{secret}" in lines
    assert secret.encode() not in _all_layer_bytes(store, result.image)
    for lid in result.image.layers[1:]:
        paths = {e.path for e in store.layer_entries(lid)}
        assert not any(p.startswith(("run", "etc/tok")) for p in paths), paths
    # The secret's content is not in the key: a new value still hits the cache.
    src.write_text("another value")
    _, again = _build(store, ctx, secrets=secrets)
    assert again.count(" ---> Using cache") == 2
    assert not os.listdir(store.tmp_dir)
    for name in os.listdir("/dev/shm"):  # other builds may be running: look for ours
        if name.startswith("layerfs-secret-"):
            for f in os.listdir(os.path.join("/dev/shm", name)):
                with open(os.path.join("/dev/shm", name, f), "rb") as fh:
                    assert secret.encode() not in fh.read()


@_fuse
def test_secret_optional_and_required(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\n"
                       "RUN --mount=type=secret,id=absent test ! -e /run/secrets/absent && echo skipped\n")
    _, lines = _build(store, ctx)
    assert "skipped" in lines
    ctx = make_context(tmp_path, "FROM busybox:latest\nRUN --mount=type=secret,id=absent,required true\n",
                       name="ctx2")
    with pytest.raises(NotFound, match="secret absent not found"):
        _build(store, ctx)


@_fuse
def test_cache_mount_persists_and_stays_out_of_the_layer(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\n"
                       "RUN --mount=type=cache,target=/var/cache/app,mode=0700,uid=7 "
                       "--mount=type=cache,id=other,target=/c2 "
                       "echo run >> /var/cache/app/log; echo \"runs:$(wc -l < /var/cache/app/log)\"; "
                       "stat -c %a:%u /var/cache/app; touch /c2/x; echo done > /done\n")
    first, lines = _build(store, ctx)
    assert "runs:1" in lines and "700:7" in lines
    assert _layer_paths(store, first.image) == {"", "done"}
    # Same instruction: a cache hit whatever the cache mount holds.
    _, lines = _build(store, ctx)
    assert " ---> Using cache" in lines
    _, lines = _build(store, ctx, no_cache=True)
    assert "runs:2" in lines
    prune_cache(store)
    assert not os.path.exists(os.path.join(store.layout.cache_mounts, "x"))
    _, lines = _build(store, ctx)
    assert "runs:1" in lines


@_fuse
def test_cache_mount_shared_by_id_across_targets(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\n"
                       "RUN --mount=type=cache,id=pkgs,target=/a echo hi > /a/f\n"
                       "RUN --mount=type=cache,id=pkgs,target=/b,ro cat /b/f; ! touch /b/g 2>/dev/null\n")
    _, lines = _build(store, ctx)
    assert "hi" in lines


@_fuse
def test_bind_context_read_only_and_rw_discarded(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\n"
                       "RUN --mount=type=bind,source=src,target=/src cat /src/a.txt; ls /src\n"
                       "WORKDIR /w\nRUN --mount=source=src/a.txt,target=one cat /w/one\n"
                       "RUN --mount=target=/ctx,rw echo scribble > /ctx/new; echo x >> /ctx/src/a.txt; "
                       "echo ok > /kept\n",
                       {"src/a.txt": "from-context\n", "src/secret.env": "hidden\n", ".dockerignore": "**/*.env\n"})
    result, lines = _build(store, ctx)
    assert lines.count("from-context") == 2 and "a.txt" in lines and "secret.env" not in lines
    assert not os.path.exists(os.path.join(ctx, "new"))
    with open(os.path.join(ctx, "src", "a.txt")) as f:
        assert f.read() == "from-context\n"
    assert _layer_paths(store, result.image) == {"", "kept"}
    assert "w/one" not in store.merged_tree(result.image).entries
    # The bound files are an input: changing one runs the step again.
    _, lines = _build(store, ctx)
    assert lines.count(" ---> Using cache") == 4
    with open(os.path.join(ctx, "src", "a.txt"), "w") as f:
        f.write("edited\n")
    _, lines = _build(store, ctx)
    assert lines.count("edited") == 2


@_fuse
def test_bind_read_only_refuses_writes(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nRUN --mount=type=bind,target=/ctx echo x > /ctx/f\n",
                       {"f": "f\n"})
    with pytest.raises(BuildError):
        _build(store, ctx)
    with open(os.path.join(ctx, "f")) as f:
        assert f.read() == "f\n"


@_fuse
def test_bind_and_cache_from_a_stage(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest AS tools\nRUN mkdir /out && echo built-in-stage > /out/t\n"
                       "FROM busybox:latest\n"
                       "RUN --mount=from=tools,source=/out,target=/tools cat /tools/t\n"
                       "RUN --mount=type=cache,from=tools,source=/out,target=/seeded cat /seeded/t\n")
    _, lines = _build(store, ctx)
    assert lines.count("built-in-stage") == 2
    bad = make_context(tmp_path, "FROM busybox:latest\nRUN --mount=from=busybox:latest,source=/nope,target=/x true\n",
                       name="bad")
    with pytest.raises(InvalidInput, match="no such file or directory"):
        _build(store, bad)


@_fuse
def test_tmpfs_is_empty_and_discarded(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nRUN mkdir /t && echo below > /t/old\n"
                       "RUN --mount=type=tmpfs,target=/t,size=1m test -z \"$(ls -A /t)\" && "
                       "grep ' /t tmpfs' /proc/mounts && echo scratch > /t/new && echo ok > /ran\n")
    result, lines = _build(store, ctx)
    assert any("size=1024k" in line for line in lines)
    assert _layer_paths(store, result.image) == {"", "ran"}
    tree = store.merged_tree(result.image)
    assert "t/old" in tree.entries and "t/new" not in tree.entries


@_fuse
def test_plain_run_layer_holds_no_mount_stubs(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nRUN echo hi > /x\n")
    result, _ = _build(store, ctx)
    # Before: an empty etc/hosts and etc/resolv.conf, the runtime's mountpoints.
    assert _layer_paths(store, result.image) == {"", "x"}
    assert store.merged_tree(result.image).entries["etc"] == store.merged_tree(base).entries["etc"]


@_fuse
def test_run_keeps_a_stub_it_filled(store, base, tmp_path):
    # /new and /new/t are stubs for the tmpfs; the command writes into
    # /new, so /new is the command's (kept) and only the empty /new/t goes:
    # the same rule commit uses (rootpath.is_unused_mountpoint).
    ctx = make_context(tmp_path, "FROM busybox:latest\nRUN --mount=type=tmpfs,target=/new/t echo hi > /new/f\n")
    result, _ = _build(store, ctx)
    assert _layer_paths(store, result.image) == {"", "new", "new/f"}


@_fuse
def test_run_network_flag(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nRUN --network=none echo \"ifs:$(ls /sys/class/net)\"\n"
                       "RUN --network=default true\n")
    _, lines = _build(store, ctx)
    assert "ifs:lo" in lines
    bad = make_context(tmp_path, "FROM busybox:latest\nRUN --network=bridge true\n", name="bad")
    with pytest.raises(InvalidInput, match="want default, none or host"):
        _build(store, bad)


@_fuse
def test_proxy_args_reach_run_not_history_config_or_key(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nRUN echo \"p=$HTTPS_PROXY n=$no_proxy\" > /seen; cat /seen\n")
    args = {"HTTPS_PROXY": "http://user:pw@proxy.example:3128", "no_proxy": "localhost"}
    result, lines = _build(store, ctx, build_args=args, tags=("proxy:1",))
    assert "p=http://user:pw@proxy.example:3128 n=localhost" in lines
    assert not any("Warning" in line for line in lines)
    text = json.dumps(result.image.config)
    assert "proxy.example" not in text and "localhost" not in text
    # Another proxy is not another step: docker and BuildKit keep it out of the key.
    _, lines = _build(store, ctx, build_args={"HTTPS_PROXY": "http://other:1"})
    assert " ---> Using cache" in lines
    # Declared with ARG, it is an ordinary build arg, key included.
    declared = make_context(tmp_path, "FROM busybox:latest\nARG HTTPS_PROXY\nRUN echo \"p=$HTTPS_PROXY\"\n",
                            name="declared")
    _build(store, declared, build_args=args)
    _, lines = _build(store, declared, build_args={"HTTPS_PROXY": "http://other:1"})
    assert "p=http://other:1" in lines


@_fuse
def test_cli_secret_and_prune(store_root, tmp_path):
    layerfs_cmd("bootstrap", "busybox", root=store_root, check=True)
    src = tmp_path / "ca.pem"
    src.write_text("PEM-" + os.urandom(4).hex())
    ctx = make_context(tmp_path, "FROM busybox:latest\n"
                       "RUN --mount=type=secret,id=cacert --mount=type=cache,target=/c "
                       "wc -c < /run/secrets/cacert > /len; echo x > /c/y\n")
    layerfs_cmd("build", "--secret", f"id=cacert,src={src}", "-t", "s:1", ctx, root=store_root, check=True)
    history = layerfs_cmd("history", "--no-trunc", "s:1", root=store_root, check=True).stdout.decode()
    assert "RUN" in history and src.read_text() not in history
    layerfs_cmd("export", "-o", str(tmp_path / "out.tar"), "s:1", root=store_root, check=True)
    with tarfile.open(tmp_path / "out.tar") as tf:
        names = {n.removeprefix("./") for n in tf.getnames()}
        assert "len" in names and not any(n.startswith(("run/", "c/")) for n in names), names
        member = tf.getmember(next(n for n in tf.getnames() if n.endswith("len")))
        assert tf.extractfile(member).read().strip() == str(len(src.read_text())).encode()
    out = layerfs_cmd("builder", "prune", root=store_root, check=True).stdout.decode()
    assert "Deleted 1 cache mount" in out


@pytest.mark.root
@pytest.mark.tools("busybox")
@pytest.mark.parametrize("args, dockerfile, message", [
    ((), "FROM busybox:latest\nRUN --mount=type=cache,sharing=all,target=/x true\n",
     "Dockerfile:2: --mount=type=cache,sharing=all,target=/x: unsupported sharing value 'all'"),
    ((), "FROM busybox:latest\nRUN --mount=type=tmpfs true\n", "Dockerfile:2: --mount=type=tmpfs: a tmpfs mount needs"),
    ((), "FROM busybox:latest\nRUN --mount=source=../x,target=/x true\n", "Dockerfile:2: "),
    (("--secret", "src=/etc/hostname"), "FROM busybox:latest\n", "--secret src=/etc/hostname: id is required"),
    (("--secret", "id=a,src=/nonexistent"), "FROM busybox:latest\n", "cannot use /nonexistent"),
])
def test_cli_bad_mount_specs(store_root, tmp_path, args, dockerfile, message):
    layerfs_cmd("bootstrap", "busybox", root=store_root, check=True)
    proc = layerfs_cmd("build", *args, make_context(tmp_path, dockerfile), root=store_root)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("Error: ") and message in err, err


def test_example_pair_mounts_parse_and_differ_only_in_the_pip_step():
    from layerfs.builder import dockerfile as dfm

    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "numpy-matplotlib")
    parsed = []
    for name in ("Dockerfile.numpy", "Dockerfile.matplotlib"):
        with open(os.path.join(examples, name)) as f:
            df = dfm.parse(f.read(), file=name)
        runs = [i for i in df.stages[0].instructions if isinstance(i, dfm.Run)]
        mounts = [parse_mount(m) for r in runs for m in r.mounts]
        assert {m.type for m in mounts} == {"cache", "secret"}
        assert any(m.type == "secret" and m.id == "cacert" and not m.required for m in mounts)
        parsed.append([i.original for i in df.stages[0].instructions])
    numpy, matplotlib = parsed
    assert numpy[:-2] == matplotlib[:-2] and numpy[-2] != matplotlib[-2]
    assert not os.path.exists(os.path.join(examples, "ca"))
