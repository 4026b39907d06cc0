"""metric=ema_sweep: held-out loss by σ for EMA lengths chosen after training (post-hoc EMA).

Why: EDM2 found the best EMA length differs by model and training length, and the expert tree
adds another axis (a short child may want a different width than its root). For each evaluated
ensemble and each `ema.sigma_rels` value, every node's EMA is rebuilt from its post-hoc
snapshots (posthoc_ema.py) and the ensemble's held-out loss is measured on the same σ grid, images
and noise as metric=loss_by_sigma; the node's own stored EMA is measured too, as the reference.
Writes ema_sweep.json and ema_sweep.csv (one row per ensemble and σ_rel) in `out`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ediff_train.errors import EdiffError
from ediff_train.evaluation.common import heldout_batches, log_wandb, pick_device, run_specs
from ediff_train.io.files import write_json, write_text
from ediff_train.metrics.loss_by_sigma import band_means, loss_by_sigma, sigma_grid
from ediff_train.run.posthoc_ema import Plan, combine, lineage_snapshots, plan
from ediff_train.run.weights import denoiser_of, load_expert, load_train_config
from ediff_train.sampling.ensemble import Ensemble

STORED = "stored"  # the row of the EMA each node trained with (weights.safetensors)


def _sigma_rels(cfg: DictConfig) -> list[float]:
    values = cfg.ema.sigma_rels
    values = list(values) if OmegaConf.is_list(values) or isinstance(values, list) else [values]
    if not values:
        raise EdiffError(
            "ema.sigma_rels is empty: give the EMA widths to sweep, e.g. "
            "ema.sigma_rels=[0.05,0.075,0.1]"
        )
    return [float(v) for v in values]


def _expert(ndir: Path, ema: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The node's denoiser, rebuilt from its config, with the given EMA weights."""
    denoiser = denoiser_of(load_train_config(ndir))
    denoiser.load_state_dict(ema)
    return denoiser.eval().requires_grad_(False)


def _row(
    label: str,
    sigma_rel: float | str,
    sigmas: list[float],
    loss: list[float],
    bands: list[tuple[str, float, float]],
    plans: list[Plan],
) -> dict[str, Any]:
    return {
        "sigma_rel": sigma_rel,
        "mean_loss": sum(loss) / len(loss),
        "loss": loss,
        "band_means": band_means(sigmas, loss, bands),
        "posthoc": [p.record() for p in plans],
        "run": label,
    }


def evaluate_ema_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Loss by σ of every ensemble at every swept σ_rel (and its stored EMA); rank 0's job."""
    sigma_rels = _sigma_rels(cfg)
    step = cfg.ema.get("step")
    c = cfg.loss_by_sigma
    device = pick_device(str(cfg.device))
    specs = run_specs(cfg)
    # every reconstruction is planned before any image is read: a bad σ_rel or step is one line
    plans = {
        str(d): [plan(lineage_snapshots(d), s, step, d.name) for s in sigma_rels]
        for spec in specs
        for d in spec["dirs"]
    }
    train_cfg = load_train_config(specs[0]["dirs"][0])
    batches = heldout_batches(train_cfg, int(c.images), int(c.batch_size))
    sigmas = sigma_grid(int(c.sigmas), float(c.sigma_min), float(c.sigma_max))
    runs = []
    for spec in specs:
        stored = [load_expert(d, "ema") for d in spec["dirs"]]
        nodes = [n for n, _ in stored]
        bands = [(n.name, *n.sigma_interval) for n in nodes]
        model = Ensemble(nodes, [m for _, m in stored]).to(device)
        rows = [
            _row(
                spec["label"],
                STORED,
                sigmas,
                loss_by_sigma(model, batches, sigmas, int(cfg.seed), device),
                bands,
                [],
            )
        ]
        rebuilt = [combine(plans[str(d)]) for d in spec["dirs"]]  # each snapshot read once
        for i, s in enumerate(sigma_rels):
            experts = [_expert(d, rebuilt[j][i]) for j, d in enumerate(spec["dirs"])]
            model = Ensemble(nodes, experts).to(device)
            loss = loss_by_sigma(model, batches, sigmas, int(cfg.seed), device)
            rows.append(
                _row(
                    spec["label"], s, sigmas, loss, bands, [plans[str(d)][i] for d in spec["dirs"]]
                )
            )
        best = min(rows[1:], key=lambda r: r["mean_loss"])
        print(
            f"{spec['label']}: "
            + ", ".join(
                f"σ_rel {r['sigma_rel']:g} {r['mean_loss']:.4f}"
                if r["sigma_rel"] != STORED
                else f"stored EMA {r['mean_loss']:.4f}"
                for r in rows
            )
            + f" (best σ_rel {best['sigma_rel']:g})"
        )
        runs.append(
            {
                "label": spec["label"],
                "nodes": [str(d) for d in spec["dirs"]],
                "node_steps": spec["steps"],
                "best_sigma_rel": best["sigma_rel"],
                "rows": rows,
            }
        )
    report = {
        "metric": "ema_sweep",
        "sigma_rels": sigma_rels,
        "step": step,
        "sigmas": sigmas,
        "images": sum(b["image"].shape[0] for b in batches),
        "seed": int(cfg.seed),
        "runs": runs,
    }
    write_report(Path(str(cfg.out)), report)
    log_wandb(cfg, report, [])
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    """ema_sweep.json (everything) and ema_sweep.csv (run, σ_rel, mean loss, loss per σ)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ema_sweep.json", report)
    lines = [["run", "sigma_rel", "mean_loss", *[f"{s:.4g}" for s in report["sigmas"]]]]
    for run in report["runs"]:
        for r in run["rows"]:
            sr = r["sigma_rel"] if isinstance(r["sigma_rel"], str) else f"{r['sigma_rel']:g}"
            lines.append(
                [run["label"], sr, f"{r['mean_loss']:.6g}", *[f"{v:.6g}" for v in r["loss"]]]
            )
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(lines)
    write_text(out / "ema_sweep.csv", text.getvalue())
    print(f"wrote {out / 'ema_sweep.json'} and {out / 'ema_sweep.csv'}")
