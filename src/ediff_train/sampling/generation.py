"""Generate images from prompts with an ensemble: per-image noise, prompt embedding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ediff_train.core import solvers
from ediff_train.core.conditioning import Conditioning
from ediff_train.core.solvers import karras_sigmas
from ediff_train.core.sr import SIGMA_AUG_FLOOR, sampling_condition
from ediff_train.errors import EdiffError
from ediff_train.sampling.distilled import distilled_experts
from ediff_train.sampling.ensemble import Ensemble
from ediff_train.sampling.guidance import Guidance, guided, style_guided, text_only


def image_noise(seed: int, index: int, shape: Sequence[int]) -> Tensor:
    """Unit starting noise of image `index` under `seed`: the same whatever batch, rank or
    device the image is generated on."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.randn(*shape, generator=g)


@torch.no_grad()
def generate(
    model: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning,
    image_size: int,
    steps: int = 32,
    guidance: float | Guidance = 2.0,
    seed: int = 0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    channels: int = 3,
    noise: Tensor | None = None,
    lowres: Tensor | None = None,
    sigma_aug: float = SIGMA_AUG_FLOOR,
    solver: str = "heun",
    order: int = 3,
    text: str = "both",
    style: Tensor | None = None,
    style_guidance: float = 1.0,
    paint: Any = None,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Text-to-image with Heun + CFG; returns images in [0, 1]. One sample per cond row.

    `noise` [N,C,H,W] (unit variance) replaces the seeded draw, so a caller can give every
    image its own seed and get the same image whatever batch it lands in. A super-resolution
    stage also takes `lowres` [N,3,h,w] in [0, 1] (the stage below's images), augmented once
    at noise level `sigma_aug` (sr.py); guidance's unconditional branch sees it too.
    `solver` is one of solvers.SOLVERS (`order`: deis_ab's), `guidance` a scale or a Guidance,
    `text` both / t5 / clip (text_only). `style` [Di] (style_embedding) conditions every image
    on a reference image's CLIP embedding, weighted by `style_guidance` (style_guided). `paint`
    (paint.Painter for these rows) paints phrases onto regions in every cross-attention.
    `decode` (a VAE codec's, nn/codec.py): the solver runs in latent space, `image_size` and
    `channels` being the latent's, and its result is decoded to [-1, 1] pixels here."""
    if steps < 1:
        raise EdiffError(f"steps must be ≥ 1, got {steps}")
    if isinstance(guidance, Guidance) and isinstance(model, Ensemble):
        guidance.check([n.name for n in model.router.nodes])
    device = cond.t5.device
    n = cond.batch_size
    if lowres is not None:
        low = lowres.to(device, torch.float32) * 2 - 1
        cond = sampling_condition(cond, low, sigma_aug, seed)
    if noise is None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, channels, image_size, image_size, generator=g)
    x = noise.to(device)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = x * sigmas[0].to(torch.float32)
    if isinstance(model, Ensemble):
        model.plan(sigmas)
    cond = text_only(cond, text)
    route = model  # where guided() finds the expert owning σ (and whether it is distilled)
    if paint is not None:
        model = paint.wrap(model)
    if style is not None:
        if any(distilled_experts(route)):
            raise EdiffError(
                "a style image needs CFG's separate branches; a guidance-distilled expert "
                "answers one guided call (sample without style_image, or with its teacher)"
            )
        if isinstance(guidance, Guidance) and (guidance.per_expert or guidance.interval):
            raise EdiffError(
                "a style image takes one guidance scale (no per-expert scales or interval)"
            )
        styled = replace(cond, clip_img=style.to(cond.clip_img)[None].expand_as(cond.clip_img))
        scale = guidance.scale if isinstance(guidance, Guidance) else float(guidance)
        denoise = style_guided(model, styled, cond.null(), scale, float(style_guidance))
    else:
        denoise = guided(model, cond, cond.null(), guidance, route=route)
    out = solvers.solve(solver, denoise, x, sigmas, order)
    if decode is not None:
        out = decode(out.float())
    return (out.float() * 0.5 + 0.5).clamp(0, 1)


def embed_prompts(encoders: Any, prompts: list[str]) -> Conditioning:
    """Prompts → the Conditioning the loader builds from shards: T5 padded with a mask, and
    every embedding rounded through float16 exactly as the shards store it. No image prompt."""
    out = encoders.encode_text(prompts)
    lengths = [t.shape[0] for t in out["t5"]]
    t5 = torch.zeros(len(prompts), max(lengths), out["t5"][0].shape[-1])
    mask = torch.zeros(len(prompts), max(lengths), dtype=torch.bool)
    for i, t in enumerate(out["t5"]):
        t5[i, : t.shape[0]] = t.half().float()
        mask[i, : t.shape[0]] = True
    return Conditioning(
        t5=t5,
        t5_mask=mask,
        clip_txt=out["clip_txt"].half().float(),
        clip_pool=out["clip_pool"].half().float(),
        clip_img=torch.zeros(len(prompts), int(encoders.dims["clip_img"])),
    )
