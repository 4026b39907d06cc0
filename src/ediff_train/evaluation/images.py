"""metric=images: FID/CLIP/digits scores per ensemble and guidance scale."""

from __future__ import annotations

import csv
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ediff_train.data.heldout import validation_source
from ediff_train.data.manifest import read_manifest
from ediff_train.errors import EdiffError
from ediff_train.evaluation.common import (
    caption_set,
    guidance_list,
    load_spec,
    log_wandb,
    pick_device,
    run_specs,
)
from ediff_train.io.files import write_json
from ediff_train.metrics import scorers
from ediff_train.metrics.captions import Item
from ediff_train.metrics.generation import claim_folder, generate_items, rank_world, wait_for_images
from ediff_train.metrics.plots import fid_clip_plot
from ediff_train.run.weights import load_codec, load_encoders, load_train_config
from ediff_train.sampling.cost import trained_cost
from ediff_train.sampling.ensemble import Ensemble
from ediff_train.sampling.generation import embed_prompts, generate
from ediff_train.sampling.guidance import TEXT_MODES, text_only


def build_scorer(
    cfg: DictConfig, train_cfg: Any, items: list[Item], size: int, device: torch.device
) -> Any:
    """Digits analogues for digits data (backend auto/digits), else Inception + CLIP."""

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
        raise EdiffError(
            "FID needs real images: set metrics.reference=/path/to/folder or use "
            "a captions file whose lines name images"
        )
    cache = os.environ.get("EDIFF_CACHE") or Path.home() / ".cache" / "ediff_train"
    return scorers.RealScorer(
        m.get("inception_weights"),
        str(m.clip_model),
        m.get("clip_checkpoint"),
        reference,
        int(m.get("reference_size") or size),
        cache,
        device,
    )


ScorerFactory = Callable[[DictConfig, Any, list[Item], int, torch.device], Any]


