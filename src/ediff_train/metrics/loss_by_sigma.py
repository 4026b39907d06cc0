"""Loss by σ: the EDM loss on held-out data at fixed noise levels, the experts' reason to exist.

An expert is worth training when, inside its band, its loss is below its parent's. Here the loss
is measured at a fixed grid of σ with fixed noise (the same draws for every model compared, so
differences are the models', not the sampling's), each σ answered by the expert that owns it
(an Ensemble routes; a single node answers everything). The training loop logs the same figure
on a coarse grid (`SigmaLossMonitor`) so a child can be watched improving inside its band; its
cadence follows the run's length (`monitor_steps`): a short child is measured as often as a long
root, and densely right after the hand-off, where a child that lost ground shows first.
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

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.edm import edm_loss
from ediff_train.core.sr import SIGMA_AUG_FLOOR


def sigma_grid(n: int = 40, lo: float = 0.002, hi: float = 80.0) -> list[float]:
    """n log-spaced σ values over [lo, hi] (EDM's sampling range by default)."""
    if n < 1 or not 0 < lo <= hi:
        raise ValueError(f"bad σ grid: n={n}, lo={lo}, hi={hi}")
    if n == 1:
        return [float(lo)]
    step = (math.log(hi) - math.log(lo)) / (n - 1)
    return [math.exp(math.log(lo) + i * step) for i in range(n)]


DENSE_START = (1, 2, 3, 5, 10)  # steps measured right after the start (the hand-off)


def monitor_steps(steps: int, every: int | str = "auto") -> Sequence[int]:
    """The run's steps (optimiser steps done, 0 = before the first) the monitor measures at.

    "auto": 0 and the last step always; between them one point per 50 steps, at most 10 (one
    measurement, 2 batches × 8 σ forward only, costs about 5 training steps, so the monitor stays
    near a tenth of the run: a 10-step smoke node is not mostly monitor); from 500 steps also
    1, 2, 3, 5, 10, where a hand-off goes wrong (the hand-off probe watches short children).
    An integer n: every n steps, as before (0 = never); a range, so a long run costs no memory."""
    steps = int(steps)
    if every == "auto":
        marks = {0, max(steps, 0)}
        points = min(10, steps // 50)
        if points:
            stride = max(1, steps // points)
            marks.update(range(stride, steps + 1, stride))
        if steps >= 500:
            marks.update(DENSE_START)
        return sorted(marks)
    n = int(every)
    return range(n, steps + 1, n) if n > 0 else range(0)


def heldout_inputs(
    batch: dict[str, Any], device: str | torch.device
) -> tuple[torch.Tensor, Conditioning]:
    """A held-out batch's clean images and its conditioning (full, no dropout): an SR stage gets
    its clean low-res at the clean σ_aug floor, so only the denoiser varies between models."""
    x = batch["image"].to(device, torch.float32)
    cond = Conditioning.from_batch(batch).to(device, torch.float32)
    if "lowres" in batch:
        cond = replace(
            cond,
            lowres=batch["lowres"].to(device, torch.float32),
            sigma_aug=torch.full((x.shape[0],), SIGMA_AUG_FLOOR, device=device),
        )
    return x, cond


def noise_seed(seed: int, batch: int, k: int) -> int:
    """Seed of the fixed noise for (batch, draw k): the same for every model compared."""
    return int(seed) * 1_000_003 + batch * 1009 + k


@torch.no_grad()
def loss_by_sigma(
    denoiser: nn.Module,
    batches: Sequence[dict[str, Any]],
    sigmas: Sequence[float],
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Mean λ(σ)·‖D(x+σn) − x‖² over the held-out batches at each σ (conditional, no dropout).

    Noise for (batch b, σ index k) is seeded by (seed, b, k): identical for every model."""
    totals = [0.0] * len(sigmas)
    count = 0
    for b, batch in enumerate(batches):
        x, cond = heldout_inputs(batch, device)
        for k, s in enumerate(sigmas):
            g = torch.Generator().manual_seed(noise_seed(seed, b, k))
            noise = torch.randn(x.shape, generator=g).to(device)
            sigma = torch.full((x.shape[0],), float(s), device=device)
            totals[k] += float(edm_loss(denoiser, x, sigma, cond, noise=noise).sum())
        count += x.shape[0]
    return [t / max(count, 1) for t in totals]


def band_means(
    sigmas: Sequence[float], losses: Sequence[float], bands: Sequence[tuple[str, float, float]]
) -> dict[str, float | None]:
    """Mean loss over the grid points inside each (name, σ_lo, σ_hi) band."""
    out: dict[str, float | None] = {}
    for name, lo, hi in bands:
        inside = [v for s, v in zip(sigmas, losses) if lo <= s < hi]
        out[name] = sum(inside) / len(inside) if inside else None
    return out


class StepCadence(Callback):
    """Calls `measure(trainer, module, k)` after k optimiser steps of this run, for k in `steps`.

    k = 0 is measured on_train_start (after the strategy set the model up, before any update:
    a child's hand-off weights); k > 0 on_train_batch_end when the run's global step reaches
    `start` + k (`start`: the global step the run begins at, a continuation's > 0). Each k once,
    also under gradient accumulation; a resumed run goes on after its checkpoint's step. Every
    rank decides alike from the global step, so collectives inside `measure` stay matched."""

    def __init__(self, steps: Sequence[int], start: int = 0) -> None:
        self.steps, self.start = steps, int(start)
        self._last = -1

    def setup_measure(self, trainer, module) -> bool:  # noqa: ANN001
        """Load what measuring needs (once, on train start); False turns measuring off."""
        return True

    def measure(self, trainer, module, k: int) -> None:  # noqa: ANN001
        raise NotImplementedError

    def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
        k = trainer.global_step - self.start
        self._last = k  # a resumed run measured its checkpoint's step before stopping
        if not self.steps or not self.setup_measure(trainer, module):
            self.steps = range(0)
        elif k == 0 and 0 in self.steps:
            self._measure_whole(trainer, module, 0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        k = trainer.global_step - self.start
        if k != self._last and k in self.steps:
            self._last = k
            self._measure_whole(trainer, module, k)

    def _measure_whole(self, trainer, module, k: int) -> None:  # noqa: ANN001
        """`measure` with every parameter whole: under ZeRO-3 a forward outside the engine would
        see the empty partitions of parameters used directly (the null token), so they are
        gathered for the measurement (a collective: every rank is here at the same step)."""
        if not getattr(trainer.strategy, "zero_stage_3", False):
            self.measure(trainer, module, k)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.denoiser.parameters())):
            self.measure(trainer, module, k)


class SigmaLossMonitor(StepCadence):
    """At the run's `steps` (`monitor_steps`): held-out loss at a coarse σ grid, logged (W&B/CSV
    logger) as `val/loss_sigma_<σ>` and appended to `<node dir>/loss_by_sigma.csv` (one row per
    measurement, `step` = the tree's global step: the parent's steps plus this run's).

    Runs on every rank (under ZeRO-3 a forward is a collective); rank 0 logs. It measures the
    weights being trained, not the EMA (which lags far behind early in a child's run)."""

    def __init__(
        self,
        batches: Callable[[], Sequence[dict[str, Any]]],
        sigmas: Sequence[float],
        steps: Sequence[int],
        csv_path: Path | None,
        seed: int = 0,
        start: int = 0,
    ) -> None:
        super().__init__(steps, start)
        self.load, self.sigmas = batches, list(sigmas)
        self.csv_path, self.seed = csv_path, seed
        self.batches: list[dict[str, Any]] = []

    def setup_measure(self, trainer, module) -> bool:  # noqa: ANN001
        # after prepare_data: the embedded data set may only now have been built
        self.batches = list(self.load())
        if not self.batches and trainer.is_global_zero:
            print(
                "loss-by-σ monitor off: this data names no held-out samples "
                "(set data.val_root or data.val_fraction)"
            )
        return bool(self.batches)

    def measure(self, trainer, module, k: int) -> None:  # noqa: ANN001
        was_training = module.denoiser.training
        module.denoiser.eval()
        losses = loss_by_sigma(module.denoiser, self.batches, self.sigmas, self.seed, module.device)
        module.denoiser.train(was_training)
        if not trainer.is_global_zero:
            return
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"val/loss_sigma_{s:.3g}": v for s, v in zip(self.sigmas, losses)},
                step=trainer.global_step,
            )
        if self.csv_path is not None:
            new = not self.csv_path.is_file()
            with self.csv_path.open("a", newline="") as fh:
                w = csv.writer(fh)
                if new:
                    w.writerow(["step", *[f"{s:.4g}" for s in self.sigmas]])
                w.writerow([module.total_step, *[f"{v:.6g}" for v in losses]])
