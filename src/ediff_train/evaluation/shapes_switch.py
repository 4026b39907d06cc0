"""Prompt switching (eDiff-I Fig. 4) on the shapes benchmark: which attributes the first prompt
fixes, read exactly. Prompt A "a {colour} {shape} at the {cell}" for the first fraction f of the
solver steps, prompt B (another colour, shape and cell) for the rest. The reader returns the
drawn objects, so per f the report gives, separately for position, colour and shape, the share of
samples whose object takes A's value and B's. eDiff-I's argument is that text decides layout at
high noise and detail at low noise: then position should follow A from a smaller f than colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ediff_train.core.solvers import karras_sigmas, solve
from ediff_train.data.heldout import validation_source
from ediff_train.data.toys.shapes_scene import CELLS, COLOURS, SHAPES, Obj
from ediff_train.evaluation.common import load_spec, pick_device, run_specs
from ediff_train.io.files import write_json
from ediff_train.metrics.plots import switch_attribute_plot
from ediff_train.metrics.shapes_score import ShapesScorer
from ediff_train.run.weights import load_codec, load_encoders, load_train_config
from ediff_train.sampling.generation import embed_prompts
from ediff_train.sampling.guidance import guided
from ediff_train.sampling.switching import switch_sigma, switched

ATTRS = ("position", "colour", "shape")


def switch_pairs(n: int, generator: torch.Generator) -> list[tuple[Obj, Obj]]:
    """n pairs (A, B) differing in shape, colour and cell alike (size unused)."""
    out = []
    for _ in range(n):
        s = torch.randperm(len(SHAPES), generator=generator)[:2].tolist()
        c = torch.randperm(len(COLOURS), generator=generator)[:2].tolist()
        p = torch.randperm(len(CELLS), generator=generator)[:2].tolist()
        out.append((Obj(s[0], c[0], 0, p[0]), Obj(s[1], c[1], 0, p[1])))
    return out


def prompt(o: Obj) -> str:
    return f"a {COLOURS[o.colour]} {SHAPES[o.shape]} at the {CELLS[o.cell]}"


def follows(scene: list[Obj], a: Obj, b: Obj) -> dict[str, tuple[bool, bool]]:
    """Per attribute: (some drawn object has A's value, some has B's)."""
    key = {"position": "cell", "colour": "colour", "shape": "shape"}
    return {
        k: (
            any(getattr(o, key[k]) == getattr(a, key[k]) for o in scene),
            any(getattr(o, key[k]) == getattr(b, key[k]) for o in scene),
        )
        for k in ATTRS
    }


def evaluate_shapes_switch(cfg: DictConfig) -> dict[str, Any]:
    """metric=switch on a run trained with data=shapes (evaluation/switch.py dispatches here)."""
    c = cfg.switch
    device = pick_device(str(cfg.device))
    spec = run_specs(cfg)[0]
    train_cfg = load_train_config(spec["dirs"][0])
    root = str(train_cfg.data.root)
    val = validation_source(root, train_cfg.data.get("val_root"))
    scorer = ShapesScorer(root, val[0] if val else Path(root) / "val", int(cfg.shapes.reader_steps))
    model = load_spec(spec, str(cfg.weights), device)
    enc = load_encoders(train_cfg)
    g = torch.Generator().manual_seed(int(cfg.seed))
    pairs = switch_pairs(int(c.pairs), g)
    per = int(c.per_pair)
    flat = [(a, b) for a, b in pairs for _ in range(per)]
    cond_a = embed_prompts(enc, [prompt(a) for a, _ in flat]).to(device)
    cond_b = embed_prompts(enc, [prompt(b) for _, b in flat]).to(device)
    sigmas = karras_sigmas(int(cfg.steps))
    codec = load_codec(train_cfg, device)
    side = int(train_cfg.data.image_size) // codec.downsample
    noise = torch.randn(len(flat), codec.channels, side, side, generator=g).to(device) * 80.0
    den_a = guided(model, cond_a, cond_a.null(), float(c.guidance))
    den_b = guided(model, cond_b, cond_b.null(), float(c.guidance))
    rows = []
    for f in [float(v) for v in c.fractions]:
        s = switch_sigma(sigmas, f)
        out = codec.decode(solve("heun", switched(den_a, den_b, s), noise.clone(), sigmas))
        scenes = scorer.read((out.float().cpu() * 0.5 + 0.5).clamp(0, 1))
        hits = [follows(scene, a, b) for scene, (a, b) in zip(scenes, flat)]
        row: dict[str, Any] = {"fraction_with_A": f, "switch_sigma": s}
        for k in ATTRS:
            row[f"{k}_A"] = round(sum(h[k][0] for h in hits) / len(hits), 4)
            row[f"{k}_B"] = round(sum(h[k][1] for h in hits) / len(hits), 4)
        rows.append(row)
        print(
            f"f={f:.2f} (σ={s:.4g}): "
            + ", ".join(f"{k} A {row[f'{k}_A']:.2f} B {row[f'{k}_B']:.2f}" for k in ATTRS)
        )
    report = {
        "metric": "switch",
        "data": "shapes",
        "run": spec["label"],
        "pairs": [[prompt(a), prompt(b)] for a, b in pairs],
        "per_pair": per,
        "steps": int(cfg.steps),
        "guidance": float(c.guidance),
        "seed": int(cfg.seed),
        "scorer": scorer.name,
        "rows": rows,
    }
    out_dir = Path(str(cfg.out))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "switch.json", report)
    switch_attribute_plot(rows, ATTRS, spec["label"], out_dir / "switch.png")
    print(f"wrote {out_dir / 'switch.json'} and .png")
    return report
