"""`init=distill`: a child of any architecture first learns its parent's denoiser in its band.

For the first `steps` optimiser steps of the run the target of the child's D(x + σn; σ, c) is
the parent's (its EMA weights, frozen) at the same noisy input, σ drawn from the child's band
and the same conditioning, with the parameterisation's loss weight λ(σ):
λ(σ)·mean‖D_child − D_parent‖². After that the run trains on the data as any node does. A net
of another shape then starts from a denoiser that is already good where it will be used, not
from noise, without needing the parent's weights to fit its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def noised(x: Tensor, sigma: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x + σ·n, σ as float32): the input a distilling student and its teacher both see."""
    sigma = sigma.to(torch.float32)
    return x + sigma.view((-1,) + (1,) * (x.ndim - 1)) * noise, sigma


def sample_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample, [B], in float32."""
    return (pred.float() - target).pow(2).flatten(1).mean(1)


class Distiller:
    """The frozen teacher and the distillation phase's length; not a submodule (the strategy
    must neither train, shard nor checkpoint it)."""

    def __init__(self, teacher: nn.Module, steps: int) -> None:
        self.teacher, self.steps = teacher, int(steps)
        self.losses: list[Tensor] = []  # mean unweighted error per distill step, on device

    def active(self, step: int) -> bool:
        """Whether this run's step `step` (0-based) is in the distillation phase."""
        return step < self.steps

    def to(self, device: torch.device) -> Distiller:
        self.teacher.to(device)
        return self

    def loss(
        self,
        student: Callable[..., Tensor],
        x: Tensor,
        sigma: Tensor,
        cond: Any,
        noise: Tensor,
        weight: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Per-sample λ(σ)·mean‖D_child(y) − D_parent(y)‖², y = x + σn, shape [B]."""
        y, sigma = noised(x, sigma, noise)
        with torch.no_grad():
            target = self.teacher(y, sigma, cond).float()
        err = sample_error(student(y, sigma, cond), target)
        self.losses.append(err.detach().mean())
        return weight(sigma) * err

    def record(self) -> dict[str, Any]:
        """node.json's account of the phase: its length and the error at its first/last steps."""
        values = [float(v) for v in self.losses]
        return {
            "steps": self.steps,
            "teacher": "the parent's EMA denoiser",
            "loss": "λ(σ)·mean‖D_child − D_parent‖², σ from the child's band",
            "error_first": values[0] if values else None,
            "error_last": values[-1] if values else None,
            "steps_logged": len(values),
        }
