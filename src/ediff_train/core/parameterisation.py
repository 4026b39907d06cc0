"""Parameterisations as swappable parts: EDM, flow matching (rectified flow, v-target) and VP
(ε- or v-prediction, SD-class), each an EDM preconditioning with its own loss weight and
training noise law (docs/design.md §3).

Everything downstream works in EDM's σ (noise/signal ratio of x_σ = x₀ + σε): the expert tree
takes quantiles of `law`, the solvers step in σ, routing compares σ. A parameterisation only
says how the backbone F sees its input and what it predicts:
D(x_σ) = c_skip·x_σ + c_out·F(c_in·x_σ, c_noise), trained with λ(σ)·‖D − x₀‖².

- flow matching: x_t = (1−t)x₀ + tε, σ = t/(1−t), F predicts v = ε − x₀:
  c_in = c_skip = 1/(1+σ), c_out = −σ/(1+σ), c_noise = t, λ = ((1+σ)/σ)² (= ‖F − v‖²);
  logit-normal(m, s) on t is ln σ ~ N(m, s²), and a shift k (t′ = kt/(1+(k−1)t)) is σ′ = kσ.
- VP: x_t = αx₀ + sε, α² + s² = 1, σ = s/α. ε-prediction: c_skip = 1, c_out = −σ,
  c_in = α = 1/√(1+σ²), λ = 1/σ²; v-prediction (v = αε − sx₀): c_skip = α², c_out = −s,
  λ = (1+σ²)/σ²; c_noise = the (fractional) index in the 1000-step training schedule, whose
  uniform index law is the training noise law.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ediff_train.core.edm import P_MEAN, P_STD, SIGMA_DATA, LogNormalSigma
from ediff_train.core.edm import loss_weight as edm_loss_weight
from ediff_train.core.edm import precond_coefficients as edm_coefficients
from ediff_train.errors import EdiffError


@dataclass(frozen=True)
class EDM:
    """Karras et al. (2022), as eDiff-I uses it: the default."""

    sigma_data: float = SIGMA_DATA
    p_mean: float = P_MEAN
    p_std: float = P_STD
    name: str = field(default="edm", init=False)

    @property
    def law(self) -> LogNormalSigma:
        return LogNormalSigma(self.p_mean, self.p_std)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return edm_coefficients(sigma, self.sigma_data)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return edm_loss_weight(sigma, self.sigma_data)


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow with a v-target and a logit-normal(p_mean, p_std) law on t, shifted by
    `shift` (SD3: 3.0; 1 = none)."""

    p_mean: float = 0.0
    p_std: float = 1.0
    shift: float = 1.0
    name: str = field(default="flow", init=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift)):
            raise EdiffError(f"param.shift must be a finite number > 0, got {self.shift!r}")
        if self.shift <= 0:
            raise EdiffError(f"param.shift must be a finite number > 0, got {self.shift!r}")

    @property
    def law(self) -> LogNormalSigma:
        return LogNormalSigma(self.p_mean + math.log(self.shift), self.p_std)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        one = 1.0 / (1.0 + sigma)
        return one, -sigma * one, one, sigma * one  # c_noise = t = σ/(1+σ)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return ((1.0 + sigma) / sigma) ** 2


def vp_sigmas(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> Tensor:
    """σ_i = √((1−ᾱ_i)/ᾱ_i) of the scaled-linear β schedule (SD's), i = 0 … steps−1, float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, 0)
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


@dataclass(frozen=True)
class IndexLaw:
    """The σ law of a discrete schedule trained with a uniform index: u = i/(N−1), read
    between table entries by linear interpolation in ln σ (monotone, so exact inverse)."""

    log_sigmas: tuple[float, ...]

    def _table(self) -> Tensor:
        return torch.tensor(self.log_sigmas, dtype=torch.float64)

    def cdf_t(self, sigma: Tensor) -> Tensor:
        ls = sigma.double().clamp(min=1e-300).log()
        t = self._table().to(ls.device)
        n = t.numel()
        idx = torch.searchsorted(t, ls.clamp(t[0], t[-1])).clamp(1, n - 1)
        lo, hi = t[idx - 1], t[idx]
        frac = ((ls.clamp(t[0], t[-1]) - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + frac) / (n - 1)

    def icdf_t(self, u: Tensor) -> Tensor:
        t = self._table().to(u.device)
        pos = u.double().clamp(0, 1) * (t.numel() - 1)
        i = pos.floor().long().clamp(max=t.numel() - 2)
        frac = pos - i
        return (t[i] + frac * (t[i + 1] - t[i])).exp()

    def cdf(self, sigma: float) -> float:
        return float(self.cdf_t(torch.tensor([float(sigma)]))[0])

    def icdf(self, u: float) -> float:
        return float(self.icdf_t(torch.tensor([float(u)]))[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.icdf_t(torch.rand(n, generator=generator, dtype=torch.float64))


@dataclass(frozen=True)
class VP:
    """Variance-preserving diffusion (DDPM / SD-class U-Nets), ε- or v-prediction."""

    prediction: str = "eps"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps: int = 1000
    name: str = field(default="vp", init=False)

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise EdiffError(f"param.prediction must be eps or v, got {self.prediction!r}")

    @property
    def law(self) -> IndexLaw:
        sig = vp_sigmas(self.beta_start, self.beta_end, self.steps)
        return IndexLaw(tuple(float(x) for x in sig.log()))

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        alpha = 1.0 / (1.0 + sigma**2).sqrt()
        c_noise = (self.law.cdf_t(sigma) * (self.steps - 1)).to(sigma.dtype)
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, alpha, c_noise
        return alpha**2, -sigma * alpha, alpha, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        if self.prediction == "eps":
            return sigma**-2
        return (1.0 + sigma**2) / sigma**2


Parameterisation = EDM | FlowMatching | VP
KINDS: dict[str, type] = {"edm": EDM, "flow": FlowMatching, "vp": VP}


def from_config(cfg: Any) -> Parameterisation:
    """The `param:` group of a training config; a config without one (runs stored before it
    existed) is EDM."""
    if cfg is None:
        return EDM()
    values = {str(k): v for k, v in dict(cfg).items()}
    name = str(values.pop("name", "edm"))
    if name not in KINDS:
        raise EdiffError(f"param.name must be one of {', '.join(KINDS)}, got {name!r}")
    kind = KINDS[name]
    for f in fields(kind):  # Hydra gives `shift=3` as an int: keep the record's types stable
        if f.init and f.name in values and f.type in ("float", float):
            v = values[f.name]
            if isinstance(v, int) and not isinstance(v, bool):
                values[f.name] = float(v)
    try:
        return kind(**values)
    except TypeError as e:
        raise EdiffError(f"param={name}: {e}") from None


def spec(param: Parameterisation) -> dict[str, Any]:
    """What node.json records and a child's hand-off compares."""
    return {"name": param.name, **{k: v for k, v in asdict(param).items() if k != "name"}}
