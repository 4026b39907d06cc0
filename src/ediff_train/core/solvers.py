"""ODE solvers for the EDM probability-flow ODE dx/dσ = (x − D(x, σ))/σ, as plain functions
`(denoiser, x, sigmas) -> x` (k-diffusion's shape). `sigmas` runs from σ_max down, usually ending
in 0; the step to σ = 0 is always first order (x = D(x, σ), the ODE's exact limit), and multistep
methods start at first order and build up as history accumulates.

- euler: 1 call per step, order 1.
- heun: EDM's Algorithm 1, 2 calls per step (1 on the last), order 2.
- dpmpp_2m: DPM-Solver++(2M) in λ = −ln σ, 1 call per step, order 2.
- deis_ab: DEIS's ρAB (Adams–Bashforth in σ on d = (x − D)/σ, the exact polynomial integral
  over the non-uniform grid), 1 call per step, order `order` (1–4).
- deis_rk3: DEIS's ρRK with Kutta's 3rd-order tableau in σ, 3 calls per step, order 3.

The paper's sampler, "DEIS, 3-Kutta, order 6, 25 steps" (secondary source), maps most plausibly
to `solver=deis_rk3 rho=6 steps=25` here: Kutta's 3rd-order Runge–Kutta in σ on EDM's σ grid
with schedule exponent ρ = 6 (≈ 73 network calls). docs/design.md §8 says why that reading.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ediff_train.errors import EdiffError

Denoiser = Callable[[Tensor, Tensor], Tensor]


def _s(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.device, torch.float32)


# The network sees σ as a float32 tensor; the solver's own arithmetic uses the float64 grid.


@torch.no_grad()
def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, _s(s, x))) / float(s)
        x = x + float(t - s) * d
    return x


@torch.no_grad()
def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """EDM Algorithm 1 (deterministic 2nd-order Heun)."""
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        sc, sn = float(s), float(t)
        d = (x - denoiser(x, _s(s, x))) / sc
        x_next = x + (sn - sc) * d
        if t > 0:
            d2 = (x_next - denoiser(x_next, _s(t, x))) / sn
            x_next = x + (sn - sc) * 0.5 * (d + d2)
        x = x_next
    return x


@torch.no_grad()
def dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver++(2M): x' = (σ'/σ)·x − (e^{−h} − 1)·D̂, h = ln(σ/σ'), with
    D̂ = (1 + 1/(2r))·D_i − (1/(2r))·D_{i−1}, r = h_{i−1}/h_i; first order on the first step and
    on the step to σ = 0 (where it is x' = D)."""
    prev_d: Tensor | None = None
    prev_h: float | None = None
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        d = denoiser(x, _s(s, x))
        if t == 0:
            x = d
            break
        h = float(torch.log(s / t))
        est = d
        if prev_d is not None and prev_h is not None:
            r = prev_h / h
            est = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev_d
        x = float(t / s) * x - float(torch.expm1(torch.tensor(-h, dtype=torch.float64))) * est
        prev_d, prev_h = d, h
    return x


def _ab_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """∫_a^b of each Lagrange basis polynomial on `nodes` (float64, exact for ≤ 4 nodes)."""
    out = []
    for j, nj in enumerate(nodes):
        poly = [1.0]  # coefficients, low order first
        denom = 1.0
        for m, nm in enumerate(nodes):
            if m == j:
                continue
            poly = [0.0] + poly  # multiply by (s − nm)
            for k in range(len(poly) - 1):
                poly[k] -= nm * poly[k + 1]
            denom *= nj - nm
        integral = sum(c * (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k, c in enumerate(poly))
        out.append(integral / denom)
    return out


@torch.no_grad()
def deis_ab(denoiser: Denoiser, x: Tensor, sigmas: Tensor, order: int = 3) -> Tensor:
    """ρAB: x' = x + Σ_j w_j·d_j, w_j = ∫_σ^σ' ℓ_j, over the last `order` (σ_j, d_j)."""
    if not 1 <= order <= 4:
        raise EdiffError(f"deis_ab order must be 1..4, got {order}")
    hist: list[tuple[float, Tensor]] = []
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        sc = float(s)
        d = (x - denoiser(x, _s(s, x))) / sc
        if t == 0:
            x = x - sc * d  # = D: the first-order step to σ = 0
            break
        hist = [*hist, (sc, d)][-order:]
        nodes = [h[0] for h in hist]
        weights = _ab_weights(nodes, sc, float(t))
        x = x + sum(w * dj for w, (_, dj) in zip(weights, hist))
    return x


@torch.no_grad()
def deis_rk3(denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """Kutta's 3rd-order Runge–Kutta in σ (ρRK-3kutta); Euler on the step to σ = 0."""

    def f(xx: Tensor, sig: float) -> Tensor:
        return (xx - denoiser(xx, _s(torch.tensor(sig, dtype=torch.float64), xx))) / sig

    for s, t in zip(sigmas[:-1], sigmas[1:]):
        sc, h = float(s), float(t - s)
        k1 = f(x, sc)
        if t == 0:
            x = x + h * k1
            break
        k2 = f(x + 0.5 * h * k1, sc + 0.5 * h)
        k3 = f(x - h * k1 + 2 * h * k2, sc + h)
        x = x + h / 6 * (k1 + 4 * k2 + k3)
    return x


SOLVERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "deis_ab": deis_ab,
    "deis_rk3": deis_rk3,
}
CALLS_PER_STEP = {"euler": 1, "heun": 2, "dpmpp_2m": 1, "deis_ab": 1, "deis_rk3": 3}


def solve(name: str, denoiser: Denoiser, x: Tensor, sigmas: Tensor, order: int = 3) -> Tensor:
    """Run solver `name` (one of SOLVERS); `order` is deis_ab's."""
    if name not in SOLVERS:
        raise EdiffError(f"unknown solver {name!r}: choose one of {', '.join(SOLVERS)}")
    if name == "deis_ab":
        return deis_ab(denoiser, x, sigmas, order)
    return SOLVERS[name](denoiser, x, sigmas)


def karras_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """EDM's σ grid (steps values from σ_max down to σ_min, then a final 0)."""
    i = torch.arange(steps, dtype=torch.float64)
    ramp = i / max(steps - 1, 1)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])
