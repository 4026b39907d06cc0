"""The preview a node leaves at the end of its training: samples.png from the EMA weights (a
grid of the configured prompts, or an SR stage's held-out images super-resolved). Apart from
loop.py so a node that makes no grid (`sample.per_prompt=0`) never imports the sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ediff_train.core.conditioning import Conditioning
from ediff_train.run.layout import node_dir
from ediff_train.run.weights import load_codec, load_encoders
from ediff_train.sampling.cascade import comparison_rows, upsample
from ediff_train.sampling.generation import embed_prompts, generate
from ediff_train.sampling.grids import labelled_grid


def sample_grid(cfg: DictConfig, module: Any, data: Any = None) -> Path:
    """A grid from the EMA weights for the configured prompts (rows: prompts); for an SR stage,
    held-out low-res images super-resolved, beside bicubic and the truth."""
    if module.sr is not None:
        return sr_preview(cfg, module, data)
    encoders = load_encoders(cfg)
    prompts = [p for p in cfg.sample.prompts for _ in range(int(cfg.sample.per_prompt))]
    cond = embed_prompts(encoders, prompts)
    denoiser = module.ema.to("cpu").float()
    codec = load_codec(cfg)
    images = generate(
        denoiser,
        cond,
        image_size=int(cfg.data.image_size) // codec.downsample,
        steps=int(cfg.sample.steps),
        guidance=float(cfg.sample.guidance),
        seed=int(cfg.seed),
        channels=codec.channels,
        decode=None if codec.is_identity else codec.decode,
    )
    path = node_dir(cfg.run_dir, module.node.name) / "samples.png"
    labelled_grid(images, list(cfg.sample.prompts), int(cfg.sample.per_prompt), upscale=4).save(
        path
    )
    return path


def sr_preview(cfg: DictConfig, module: Any, data: Any) -> Path:
    """Rows low-res | bicubic | SR | high-res for held-out images (their own captions)."""

    n = 10  # one row of ten held-out images per method
    batches = data.val_batches(1, n) if hasattr(data, "val_batches") else []
    path = node_dir(cfg.run_dir, module.node.name) / "samples.png"
    if not batches:
        print("no held-out images to preview the SR stage with (set data.val_root)")
        return path
    batch = batches[0]
    truth, low = batch["image"] * 0.5 + 0.5, batch["lowres"] * 0.5 + 0.5
    cond = Conditioning.from_batch(batch).without_image()
    sr = generate(
        module.ema.to("cpu").float(),
        cond,
        image_size=truth.shape[-1],
        steps=int(cfg.sample.steps),
        guidance=float(cfg.sample.guidance),
        seed=int(cfg.seed),
        lowres=low,
        sigma_aug=float(cfg.sr.sample_sigma_aug),
    )
    rows = {"low-res": low, "bicubic": upsample(low, truth.shape[-1]), "SR": sr, "high-res": truth}
    comparison_rows(rows, upscale=max(1, 64 // truth.shape[-1])).save(path)
    return path
