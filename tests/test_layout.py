"""The layout set: two real scans per canvas, captions that match them, shards like digits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ediff_train.data.heldout import read_records
from ediff_train.data.layout import build_layout, layout_sample
from ediff_train.data.manifest import read_manifest
from ediff_train.metrics.paint_eval import halves


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
    assert build_layout(tmp_path / "layout", samples=48, val_size=8,
                        encoders_from=digits_root) == root  # cached
    rec = read_records(root, limit=4)
    for r in rec:
        label = r["meta"]["label"]
        assert sorted(int(d) for d in re.findall(r"\d", r["caption"])) == sorted(
            [label // 10, label % 10])
    import torch

    img = torch.rand(2, 3, 16, 16)
    lh, rh = halves(img)
    assert lh.shape == rh.shape == (2, 3, 16, 16)
