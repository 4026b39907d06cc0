"""Evaluate nodes and ensembles of a run directory (what `evaluate.py` runs).

metric=images: for each ensemble and guidance scale, generate the caption set (split across
ranks, resumable) and score it: prompt accuracy + digits-FID on the embedded digits, FID +
CLIP score on real data. Writes eval.json (every figure with its exact settings), sweep.csv and
fid_clip.png. metric=loss_by_sigma: held-out loss at a fixed σ grid, each σ answered by its
owner; writes loss_by_sigma.{json,csv,png} and prints each band's loss per run.
"""

from __future__ import annotations

import csv
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ediff_train.checkpoints import load_encoders, load_train_config, read_node_json, write_json
from ediff_train.errors import EdiffError
from ediff_train.experts import Router, node_from_config
from ediff_train.metrics.captions import Item, digits_items, file_items
from ediff_train.metrics.generation import (
    claim_folder,
    generate_items,
    rank_world,
    wait_for_images,
)
from ediff_train.sampling import Ensemble, embed_prompts, generate, load_ensemble


def run_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The ensembles to evaluate: `experts` (or `expert`) first, then each of `compare`.
    An entry "path/to/run/E0_0" names a node of another run dir."""
    first = list(cfg.experts) if cfg.get("experts") else [str(cfg.expert)]
    specs = []
    for names in [first, *[list(c) if not isinstance(c, str) else [c]
                           for c in (cfg.get("compare") or [])]]:
        dirs = [Path(n) if "/" in str(n) else Path(cfg.run_dir) / str(n) for n in names]
        for d in dirs:
            if not (d / "weights.safetensors").is_file():
                raise EdiffError(f"no trained node at {d} (weights.safetensors missing); "
                                 f"train it first or fix run_dir/experts")
        # the tiling is checked here, before anything is generated or written
        Router([node_from_config(load_train_config(d).expert) for d in dirs])
        label = "+".join(d.name if d.parent == Path(cfg.run_dir) else str(d) for d in dirs)
        specs.append({"label": label, "dirs": dirs,
                      "steps": {d.name: read_node_json(d).get("step") for d in dirs}})
    return specs


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def load_spec(spec: dict[str, Any], weights: str, device: torch.device) -> Ensemble:
    """The ensemble's experts from their node folders (the Router refuses a bad tiling)."""
    return load_ensemble(".", [str(d) for d in spec["dirs"]], weights).to(device)


def caption_set(cfg: DictConfig) -> tuple[list[Item], str]:
    c = cfg.captions
    if str(c.source) == "digits":
        items = digits_items(int(c.per_caption), str(c.templates))
        return items, f"digits prompts ({c.templates} wordings × {c.per_caption} each)"
    items = file_items(str(c.source), c.get("n"), int(c.get("seed", 0)))
    return items, f"{c.source} ({len(items)} captions, seed {c.get('seed', 0)})"


def build_scorer(cfg: DictConfig, train_cfg: Any, items: list[Item], size: int,
                 device: torch.device) -> Any:
    """Digits analogues for digits data (backend auto/digits), else Inception + CLIP."""
    from ediff_train.data.heldout import validation_source
    from ediff_train.data.manifest import read_manifest
    from ediff_train.metrics import scorers

    m = cfg.metrics
    root = Path(str(train_cfg.data.root))
    backend = str(m.backend)
    if backend == "auto":
        backend = "digits" if read_manifest(root).get("dataset") == "digits" else "real"
    if backend == "digits":
        val = validation_source(root, train_cfg.data.get("val_root"))
        if val is None:
            raise EdiffError(f"digits metrics need the held-out split: {root} names none")
        return scorers.DigitsScorer(root, val[0], int(m.classifier_steps))
    if backend != "real":
        raise EdiffError(f"metrics.backend must be auto, digits or real, got {backend!r}")
    if m.get("reference"):
        reference = [str(p) for p in scorers.image_files(str(m.reference))]
    else:
        reference = sorted({it.image for it in items if it.image})
    if not reference:
        raise EdiffError("FID needs real images: set metrics.reference=/path/to/folder or use "
                         "a captions file whose lines name images")
    cache = os.environ.get("EDIFF_CACHE") or Path.home() / ".cache" / "ediff_train"
    return scorers.RealScorer(m.get("inception_weights"), str(m.clip_model),
                              m.get("clip_checkpoint"), reference,
                              int(m.get("reference_size") or size), cache, device)


