"""Sampling with guidance-distilled experts (docs/guidance_distillation.md): such an expert is
asked once per solver step, with its guidance scale w as an input, instead of CFG's two
branches. In a mixed ensemble the other experts keep CFG; the expert owning σ decides."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ediff_train.core.conditioning import Conditioning
from ediff_train.nn.guidance_embed import is_guided_student

_warned: set[tuple[str, float, tuple[float, float]]] = set()  # one line per expert and scale


def distilled_experts(route: Any) -> list[bool]:
    """Per expert of an Ensemble (router order), or for one denoiser: is it a student?"""
    experts = getattr(route, "experts", None)
    if getattr(route, "router", None) is not None and experts is not None:
        return [is_guided_student(e) for e in experts]
    return [is_guided_student(route)]


def check_scale(name: str, w: float, w_range: tuple[float, float]) -> None:
    """One warning line (once per expert and scale) for a scale outside the trained range: the
    student extrapolates its w embedding there, with no teacher to say how well."""
    key = (name, float(w), tuple(w_range))
    if w_range[0] <= w <= w_range[1] or key in _warned:
        return
    _warned.add(key)
    print(
        f"warning: guidance {w:g} for {name} is outside the range it was distilled for "
        f"[{w_range[0]:g}, {w_range[1]:g}]: its output there is extrapolated",
        file=sys.stderr,
        flush=True,
    )


def distilled_guided(
    model: Callable[..., Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    g: Any,
    route: Any,
    students: list[bool],
) -> Callable[[Tensor, Tensor], Tensor]:
    """The denoiser for a solver: a student owning σ answers model(x, σ, c, guidance=w) once,
    any other expert CFG as `guided` does (conditional alone at scale 1)."""
    router = getattr(route, "router", None)
    experts = getattr(route, "experts", None) if router is not None else [route]
    both = cond.cat(uncond)

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma.reshape(-1)[0])
        i = int(router.index(s)) if router is not None else 0
        owner = router.nodes[i].name if router is not None else None
        w = g.scale_at(s, owner)
        if students[i]:
            check_scale(owner or "the expert", w, experts[i].w_range)
            return model(x, sigma, cond, guidance=w)
        if w == 1.0:
            return model(x, sigma, cond)
        d_c, d_u = model(torch.cat([x, x]), sigma, both).chunk(2)
        return d_u + w * (d_c - d_u)

    return denoise
