"""metric=loss_by_sigma: held-out denoising loss per σ bin for every node."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ediff_train.evaluation.common import (
    heldout_batches,
    load_spec,
    log_wandb,
    pick_device,
    run_specs,
)
from ediff_train.io.files import write_json
from ediff_train.metrics.loss_by_sigma import band_means, loss_by_sigma, sigma_grid
from ediff_train.metrics.plots import loss_by_sigma_plot
from ediff_train.run.weights import load_train_config


def evaluate_loss_by_sigma(cfg: DictConfig) -> dict[str, Any]:
    """Held-out loss at a fixed σ grid for every ensemble; each σ routed to its owner."""

    c = cfg.loss_by_sigma
    device = pick_device(str(cfg.device))
    specs = run_specs(cfg)
    train_cfg = load_train_config(specs[0]["dirs"][0])
    batches = heldout_batches(train_cfg, int(c.images), int(c.batch_size))
    sigmas = sigma_grid(int(c.sigmas), float(c.sigma_min), float(c.sigma_max))
    runs = []
    for spec in specs:
        model = load_spec(spec, str(cfg.weights), device)
        loss = loss_by_sigma(model, batches, sigmas, int(cfg.seed), device)
        owners = model.router.index(torch.tensor(sigmas, dtype=torch.float64)).tolist()
        bands = []
        for node in model.router.nodes:
            lo, hi = node.sigma_interval
            bands.append({"node": node.name, "sigma_lo": lo, "sigma_hi": hi})
        runs.append(
            {
                "label": spec["label"],
                "nodes": [str(d) for d in spec["dirs"]],
                "node_steps": spec["steps"],
                "sigmas": sigmas,
                "loss": loss,
                "owner": [model.router.nodes[i].name for i in owners],
                "bands": bands,
            }
        )
    # every band of every run, with every run's mean loss inside it
    all_bands = {b["node"]: (b["sigma_lo"], b["sigma_hi"]) for r in runs for b in r["bands"]}
    table = {
        name: {r["label"]: band_means(sigmas, r["loss"], [(name, lo, hi)])[name] for r in runs}
        for name, (lo, hi) in all_bands.items()
    }
    report = {
        "metric": "loss_by_sigma",
        "images": sum(b["image"].shape[0] for b in batches),
        "seed": int(cfg.seed),
        "weights": str(cfg.weights),
        "runs": runs,
        "band_means": table,
    }
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "loss_by_sigma.json", report)
    with (out / "loss_by_sigma.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["sigma", *[f"{r['label']}" for r in runs], *[f"owner:{r['label']}" for r in runs]]
        )
        for k, s in enumerate(sigmas):
            w.writerow(
                [f"{s:.6g}", *[f"{r['loss'][k]:.6g}" for r in runs], *[r["owner"][k] for r in runs]]
            )
    loss_by_sigma_plot(runs, out / "loss_by_sigma.png")
    for name, per in table.items():
        lo, hi = all_bands[name]
        print(
            f"band {name} (σ {lo:.4g}–{hi:.4g}): "
            + ", ".join(
                f"{label} {v:.4f}" if v is not None else f"{label} –" for label, v in per.items()
            )
        )
    print(f"wrote {out / 'loss_by_sigma.json'}, .csv and .png")
    log_wandb(cfg, report, [out / "loss_by_sigma.png"])
    return report
