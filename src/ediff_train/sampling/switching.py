"""Prompt switching's two pieces (eDiff-I Fig. 4): a denoiser that answers with one
conditioning above a σ and another below it, and the σ where a switch after a fraction of the
solver steps happens. Shared by metric=switch on the digits and on shapes."""

from __future__ import annotations

from torch import Tensor

from ediff_train.core.solvers import Denoiser


def switched(first: Denoiser, then: Denoiser, sigma_switch: float) -> Denoiser:
    """`first` while σ ≥ sigma_switch, `then` below it."""

    def den(x: Tensor, sigma: Tensor) -> Tensor:
        return (first if float(sigma.reshape(-1)[0]) >= sigma_switch else then)(x, sigma)

    return den


def switch_sigma(sigmas: Tensor, fraction: float) -> float:
    """The σ at which a switch after `fraction` of the solver steps happens (∞: never A; 0:
    always A)."""
    steps = len(sigmas) - 1
    k = round(fraction * steps)
    return float("inf") if k == 0 else (0.0 if k >= steps else float(sigmas[k]))
