"""Paint-with-words (eDiff-I §4.3): phrases of the prompt painted onto regions of the canvas.

For each phrase, a mask (one PNG per phrase, or one colour map and a legend colour → phrase) says
where its tokens should attend. In every cross-attention the layer adds w·A to QKᵀ, with
A[i, j] = strength of the phrase holding text token j where image token i lies inside its mask
(the mask bilinearly resized to the layer's size, any size and aspect), and
w = w′·log(1 + σ)·max(QKᵀ). Only the conditional branch of guidance is painted. It runs through
the network's own attention (`nn.attention.AttentionHook`); with w′ = 0 no hook is installed and
the sampler is the plain one, bit for bit (with a `record`, hooks that only record keep the fused
attention output, so the images are still the plain ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.nn.attention import AttentionHook
from ediff_train.nn.embed import ConditionEmbedder


@dataclass
class Region:
    phrase: str
    mask: Tensor  # [H, W] in [0, 1]
    strength: float = 1.0


def read_mask(path: str | Path) -> Tensor:
    """A mask image → [H, W] in [0, 1] (its luminance; white = paint here)."""

    p = Path(path)
    if not p.is_file():
        raise EdiffError(f"mask {p} does not exist")
    try:
        with Image.open(p) as im:
            return torch.from_numpy(np.array(im.convert("L"), dtype=np.float32) / 255.0)
    except (UnidentifiedImageError, OSError) as e:
        raise EdiffError(f"mask {p} is not a readable image ({type(e).__name__})") from None


def regions_from_colour_map(path: str | Path, legend: dict[str, str]) -> list[Region]:
    """A colour map + {"#rrggbb": "phrase[,strength]"} → one region per legend colour."""

    p = Path(path)
    if not p.is_file():
        raise EdiffError(f"colour map {p} does not exist")
    with Image.open(p) as im:
        rgb = np.array(im.convert("RGB"), dtype=np.int64)
    out = []
    for colour, spec in legend.items():
        c = colour.lstrip("#")
        if len(c) != 6:
            raise EdiffError(f"legend colour {colour!r} is not #rrggbb")
        value = [int(c[i : i + 2], 16) for i in (0, 2, 4)]
        mask = (rgb == np.array(value)).all(-1)
        if not mask.any():
            raise EdiffError(f"legend colour {colour} does not occur in {p}")
        phrase, _, strength = str(spec).partition(",")
        out.append(
            Region(
                phrase.strip(),
                torch.from_numpy(mask.astype(np.float32)),
                float(strength) if strength.strip() else 1.0,
            )
        )
    return out


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def token_positions(encoders: Any, prompt: str, phrase: str) -> tuple[list[int], list[int]]:
    """Indices of the phrase's tokens in the prompt's T5 tokens and in its CLIP tokens."""
    t5_all = encoders.t5_tokenizer([prompt]).input_ids[0]
    t5_sub = encoders.t5_tokenizer([phrase], add_special_tokens=False).input_ids[0]
    clip_all = [int(t) for t in encoders.clip_tokenizer([prompt])[0] if int(t)]
    clip_sub = [int(t) for t in encoders.clip_tokenizer([phrase])[0] if int(t)][1:-1]  # no SOT/EOT
    i, j = _find(list(t5_all), list(t5_sub)), _find(clip_all, clip_sub)
    if not t5_sub or not clip_sub or i < 0 or j < 0:
        raise EdiffError(f"phrase {phrase!r} is not in the prompt {prompt!r}")
    return list(range(i, i + len(t5_sub))), list(range(j, j + len(clip_sub)))


Recorder = Callable[[float, Tensor, Tensor], None]


class Painter:
    """Builds each cross-attention's AttentionHook for a batch of painted prompts.

    Rows of the batch are [conditional rows..., unconditional rows...] (guided's layout); only
    the first `rows` are painted. `record(σ, probs, A)`, if given, sees every cross-attention's
    weights [B, heads, HW, N] with its paint matrix A [B, HW, N], also at w′ = 0, so the
    attention a phrase gets inside its mask can be measured with and without painting."""

    def __init__(
        self,
        encoders: Any,
        prompts: Sequence[str],
        regions: Sequence[Region],
        w_prime: float,
        record: Recorder | None = None,
    ) -> None:
        if not regions:
            raise EdiffError("paint-with-words needs at least one phrase and mask")
        self.w_prime, self.rows, self.record = float(w_prime), len(prompts), record
        self.regions = list(regions)
        self.positions = [
            [token_positions(encoders, p, r.phrase) for r in regions] for p in prompts
        ]

    def matrix(self, h: int, w: int, t5_len: int, batch: int) -> Tensor:
        """A [batch, h·w, N]: each region's resized mask on its phrase's T5 and CLIP tokens."""
        sl = ConditionEmbedder.slices(t5_len)
        n = sl["null"].stop
        a = torch.zeros(batch, h * w, n)
        for row, per_region in enumerate(self.positions):
            for region, (t5_pos, clip_pos) in zip(self.regions, per_region):
                m = F.interpolate(
                    region.mask[None, None].float(),
                    size=(h, w),
                    mode="bilinear",
                    align_corners=False,
                ).reshape(-1)
                cols = [p for p in t5_pos if p < t5_len] + [
                    sl["clip_txt"].start + p for p in clip_pos
                ]
                a[row, :, cols] = torch.maximum(a[row, :, cols], region.strength * m[:, None])
        return a

    def bias_fn(self, sigma: float, cond: Conditioning) -> Callable[[int, int], AttentionHook]:
        weight = torch.full((cond.batch_size,), self.w_prime * math.log1p(sigma))
        t5_len = cond.t5.shape[1]
        cache: dict[tuple[int, int], AttentionHook] = {}

        def hook(h: int, w: int) -> AttentionHook:
            if (h, w) not in cache:
                a = self.matrix(h, w, t5_len, cond.batch_size).to(cond.t5.device)
                seen = (
                    None if self.record is None else lambda probs, a=a: self.record(sigma, probs, a)
                )
                cache[(h, w)] = AttentionHook(
                    paint=a if self.w_prime else None, weight=weight.to(cond.t5.device), record=seen
                )
            return cache[(h, w)]

        return hook

    def wrap(
        self, model: Callable[..., Tensor]
    ) -> Callable[[Tensor, Tensor, Conditioning], Tensor]:
        """`model` with every call painted (a plain model when w′ = 0 and nothing records)."""
        if self.w_prime == 0.0 and self.record is None:
            return model

        def painted(x: Tensor, sigma: Tensor, cond: Conditioning, **kw: Any) -> Tensor:
            s = float(sigma.reshape(-1)[0])  # kw: a distilled expert's guidance scale
            return model(x, sigma, cond, cross_attn_bias=self.bias_fn(s, cond), **kw)

        return painted
