"""Loss by σ: the EDM loss on held-out data at fixed noise levels, the experts' reason to exist.

An expert is worth training when, inside its band, its loss is below its parent's. Here the loss
is measured at a fixed grid of σ with fixed noise (the same draws for every model compared, so
differences are the models', not the sampling's), each σ answered by the expert that owns it
(an Ensemble routes; a single node answers everything). The training loop logs the same figure
on a coarse grid (`SigmaLossMonitor`) so a child can be watched improving inside its band.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ediff_train.conditioning import Conditioning
from ediff_train.edm import edm_loss
from ediff_train.sr import SIGMA_AUG_FLOOR


def sigma_grid(n: int = 40, lo: float = 0.002, hi: float = 80.0) -> list[float]:
    """n log-spaced σ values over [lo, hi] (EDM's sampling range by default)."""
    if n < 1 or not 0 < lo <= hi:
        raise ValueError(f"bad σ grid: n={n}, lo={lo}, hi={hi}")
    if n == 1:
        return [float(lo)]
    step = (math.log(hi) - math.log(lo)) / (n - 1)
    return [math.exp(math.log(lo) + i * step) for i in range(n)]


@torch.no_grad()
def loss_by_sigma(denoiser: nn.Module, batches: Sequence[dict[str, Any]],
                  sigmas: Sequence[float], seed: int = 0,
                  device: str | torch.device = "cpu") -> list[float]:
    """Mean λ(σ)·‖D(x+σn) − x‖² over the held-out batches at each σ (conditional, no dropout).

    Noise for (batch b, σ index k) is seeded by (seed, b, k): identical for every model."""
    totals = [0.0] * len(sigmas)
    count = 0
    for b, batch in enumerate(batches):
        x = batch["image"].to(device, torch.float32)
        cond = Conditioning.from_batch(batch).to(device, torch.float32)
        if "lowres" in batch:  # an SR stage: its clean low-res, at the clean σ_aug floor
            cond = replace(cond, lowres=batch["lowres"].to(device, torch.float32),
                           sigma_aug=torch.full((x.shape[0],), SIGMA_AUG_FLOOR, device=device))
        for k, s in enumerate(sigmas):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b * 1009 + k)
            noise = torch.randn(x.shape, generator=g).to(device)
            sigma = torch.full((x.shape[0],), float(s), device=device)
            totals[k] += float(edm_loss(denoiser, x, sigma, cond, noise=noise).sum())
        count += x.shape[0]
    return [t / max(count, 1) for t in totals]


def band_means(sigmas: Sequence[float], losses: Sequence[float],
               bands: Sequence[tuple[str, float, float]]) -> dict[str, float | None]:
    """Mean loss over the grid points inside each (name, σ_lo, σ_hi) band."""
    out: dict[str, float | None] = {}
    for name, lo, hi in bands:
        inside = [v for s, v in zip(sigmas, losses) if lo <= s < hi]
        out[name] = sum(inside) / len(inside) if inside else None
    return out


class SigmaLossMonitor(Callback):
    """Every `every` steps: held-out loss at a coarse σ grid, logged (W&B/CSV logger) as
    `val/loss_sigma_<σ>` and appended to `<node dir>/loss_by_sigma.csv`.

    Runs on every rank (under ZeRO-3 a forward is a collective); rank 0 logs. It measures the
    weights being trained, not the EMA (which lags far behind early in a child's run)."""

    def __init__(self, batches: Callable[[], Sequence[dict[str, Any]]], sigmas: Sequence[float],
                 every: int, csv_path: Path | None, seed: int = 0) -> None:
        self.load, self.sigmas, self.every = batches, list(sigmas), int(every)
        self.csv_path, self.seed = csv_path, seed
        self.batches: list[dict[str, Any]] = []

    def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
        # after prepare_data: the embedded data set may only now have been built
        self.batches = list(self.load()) if self.every > 0 else []
        if self.every > 0 and not self.batches and trainer.is_global_zero:
            print("loss-by-σ monitor off: this data names no held-out samples "
                  "(set data.val_root or data.val_fraction)")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step
        if self.every <= 0 or step % self.every != 0 or not self.batches:
            return
        was_training = module.denoiser.training
        module.denoiser.eval()
        losses = loss_by_sigma(module.denoiser, self.batches, self.sigmas, self.seed,
                               module.device)
        module.denoiser.train(was_training)
        if not trainer.is_global_zero:
            return
        total = module.total_step
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"val/loss_sigma_{s:.3g}": v for s, v in zip(self.sigmas, losses)}, step=step)
        if self.csv_path is not None:
            new = not self.csv_path.is_file()
            with self.csv_path.open("a", newline="") as fh:
                w = csv.writer(fh)
                if new:
                    w.writerow(["step", *[f"{s:.4g}" for s in self.sigmas]])
                w.writerow([total, *[f"{v:.6g}" for v in losses]])

