"""The closed-form optimal denoiser of a data sample, and its similarity across noise levels.

For data y uniform on N points and x = y + σn, the minimum-MSE denoiser is the posterior mean
D*(x; σ) = Σ_i softmax_i(−‖x − y_i‖²/2σ²) y_i. It needs no network: how much D* changes between two
σ says how different the two denoising tasks are for this data (Zhang et al., CVPR 2024, cluster
timesteps by it). Similarity of σ_a and σ_b: the correlation of the centred outputs
D*(x; σ_a) − μ and D*(x; σ_b) − μ over inputs x noised at σ_a and at σ_b (both, so it is symmetric);
1 on the diagonal. It is the data's own structure, not the trained model's. The inputs are made
from samples left out of the reference set: noised reference points themselves would be
denoised back to themselves at every σ a small sample can resolve (the memorising solution),
and every pair of σ would look alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ediff_train.errors import EdiffError


def optimal_denoiser(x: Tensor, sigma: float, data: Tensor) -> Tensor:
    """E[y | x] for y uniform on the rows of `data` ([N, ...]) and x = y + σn ([B, ...])."""
    flat_x, flat_d = x.flatten(1).double(), data.flatten(1).double()
    d2 = flat_x.pow(2).sum(1, keepdim=True) - 2 * flat_x @ flat_d.T + flat_d.pow(2).sum(1)
    w = torch.softmax(-d2 / (2 * float(sigma) ** 2), dim=1)
    return (w @ flat_d).reshape(x.shape).to(x.dtype)


def denoiser_similarity(
    data: Tensor, sigmas: Sequence[float], inputs: int = 128, seed: int = 0
) -> np.ndarray:
    """[K, K] similarity of the optimal denoisers at `sigmas` (one per bin) of the reference set
    (the data less `inputs` held-out points), on those points noised with fixed noise at every σ."""
    data = data.double()
    if data.shape[0] < 4:
        raise EdiffError(f"the optimal denoiser needs at least 4 samples, got {data.shape[0]}")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(data.shape[0], generator=g)
    count = min(inputs, data.shape[0] // 2)
    y, data = data[order[:count]], data[order[count:]]
    mu = data.mean(0, keepdim=True)
    noise = torch.randn(y.shape, generator=g, dtype=torch.float64)
    k = len(sigmas)
    # gram[a][b, c] = Σ over inputs noised at σ_a of ⟨D*(x; σ_b) − μ, D*(x; σ_c) − μ⟩
    gram = torch.zeros(k, k, k, dtype=torch.float64)
    for a, s_a in enumerate(sigmas):
        outs = torch.stack(
            [(optimal_denoiser(y + s_a * noise, s_b, data) - mu).flatten(1) for s_b in sigmas]
        ).flatten(1)
        gram[a] = outs @ outs.T
    sim = np.eye(k)
    for a in range(k):
        for b in range(a + 1, k):
            both = gram[a] + gram[b]  # inputs noised at σ_a and at σ_b
            denom = float((both[a, a] * both[b, b]).sqrt())
            sim[a, b] = sim[b, a] = float(both[a, b]) / denom if denom > 0 else 1.0
    return sim