def evaluate_images(
    cfg: DictConfig,
    captions: tuple[list[Item], str] | None = None,
    make_scorer: ScorerFactory | None = None,
    metric: str = "images",
) -> dict[str, Any] | None:
    """Generate + score every (ensemble, guidance); rank 0 writes the reports. A metric of its
    own (metric=shapes) passes its caption set and its scorer; the default is `captions:` and
    `build_scorer`."""
    rank, world = rank_world()
    device = pick_device(str(cfg.device))
    specs = run_specs(cfg)
    items, described = captions if captions is not None else caption_set(cfg)
    out = Path(str(cfg.out))
    train_cfg = load_train_config(specs[0]["dirs"][0])
    size = int(train_cfg.data.image_size)
    encoders = load_encoders(train_cfg)
    # a VAE run samples latents and scores the decoded pixels (docs/latent.md)
    codec = load_codec(train_cfg, device)
    side, decode = size // codec.downsample, None if codec.is_identity else codec.decode
    scales = guidance_list(cfg)
    text = str(cfg.get("text", "both"))  # the encoder study: t5 or clip alone (guidance.py)
    if text not in TEXT_MODES:  # before anything is generated
        raise EdiffError(f"text must be one of {', '.join(TEXT_MODES)}, got {text!r}")
    # rank 0 builds its scorer first: missing weights or an empty reference set fail before
    # any image is generated
    make = make_scorer or build_scorer
    scorer = make(cfg, train_cfg, items, size, device) if rank == 0 else None
    timings: dict[str, Any] = {}
    for spec in specs:  # generation: every rank its share
        model = load_spec(spec, str(cfg.weights), device)
        for g in scales:
            folder = out / spec["label"] / f"guidance_{g:g}"

            def sample(
                captions: list[str], noise: torch.Tensor, g: float = g, model: Ensemble = model
            ) -> torch.Tensor:
                cond = text_only(embed_prompts(encoders, captions), text).to(device)
                return generate(
                    model,
                    cond,
                    side,
                    steps=int(cfg.steps),
                    guidance=g,
                    sigma_min=float(cfg.sigma_min),
                    sigma_max=float(cfg.sigma_max),
                    rho=float(cfg.rho),
                    channels=codec.channels,
                    noise=noise,
                    decode=decode,
                )

            claim_folder(
                folder,
                {
                    "nodes": [str(d.resolve()) for d in spec["dirs"]],
                    "node_steps": spec["steps"],
                    "weights": str(cfg.weights),
                    "guidance": g,
                    "steps": int(cfg.steps),
                    "sigma_min": float(cfg.sigma_min),
                    "sigma_max": float(cfg.sigma_max),
                    "rho": float(cfg.rho),
                    "seed": int(cfg.seed),
                    "captions": described,
                    "size": size,
                    **({"text": text} if text != "both" else {}),  # older folders: both
                },
            )
            timings[f"{spec['label']}@{g:g}"] = generate_items(
                sample,
                items,
                folder,
                (codec.channels, side, side),
                seed=int(cfg.seed),
                batch_size=int(cfg.batch_size),
                rank=rank,
                world=world,
            )
    if scorer is None:
        return None
    runs = []
    for spec in specs:
        rows = []
        for g in scales:
            folder = out / spec["label"] / f"guidance_{g:g}"
            wait_for_images(folder, items, float(cfg.wait_timeout))
            cost = trained_cost(
                spec["dirs"],
                steps=int(cfg.steps),
                guidance=g,
                sigma_min=float(cfg.sigma_min),
                sigma_max=float(cfg.sigma_max),
                rho=float(cfg.rho),
                measure=False,  # the measured time is the generation's own, below
            )
            gen = timings[f"{spec['label']}@{g:g}"]
            row = {
                "guidance": g,
                **scorer.score(folder, items),
                "generation": gen,
                "cost": cost.record(),
            }
            rows.append(row)
            rate = gen.get("images_per_second")
            print(
                f"{spec['label']} guidance {g:g}: "
                + ", ".join(f"{k} {row[k]}" for k in (scorer.y_key, scorer.x_key))
                + f"; cost {cost.flops / 1e9:.3f} GFLOP/image ({cost.flops_ratio:.3f}× root)"
                + (f", {1 / rate:.3f} s/image measured" if rate else "")
            )
        runs.append(
            {
                "label": spec["label"],
                "nodes": [str(d) for d in spec["dirs"]],
                "node_steps": spec["steps"],
                "rows": rows,
            }
        )
    report = {
        "metric": metric,
        "scorer": scorer.name,
        "captions": described,
        "images": len(items),
        "settings": {
            "weights": str(cfg.weights),
            "solver": "heun (EDM)",
            "steps": int(cfg.steps),
            "sigma_min": float(cfg.sigma_min),
            "sigma_max": float(cfg.sigma_max),
            "rho": float(cfg.rho),
            "seed": int(cfg.seed),
            "guidance": scales,
            "text": text,
            "ranks": world,
            "device": str(device),
        },
        "machine": {
            "host": platform.node(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
        },
        "runs": runs,
        **({"classifier": scorer.info} if hasattr(scorer, "info") else {}),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_reports(out, report, scorer)
    log_wandb(cfg, report, [out / "fid_clip.png"])
    return report


def write_reports(out: Path, report: dict[str, Any], scorer: Any) -> None:

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", report)
    keys = [scorer.y_key, scorer.x_key]
    tmp = out / ".sweep.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "guidance", *keys, "images"])
        for run in report["runs"]:
            for row in run["rows"]:
                w.writerow([run["label"], row["guidance"], *[row[k] for k in keys], row["images"]])
    os.replace(tmp, out / "sweep.csv")
    fid_clip_plot(
        report["runs"],
        scorer.x_key,
        scorer.y_key,
        scorer.x_label,
        scorer.y_label,
        out / "fid_clip.png",
    )
    print(f"wrote {out / 'eval.json'}, {out / 'sweep.csv'} and {out / 'fid_clip.png'}")
