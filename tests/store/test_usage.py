"""df's per-image counts: build-step images apart, UNIQUE among shown images."""

from __future__ import annotations

import json
import os

from layerfs.store import images as img
from layerfs.store import transfer, usage
from layerfs.store.refs import Ref
from layerfs.store.store import Store
from tests.conftest import layerfs_cmd

SIZES = {"base": 1000, "step": 3000, "final": 4000, "other": 5000, "orphan": 6000}


def _layer(store: Store, tmp_path, name: str) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / f"{name}.bin").write_bytes(os.urandom(SIZES[name]))
    return transfer.import_layer(store, str(d), as_layer=True)


def _image(store: Store, parent: img.Image | None, lid: str) -> img.Image:
    cfg = img.with_layer(parent.config if parent else None, lid, img.history_entry("step"))
    return store.put_image(cfg)


def _build_like_store(store: Store, tmp_path) -> dict[str, img.Image]:
    """base:1 <- (build step) <- app:1, other:1 on base, and a build step
    whose final image is gone (its bytes are only the step's)."""
    base = _image(store, None, _layer(store, tmp_path, "base"))
    step = _image(store, base, _layer(store, tmp_path, "step"))
    final = _image(store, step, _layer(store, tmp_path, "final"))
    other = _image(store, base, _layer(store, tmp_path, "other"))
    orphan = _image(store, base, _layer(store, tmp_path, "orphan"))
    for im, tag in ((base, "base:1"), (final, "app:1"), (other, "other-" + "x" * 60 + ":1")):
        store.tag(im.id, tag)
    for key, im in (("k1", step), ("k2", final), ("k3", orphan)):
        store.add_ref(Ref("build-cache", key, image_id=im.id))
    return {"base": base, "step": step, "final": final, "other": other, "orphan": orphan}


def test_unique_counts_among_shown_images_and_steps_apart(tmp_path):
    with Store(str(tmp_path / "s")) as store:
        ims = _build_like_store(store, tmp_path)
        u = usage.measure(store)
    by_id = {r.image_id: r for r in u.images}
    row = {name: by_id[im.id] for name, im in ims.items()}
    assert {n for n, r in row.items() if r.build_step} == {"step", "orphan"}
    # The final image's unique bytes include its build step's layer: the
    # step is hidden, not another owner.
    assert row["final"].unique == SIZES["step"] + SIZES["final"]
    assert row["other"].unique == SIZES["other"]
    assert row["base"].unique == 0 and row["base"].shared_files == SIZES["base"]
    assert row["step"].unique == 0
    assert row["orphan"].unique == SIZES["orphan"]
    assert u.build_step_only == SIZES["orphan"]
    shown = ("base", "final", "other")
    assert u.logical == sum(row[n].logical for n in shown) + SIZES["orphan"]
    assert u.logical >= u.layer_level


def test_df_cli_reports_steps_apart_and_cuts_tags(tmp_path):
    root = str(tmp_path / "s")
    with Store(root) as store:
        ims = _build_like_store(store, tmp_path)
    out = layerfs_cmd("df", "-v", root=root, check=True).stdout.decode()
    assert "Build-step images (hidden like docker's intermediate images): 2, holding 6kB" in out
    images, steps = out.split("\nImages:\n")[1].split("\nBuild-step images:\n")
    assert ims["final"].id[:12] in images and ims["step"].id[:12] not in images
    assert ims["step"].id[:12] in steps and ims["orphan"].id[:12] in steps
    long_tag = "other-" + "x" * 60 + ":1"
    assert long_tag not in out and ("other-" + "x" * 33 + "…") in out
    assert long_tag in layerfs_cmd("df", "-v", "--no-trunc", root=root, check=True).stdout.decode()
    data = json.loads(layerfs_cmd("df", "--format", "json", root=root, check=True).stdout)
    assert data["BuildStepImages"] == 2 and data["BuildStepOnly"] == SIZES["orphan"]
    final = next(i for i in data["Images"] if i["image_id"] == ims["final"].id)
    assert final["unique"] == SIZES["step"] + SIZES["final"] and final["build_step"] is False
