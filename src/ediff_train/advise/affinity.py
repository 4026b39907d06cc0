"""Gradient-cosine task affinity between σ bins at a trained node (Go et al., NeurIPS 2023).

Each bin's task is the EDM loss with σ drawn from that bin. At the node's weights its gradient
g_k (summed over the same held-out samples and the same noise for every bin, only σ differing)
says where an update for that band moves the shared weights; cos(g_i, g_j) < 0 means the bands
pull apart: negative transfer a split removes. The diagonal is 1 by construction.

Rank-aware: under torch.distributed each rank takes every world-th batch and the gradients are
summed across ranks before the cosine; large models keep a fixed random subset of `max_coords`
coordinates per gradient (an unbiased sketch of the inner products), so K gradients fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ediff_train.advise.bins import Bins
from ediff_train.core.edm import edm_loss
from ediff_train.metrics.loss_by_sigma import heldout_inputs, noise_seed

SIGMA_SALT = 424_243  # the σ draws' seed offset: apart from any noise seed


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def bin_gradients(
    denoiser: nn.Module,
    batches: Sequence[dict[str, Any]],
    bins: Bins,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_coords: int = 4_000_000,
) -> Tensor:
    """[K, P'] the loss gradient per bin (P' = min(parameters, max_coords) coordinates)."""
    params = [p for p in denoiser.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    pick = None
    if total > max_coords:
        pick = torch.randint(total, (max_coords,), generator=torch.Generator().manual_seed(seed))
    rank, world = _rank_world()
    rows = []
    for k in range(bins.count):
        grads = [torch.zeros_like(p) for p in params]
        for b, batch in enumerate(batches):
            if b % world != rank:
                continue
            x, cond = heldout_inputs(batch, device)
            g = torch.Generator().manual_seed(noise_seed(seed, b, 0))
            noise = torch.randn(x.shape, generator=g).to(device)
            sg = torch.Generator().manual_seed(noise_seed(seed, b, 0) + SIGMA_SALT)
            # the same uniform draws in every bin: σ differs only by the bin's quantile range
            sigma = bins.sample(k, x.shape[0], sg).to(device, torch.float32)
            loss = edm_loss(denoiser, x, sigma, cond, noise=noise).sum()
            for acc, gr in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if gr is not None:
                    acc += gr
        flat = torch.cat([gr.reshape(-1) for gr in grads]).float()
        if world > 1:
            torch.distributed.all_reduce(flat)
        rows.append((flat if pick is None else flat[pick.to(flat.device)]).cpu())
    return torch.stack(rows)


def cosine_matrix(rows: Tensor) -> np.ndarray:
    """[K, K] cosine similarity of the rows (a zero row is similar only to itself)."""
    rows = rows.double()
    norms = rows.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, rows / norms.clamp(min=1e-300), torch.zeros_like(rows))
    out = (unit @ unit.T).clamp(-1, 1).numpy()
    zero = (norms[:, 0] == 0).numpy()
    out[zero, zero] = 1.0
    return out


def affinity_matrix(
    denoiser: nn.Module,
    batches: Sequence[dict[str, Any]],
    bins: Bins,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The gradient-cosine affinity of every pair of bins at the node's weights."""
    was = {id(p): p.requires_grad for p in denoiser.parameters()}
    for p in denoiser.parameters():
        p.requires_grad_(True)
    try:
        return cosine_matrix(bin_gradients(denoiser, batches, bins, seed, device))
    finally:
        for p in denoiser.parameters():
            p.requires_grad_(was[id(p)])