def _guidance_list(cfg: DictConfig) -> list[float]:
    g = cfg.guidance
    values = list(g) if OmegaConf.is_list(g) or isinstance(g, (list, tuple)) else [g]
    return [float(v) for v in values]


def evaluate_images(cfg: DictConfig) -> dict[str, Any] | None:
    """Generate + score every (ensemble, guidance); rank 0 writes the reports."""
    rank, world = rank_world()
    device = pick_device(str(cfg.device))
    specs = run_specs(cfg)
    items, described = caption_set(cfg)
    out = Path(str(cfg.out))
    train_cfg = load_train_config(specs[0]["dirs"][0])
    size = int(train_cfg.data.image_size)
    encoders = load_encoders(train_cfg)
    scales = _guidance_list(cfg)
    # rank 0 builds its scorer first: missing weights or an empty reference set fail before
    # any image is generated
    scorer = build_scorer(cfg, train_cfg, items, size, device) if rank == 0 else None
    timings: dict[str, Any] = {}
    for spec in specs:  # generation: every rank its share
        model = load_spec(spec, str(cfg.weights), device)
        for g in scales:
            folder = out / spec["label"] / f"guidance_{g:g}"

            def sample(captions: list[str], noise: torch.Tensor, g: float = g,
                       model: Ensemble = model) -> torch.Tensor:
                cond = embed_prompts(encoders, captions).to(device)
                return generate(model, cond, size, steps=int(cfg.steps), guidance=g,
                                sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max),
                                rho=float(cfg.rho), noise=noise)

            claim_folder(folder, {
                "nodes": [str(d.resolve()) for d in spec["dirs"]], "node_steps": spec["steps"],
                "weights": str(cfg.weights), "guidance": g, "steps": int(cfg.steps),
                "sigma_min": float(cfg.sigma_min), "sigma_max": float(cfg.sigma_max),
                "rho": float(cfg.rho), "seed": int(cfg.seed), "captions": described,
                "size": size})
            timings[f"{spec['label']}@{g:g}"] = generate_items(
                sample, items, folder, (3, size, size), seed=int(cfg.seed),
                batch_size=int(cfg.batch_size), rank=rank, world=world)
    if scorer is None:
        return None
    runs = []
    for spec in specs:
        rows = []
        for g in scales:
            folder = out / spec["label"] / f"guidance_{g:g}"
            wait_for_images(folder, items, float(cfg.wait_timeout))
            row = {"guidance": g, **scorer.score(folder, items),
                   "generation": timings[f"{spec['label']}@{g:g}"]}
            rows.append(row)
            print(f"{spec['label']} guidance {g:g}: " + ", ".join(
                f"{k} {row[k]}" for k in (scorer.y_key, scorer.x_key)))
        runs.append({"label": spec["label"], "nodes": [str(d) for d in spec["dirs"]],
                     "node_steps": spec["steps"], "rows": rows})
    report = {
        "metric": "images", "scorer": scorer.name, "captions": described, "images": len(items),
        "settings": {"weights": str(cfg.weights), "solver": "heun (EDM)", "steps": int(cfg.steps),
                     "sigma_min": float(cfg.sigma_min), "sigma_max": float(cfg.sigma_max),
                     "rho": float(cfg.rho), "seed": int(cfg.seed), "guidance": scales,
                     "ranks": world, "device": str(device)},
        "machine": {"host": platform.node(), "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__},
        "runs": runs, **({"classifier": scorer.info} if hasattr(scorer, "info") else {}),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_reports(out, report, scorer)
    log_wandb(cfg, report, [out / "fid_clip.png"])
    return report


def write_reports(out: Path, report: dict[str, Any], scorer: Any) -> None:
    from ediff_train.metrics.plots import fid_clip_plot

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", report)
    keys = [scorer.y_key, scorer.x_key]
    tmp = out / ".sweep.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "guidance", *keys, "images"])
        for run in report["runs"]:
            for row in run["rows"]:
                w.writerow([run["label"], row["guidance"], *[row[k] for k in keys],
                            row["images"]])
    os.replace(tmp, out / "sweep.csv")
    fid_clip_plot(report["runs"], scorer.x_key, scorer.y_key, scorer.x_label, scorer.y_label,
                  out / "fid_clip.png")
    print(f"wrote {out / 'eval.json'}, {out / 'sweep.csv'} and {out / 'fid_clip.png'}")


def log_wandb(cfg: DictConfig, report: dict[str, Any], plots: list[Path]) -> None:
    """The report's figures, its table and its plots as one W&B run (offline unless
    WANDB_MODE says otherwise), when `wandb: true`."""
    if not cfg.get("wandb"):
        return
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project=str(cfg.get("wandb_project") or "ediff-train-eval"),
                     dir=str(cfg.out), config={"metric": report["metric"],
                                               **report.get("settings", {})},
                     name=f"{report['metric']}:{','.join(r['label'] for r in report['runs'])}")
    try:
        data: dict[str, Any] = {p.stem: wandb.Image(str(p)) for p in plots if p.is_file()}
        for r in report["runs"]:
            for row in r.get("rows", []):
                cols = [k for k, v in row.items() if isinstance(v, (int, float))]
                data.setdefault("table_cols", cols)
                data.setdefault("table_rows", []).append([r["label"], *[row[c] for c in cols]])
        if "table_rows" in data:
            cols = data.pop("table_cols")
            data["results"] = wandb.Table(columns=["run", *cols], data=data.pop("table_rows"))
        run.log(data)
    finally:
        run.finish()


def evaluate_loss_by_sigma(cfg: DictConfig) -> dict[str, Any]:
    """Held-out loss at a fixed σ grid for every ensemble; each σ routed to its owner."""
    from hydra.utils import instantiate

    from ediff_train.metrics.loss_by_sigma import band_means, loss_by_sigma, sigma_grid
    from ediff_train.metrics.plots import loss_by_sigma_plot

    c = cfg.loss_by_sigma
    device = pick_device(str(cfg.device))
    specs = run_specs(cfg)
    train_cfg = load_train_config(specs[0]["dirs"][0])
    data = instantiate(train_cfg.data, builder=None, _convert_="object")
    bs = int(c.batch_size)
    batches = data.val_batches(max(1, int(c.images) // bs), bs)
    if not batches:
        raise EdiffError(f"no held-out data for {train_cfg.data.root}: set data.val_root or "
                         "data.val_fraction when training (digits builds hold out val/)")
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
        runs.append({"label": spec["label"], "nodes": [str(d) for d in spec["dirs"]],
                     "node_steps": spec["steps"], "sigmas": sigmas, "loss": loss,
                     "owner": [model.router.nodes[i].name for i in owners], "bands": bands})
    # every band of every run, with every run's mean loss inside it
    all_bands = {b["node"]: (b["sigma_lo"], b["sigma_hi"]) for r in runs for b in r["bands"]}
    table = {name: {r["label"]: band_means(sigmas, r["loss"], [(name, lo, hi)])[name]
                    for r in runs} for name, (lo, hi) in all_bands.items()}
    report = {"metric": "loss_by_sigma", "images": sum(b["image"].shape[0] for b in batches),
              "seed": int(cfg.seed), "weights": str(cfg.weights), "runs": runs,
              "band_means": table}
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "loss_by_sigma.json", report)
    with (out / "loss_by_sigma.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sigma", *[f"{r['label']}" for r in runs], *[f"owner:{r['label']}"
                                                                  for r in runs]])
        for k, s in enumerate(sigmas):
            w.writerow([f"{s:.6g}", *[f"{r['loss'][k]:.6g}" for r in runs],
                        *[r["owner"][k] for r in runs]])
    loss_by_sigma_plot(runs, out / "loss_by_sigma.png")
    for name, per in table.items():
        lo, hi = all_bands[name]
        print(f"band {name} (σ {lo:.4g}–{hi:.4g}): " + ", ".join(
            f"{label} {v:.4f}" if v is not None else f"{label} –" for label, v in per.items()))
    print(f"wrote {out / 'loss_by_sigma.json'}, .csv and .png")
    log_wandb(cfg, report, [out / "loss_by_sigma.png"])
    return report
