"""Contiguous clustering of ordered σ bins (interval clustering by dynamic programming).

A split of a node is a partition of its ordered σ bins into contiguous bands. Given a symmetric
affinity (or similarity) matrix A over the bins, a band B scores S_B / |B|, S_B the sum of A over
B × B: the mean affinity of a bin with its band, summed over its bins. The partition into k bands
maximising Σ_B S_B/|B| keeps bins that agree together; with A ≡ 1 every partition scores K (no
split is favoured), with a block-diagonal A the blocks win. Exact in O(k·K²).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ediff_train.errors import EdiffError


def _prefix(a: np.ndarray) -> np.ndarray:
    p = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    p[1:, 1:] = a.cumsum(0).cumsum(1)
    return p


def band_score(a: np.ndarray, lo: int, hi: int) -> float:
    """S_B/|B| of the band of bins [lo, hi)."""
    block = np.asarray(a, dtype=float)[lo:hi, lo:hi]
    return float(block.sum() / (hi - lo))


def partition_score(a: np.ndarray, starts: Sequence[int]) -> float:
    """Σ_B S_B/|B| of the partition whose bands start at bin 0 and at each of `starts`."""
    edges = [0, *starts, a.shape[0]]
    return sum(band_score(a, lo, hi) for lo, hi in zip(edges[:-1], edges[1:]))


def best_partition(a: np.ndarray, k: int) -> tuple[list[int], float]:
    """(first bin of each band after the first, score) of the best partition into k bands."""
    a = np.asarray(a, dtype=float)
    n = a.shape[0]
    if a.ndim != 2 or a.shape[1] != n:
        raise EdiffError(f"an affinity matrix must be square, got shape {a.shape}")
    if not 1 <= k <= n:
        raise EdiffError(f"cannot split {n} σ bins into {k} bands: choose 1–{n} bands")
    p = _prefix(a)

    def score(i: int, j: int) -> float:
        return (p[j, j] - p[i, j] - p[j, i] + p[i, i]) / (j - i)

    best = np.full((k + 1, n + 1), -np.inf)
    back = np.zeros((k + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        for j in range(m, n + 1):
            for i in range(m - 1, j):
                v = best[m - 1, i] + score(i, j)
                if v > best[m, j]:
                    best[m, j], back[m, j] = v, i
    starts, j = [], n
    for m in range(k, 0, -1):
        j = int(back[m, j])
        starts.append(j)
    return sorted(starts)[1:], float(best[k, n])
