"""The learning rate over a node's run: warmup at a root's start and after every hand-off, then a
decay (constant, cosine over the run, or EDM2's inverse square root over the tree's samples).

Every fine-tuning recipe warms up a model that changes task; a child changes its noise band. The
factor is a pure function of the node's own step and the tree's step, so it resumes with the
step count (Lightning restores LambdaLR's position from the checkpoint) and the effective
schedule can be written into node.json as numbers, not only as settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ediff_train.errors import EdiffError

DECAYS = ("constant", "cosine", "inv_sqrt")
UNITS = ("steps", "images")


@dataclass(frozen=True)
class LRSchedule:
    """lr × factor(n) for the n-th optimiser step of this node's run (n = 0, 1, ...).

    `warmup` is the ramp length of this run (root or hand-off, chosen by the caller) in
    optimiser steps; `total` the run's steps (cosine); `offset` the tree's step at the run's
    start (inv_sqrt counts the tree's steps, so a child continues its parent's decay)."""

    decay: str = "constant"
    warmup: int = 0
    total: int = 1
    offset: int = 0
    min_factor: float = 0.0
    ref: int = 0  # inv_sqrt: steps of the tree after which the decay starts

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise EdiffError(
                f"module.lr_schedule.decay must be one of {', '.join(DECAYS)}, got {self.decay!r}"
            )
        if self.warmup < 0 or self.total < 1 or self.ref < 0:
            raise EdiffError(
                f"lr schedule needs warmup ≥ 0, total ≥ 1, ref ≥ 0 (got warmup="
                f"{self.warmup}, total={self.total}, ref={self.ref})"
            )
        if not 0.0 <= self.min_factor <= 1.0:
            raise EdiffError(
                f"module.lr_schedule.min_factor must be in [0, 1], got {self.min_factor}"
            )

    def factor(self, n: int) -> float:
        """The multiplier of the base lr at this run's step n (0-based)."""
        ramp = min(1.0, (n + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.decay == "cosine":
            frac = min(1.0, n / max(self.total - 1, 1))
            decay = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
        elif self.decay == "inv_sqrt":
            t = self.offset + n
            decay = 1.0 / math.sqrt(max(t / self.ref, 1.0)) if self.ref > 0 else 1.0
        else:
            decay = 1.0
        return ramp * decay

    def __call__(self, n: int) -> float:  # LambdaLR's lr_lambda
        return self.factor(n)

    def record(self, base_lr: float, points: int = 11) -> dict[str, Any]:
        """The settings and the effective lr at a few of this run's steps, for node.json."""
        steps = sorted(
            {
                0,
                *(round(i * (self.total - 1) / (points - 1)) for i in range(points)),
                *([self.warmup - 1] if self.warmup > 0 else []),
            }
        )
        return {
            **asdict(self),
            "base_lr": base_lr,
            "lr_at_step": [[s, base_lr * self.factor(s)] for s in steps if s < self.total],
        }


def to_steps(value: float | int | None, unit: str, images_per_step: int) -> int:
    """A length in steps or images as optimiser steps (images rounded up to whole steps)."""
    if unit not in UNITS:
        raise EdiffError(f"module.lr_schedule.unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if value is None:
        return 0
    value = float(value)
    if value < 0 or not math.isfinite(value):
        raise EdiffError(f"lr schedule lengths must be ≥ 0, got {value}")
    return int(math.ceil(value / max(images_per_step, 1))) if unit == "images" else int(value)
