"""Classifier-free guidance, text-encoder modes and style guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.solvers import Denoiser
from ediff_train.errors import EdiffError
from ediff_train.sampling.distilled import distilled_experts, distilled_guided


@dataclass
class Guidance:
    """Classifier-free guidance scale as a function of σ and of the expert owning it.

    `per_expert` gives an ensemble's experts their own scales by node name (Wan2.2-style, one
    per noise band; others use `scale`); `interval` (lo, hi] limits guidance to σ in it, the
    conditional model alone answering outside (Kynkäänniemi et al. 2024) at half the cost."""

    scale: float = 5.0
    per_expert: dict[str, float] = field(default_factory=dict)
    interval: tuple[float, float] | None = None

    def scale_at(self, sigma: float, owner: str | None = None) -> float:
        if self.interval is not None and not self.interval[0] < sigma <= self.interval[1]:
            return 1.0
        return float(self.per_expert.get(owner, self.scale)) if owner else float(self.scale)

    def check(self, names: Sequence[str]) -> None:
        unknown = sorted(set(self.per_expert) - set(names))
        if unknown:
            raise EdiffError(
                f"guidance per expert names {', '.join(unknown)}, not in the "
                f"ensemble ({', '.join(names)})"
            )
        if self.interval is not None and not 0 <= self.interval[0] < self.interval[1]:
            raise EdiffError(
                f"guidance interval must be (lo, hi] with 0 ≤ lo < hi, got {tuple(self.interval)}"
            )


TEXT_MODES = ("both", "t5", "clip")


def style_guided(
    model: Callable[[Tensor, Tensor, Conditioning], Tensor],
    styled: Conditioning,
    uncond: Conditioning,
    scale: float,
    style_scale: float,
) -> Denoiser:
    """Guidance with a style image (its CLIP image embedding in `styled.clip_img`) weighted on
    its own: D = D_u + s·(D_text − D_u) + s_style·(D_text+style − D_text), the three branches in
    one batched call. s_style = 0 ignores the image; 1 conditions on it without extrapolating."""
    text = replace(styled, clip_img=torch.zeros_like(styled.clip_img))
    rows = styled.cat(text).cat(uncond)

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        d_s, d_t, d_u = model(torch.cat([x, x, x]), sigma, rows).chunk(3)
        return d_u + scale * (d_t - d_u) + style_scale * (d_s - d_t)

    return denoise


def style_embedding(encoders: Any, path: str | Path) -> Tensor:
    """A reference image file → its CLIP image embedding [Di] (rounded through float16, as the
    shards store it), with the encoders' own image tower."""

    p = Path(path)
    if not p.is_file():
        raise EdiffError(f"style_image {p} does not exist")
    try:
        with Image.open(p) as im:
            arr = torch.from_numpy(np.array(im.convert("RGB")))
    except (UnidentifiedImageError, OSError) as e:
        raise EdiffError(f"style_image {p} is not a readable image ({type(e).__name__})") from None
    pixels = arr.permute(2, 0, 1)[None].float() / 255.0
    return encoders.encode_image(pixels)[0].half().float()


def text_only(cond: Conditioning, mode: str) -> Conditioning:
    """Condition on T5 only, CLIP text only, or both (the paper's encoder study): the other
    encoder's embeddings are zeroed exactly as training's dropout zeroes them. The
    unconditional branch is always everything dropped (`Conditioning.null`), whatever `mode`."""
    if mode not in TEXT_MODES:
        raise EdiffError(f"text must be one of {', '.join(TEXT_MODES)}, got {mode!r}")
    if mode == "t5":
        return replace(
            cond,
            clip_txt=torch.zeros_like(cond.clip_txt),
            clip_pool=torch.zeros_like(cond.clip_pool),
        )
    if mode == "clip":
        return replace(cond, t5=torch.zeros_like(cond.t5))
    return cond


def guided(
    model: Callable[..., Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    scale: float | Guidance,
    route: Any = None,
) -> Denoiser:
    """Classifier-free guidance: D_u + s·(D_c − D_u), both branches in one batched call; where
    the scale is 1 (or σ is outside a Guidance's interval) only the conditional branch runs. A
    guidance-distilled expert (sampling/distilled.py) is called once with its scale instead.
    `route`: the model or Ensemble to look the expert owning σ up in, when `model` wraps it."""
    g = scale if isinstance(scale, Guidance) else Guidance(float(scale))
    route = model if route is None else route
    students = distilled_experts(route)
    if any(students):
        return distilled_guided(model, cond, uncond, g, route, students)
    router = getattr(route, "router", None) if g.per_expert else None
    if g.interval is None and not g.per_expert and g.scale == 1.0:
        return lambda x, sigma: model(x, sigma, cond)
    both = cond.cat(uncond)

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma.reshape(-1)[0])
        owner = router.nodes[int(router.index(s))].name if router is not None else None
        w = g.scale_at(s, owner)
        if w == 1.0:
            return model(x, sigma, cond)
        d_c, d_u = model(torch.cat([x, x]), sigma, both).chunk(2)
        return d_u + w * (d_c - d_u)

    return denoise
