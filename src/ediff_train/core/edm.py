"""EDM core (Karras et al. 2022) as eDiff-I uses it: preconditioning, loss weight, σ law.

Nothing here knows about experts or data; the expert tree (experts.py) restricts the σ law.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2


@dataclass(frozen=True)
class LogNormalSigma:
    """ln σ ~ N(p_mean, p_std²) and its quantile transform u = Φ((ln σ − p_mean)/p_std)."""

    p_mean: float = P_MEAN
    p_std: float = P_STD

    def cdf(self, sigma: float) -> float:
        """u(σ); σ ≤ 0 maps to 0 and σ = ∞ to 1."""
        if sigma <= 0:
            return 0.0
        if math.isinf(sigma):
            return 1.0
        z = (math.log(sigma) - self.p_mean) / self.p_std
        return 0.5 * math.erfc(-z / math.sqrt(2.0))

    def icdf(self, u: float) -> float:
        """σ(u); u = 0 maps to 0 and u = 1 to ∞."""
        if u <= 0.0:
            return 0.0
        if u >= 1.0:
            return math.inf
        z = float(torch.special.ndtri(torch.tensor(u, dtype=torch.float64)))
        return math.exp(self.p_mean + self.p_std * z)

    def cdf_t(self, sigma: Tensor) -> Tensor:
        z = (sigma.double().log() - self.p_mean) / self.p_std
        return torch.special.ndtr(z)

    def icdf_t(self, u: Tensor) -> Tensor:
        """σ(u) for a tensor of quantiles, computed in float64 so tails stay exact."""
        z = torch.special.ndtri(u.double())
        return torch.exp(self.p_mean + self.p_std * z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.exp(self.p_mean + self.p_std * z)


def precond_coefficients(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1.0 / s2.sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """λ(σ) = (σ² + σ_data²)/(σ·σ_data)²: makes the effective target unit-variance at every σ."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMPrecond(nn.Module):
    """D(x; c, σ) = c_skip·x + c_out·F(c_in·x; c, c_noise) around any backbone F.

    `param` (core/parameterisation.py: flow matching, VP, …) supplies other coefficients and
    its loss weight; None is EDM's own."""

    def __init__(
        self, backbone: nn.Module, sigma_data: float = SIGMA_DATA, param: Any = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data
        self.param = param

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, ...]:
        if self.param is None:
            return precond_coefficients(sigma, self.sigma_data)
        return self.param.coefficients(sigma)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        if self.param is None:
            return loss_weight(sigma, self.sigma_data)
        return self.param.loss_weight(sigma)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any, **kwargs: Any) -> Tensor:
        sigma = sigma.to(torch.float32).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] > 1:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        b = (-1,) + (1,) * (x.ndim - 1)
        x32 = x.to(torch.float32)
        f = self.backbone(c_in.view(b) * x32, c_noise, cond, **kwargs)
        return c_skip.view(b) * x32 + c_out.view(b) * f.to(torch.float32)


def edm_loss(
    denoiser: nn.Module,
    x: Tensor,
    sigma: Tensor,
    cond: Any,
    noise: Tensor | None = None,
    sigma_data: float = SIGMA_DATA,
    weight: Any = None,
) -> Tensor:
    """Per-sample λ(σ)·mean‖D(x + σn; c, σ) − x‖², shape [B]. λ: `weight`, else the
    denoiser's own (`EDMPrecond.loss_weight`, which follows its parameterisation), else EDM's."""
    if noise is None:
        noise = torch.randn_like(x)
    b = (-1,) + (1,) * (x.ndim - 1)
    sigma = sigma.to(torch.float32)
    denoised = denoiser(x + sigma.view(b) * noise, sigma, cond)
    err = (denoised - x).pow(2).flatten(1).mean(1)
    if weight is None:
        weight = getattr(denoiser, "loss_weight", None) or (lambda s: loss_weight(s, sigma_data))
    return weight(sigma) * err
