"""Does painting a phrase put it where it was painted? Measured on the layout set (data/layout.py).

For random pairs a ≠ b the prompt "a {a} and a {b}" names both digits but not their places.
Three runs from the same noise: unpainted; "a" painted into the left half and "b" into the right;
and swapped. Each half (the 8×8 scan area) is classified by the digits build's classifier; a
sample is placed right when the left half reads as the digit painted left and the right half as
the one painted right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from ediff_train.checkpoints import load_train_config, write_json
from ediff_train.paint import Region


def halves(images: Tensor) -> tuple[Tensor, Tensor]:
    """The left and right scan areas of 16 px layout canvases, at 16 px for the classifier."""
    def up(x: Tensor) -> Tensor:
        return F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False).clamp(0, 1)

    return up(images[:, :, 4:12, 0:8]), up(images[:, :, 4:12, 8:16])


def evaluate_paint(cfg: DictConfig) -> dict[str, Any]:
    from ediff_train.data.heldout import validation_source
    from ediff_train.evaluation import run_specs
    from ediff_train.metrics.digits import digit_pairs, load_or_train
    from ediff_train.pipeline import Sampler

    c = cfg.paint
    spec = run_specs(cfg)[0]
    train_cfg = load_train_config(spec["dirs"][0])
    digits_root = Path(str(train_cfg.data.root)).parent / "digits16"
    val = validation_source(digits_root, None)
    classifier, _ = load_or_train(digits_root, val[0] if val else digits_root / "val",
                                  int(cfg.metrics.classifier_steps))
    sampler = Sampler.from_run(cfg.run_dir, [d.name for d in spec["dirs"]], str(cfg.weights))
    g = torch.Generator().manual_seed(int(cfg.seed))
    pairs = digit_pairs(int(c.pairs), g)
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0
    right = 1.0 - left
    hits = {"unpainted": 0, "painted": 0, "swapped": 0}
    n = 0
    for k, (a, b) in enumerate(pairs):
        prompts = [f"a {a} and a {b}"] * int(c.per_pair)
        runs = {"unpainted": None,
                "painted": [Region(str(a), left), Region(str(b), right)],
                "swapped": [Region(str(a), right), Region(str(b), left)]}
        for name, regions in runs.items():
            images = sampler(prompts, seed=int(cfg.seed) + k, steps=int(cfg.steps),
                             guidance=float(c.guidance), paint=regions,
                             paint_weight=float(c.weight), first_index=0)
            lh, rh = halves(images)
            with torch.no_grad():
                gl, gr = classifier(lh).argmax(1), classifier(rh).argmax(1)
            want_l, want_r = (b, a) if name == "swapped" else (a, b)
            hits[name] += int(((gl == want_l) & (gr == want_r)).sum())
        n += len(prompts)
    rates = {k: round(v / n, 4) for k, v in hits.items()}
    report = {"metric": "paint", "run": spec["label"], "samples_per_run": n,
              "pairs": len(pairs), "paint_weight": float(c.weight),
              "guidance": float(c.guidance), "steps": int(cfg.steps), "seed": int(cfg.seed),
              "placed_as_painted": rates,
              "meaning": "share of samples whose left half reads as the digit painted left "
                         "(unpainted: the first-named digit) and right half as the other"}
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "paint.json", report)
    print(f"placed as painted: {rates} ({n} samples per run)")
    print(f"wrote {out / 'paint.json'}")
    return report
