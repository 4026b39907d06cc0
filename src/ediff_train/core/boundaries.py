"""One noise level in every convention the tools use, and which way each runs — the
commonest bug in expert training is mixing them up (docs/design.md §3, "Boundaries").

σ is EDM's noise/signal ratio (x_σ = x₀ + σε); the others are functions of it:

| name | formula | runs with noise |
|---|---|---|
| `sigma` | σ | up |
| `log_snr` | λ = −2·ln σ (SNR = 1/σ², VP and flow alike) | down |
| `t` | flow-matching time t = σ/(1+σ) (x_t = (1−t)x₀ + tε) | up |
| `t_grid` | t before a shift k: t/(k − (k−1)t) (the sampler's uniform grid; k = 1: t) | up |
| `boundary_ratio` | diffusers' WanPipeline: the flow scheduler's timestep/1000 = t | up |
| `timestep` | a flow scheduler's timestep, 1000·t | up |
| `ddpm_index` | the (fractional) index i of SD's 1000-step scaled-linear schedule | up |

Wan2.2-A14B T2V's boundary_ratio 0.875 is t = 0.875, so σ = 7 (at its sample shift 12 the
sampler's grid reaches it at t_grid = 0.368); I2V's 0.900 is σ = 9.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ediff_train.core.parameterisation import VP
from ediff_train.errors import EdiffError

DIRECTIONS = {
    "sigma": "up",
    "log_snr": "down",
    "t": "up",
    "t_grid": "up",
    "boundary_ratio": "up",
    "timestep": "up",
    "ddpm_index": "up",
}
_VP = VP()


def t_of_sigma(sigma: float) -> float:
    return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)


def sigma_of_t(t: float) -> float:
    if not 0.0 <= t <= 1.0:
        raise EdiffError(f"t must be in [0, 1], got {t!r}")
    return math.inf if t == 1.0 else t / (1.0 - t)


def unshift(t: float, shift: float) -> float:
    """The grid time that a shift k (t′ = k·t/(1+(k−1)t)) carries to t."""
    if shift <= 0:
        raise EdiffError(f"shift must be a number > 0, got {shift!r}")
    return t / (shift - (shift - 1.0) * t)


def conventions(sigma: float, shift: float = 1.0) -> dict[str, float]:
    """σ in every convention above (at a stated sample shift for `t_grid`)."""
    t = t_of_sigma(sigma)
    if sigma <= 0:
        log_snr, ddpm = math.inf, 0.0
    else:
        log_snr = -math.inf if math.isinf(sigma) else 0.0 - 2.0 * math.log(sigma)
        ddpm = (
            _VP.steps - 1.0
            if math.isinf(sigma)
            else float(
                _VP.law.cdf_t(torch.tensor([sigma], dtype=torch.float64))[0] * (_VP.steps - 1)
            )
        )
    return {
        "sigma": sigma,
        "log_snr": log_snr,
        "t": t,
        "t_grid": unshift(t, shift),
        "boundary_ratio": t,
        "timestep": 1000.0 * t,
        "ddpm_index": ddpm,
    }


def interval(lo: float, hi: float, shift: float = 1.0) -> dict[str, Any]:
    """A node's σ interval [lo, hi) in every convention, with the shift and directions."""
    a, b = conventions(lo, shift), conventions(hi, shift)
    return {"shift": shift, "directions": DIRECTIONS, **{k: [a[k], b[k]] for k in DIRECTIONS}}


def table(pieces: list[tuple[float, float]], shift: float = 1.0) -> str:
    """A plain-text table of a node's pieces (the experts command prints it)."""
    rows = [f"  {'convention':<15}{'low-noise end':>16}{'high-noise end':>16}  with noise"]
    for lo, hi in pieces:
        a, b = conventions(lo, shift), conventions(hi, shift)
        for k, d in DIRECTIONS.items():
            name = f"{k}@{shift:g}" if k == "t_grid" else k
            rows.append(f"  {name:<15}{a[k]:>16.6g}{b[k]:>16.6g}  {d}")
    return "\n".join(rows)
