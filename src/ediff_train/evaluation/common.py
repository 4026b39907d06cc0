"""Helpers every evaluate.py metric shares: which runs, which device, which captions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ediff_train.core.experts import Router
from ediff_train.errors import EdiffError
from ediff_train.metrics.captions import Item, digits_items, file_items
from ediff_train.run.adapters import is_lora_node
from ediff_train.run.layout import WEIGHTS, read_node_json
from ediff_train.run.weights import load_codec, load_train_config, node_of
from ediff_train.sampling.ensemble import Ensemble, load_ensemble


def run_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The ensembles to evaluate: `experts` (or `expert`) first, then each of `compare`.
    An entry "path/to/run/E0_0" names a node of another run dir."""
    first = list(cfg.experts) if cfg.get("experts") else [str(cfg.expert)]
    specs = []
    for names in [
        first,
        *[list(c) if not isinstance(c, str) else [c] for c in (cfg.get("compare") or [])],
    ]:
        dirs = [Path(n) if "/" in str(n) else Path(cfg.run_dir) / str(n) for n in names]
        for d in dirs:
            if not (d / WEIGHTS).is_file() and not is_lora_node(d):  # LoRA: run/adapters.py
                raise EdiffError(
                    f"no trained node at {d} (weights.safetensors missing); "
                    f"train it first or fix run_dir/experts"
                )
        # the tiling is checked here, before anything is generated or written
        Router([node_of(load_train_config(d)) for d in dirs])
        label = "+".join(d.name if d.parent == Path(cfg.run_dir) else str(d) for d in dirs)
        specs.append(
            {
                "label": label,
                "dirs": dirs,
                "steps": {d.name: read_node_json(d).get("step") for d in dirs},
            }
        )
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


def guidance_list(cfg: DictConfig) -> list[float]:
    g = cfg.guidance
    values = list(g) if OmegaConf.is_list(g) or isinstance(g, (list, tuple)) else [g]
    return [float(v) for v in values]


def log_wandb(cfg: DictConfig, report: dict[str, Any], plots: list[Path]) -> None:
    """The report's figures, its table and its plots as one W&B run (offline unless
    WANDB_MODE says otherwise), when `wandb: true`."""
    if not cfg.get("wandb"):
        return
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(
        project=str(cfg.get("wandb_project") or "ediff-train-eval"),
        dir=str(cfg.out),
        config={"metric": report["metric"], **report.get("settings", {})},
        name=f"{report['metric']}:{','.join(r['label'] for r in report['runs'])}",
    )
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


def heldout_batches(train_cfg: Any, images: int, batch_size: int) -> list[Any]:
    """The run's fixed held-out batches (about `images` samples); one line when it has none.
    A VAE run's batches hold its latents (loss by σ stays in latent space, docs/latent.md)."""
    codec = load_codec(train_cfg)
    spec = None if codec.is_identity else codec.spec()
    data = instantiate(train_cfg.data, builder=None, codec=spec, _convert_="object")
    batches = data.val_batches(max(1, images // batch_size), batch_size)
    if not batches:
        raise EdiffError(
            f"no held-out data for {train_cfg.data.root}: set data.val_root or "
            "data.val_fraction when training (digits builds hold out val/)"
        )
    return batches
