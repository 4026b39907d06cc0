"""The shapes benchmark: scenes, captions and their claims, the renderer, the build, the exact
scorer and metric=shapes, each against a known answer."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_env

from ediff_train.data.manifest import read_manifest
from ediff_train.data.toys.shapes import build_shapes, check_heldout, sample
from ediff_train.data.toys.shapes_render import PALETTE, draw, render, scene_rng
from ediff_train.data.toys.shapes_scene import (
    COLOURS,
    SHAPES,
    Obj,
    caption,
    score_claims,
    vocabulary,
)
from ediff_train.errors import EdiffError
from ediff_train.metrics.shapes_reader import load_or_train_reader, reader_accuracy, train_reader
from ediff_train.metrics.shapes_score import accuracy_table
from ediff_train.nn.encoders import Encoders

RED, BLUE, GREEN = COLOURS.index("red"), COLOURS.index("blue"), COLOURS.index("green")
CIRCLE, SQUARE, TRIANGLE = SHAPES.index("circle"), SHAPES.index("square"), SHAPES.index("triangle")
SMALL = {"train_size": 240, "val_size": 96, "samples_per_shard": 100, "align_steps": 4}
# a red small circle top left, a blue large square center, a blue large square bottom right
SCENE = [Obj(CIRCLE, RED, 0, 0), Obj(SQUARE, BLUE, 1, 4), Obj(SQUARE, BLUE, 1, 8)]


def test_captions_and_their_claims() -> None:
    text, claims = caption(SCENE, "attributes")
    assert text == "a small red circle, a large blue square and a large blue square"
    assert claims["objects"][0] == {"shape": CIRCLE, "colour": RED, "size": 0}
    text, claims = caption(SCENE, "positions")
    assert text == (
        "a red circle at the top left, a blue square in the center and a blue square at the "
        "bottom right"
    )
    assert [o["cell"] for o in claims["objects"]] == [0, 4, 8]
    text, claims = caption(SCENE, "relation")
    assert text == "a red circle left of a blue square and a blue square"
    assert claims["relation"] == [0, "left of", 1]
    text, claims = caption(SCENE, "count")
    assert text == "one red circle and two blue squares"
    assert len(claims["objects"]) == 3
    with pytest.raises(EdiffError, match="relation"):
        caption(SCENE[:1], "relation")


def test_score_claims_known_answers() -> None:
    _, pos = caption(SCENE, "positions")
    right = score_claims(pos, SCENE)
    assert right["caption"] and right["colour"] and right["position"] and right["count"]
    assert right["relation"] is None and right["size"] is None  # not claimed
    # the circle read as green: colour fails, shape and position still hold
    wrong = score_claims(pos, [Obj(CIRCLE, GREEN, 0, 0), *SCENE[1:]])
    assert (wrong["colour"], wrong["shape"], wrong["position"], wrong["caption"]) == (
        False,
        True,
        True,
        False,
    )
    # one square missing: the count fails (and the unmatched object's attributes)
    missing = score_claims(pos, SCENE[:2])
    assert missing["count"] is False and missing["caption"] is False
    # objects in another order are matched, not compared by position in the list
    assert score_claims(pos, SCENE[::-1])["caption"]
    # a relation: the circle must lie left of the first square
    _, rel = caption(SCENE, "relation")
    moved = [Obj(CIRCLE, RED, 0, 5), *SCENE[1:]]  # now right of the centre square
    assert score_claims(rel, SCENE)["relation"] is True
    assert score_claims(rel, moved)["relation"] is False
    table = accuracy_table([pos, pos, rel], [SCENE, SCENE[:2], moved])
    assert table["caption_accuracy"] == round(1 / 3, 4)
    assert table["attribute_accuracy"]["count"] == round(2 / 3, 4)
    assert table["attribute_accuracy"]["relation"] == 0.0
    assert table["attribute_accuracy"]["size"] is None


def test_render_is_deterministic_and_draws_the_scene() -> None:
    a_scene, a = draw(7, 0, 123, 32)
    b_scene, b = draw(7, 0, 123, 32)
    assert a_scene == b_scene and np.array_equal(a, b)
    assert not np.array_equal(a, draw(7, 1, 123, 32)[1])  # the held-out stream differs
    # a large object's cell centre lies inside it whatever the jitter: exactly its colour
    scene = [
        Obj(SHAPES.index(s), k % len(COLOURS), 1, c)
        for k, (s, c) in enumerate([("circle", 0), ("square", 4), ("diamond", 8)])
    ]
    image = render(scene, 48, scene_rng(0, 0, 0))
    for o in scene:
        cy, cx = (o.cell // 3 + 0.5) * 16, (o.cell % 3 + 0.5) * 16
        assert image[int(cy), int(cx)].tolist() == np.rint(PALETTE[o.colour] * 255).tolist()
    # an empty cell shows the muted background, far from every object colour
    corner = image[24, 8].astype(float) / 255  # the left cell, empty
    assert min(np.abs(PALETTE - corner).sum(1)) > 0.3


def test_sample_caption_describes_its_own_scene() -> None:
    for i in range(50):
        scene, _, text, claims = sample(0, 0, i, 32)
        assert score_claims(claims, scene)["caption"], text
        assert set(text.replace(",", "").split()) <= vocabulary()
        assert len(text) + 1 <= 128  # bytes + EOS fit the T5 context


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "shapes32"
    return build_shapes(root, **SMALL)


def test_build_is_byte_identical_for_a_seed(small_build: Path, tmp_path: Path) -> None:
    again = build_shapes(tmp_path / "again", **SMALL)
    m = read_manifest(small_build)
    assert m["num_samples"] == 240 and len(m["shards"]) == 3
    assert read_manifest(small_build / "val")["num_samples"] == 96
    for rel in [*m["shards"], "val/000000.tar", "encoders/clip.safetensors"]:
        assert filecmp.cmp(small_build / rel, again / rel, shallow=False), rel
    # the manifests differ only in how long the encoders' alignment took
    m2 = read_manifest(again)
    m["align"].pop("seconds"), m2["align"].pop("seconds")
    assert m == m2
    # the stored claims are the scene's own caption claims, and keys name the streams
    from ediff_train.data.heldout import read_records

    rec = read_records(small_build / "val", limit=5)
    for r in rec:
        assert r["key"].startswith("shapes-val-")
        scene, image, text, claims = sample(0, 1, r["meta"]["index"], 32)
        assert r["caption"] == text and r["meta"]["claims"] == json.loads(json.dumps(claims))
        assert np.array_equal(r["image"], image)


def test_heldout_that_overlaps_training_is_refused(small_build: Path) -> None:
    check_heldout(small_build, small_build / "val")
    with pytest.raises(EdiffError, match="overlap training"):
        check_heldout(small_build, small_build)


def test_encoders_refuse_words_outside_the_vocabulary(small_build: Path) -> None:
    enc = Encoders.load(small_build / "encoders")
    enc.encode_text(["two green triangles"])
    with pytest.raises(EdiffError, match="'pink'") as e:
        enc.encode_text(["a pink circle left of a red square"])
    assert "\n" not in str(e.value)


def test_reader_reads_heldout_renders(tmp_path: Path) -> None:
    """≥ 0.99 per attribute on renders it never saw (its own check stream)."""
    torch.manual_seed(0)
    model = train_reader(0, 32)
    acc = reader_accuracy(model, 0, 32, n=1000)
    for key in ("cells", "shape", "colour", "size"):
        assert acc[key] >= 0.99, acc


def test_scorer_of_another_build_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "scorer"
    folder.mkdir()
    (folder / "scorer.json").write_text(json.dumps({"build": {"seed": 1, "image_size": 32}}))
    (folder / "scorer.safetensors").write_bytes(b"")
    with pytest.raises(EdiffError, match="another build"):
        load_or_train_reader(tmp_path, {"seed": 0, "image_size": 32})


def test_train_sample_and_evaluate_on_shapes(small_build: Path, tmp_path: Path) -> None:
    """train.py data=shapes, sample.py refusing an unknown word in one line, and
    evaluate.py metric=shapes writing per-attribute accuracy that its own scorer agrees with."""
    env = run_env(tmp_path)
    run = [f"run_dir={tmp_path / 'runs'}", f"data.root={small_build}"]
    run += [f"data.builder.{k}={v}" for k, v in SMALL.items()]  # the small build, not 100k
    common = ["data=shapes", "logger=none", "data.num_workers=0", "sample.per_prompt=0"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *common, *run, "steps=2", "data.batch_size=8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"run_dir={tmp_path / 'runs'}",
            "expert=E0_0",
            "prompt=a pink circle",
            "steps=2",
            f"out={tmp_path / 's'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr[-2000:]
    assert "'pink'" in bad.stderr and not list((tmp_path / "s").rglob("*.png"))
    out = tmp_path / "eval"
    ev = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            f"run_dir={tmp_path / 'runs'}",
            "metric=shapes",
            "guidance=[1,3]",
            "steps=2",
            "shapes.captions=8",
            "shapes.reader_steps=20",
            "shapes.grid_rows=2",
            f"out={out}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == "shapes" and report["images"] == 8
    rows = report["runs"][0]["rows"]
    assert [r["guidance"] for r in rows] == [1.0, 3.0]
    # recompute guidance 3's table from the images with the cached scorer
    from ediff_train.metrics.captions import shapes_items
    from ediff_train.metrics.generation import image_path, load_images
    from ediff_train.metrics.shapes_score import ShapesScorer

    items = shapes_items(small_build / "val", 8)
    scorer = ShapesScorer(small_build, small_build / "val", 20)
    folder = out / "E0_0" / "guidance_3"
    seen = scorer.read(load_images([image_path(folder, it) for it in items]))
    table = accuracy_table([it.claims for it in items], seen)
    assert rows[1]["caption_accuracy"] == table["caption_accuracy"]
    assert rows[1]["attribute_accuracy"] == table["attribute_accuracy"]
    assert (out / "shapes_grid.png").is_file() and (out / "shapes_attributes.png").is_file()


def test_attribute_plot_shows_each_attribute_against_guidance(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ediff_train.metrics import plots

    shown = {}
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: shown.setdefault("fig", fig))
    rows = [
        {
            "guidance": g,
            "caption_accuracy": 0.1 * g,
            "attribute_accuracy": {"colour": 0.2 * g, "shape": 0.15 * g, "relation": None},
        }
        for g in (1.0, 3.0)
    ]
    plots.attribute_plot(
        [{"label": "E0_0", "rows": rows}], ["colour", "shape", "relation"], tmp_path / "a.png"
    )
    ax = shown["fig"].axes[0]
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}
    assert set(lines) == {"colour", "shape", "whole caption"}  # relation never claimed
    assert lines["colour"] == ([1.0, 3.0], [0.2, pytest.approx(0.6)])
    assert lines["whole caption"][1] == [0.1, pytest.approx(0.3)]
    assert ax.get_xlabel() == "guidance scale" and ax.get_title() == "E0_0"


def test_grid_shows_each_image_with_its_reading(tmp_path: Path) -> None:
    """Under each image: the reading, green where the caption holds, red where not."""
    from PIL import Image

    from ediff_train.evaluation.shapes import shapes_grid
    from ediff_train.metrics.captions import Item

    scenes = [[Obj(CIRCLE, RED, 1, 4), Obj(TRIANGLE, GREEN, 0, 8)], [Obj(SQUARE, BLUE, 1, 0)]]
    folder = tmp_path / "E0_0" / "guidance_2"
    folder.mkdir(parents=True)
    images = [render(s, 32, scene_rng(0, 9, k)) for k, s in enumerate(scenes)]
    for k, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{k:06d}.png")
    # item 0's caption holds for what is drawn; item 1 claims a green square
    claims = [caption(scenes[0], "colours")[1], caption([Obj(SQUARE, GREEN, 1, 0)], "colours")[1]]
    items = [Item(k, f"prompt {k}", claims=c) for k, c in enumerate(claims)]

    class Reader:
        def read(self, x: torch.Tensor) -> list[list[Obj]]:
            got = (x[0].permute(1, 2, 0) * 255).round().byte().numpy()
            return [scenes[[np.array_equal(got, im) for im in images].index(True)]]

    report = {"runs": [{"label": "E0_0", "rows": [{"guidance": 2.0}]}]}
    grid = np.asarray(Image.open(shapes_grid(tmp_path, report, items, Reader())).convert("RGB"))
    font_h, side = 11, 96
    row_h = font_h + 2 + side + font_h * 3 + 6
    for k in range(2):
        top = font_h + 4 + k * row_h + font_h + 2
        shown = grid[top : top + side, 4 : 4 + side]
        assert np.array_equal(shown[::3, ::3], images[k])  # the image, upscaled 3x
        text = grid[top + side : top + side + font_h * 3, :].reshape(-1, 3).astype(int)
        green = int(((text[:, 1] - text[:, 0]) > 60).sum())  # anti-aliased glyphs: by hue
        red = int(((text[:, 0] - text[:, 1]) > 60).sum())
        assert (green > 20 and red == 0) if k == 0 else (red > 20 and green == 0), (green, red)


def test_shapes_shards_of_another_size_or_encoders_are_refused(small_build: Path) -> None:
    """The shared manifest checks, on a shapes build: another image size, other encoder dims."""
    from ediff_train.data.datamodule import check_image_size
    from ediff_train.data.manifest import check_manifest

    m = read_manifest(small_build)
    check_image_size(m, small_build, 32, None)
    with pytest.raises(EdiffError, match="32") as e:
        check_image_size(m, small_build, 64, None)
    assert "\n" not in str(e.value)
    with pytest.raises(EdiffError, match="t5.dim is 32 but the model expects 4096"):
        check_manifest(m, {"t5_dim": 4096})
