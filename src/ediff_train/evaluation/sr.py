"""Is an SR stage worth it? And does a cascade keep what its base got right?

metric=sr: the stage's held-out high-res images are down-sampled as in training (its loader's
`lowres`), super-resolved, and compared with the truth beside bicubic up-sampling of the same
inputs: PSNR (higher is better) and, on digits data, digits-FID in the features of a classifier
trained at the stage's own size (so sharpness counts), against the held-out truth.

metric=cascade: the caption set through a whole cascade file; on digits data every stage's
output is classified by the base data's classifier (the final images after down-sampling to
the base size), so the cascade's prompt accuracy can be read against its base's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from ediff_train import CONF_DIR
from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.evaluation.common import caption_set, load_spec, pick_device, run_specs
from ediff_train.io.files import write_json
from ediff_train.metrics.digits import classifier_for, prompt_digit
from ediff_train.metrics.fid import FeatureStats, fid_from_stats
from ediff_train.run.weights import load_train_config
from ediff_train.sampling.cascade import (
    comparison_rows,
    load_stages,
    read_cascade,
    run_cascade,
    upsample,
)
from ediff_train.sampling.generation import generate


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def _features(model: Any, images: Tensor) -> Tensor:
    return torch.cat([model.features(images[i : i + 512]) for i in range(0, len(images), 512)])


def evaluate_sr(cfg: DictConfig) -> dict[str, Any]:
    """PSNR and digits-FID of an SR stage (each σ_aug asked) vs bicubic on held-out pairs."""

    c = cfg.sr
    device = pick_device(str(cfg.device))
    spec = run_specs(cfg)[0]
    train_cfg = load_train_config(spec["dirs"][0])
    if not train_cfg.data.get("lowres_size"):
        raise EdiffError(f"{spec['dirs'][0]} is not a super-resolution stage (metric=sr)")
    data = instantiate(train_cfg.data, builder=None, _convert_="object")
    bs = int(cfg.batch_size)
    batches = data.val_batches(max(1, math.ceil(int(c.images) / bs)), bs)
    if not batches:
        raise EdiffError(f"no held-out data for {train_cfg.data.root} (data.val_root)")
    truth = torch.cat([b["image"] for b in batches]) * 0.5 + 0.5
    low = torch.cat([b["lowres"] for b in batches]) * 0.5 + 0.5
    size = truth.shape[-1]
    model = load_spec(spec, str(cfg.weights), device)
    outputs: dict[str, Tensor] = {"bicubic": upsample(low, size)}
    levels = [
        float(s)
        for s in (c.sigma_aug if not isinstance(c.sigma_aug, (int, float)) else [c.sigma_aug])
    ]
    for level in levels:
        parts, start = [], 0
        for b in batches:
            n = b["image"].shape[0]
            cond = Conditioning.from_batch(b).without_image().to(device)
            parts.append(
                generate(
                    model,
                    cond,
                    image_size=size,
                    steps=int(cfg.steps),
                    guidance=float(c.guidance),
                    seed=int(cfg.seed) + start,
                    lowres=low[start : start + n],
                    sigma_aug=level,
                ).cpu()
            )
            start += n
        outputs[f"SR σ_aug={level:g}"] = torch.cat(parts)
    classifier = classifier_for(train_cfg, size, int(cfg.metrics.classifier_steps))
    labels = torch.tensor(
        [
            prompt_digit(cap) if prompt_digit(cap) is not None else -1
            for b in batches
            for cap in b["caption"]
        ]
    )
    rows = []
    ref = FeatureStats().update(_features(classifier, truth)) if classifier else None
    for name, images in outputs.items():
        row: dict[str, Any] = {
            "method": name,
            "psnr_db": round(float(psnr(images, truth).mean()), 3),
        }
        if classifier is not None:
            feats = _features(classifier, images)
            row["digits_fid"] = round(fid_from_stats(FeatureStats().update(feats), ref), 3)
            known = labels >= 0
            guess = classifier.head(feats).argmax(1)
            row["digit_accuracy"] = round(float((guess[known] == labels[known]).float().mean()), 4)
        rows.append(row)
    report = {
        "metric": "sr",
        "run": spec["label"],
        "nodes": [str(d) for d in spec["dirs"]],
        "node_steps": spec["steps"],
        "images": len(truth),
        "low_res": low.shape[-1],
        "high_res": size,
        "steps": int(cfg.steps),
        "guidance": float(c.guidance),
        "seed": int(cfg.seed),
        "weights": str(cfg.weights),
        "rows": rows,
        "digits_fid_features": f"digit classifier at {size} px" if classifier else None,
    }
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sr.json", report)
    k = min(10, len(truth))
    grid = {"low-res": low[:k], "bicubic": outputs["bicubic"][:k]}
    grid |= {name: v[:k] for name, v in outputs.items() if name != "bicubic"}
    comparison_rows({**grid, "high-res": truth[:k]}, upscale=max(1, 64 // size)).save(
        out / "sr_samples.png"
    )
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    print(f"wrote {out / 'sr.json'} and {out / 'sr_samples.png'}")
    return report


def evaluate_cascade(cfg: DictConfig) -> dict[str, Any]:
    """Every stage's prompt accuracy (digits) for the caption set through a cascade file."""

    conf_dir = CONF_DIR / "cascade"
    stages, description = read_cascade(str(cfg.cascade), conf_dir)
    device = str(pick_device(str(cfg.device)))
    loaded = load_stages(stages, device)
    items, described = caption_set(cfg)
    base_size = loaded[0].image_size
    classifier = classifier_for(loaded[0].train_cfg, base_size, int(cfg.metrics.classifier_steps))
    if classifier is None:
        raise EdiffError("metric=cascade scores digits cascades (a digits base stage)")
    bs = int(cfg.batch_size)
    right = [0] * len(loaded)
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        outs = run_cascade(
            loaded, [it.caption for it in chunk], seed=int(cfg.seed) + i, device=device
        )
        want = torch.tensor([it.digit for it in chunk])
        for k, images in enumerate(outs):  # the classifier resizes (antialiased) to base size
            right[k] += int((classifier(images.cpu()).argmax(1) == want).sum())
    acc = [round(r / len(items), 4) for r in right]
    report = {
        "metric": "cascade",
        "cascade": str(cfg.cascade),
        "description": description,
        "captions": described,
        "images": len(items),
        "seed": int(cfg.seed),
        "stages": [
            {
                "name": ls.stage.name,
                "run_dir": ls.stage.run_dir,
                "experts": ls.stage.experts,
                "size": ls.image_size,
                "steps": ls.stage.steps,
                "guidance": ls.stage.guidance,
                "sigma_aug": ls.stage.sigma_aug,
                "prompt_accuracy": a,
            }
            for ls, a in zip(loaded, acc)
        ],
    }
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cascade.json", report)
    for s in report["stages"]:
        print(f"{s['name']} ({s['size']} px): prompt accuracy {s['prompt_accuracy']}")
    print(f"wrote {out / 'cascade.json'}")
    return report
