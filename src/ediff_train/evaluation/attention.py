"""Where cross-attention looks as σ falls (eDiff-I Fig. 3): the share of attention on T5 tokens,
CLIP text tokens, the CLIP image token and the null token at every solver call, per expert.

The paper's finding, which motivates experts: at high noise the model attends to the text, at
low noise mostly to the null token. Here it is measured, not assumed: the sampler runs with an
`AttentionHook(record=...)` in every cross-attention (the explicit attention path), and the
attention weights of the conditional rows are summed per token group, averaged over layers,
heads and image tokens.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from ediff_train.core.conditioning import Conditioning
from ediff_train.evaluation.common import load_spec, pick_device, run_specs
from ediff_train.io.files import write_json
from ediff_train.metrics.plots import attention_plot
from ediff_train.nn.attention import AttentionHook
from ediff_train.nn.embed import CONTEXT_ORDER, ConditionEmbedder
from ediff_train.run.weights import load_codec, load_encoders, load_train_config
from ediff_train.sampling.generation import embed_prompts, generate


class AttentionRecorder:
    """Wraps a model D(x, σ, cond); after each call, the mean attention share per token group
    of the first `rows` batch rows (guidance puts the conditional rows first)."""

    def __init__(self, model: Any, rows: int) -> None:
        self.model, self.rows = model, rows
        self.records: list[dict[str, float]] = []

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        sl = ConditionEmbedder.slices(cond.t5.shape[1])
        layers: list[Tensor] = []

        def record(probs: Tensor) -> None:  # [B, heads, HW, N]
            p = probs[: self.rows]
            layers.append(torch.stack([p[..., sl[g]].sum(-1).mean() for g in CONTEXT_ORDER]))

        out = self.model(x, sigma, cond, cross_attn_bias=lambda h, w: AttentionHook(record=record))
        share = torch.stack(layers).mean(0)
        entry = {"sigma": float(sigma.reshape(-1)[0])}
        entry |= {g: float(v) for g, v in zip(CONTEXT_ORDER, share)}
        router = getattr(self.model, "router", None)
        if router is not None:
            entry["expert"] = router.nodes[int(router.index(entry["sigma"]))].name
        self.records.append(entry)
        return out


def evaluate_attention(cfg: DictConfig) -> dict[str, Any]:
    """metric=attention: the share per token group against σ, one plot, JSON and CSV."""

    device = pick_device(str(cfg.device))
    spec = run_specs(cfg)[0]
    train_cfg = load_train_config(spec["dirs"][0])
    model = load_spec(spec, str(cfg.weights), device)
    prompts = [str(p) for p in cfg.attention.prompts]
    cond = embed_prompts(load_encoders(train_cfg), prompts).to(device)
    rec = AttentionRecorder(model, len(prompts))
    codec = load_codec(train_cfg)  # a VAE run attends over its latent (no decode needed)
    generate(
        rec,
        cond,
        int(train_cfg.data.image_size) // codec.downsample,
        channels=codec.channels,
        steps=int(cfg.steps),
        guidance=float(cfg.attention.guidance),
        seed=int(cfg.seed),
    )
    report = {
        "metric": "attention",
        "run": spec["label"],
        "node_steps": spec["steps"],
        "prompts": prompts,
        "steps": int(cfg.steps),
        "guidance": float(cfg.attention.guidance),
        "solver": "heun",
        "groups": list(CONTEXT_ORDER),
        "calls": rec.records,
    }
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "attention.json", report)
    with (out / "attention.csv").open("w", newline="") as fh:
        w = csv.DictWriter(
            fh, fieldnames=["sigma", *CONTEXT_ORDER, "expert"], extrasaction="ignore"
        )
        w.writeheader()
        w.writerows(rec.records)
    attention_plot(rec.records, spec["label"], out / "attention.png")
    hi = [r for r in rec.records if r["sigma"] > 1.0]
    lo = [r for r in rec.records if r["sigma"] < 0.1]
    for name, part in (("σ > 1", hi), ("σ < 0.1", lo)):
        if part:
            means = {g: sum(r[g] for r in part) / len(part) for g in CONTEXT_ORDER}
            print(f"{name}: " + ", ".join(f"{g} {v:.3f}" for g, v in means.items()))
    print(f"wrote {out / 'attention.json'}, .csv and .png")
    return report
