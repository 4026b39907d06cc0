"""Short training probes at a node: where capacity binds, and what a specialist gains.

- `headroom`: the node's network and a wider one (e.g. twice the channels), both from scratch
  on the same batches, σ and noise for the same steps; per bin, the relative held-out loss the
  wider net saves. A band whose loss does not move with width has no capacity to gain from.
- `transfer_gap`: the measured negative-transfer gap. From the node's weights, one copy trains
  on the whole band (shared) and one per candidate band on that band only (specialist), each for
  the same steps on the same batches; per band, the relative in-band held-out loss the
  specialist saves. This is what a split buys at equal steps, and what the advisor predicts.
Both use a plain AdamW loop on the EDM loss with full conditioning (no CFG dropout: a probe,
not a training run), and fixed draws for every held-out loss so models compare sample for sample.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ediff_train.advise.bins import Bins
from ediff_train.core.edm import edm_loss
from ediff_train.metrics.loss_by_sigma import heldout_inputs, noise_seed

Batches = Callable[[], Iterator[dict[str, Any]]]  # a fresh, identical training stream per call
SIGMA_SALT = 77_777


@torch.no_grad()
def bin_losses(
    denoiser: nn.Module,
    heldout: Sequence[dict[str, Any]],
    bins: Bins,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Per bin, the mean weighted EDM loss over the held-out samples (fixed σ and noise)."""
    denoiser.eval()
    out = []
    for k in range(bins.count):
        total, count = 0.0, 0
        for b, batch in enumerate(heldout):
            x, cond = heldout_inputs(batch, device)
            noise = torch.randn(
                x.shape, generator=torch.Generator().manual_seed(noise_seed(seed, b, 1 + k))
            ).to(device)
            sg = torch.Generator().manual_seed(noise_seed(seed, b, 0) + SIGMA_SALT)
            sigma = bins.sample(k, x.shape[0], sg).to(device, torch.float32)
            total += float(edm_loss(denoiser, x, sigma, cond, noise=noise).sum())
            count += x.shape[0]
        out.append(total / max(count, 1))
    return out


def train_probe(
    denoiser: nn.Module,
    batches: Iterator[dict[str, Any]],
    draw_sigma: Callable[[int, torch.Generator], Tensor],
    steps: int,
    lr: float,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """`steps` AdamW updates of the EDM loss, σ from `draw_sigma(n, generator)`."""
    denoiser.train()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(int(seed) + SIGMA_SALT)
    for step in range(steps):
        batch = next(batches)
        x, cond = heldout_inputs(batch, device)
        noise = torch.randn(
            x.shape, generator=torch.Generator().manual_seed(noise_seed(seed, step, 3))
        ).to(device)
        sigma = draw_sigma(x.shape[0], g).to(device, torch.float32)
        loss = edm_loss(denoiser, x, sigma, cond, noise=noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return denoiser.eval()


def relative_gain(base: Sequence[float], other: Sequence[float]) -> list[float]:
    """(base − other)/base per entry: the share of the base's loss the other removes."""
    return [(b - o) / b if b > 0 else 0.0 for b, o in zip(base, other)]


def headroom(
    make_base: Callable[[], nn.Module],
    make_wide: Callable[[], nn.Module],
    batches: Batches,
    heldout: Sequence[dict[str, Any]],
    bins: Bins,
    steps: int,
    lr: float,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, list[float]]:
    """Per bin: held-out loss of the node's net and of the wider one after `steps` from scratch,
    and the wider net's relative gain."""

    def draw(n: int, g: torch.Generator) -> Tensor:
        return bins.sample_band(0, bins.count, n, g)

    losses = {}
    for name, make in (("base", make_base), ("wide", make_wide)):
        torch.manual_seed(seed)
        net = train_probe(make().to(device), batches(), draw, steps, lr, seed, device)
        losses[name] = bin_losses(net, heldout, bins, seed, device)
    return {**losses, "headroom": relative_gain(losses["base"], losses["wide"])}


def transfer_gap(
    denoiser: nn.Module,
    batches: Batches,
    heldout: Sequence[dict[str, Any]],
    bins: Bins,
    bands: Sequence[tuple[int, int]],
    steps: int,
    lr: float,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Per band [lo, hi) of bins: in-band held-out loss of the shared copy and of the band's
    specialist after `steps` each from the node's weights, and the specialist's relative gain."""

    def in_band(losses: list[float], lo: int, hi: int) -> float:
        return sum(losses[lo:hi]) / (hi - lo)

    def trained(first: int, stop: int) -> list[float]:
        net = copy.deepcopy(denoiser).to(device).requires_grad_(True)

        def draw(n: int, g: torch.Generator) -> Tensor:
            return bins.sample_band(first, stop, n, g)

        net = train_probe(net, batches(), draw, steps, lr, seed, device)
        return bin_losses(net, heldout, bins, seed, device)

    start = bin_losses(copy.deepcopy(denoiser).to(device), heldout, bins, seed, device)
    shared = trained(0, bins.count)
    rows = []
    for lo, hi in bands:
        special = trained(lo, hi)
        s, p = in_band(shared, lo, hi), in_band(special, lo, hi)
        rows.append(
            {
                "bins": [lo, hi],
                "start": in_band(start, lo, hi),
                "shared": s,
                "specialist": p,
                "gap": (s - p) / s if s > 0 else 0.0,
            }
        )
    return {"steps": steps, "bands": rows, "shared_by_bin": shared, "start_by_bin": start}
