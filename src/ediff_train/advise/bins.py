"""The σ bins the advisor measures: equal-probability slices of a node's band (of a range inside
it), so that a dyadic split of the bins is the tree's own split of the node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ediff_train.errors import EdiffError


@dataclass(frozen=True)
class Bins:
    """K equal-probability bins [u_k, u_k+1) of the training σ law `law` (its quantiles u)."""

    edges: tuple[float, ...]  # K + 1 quantiles, increasing
    law: Any

    @property
    def count(self) -> int:
        return len(self.edges) - 1

    @property
    def sigma_edges(self) -> list[float]:
        return [self.law.icdf(u) for u in self.edges]

    @property
    def sigma_mid(self) -> list[float]:
        """Each bin's median σ (the σ at its middle quantile)."""
        return [self.law.icdf(0.5 * (lo + hi)) for lo, hi in zip(self.edges, self.edges[1:])]

    def sample(self, k: int, n: int, generator: torch.Generator) -> Tensor:
        """n exact draws of σ from the law truncated to bin k (float64)."""
        return self.sample_band(k, k + 1, n, generator)

    def sample_band(self, first: int, stop: int, n: int, generator: torch.Generator) -> Tensor:
        """n exact draws of σ from the law truncated to bins [first, stop) (float64)."""
        lo, hi = self.edges[first], self.edges[stop]
        u = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        return self.law.icdf_t(u.clamp(1e-15, 1 - 1e-15))

    def group(self, starts: list[int]) -> list[tuple[int, int]]:
        """Bands [lo, hi) of bin indices, the first starting at 0 and the others at `starts`."""
        edges = [0, *starts, self.count]
        return list(zip(edges[:-1], edges[1:]))


def node_bins(node: Any, count: int, sigma_range: tuple[float, float] | None = None) -> Bins:
    """`count` equal-probability bins of the node's band, or of `sigma_range` inside it."""
    if count < 2:
        raise EdiffError(f"--bins must be at least 2, got {count}")
    if len(node.pieces) != 1:
        raise EdiffError(f"node {node.name} is not one interval of σ: advise a tree node")
    lo, hi = node.quantile_interval
    if sigma_range is not None:
        s_lo, s_hi = (float(s) for s in sigma_range)
        band_lo, band_hi = node.sigma_interval
        if not 0 < s_lo < s_hi or s_lo < band_lo * (1 - 1e-9) or s_hi > band_hi * (1 + 1e-9):
            raise EdiffError(
                f"σ range [{s_lo:g}, {s_hi:g}] is not inside node {node.name}'s band "
                f"[{band_lo:.4g}, {band_hi:.4g}): choose σ_lo < σ_hi within it"
            )
        lo, hi = max(lo, node.law.cdf(s_lo)), min(hi, node.law.cdf(s_hi))
    return Bins(tuple(lo + (hi - lo) * k / count for k in range(count + 1)), node.law)
