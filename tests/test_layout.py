"""The layout set: two real scans per canvas, captions that match them, shards like digits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import ROOT, run_env

from ediff_train.data.heldout import read_records
from ediff_train.data.manifest import read_manifest
from ediff_train.data.toys.layout import build_layout, layout_sample
from ediff_train.evaluation.paint import halves, placement_counts, placement_scores, read_halves


def test_layout_samples_hold_their_caption() -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    grey = np.clip(np.rint(data.images * 255 / 16), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(200):
        canvas, a, b, text = layout_sample(rng, grey, data.target)
        assert canvas.shape == (16, 16) and canvas[:4].max() == 0 and canvas[12:].max() == 0
        named = [int(d) for d in re.findall(r"\d", text)]
        assert sorted(named) == sorted([a, b])
        if "left" in text:
            kinds.add("placed")
            assert f"a {a} on the left" in text and f"a {b} on the right" in text
        else:
            kinds.add("free")
    assert kinds == {"placed", "free"}


def test_build_layout_shards(tmp_path: Path, digits_root: Path) -> None:
    root = build_layout(tmp_path / "layout", samples=48, val_size=8, encoders_from=digits_root)
    m = read_manifest(root)
    assert m["dataset"] == "layout" and m["num_samples"] == 40 and (root / "encoders").is_dir()
    assert read_manifest(root / "val")["num_samples"] == 8
    assert (
        build_layout(tmp_path / "layout", samples=48, val_size=8, encoders_from=digits_root) == root
    )  # cached
    rec = read_records(root, limit=4)
    for r in rec:
        label = r["meta"]["label"]
        assert sorted(int(d) for d in re.findall(r"\d", r["caption"])) == sorted(
            [label // 10, label % 10]
        )
    img = torch.rand(2, 3, 16, 16)
    lh, rh = halves(img)
    assert lh.shape == rh.shape == (2, 3, 16, 16)


def test_evaluate_paint_on_a_layout_run(tmp_path: Path, digits_root: Path) -> None:
    """metric=paint end to end on a (briefly) trained layout run: every run reported, w′ = 0
    painting scores exactly as unpainted, and painting raises the phrases' attention inside
    their masks."""
    data = digits_root.parent / "layout_paint_test"

    def run(script: str, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, str(ROOT / script), *args],
            cwd=tmp_path,
            env=run_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(
        "train.py",
        "data=layout",
        f"data.root={data}",
        "data.builder.samples=96",
        "data.builder.val_size=16",
        "data.num_workers=0",
        "data.batch_size=16",
        "steps=4",
        "run_dir=R",
        "logger=none",
        "sample.per_prompt=1",
        "sample.steps=2",
        "monitor.every=0",
    )
    run(
        "evaluate.py",
        "run_dir=R",
        "metric=paint",
        "paint.pairs=2",
        "paint.per_pair=2",
        "steps=3",
        "paint.weight=[0.0,2.0]",
        "out=ev",
    )
    report = json.loads((tmp_path / "ev" / "paint.json").read_text())
    assert (tmp_path / "ev" / "paint_grid.png").stat().st_size > 0
    runs = report["runs"]
    assert set(runs) == {
        "unpainted",
        "painted w'=0",
        "swapped w'=0",
        "painted w'=2",
        "swapped w'=2",
    }
    assert report["samples_per_run"] == 4
    for name in ("painted w'=0", "swapped w'=0"):
        assert runs[name]["in_painted_half"] == runs[name]["unpainted_in_same_half"]
        assert abs(runs[name]["mass_inside"] - runs[name]["unpainted_mass_inside"]) < 1e-3
    for name in ("painted w'=2", "swapped w'=2"):
        assert runs[name]["mass_inside"] > runs[name]["unpainted_mass_inside"] + 0.05


def _canvases(scans: np.ndarray, left: list[int | None], right: list[int | None]) -> torch.Tensor:
    """Layout canvases [B,3,16,16] in [0,1] with scan i (or nothing) in each half's scan area."""
    out = np.zeros((len(left), 16, 16), np.uint8)
    for k, (i, j) in enumerate(zip(left, right)):
        if i is not None:
            out[k, 4:12, 0:8] = scans[i]
        if j is not None:
            out[k, 4:12, 8:16] = scans[j]
    return torch.from_numpy(out).float()[:, None].repeat(1, 3, 1, 1) / 255.0


def test_placement_metric_scores_a_real_digit_in_its_half(digits_root: Path) -> None:
    """in_painted_half / both_halves on synthetic samples with known answers: a held-out real
    scan of digit a pasted into one half and the other half blank (or holding digit b)."""
    from sklearn.datasets import load_digits

    from ediff_train.data.toys.digits import split_indices
    from ediff_train.metrics.digits import load_or_train

    classifier, _ = load_or_train(digits_root, digits_root / "val")
    data = load_digits()
    grey = np.clip(np.rint(data.images * 255 / 16), 0, 255).astype(np.uint8)
    held = split_indices(len(data.target), 0, 297)[1]  # the digits build's held-out scans
    scans = np.stack([grey[next(i for i in held if data.target[i] == d)] for d in range(10)])
    blank = int(read_halves(classifier, _canvases(scans, [None], [None]))[0])
    digits = [d for d in range(10) if d != blank]  # a blank half reads as `blank`: not a phrase
    partner = digits[1:] + digits[:1]  # b: another digit, never the blank's reading

    def score(left: list[int | None], right: list[int | None], swap: bool) -> dict[str, float]:
        gl, gr = read_halves(classifier, _canvases(scans, left, right))
        counts = sum(
            placement_counts((gl[k : k + 1], gr[k : k + 1]), *((b, a) if swap else (a, b)))
            for k, (a, b) in enumerate(zip(digits, partner))
        )
        return placement_scores(counts, len(digits))

    gl, gr = read_halves(classifier, _canvases(scans, digits, [None] * len(digits)))
    assert gl.tolist() == digits and gr.tolist() == [blank] * len(digits)
    none = [None] * len(digits)
    # a on the left, right blank: painted (a left, b right) finds a, misses b; swapped finds none
    assert score(digits, none, swap=False) == {"in_painted_half": 0.5, "both_halves": 0.0}
    assert score(digits, none, swap=True) == {"in_painted_half": 0.0, "both_halves": 0.0}
    # the mirror image: a on the right, left blank
    assert score(none, digits, swap=False) == {"in_painted_half": 0.0, "both_halves": 0.0}
    assert score(none, digits, swap=True) == {"in_painted_half": 0.5, "both_halves": 0.0}
    # a left and b right: everything as painted, nothing as swapped
    assert score(digits, partner, swap=False) == {"in_painted_half": 1.0, "both_halves": 1.0}
    assert score(digits, partner, swap=True) == {"in_painted_half": 0.0, "both_halves": 0.0}
