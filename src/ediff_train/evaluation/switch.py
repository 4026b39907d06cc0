"""Prompt switching (eDiff-I Fig. 4): prompt A for the first fraction f of the σ schedule,
prompt B for the rest. The paper finds that switching in the last few percent changes nothing
and switching in the first ~40 % changes everything, i.e. the text matters at high noise. Here:
for digit pairs a ≠ b ("the number a" → "the number b") and f on a grid, the share of samples
a digit classifier reads as a, and as b.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ediff_train.core.solvers import karras_sigmas, solve
from ediff_train.data.toys.shapes import is_shapes
from ediff_train.evaluation.common import load_spec, pick_device, run_specs
from ediff_train.evaluation.shapes_switch import evaluate_shapes_switch
from ediff_train.io.files import write_json
from ediff_train.metrics.digits import classifier_for, digit_pairs
from ediff_train.metrics.plots import switch_plot
from ediff_train.run.weights import load_codec, load_encoders, load_train_config
from ediff_train.sampling.generation import embed_prompts
from ediff_train.sampling.guidance import guided
from ediff_train.sampling.switching import switch_sigma, switched


def evaluate_switch(cfg: DictConfig) -> dict[str, Any]:
    """metric=switch: digits by the classifier, or shapes by the exact reader."""
    c = cfg.switch
    device = pick_device(str(cfg.device))
    spec = run_specs(cfg)[0]
    train_cfg = load_train_config(spec["dirs"][0])
    if is_shapes(str(train_cfg.data.root)):
        return evaluate_shapes_switch(cfg)
    model = load_spec(spec, str(cfg.weights), device)
    enc = load_encoders(train_cfg)
    size = int(train_cfg.data.image_size)
    classifier = classifier_for(train_cfg, size, int(cfg.metrics.classifier_steps))
    g = torch.Generator().manual_seed(int(cfg.seed))
    pairs = digit_pairs(int(c.pairs), g)
    per = int(c.per_pair)
    cond_a = embed_prompts(enc, [f"the number {a}" for a, _ in pairs for _ in range(per)])
    cond_b = embed_prompts(enc, [f"the number {b}" for _, b in pairs for _ in range(per)])
    cond_a, cond_b = cond_a.to(device), cond_b.to(device)
    want_a = torch.tensor([a for a, _ in pairs for _ in range(per)])
    want_b = torch.tensor([b for _, b in pairs for _ in range(per)])
    sigmas = karras_sigmas(int(cfg.steps))
    codec = load_codec(train_cfg, device)  # a VAE run: latents sampled, decoded to classify
    side = size // codec.downsample
    noise = torch.randn(len(want_a), codec.channels, side, side, generator=g).to(device) * 80.0
    den_a = guided(model, cond_a, cond_a.null(), float(c.guidance))
    den_b = guided(model, cond_b, cond_b.null(), float(c.guidance))
    rows = []
    for f in [float(v) for v in c.fractions]:
        s = switch_sigma(sigmas, f)
        out = codec.decode(solve("heun", switched(den_a, den_b, s), noise.clone(), sigmas))
        with torch.no_grad():
            guess = classifier((out.float().cpu() * 0.5 + 0.5).clamp(0, 1)).argmax(1)
        rows.append(
            {
                "fraction_with_A": f,
                "switch_sigma": s,
                "reads_as_A": round(float((guess == want_a).float().mean()), 4),
                "reads_as_B": round(float((guess == want_b).float().mean()), 4),
            }
        )
        print(
            f"f={f:.2f} (switch at σ={s:.4g}): A {rows[-1]['reads_as_A']:.3f}, "
            f"B {rows[-1]['reads_as_B']:.3f}"
        )
    report = {
        "metric": "switch",
        "run": spec["label"],
        "pairs": pairs,
        "per_pair": per,
        "steps": int(cfg.steps),
        "guidance": float(c.guidance),
        "seed": int(cfg.seed),
        "rows": rows,
    }
    out_dir = Path(str(cfg.out))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "switch.json", report)
    switch_plot(rows, spec["label"], out_dir / "switch.png")
    print(f"wrote {out_dir / 'switch.json'} and .png")
    return report
