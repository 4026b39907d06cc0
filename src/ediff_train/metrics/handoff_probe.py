"""The hand-off probe: does a child hold its parent's ground inside its own band?

A child starts from its parent's weights, so at step 0 its in-band loss is the parent's. A child
whose first updates are too large (a reset AdamW: its first steps are sign-like, ~lr per weight;
or a high lr without warmup) loses ground there (+62 % in-band loss at step 2 was seen) and
spends many steps just regaining it. The probe measures the held-out EDM loss on σ drawn from the
node's own band, on the raw weights (the EMA hides early damage), with the same samples, σ and
noise at every measurement, at step 0 and densely after it; it writes
`<node dir>/handoff_probe.json` and warns once when the loss after `after` steps is more than
`warn_ratio` × its value at the hand-off.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from ediff_train.core.edm import edm_loss
from ediff_train.core.experts import Node
from ediff_train.io.files import write_json
from ediff_train.metrics.loss_by_sigma import StepCadence, heldout_inputs, noise_seed

PROBE_JSON = "handoff_probe.json"
SIGMA_SALT = 999_983  # σ draws' seed offset: not the seed any noise draw uses
NOISE_K = 7_919  # the noise's draw index in noise_seed: apart from loss_by_sigma's grid indices
Draws = list[tuple[Tensor, Tensor]]  # per batch: σ [B] (float64) and noise (shape of the images)


def probe_steps(steps: int, after: int = 3) -> list[int]:
    """0, then 1, 2, 3, 5, 10, 20, 50, 100, ... below the run's `steps`, `after`, and `steps`."""
    steps = max(int(steps), 0)
    out, decade = {0, steps, *(s for s in (1, 2, 3, 5) if s < steps)}, 10
    while decade < steps:
        out.update(m * decade for m in (1, 2, 5) if m * decade < steps)
        decade *= 10
    if 0 < after <= steps:
        out.add(int(after))
    return sorted(out)


def probe_draws(node: Node, batches: Sequence[dict[str, Any]], seed: int = 0) -> Draws:
    """The fixed draws: σ from the node's band by one generator seeded (seed·1000003 + SIGMA_SALT)
    over the batches in order, noise per batch b seeded noise_seed(seed, b, NOISE_K)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + SIGMA_SALT)
    draws: Draws = []
    for b, batch in enumerate(batches):
        shape = batch["image"].shape
        sigma = node.sample_sigma(shape[0], g)
        noise = torch.randn(
            shape, generator=torch.Generator().manual_seed(noise_seed(seed, b, NOISE_K))
        )
        draws.append((sigma, noise))
    return draws


@torch.no_grad()
def band_loss(
    denoiser: nn.Module,
    batches: Sequence[dict[str, Any]],
    draws: Draws,
    device: str | torch.device = "cpu",
) -> float:
    """Mean λ(σ)·‖D(x+σn) − x‖² over the held-out samples at their drawn σ (full conditioning)."""
    total, count = 0.0, 0
    for batch, (sigma, noise) in zip(batches, draws):
        x, cond = heldout_inputs(batch, device)
        s = sigma.to(torch.float32).to(device)
        total += float(edm_loss(denoiser, x, s, cond, noise=noise.to(device)).sum())
        count += x.shape[0]
    return total / max(count, 1)


def lost_ground(losses: dict[int, float], after: int) -> float | None:
    """loss(after) / loss(0), None while either is unknown (or loss(0) is not positive)."""
    first, then = losses.get(0), losses.get(after)
    if first is None or then is None or not first > 0:
        return None
    return then / first


def warning_line(node: str, ratio: float, after: int) -> str:
    """The one stderr line of a child that lost ground, with the likely causes."""
    return (
        f"warning: {node}: in-band held-out loss after {after} steps is {ratio:.3g}× its "
        "value at the hand-off; the child lost ground after the hand-off: optimiser state "
        "reset or lr too high without warmup? see handoff.optimizer / "
        "module.lr_schedule.warmup_handoff"
    )


class HandoffProbe(StepCadence):
    """In-band held-out loss of the raw weights at `probe_steps`, into handoff_probe.json.

    Every rank measures (a forward may be a collective under ZeRO-3); rank 0 writes the file
    after each measurement (a resumed run reads it back and goes on) and warns. Nothing it does
    touches the training streams: its draws come from its own generators, made once."""

    def __init__(
        self,
        node: Node,
        batches: Callable[[], Sequence[dict[str, Any]]],
        steps: Sequence[int],
        path: Path,
        handoff: bool,
        after: int = 3,
        warn_ratio: float = 1.05,
        seed: int = 0,
        start: int = 0,
        stream: TextIO | None = None,
    ) -> None:
        super().__init__(steps, start)
        self.node, self.load, self.path, self.handoff = node, batches, Path(path), handoff
        self.after, self.warn_ratio, self.seed = int(after), float(warn_ratio), seed
        self.stream = stream
        self.batches: list[dict[str, Any]] = []
        self.draws: Draws = []
        self.losses: dict[int, float] = {}
        self.warned = False

    def setup_measure(self, trainer, module) -> bool:  # noqa: ANN001
        self.batches = list(self.load())
        if not self.batches:
            if trainer.is_global_zero:
                print(
                    "hand-off probe off: this data names no held-out samples "
                    "(set data.val_root or data.val_fraction)"
                )
            return False
        self.draws = probe_draws(self.node, self.batches, self.seed)
        k = trainer.global_step - self.start
        if k > 0:  # resumed: the measurements up to the checkpoint's step are on disk
            old = read_probe(self.path.parent) or {}
            kept = [
                (s, v) for s, v in zip(old.get("steps", []), old.get("in_band_loss", [])) if s <= k
            ]
            self.losses = {int(s): float(v) for s, v in kept}
            self.warned = bool(old.get("warned", False))
        return True

    def measure(self, trainer, module, k: int) -> None:  # noqa: ANN001
        was_training = module.denoiser.training
        module.denoiser.eval()
        self.losses[k] = band_loss(module.denoiser, self.batches, self.draws, module.device)
        module.denoiser.train(was_training)
        if not trainer.is_global_zero:
            return
        self.record(k)
        write_json(self.path, self.summary())

    def record(self, k: int) -> None:
        """After measuring step k: warn (once) when a hand-off lost ground by `after` steps."""
        ratio = lost_ground(self.losses, self.after)
        if (
            k == self.after
            and self.handoff
            and not self.warned
            and ratio is not None
            and ratio > self.warn_ratio
        ):
            self.warned = True
            print(
                warning_line(self.node.name, ratio, self.after),
                file=self.stream or sys.stderr,
                flush=True,
            )

    def summary(self) -> dict[str, Any]:
        """The file's content: band, steps (this run's), losses, the ratio and the warning."""
        lo, hi = self.node.sigma_interval
        steps = sorted(self.losses)
        return {
            "node": self.node.name,
            "band": [lo, hi if math.isfinite(hi) else "inf"],
            "steps": steps,
            "in_band_loss": [self.losses[s] for s in steps],
            "after": self.after,
            "warn_ratio": self.warn_ratio,
            "handoff": self.handoff,
            f"ratio_after_{self.after}": lost_ground(self.losses, self.after),
            "warned": self.warned,
        }


def read_probe(node_dir: str | Path) -> dict[str, Any] | None:
    """A node's handoff_probe.json (for node.json at export), None when absent or unreadable."""
    path = Path(node_dir) / PROBE_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
