"""The attention share painted phrases get inside their masks (metric=paint, digits or shapes):
a Painter `record` (nn/paint.py) fed each cross-attention's probabilities and paint matrix."""

from __future__ import annotations

import torch
from torch import Tensor


class MaskMass:
    """A Painter `record`: the painted phrases' attention share inside their masks, and the
    same for the masks mirrored left↔right (the swapped layout, for an unpainted baseline)."""

    def __init__(self, rows: int) -> None:
        self.rows, self.total, self.calls = rows, torch.zeros(2), 0

    def __call__(self, sigma: float, probs: Tensor, paint: Tensor) -> None:
        p = probs[: self.rows].float().mean(1)  # [rows, HW, N], heads averaged
        side = int(p.shape[1] ** 0.5)
        on = paint[: self.rows] > 0
        mirrored = on.view(on.shape[0], side, side, -1).flip(2).reshape(on.shape)
        for i, m in enumerate((on, mirrored)):
            inside = m.any(-1)  # image tokens inside some mask
            self.total[i] += (p * m).sum(-1)[inside].mean()
        self.calls += 1

    def mean(self, mirrored: bool = False) -> float:
        return float(self.total[int(mirrored)]) / max(self.calls, 1)
