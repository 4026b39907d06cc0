"""Paint-with-words on the shapes benchmark, scored against positions the exact reader sees.

For random pairs of (colour, shape) the prompt "a {colour} {shape} and a {colour} {shape}" names
both objects but not their places. From the same noise: unpainted; the first phrase painted into
the left column of the 3×3 grid and the second into the right column; and swapped; the painted
runs at every w′ asked for. The shapes reader (metrics/shapes_reader.py) reads each image back
into objects with cells, so placement is checked exactly, not by a classifier on crops:

- `in_painted_column`: the share of (sample, phrase) pairs with an object of the phrase's
  colour and shape in a cell of its painted column; its baseline is the unpainted run scored
  against the same columns (where the object lands without painting);
- `both_columns`: both phrases in their columns;
- `present`: the share of phrases drawn anywhere (painting must not erase them);
- `mass_inside`: the attention share an in-mask image token gives its phrase (as metric=paint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ediff_train.data.heldout import validation_source
from ediff_train.data.toys.shapes_scene import COLOURS, SHAPES, Obj
from ediff_train.evaluation.common import run_specs
from ediff_train.io.files import write_json
from ediff_train.metrics.paint_mass import MaskMass
from ediff_train.metrics.shapes_score import ShapesScorer
from ediff_train.nn.paint import Region
from ediff_train.run.weights import load_train_config
from ediff_train.sampling.grids import labelled_grid
from ediff_train.sampling.pipeline import Sampler

Kind = tuple[int, int]  # (shape, colour)


def object_pairs(n: int, generator: torch.Generator) -> list[tuple[Kind, Kind]]:
    """n random pairs of distinct (shape, colour) kinds."""
    out: list[tuple[Kind, Kind]] = []
    while len(out) < n:
        s = torch.randint(len(SHAPES), (2,), generator=generator).tolist()
        c = torch.randint(len(COLOURS), (2,), generator=generator).tolist()
        if (s[0], c[0]) != (s[1], c[1]):
            out.append(((s[0], c[0]), (s[1], c[1])))
    return out


def phrase(kind: Kind) -> str:
    return f"{COLOURS[kind[1]]} {SHAPES[kind[0]]}"


def column_masks(size: int) -> tuple[Tensor, Tensor]:
    """[size, size] masks of the grid's left and right columns (the cells' thirds)."""
    left, right = torch.zeros(size, size), torch.zeros(size, size)
    third = size // 3
    left[:, :third] = 1.0
    right[:, size - third :] = 1.0
    return left, right


def placed(scene: list[Obj], kind: Kind, column: int) -> tuple[bool, bool]:
    """(the kind is drawn anywhere, it is drawn in a cell of `column`)."""
    hits = [o for o in scene if (o.shape, o.colour) == kind]
    return bool(hits), any(o.cell % 3 == column for o in hits)


def placement(scenes: list[list[Obj]], first: Kind, second: Kind, swap: bool) -> Tensor:
    """[phrases in their column, samples with both in theirs, phrases present] for `first`
    painted left and `second` right (or swapped)."""
    cols = (2, 0) if swap else (0, 2)
    totals = torch.zeros(3, dtype=torch.long)
    for scene in scenes:
        a, b = placed(scene, first, cols[0]), placed(scene, second, cols[1])
        totals += torch.tensor([a[1] + b[1], a[1] and b[1], a[0] + b[0]])
    return totals


def evaluate_shapes_paint(cfg: DictConfig) -> dict[str, Any]:
    """metric=paint on a run trained with data=shapes (evaluation/paint.py dispatches here)."""
    c = cfg.paint
    spec = run_specs(cfg)[0]
    train_cfg = load_train_config(spec["dirs"][0])
    root = str(train_cfg.data.root)
    val = validation_source(root, train_cfg.data.get("val_root"))
    scorer = ShapesScorer(root, val[0] if val else Path(root) / "val", int(cfg.shapes.reader_steps))
    size = int(train_cfg.data.image_size)
    sampler = Sampler.from_run(cfg.run_dir, [d.name for d in spec["dirs"]], str(cfg.weights))
    pairs = object_pairs(int(c.pairs), torch.Generator().manual_seed(int(cfg.seed)))
    weights = [float(w) for w in (c.weight if OmegaConf.is_list(c.weight) else [c.weight])]
    runs = [("unpainted", 0.0, False)] + [
        (f"{kind} w'={w:g}", w, kind == "swapped")
        for w in weights
        for kind in ("painted", "swapped")
    ]
    counts = {name: torch.zeros(4, dtype=torch.long) for name, _, _ in runs}
    mass = {name: MaskMass(int(c.per_pair)) for name, _, _ in runs}
    left, right = column_masks(size)
    grid: list[tuple[str, Tensor]] = []
    n = 0
    for k, (a, b) in enumerate(pairs):
        prompts = [f"a {phrase(a)} and a {phrase(b)}"] * int(c.per_pair)
        base: list[list[Obj]] = []
        for name, w, swap in runs:
            masks = (right, left) if swap else (left, right)
            images = sampler(
                prompts,
                seed=int(cfg.seed) + k,
                steps=int(cfg.steps),
                guidance=float(c.guidance),
                paint=[Region(phrase(a), masks[0]), Region(phrase(b), masks[1])],
                paint_weight=w,
                paint_record=mass[name],
                first_index=0,
            )
            scenes = scorer.read(images)
            if name == "unpainted":
                base = scenes
            if k < int(c.grid_pairs) and w in (0.0, weights[0]):
                how = (
                    "unpainted" if not w else (f"{phrase(b) if swap else phrase(a)} left, w'={w:g}")
                )
                grid.append((f'"{prompts[0]}": {how}', images))
            counts[name] += torch.cat(
                [placement(scenes, a, b, swap), placement(base, a, b, swap)[:1]]
            )
        n += len(prompts)
    results = {
        name: {
            "paint_weight": w,
            "in_painted_column": round(int(counts[name][0]) / (2 * n), 4),
            "unpainted_in_same_column": round(int(counts[name][3]) / (2 * n), 4),
            "both_columns": round(int(counts[name][1]) / n, 4),
            "present": round(int(counts[name][2]) / (2 * n), 4),
            "mass_inside": round(mass[name].mean(), 4),
            "unpainted_mass_inside": round(mass["unpainted"].mean(mirrored=swap), 4),
        }
        for name, w, swap in runs
    }
    report = {
        "metric": "paint",
        "data": "shapes",
        "run": spec["label"],
        "samples_per_run": n,
        "pairs": len(pairs),
        "guidance": float(c.guidance),
        "steps": int(cfg.steps),
        "seed": int(cfg.seed),
        "scorer": scorer.name,
        "runs": results,
        "meaning": "in_painted_column: share of (sample, phrase) drawn in a cell of its painted "
        "column (unpainted: the same columns); both_columns: both; present: drawn anywhere; "
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
            f"{name:16s} in painted column {r['in_painted_column']:.3f} (unpainted "
            f"{r['unpainted_in_same_column']:.3f})  both {r['both_columns']:.3f}  present "
            f"{r['present']:.3f}  attention inside {r['mass_inside']:.3f} (unpainted "
            f"{r['unpainted_mass_inside']:.3f})"
        )
    print(f"wrote {out / 'paint.json'}")
    return report
