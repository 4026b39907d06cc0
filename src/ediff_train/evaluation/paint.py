"""Does painting a phrase put it where it was painted? Measured on the layout set
(data/toys/layout.py).

For random pairs a ≠ b the prompt "a {a} and a {b}" names both digits but not their places.
From the same noise: unpainted; "a" painted into the left half and "b" into the right; and
swapped; the painted runs at every w′ asked for. Each half (the 8×8 scan area) is classified by
the digits build's classifier. Reported per run:

- `in_painted_half`: the share of (sample, phrase) pairs whose painted half reads as the
  phrase's digit. Its baseline is the unpainted run scored against the same halves (where the
  digit lands without painting), so the difference is what painting moved.
- `both_halves`: both halves read as painted (unpainted: the first-named digit on the left).
- `mass_inside`: the mean attention weight an image token inside a mask gives the tokens of the
  phrase painted there, over every cross-attention, head and solver call; unpainted runs are
  measured against the same masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ediff_train.data.heldout import validation_source
from ediff_train.data.toys.shapes import is_shapes
from ediff_train.evaluation.common import run_specs
from ediff_train.evaluation.shapes_paint import evaluate_shapes_paint
from ediff_train.io.files import write_json
from ediff_train.metrics.digits import digit_pairs, load_or_train
from ediff_train.metrics.paint_mass import MaskMass
from ediff_train.nn.paint import Region
from ediff_train.run.weights import load_train_config
from ediff_train.sampling.grids import labelled_grid
from ediff_train.sampling.pipeline import Sampler


def halves(images: Tensor) -> tuple[Tensor, Tensor]:
    """The left and right scan areas of 16 px layout canvases, at 16 px for the classifier."""

    def up(x: Tensor) -> Tensor:
        return F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False).clamp(0, 1)

    return up(images[:, :, 4:12, 0:8]), up(images[:, :, 4:12, 8:16])


def read_halves(classifier: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    """The digit the classifier reads in the left and in the right half of each canvas ([B])."""
    lh, rh = halves(images)
    with torch.no_grad():
        return classifier(lh).argmax(1), classifier(rh).argmax(1)


def placement_counts(read: tuple[Tensor, Tensor], left: int, right: int) -> Tensor:
    """[phrases read in their painted half, samples with both halves as painted], for `left`
    painted into the left half and `right` into the right."""
    hit_l, hit_r = read[0] == left, read[1] == right
    return torch.stack([hit_l.sum() + hit_r.sum(), (hit_l & hit_r).sum()])


def placement_scores(counts: Tensor, samples: int) -> dict[str, float]:
    """`in_painted_half` and `both_halves` from summed `placement_counts` over `samples`."""
    half, both = (int(v) for v in counts[:2])
    return {
        "in_painted_half": round(half / (2 * samples), 4),
        "both_halves": round(both / samples, 4),
    }


def layout_regions(a: int, b: int, swap: bool) -> list[Region]:
    """ "a" painted into the left half and "b" into the right (or the other way round)."""
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0
    return (
        [Region(str(a), 1.0 - left), Region(str(b), left)]
        if swap
        else [Region(str(a), left), Region(str(b), 1.0 - left)]
    )


def evaluate_paint(cfg: DictConfig) -> dict[str, Any]:
    """metric=paint: placement on the layout digits, or on shapes for a run trained on them."""
    c = cfg.paint
    spec = run_specs(cfg)[0]
    train_cfg = load_train_config(spec["dirs"][0])
    if is_shapes(str(train_cfg.data.root)):
        return evaluate_shapes_paint(cfg)
    digits_root = Path(str(train_cfg.data.root)).parent / "digits16"
    val = validation_source(digits_root, None)
    classifier, _ = load_or_train(
        digits_root, val[0] if val else digits_root / "val", int(cfg.metrics.classifier_steps)
    )
    sampler = Sampler.from_run(cfg.run_dir, [d.name for d in spec["dirs"]], str(cfg.weights))
    pairs = digit_pairs(int(c.pairs), torch.Generator().manual_seed(int(cfg.seed)))
    weights = [float(w) for w in (c.weight if OmegaConf.is_list(c.weight) else [c.weight])]
    # unpainted = w′ 0: no bias; the attention is recorded beside the fused output (the plain
    # sampler's images, bit for bit)
    runs = [("unpainted", 0.0, False)] + [
        (f"{kind} w'={w:g}", w, kind == "swapped")
        for w in weights
        for kind in ("painted", "swapped")
    ]
    counts = {name: torch.zeros(3, dtype=torch.long) for name, _, _ in runs}
    mass = {name: MaskMass(int(c.per_pair)) for name, _, _ in runs}
    grid: list[tuple[str, Tensor]] = []  # the first pairs, unpainted and at the first w′
    n = 0
    for k, (a, b) in enumerate(pairs):
        prompts = [f"a {a} and a {b}"] * int(c.per_pair)
        for name, w, swap in runs:
            images = sampler(
                prompts,
                seed=int(cfg.seed) + k,
                steps=int(cfg.steps),
                guidance=float(c.guidance),
                paint=layout_regions(a, b, swap),
                paint_weight=w,
                paint_record=mass[name],
                first_index=0,
            )
            if k < int(c.grid_pairs) and w in (0.0, weights[0]):
                lt, rt = (b, a) if swap else (a, b)
                how = f"painted {lt} left, {rt} right, w'={w:g}" if w else "unpainted"
                grid.append((f'"{prompts[0]}": {how}', images))
            read = read_halves(classifier, images)
            if name == "unpainted":
                base = read
            want_l, want_r = (b, a) if swap else (a, b)
            counts[name] += torch.cat(
                [placement_counts(read, want_l, want_r), placement_counts(base, want_l, want_r)[:1]]
            )
        n += len(prompts)
    results = {}
    for name, w, swap in runs:
        score = placement_scores(counts[name], n)
        results[name] = {
            "paint_weight": w,
            "in_painted_half": score["in_painted_half"],
            "unpainted_in_same_half": round(int(counts[name][2]) / (2 * n), 4),
            "both_halves": score["both_halves"],
            "mass_inside": round(mass[name].mean(), 4),
            "unpainted_mass_inside": round(mass["unpainted"].mean(mirrored=swap), 4),
        }
    report = {
        "metric": "paint",
        "run": spec["label"],
        "samples_per_run": n,
        "pairs": len(pairs),
        "guidance": float(c.guidance),
        "steps": int(cfg.steps),
        "seed": int(cfg.seed),
        "runs": results,
        "meaning": "in_painted_half: share of (sample, phrase) whose painted half reads as "
        "that digit (unpainted: left = first-named); both_halves: both right; "
        "mass_inside: attention share an in-mask image token gives its phrase",
    }
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "paint.json", report)
    if grid:
        labelled_grid(
            torch.cat([g for _, g in grid]), [t for t, _ in grid], int(c.per_pair), upscale=4
        ).save(out / "paint_grid.png")
    for name, r in results.items():
        print(
            f"{name:16s} in painted half {r['in_painted_half']:.3f} (unpainted "
            f"{r['unpainted_in_same_half']:.3f})  both halves {r['both_halves']:.3f}  "
            f"attention inside {r['mass_inside']:.3f} (unpainted "
            f"{r['unpainted_mass_inside']:.3f})"
        )
    print(f"wrote {out / 'paint.json'}")
    return report
