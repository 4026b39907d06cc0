"""The exported ensemble as a diffusers pipeline: each step goes to the expert owning its σ.

This file is copied as `pipeline.py` into every folder `ediff-export` writes, so it must work
with torch and diffusers alone (no ediff_train import). Load it with
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

Why the pipeline steps in σ itself instead of calling the scheduler: the images must equal
`ediff-sample`'s for the same noise, solver and steps, and ediff-train's solvers (Euler, Heun)
run in EDM's σ on EDM's grid σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0.
The state is x_σ = x₀ + σ·ε, the denoiser D = c_skip·x + c_out·F(c_in·x, c_noise) with the
coefficients of the parameterisation the experts were trained with (`param` in model_index.json:
edm, flow, vp). For flow matching, c_in·x_σ = x_t and F is the velocity, so each expert is
called exactly as SD3/Wan call a transformer (timestep = 1000·t). The scheduler component names
the noise law for diffusers users; this pipeline reads only its class.

Experts are components `transformer`, `transformer_2`, … (or `unet`, `unet_2`, …) ordered from
the most noise to the least, as WanPipeline orders its pair; `experts` in the config gives each
its σ interval [lo, hi) and guidance scale; for two experts `boundary_ratio` is the split in
diffusers' convention (t = σ/(1+σ); `transformer` runs where t ≥ boundary_ratio).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor

MAX_EXPERTS = 8
SLOTS = {
    "transformer": ["transformer"] + [f"transformer_{i}" for i in range(2, MAX_EXPERTS + 1)],
    "unet": ["unet"] + [f"unet_{i}" for i in range(2, MAX_EXPERTS + 1)],
}


def vp_log_sigmas(beta_start: float, beta_end: float, steps: int) -> Tensor:
    """ln σ_i of the scaled-linear β schedule (SD's), float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, 0)
    return ((1.0 - alpha_bar) / alpha_bar).sqrt().log()


def vp_index(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """The fractional schedule index of σ, linear in ln σ between table entries."""
    ls = sigma.double().clamp(min=1e-300).log().clamp(log_sigmas[0], log_sigmas[-1])
    n = log_sigmas.numel()
    idx = torch.searchsorted(log_sigmas, ls).clamp(1, n - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    return idx - 1 + ((ls - lo) / (hi - lo)).clamp(0, 1)


def coefficients(param: dict[str, Any], sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of a parameterisation record (float32 σ in, as trained)."""
    name = param.get("name", "edm")
    if name == "edm":
        sd = float(param.get("sigma_data", 0.5))
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4
    if name == "flow":
        one = 1.0 / (1.0 + sigma)
        return one, -sigma * one, one, sigma * one
    if name == "vp":
        steps = int(param.get("steps", 1000))
        table = vp_log_sigmas(float(param["beta_start"]), float(param["beta_end"]), steps)
        alpha = 1.0 / (1.0 + sigma**2).sqrt()
        c_noise = (vp_index(sigma, table.to(sigma.device)) / (steps - 1) * (steps - 1)).to(
            sigma.dtype
        )
        if param.get("prediction", "eps") == "eps":
            return torch.ones_like(sigma), -sigma, alpha, c_noise
        return alpha**2, -sigma * alpha, alpha, c_noise
    raise ValueError(f"param.name must be edm, flow or vp, got {name!r}")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """EDM's σ grid, float64, ending in 0."""
    ramp = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])


class EnsemblePipeline(DiffusionPipeline):
    """Text-to-image with noise-band experts; prompts come in as embeddings (the backbone's
    `encoder_hidden_states` and, for an MMDiT, `pooled_projections`)."""

    _optional_components = ["vae", *SLOTS["transformer"], *SLOTS["unet"]]

    def __init__(
        self,
        scheduler: Any,
        vae: Any = None,
        transformer: Any = None,
        transformer_2: Any = None,
        transformer_3: Any = None,
        transformer_4: Any = None,
        transformer_5: Any = None,
        transformer_6: Any = None,
        transformer_7: Any = None,
        transformer_8: Any = None,
        unet: Any = None,
        unet_2: Any = None,
        unet_3: Any = None,
        unet_4: Any = None,
        unet_5: Any = None,
        unet_6: Any = None,
        unet_7: Any = None,
        unet_8: Any = None,
        experts: list[dict[str, Any]] | None = None,
        param: dict[str, Any] | None = None,
        timestep_scale: float = 1.0,
        boundary_ratio: float | None = None,
        sample: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        given = dict(locals())
        slots = [*SLOTS["transformer"], *SLOTS["unet"]]
        self.register_modules(scheduler=scheduler, vae=vae, **{k: given[k] for k in slots})
        self.register_to_config(
            experts=list(experts or []),
            param=dict(param or {"name": "edm"}),
            timestep_scale=float(timestep_scale),
            boundary_ratio=boundary_ratio,
            sample=dict(sample or {}),
        )

    # -- routing ------------------------------------------------------------------------------

    def owner(self, sigma: float) -> int:
        """Index into config.experts of the expert whose [lo, hi) holds σ."""
        for i, e in enumerate(self.config.experts):
            lo = float(e["sigma"][0] or 0.0)
            hi = math.inf if e["sigma"][1] is None else float(e["sigma"][1])
            if lo <= sigma < hi:
                return i
        raise ValueError(f"no expert owns sigma {sigma}")

    def expert(self, i: int) -> Any:
        return getattr(self, self.config.experts[i]["component"])

    def backbone(
        self, model: Any, x: Tensor, c_noise: Tensor, ctx: Tensor, pooled: Any, mask: Any
    ) -> Tensor:
        """F(c_in·x, c_noise) through the diffusers model, called as its own pipelines do (an
        MMDiT's joint attention takes no key mask; a U-Net's cross-attention does)."""
        ts = (c_noise * float(self.config.timestep_scale)).to(x.dtype)
        x = x.to(model.dtype)
        ctx = ctx.to(model.dtype)
        if hasattr(model.config, "pooled_projection_dim"):  # SD3Transformer2DModel
            out = model(
                hidden_states=x,
                timestep=ts,
                encoder_hidden_states=ctx,
                pooled_projections=pooled.to(model.dtype),
                return_dict=False,
            )[0]
        else:  # UNet2DConditionModel
            kw: dict[str, Any] = {"encoder_attention_mask": mask}
            if pooled is not None and model.config.class_embed_type == "projection":
                kw["class_labels"] = pooled.to(model.dtype)
            out = model(x, ts, encoder_hidden_states=ctx, return_dict=False, **kw)[0]
        return out.to(torch.float32)

    def denoise(
        self, i: int, x: Tensor, sigma: Tensor, ctx: Tensor, pooled: Any, mask: Any = None
    ) -> Tensor:
        """D(x; c, σ) of expert i, in float32 as ediff-train's EDMPrecond computes it."""
        sigma = sigma.to(torch.float32).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = coefficients(self.config.param, sigma)
        b = (-1,) + (1,) * (x.ndim - 1)
        f = self.backbone(self.expert(i), c_in.view(b) * x, c_noise, ctx, pooled, mask)
        return c_skip.view(b) * x + c_out.view(b) * f

    # -- sampling ------------------------------------------------------------------------------

    def scales(self, guidance_scale: Any, guidance_scale_2: Any) -> list[float]:
        """One guidance scale per expert: the exported ones, or a number for all (Wan: the
        second for `transformer_2`), or a list in component order."""
        n = len(self.config.experts)
        if guidance_scale is None:
            out = [float(e.get("guidance_scale", 1.0)) for e in self.config.experts]
        elif isinstance(guidance_scale, (list, tuple)):
            if len(guidance_scale) != n:
                raise ValueError(f"guidance_scale needs {n} values, got {len(guidance_scale)}")
            out = [float(g) for g in guidance_scale]
        else:
            out = [float(guidance_scale)] * n
        if guidance_scale_2 is not None:
            if n != 2:
                raise ValueError("guidance_scale_2 is for a pipeline of two experts")
            out[1] = float(guidance_scale_2)
        return out

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        prompt_attention_mask: Tensor | None = None,
        negative_prompt_attention_mask: Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | list[float] | None = None,
        guidance_scale_2: float | None = None,
        solver: str | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float | None = None,
        latents: Tensor | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Any:
        """`latents`: unit-variance starting noise [B, C, H, W] (scaled by σ_max here), else
        drawn from `generator`. Negative embeddings default to zeros: the unconditional input
        ediff-train trains (every text embedding dropped); the negative mask defaults to the
        prompt's (a U-Net's keys; ediff-train's null input keeps the mask). output_type: pil,
        np, pt or latent."""
        s = self.config.sample
        steps = int(num_inference_steps or s.get("steps", 32))
        solver = solver or s.get("solver", "heun")
        if solver not in ("euler", "heun"):
            raise ValueError(f"solver must be euler or heun, got {solver!r}")
        device = self._execution_device
        ctx = prompt_embeds.to(device, torch.float32)
        pooled = None if pooled_prompt_embeds is None else pooled_prompt_embeds.to(device)
        neg = torch.zeros_like(ctx) if negative_prompt_embeds is None else negative_prompt_embeds
        neg_pooled = negative_pooled_prompt_embeds
        if pooled is not None and neg_pooled is None:
            neg_pooled = torch.zeros_like(pooled)
        both = torch.cat([ctx, neg.to(device, torch.float32)])
        both_pooled = None if pooled is None else torch.cat([pooled, neg_pooled.to(device)])
        scales = self.scales(guidance_scale, guidance_scale_2)
        mask = both_mask = None
        if prompt_attention_mask is not None:
            mask = prompt_attention_mask.to(device, torch.bool)
            neg_mask = (
                mask if negative_prompt_attention_mask is None else negative_prompt_attention_mask
            )
            both_mask = torch.cat([mask, neg_mask.to(device, torch.bool)])

        def d(x: Tensor, sigma: Tensor) -> Tensor:
            i = self.owner(float(sigma))
            if scales[i] == 1.0:
                return self.denoise(i, x, sigma, ctx, pooled, mask)
            xx = torch.cat([x, x])
            d_c, d_u = self.denoise(i, xx, sigma, both, both_pooled, both_mask).chunk(2)
            return d_u + scales[i] * (d_c - d_u)

        if latents is None:
            shape = (ctx.shape[0], int(s["channels"]), int(s["image_size"]), int(s["image_size"]))
            latents = torch.randn(shape, generator=generator)
        sigmas = karras_sigmas(
            steps,
            float(sigma_min or s.get("sigma_min", 0.002)),
            float(sigma_max or s.get("sigma_max", 80.0)),
            float(rho or s.get("rho", 7.0)),
        )
        x = latents.to(device, torch.float32) * sigmas[0].to(torch.float32)
        for sc, sn in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            dx = (x - d(x, torch.tensor(sc, device=device))) / sc
            x_next = x + (sn - sc) * dx
            if solver == "heun" and sn > 0:
                dx2 = (x_next - d(x_next, torch.tensor(sn, device=device))) / sn
                x_next = x + (sn - sc) * 0.5 * (dx + dx2)
            x = x_next
        images = x if output_type == "latent" else self.decode(x)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
            images = self.numpy_to_pil(arr)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def decode(self, x: Tensor) -> Tensor:
        """Latents (through the VAE, undoing its scaling and shift) or pixels → [0, 1]."""
        if self.vae is not None:
            cfg = self.vae.config
            z = x / float(cfg.scaling_factor) + float(getattr(cfg, "shift_factor", None) or 0.0)
            x = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        return (x * 0.5 + 0.5).clamp(0, 1)


def boundary_ratio(sigma: float) -> float:
    """diffusers' boundary_ratio of a split at σ: the flow time t = σ/(1+σ)."""
    return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)
