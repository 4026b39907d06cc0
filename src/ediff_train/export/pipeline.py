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
diffusers' convention (t = σ/(1+σ); `transformer` runs where t ≥ boundary_ratio). They are
diffusers models (SD3Transformer2DModel, UNet2DConditionModel) or ediff-train's own backbones
(TextUNetModel, TextDiTModel from the folder's ediff_models.py), which take the five text
streams the shards store instead of packed tokens. LoRA experts exported as LoRA files
(`lora=true`) go onto their base's export as named adapters, one per σ band (ediff_lora.py).

Text: `text_encoder`/`tokenizer` (T5) and `text_encoder_2`/`tokenizer_2` (open_clip's CLIP text
tower, ediff_clip.py) embed prompts as ediff-train embeds them (`encode_prompt`), rounded
through float16 as the shards store them; an empty negative prompt is the unconditional input
the experts were trained with (every embedding zero), as ediff-sample's guidance uses.

Guidance-distilled experts (an ediff_models.py model with `guidance_range` in its config) learned
CFG's output with the scale w as an input: the step they own is one forward with their own
guidance scale (no conditional + negative batch, so a negative prompt does not reach them), as
ediff-sample asks them (ediff-train's sampling/distilled.py); the other experts keep CFG. A scale
outside the range a student was distilled for warns once per expert and scale, in one line.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor

from .ediff_lora import LoraMixin
from .ediff_text import STREAMS, TextMixin, cat_streams, logger, null_streams, pack

MAX_EXPERTS = 8
TEXT = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
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


class EnsemblePipeline(TextMixin, LoraMixin, DiffusionPipeline):
    """Text-to-image with noise-band experts: prompts in plain text (when the folder has the
    text encoders), as the five text streams (a dict, `encode_prompt`'s), or, for diffusers
    backbones, packed embeddings (`encoder_hidden_states` and, for an MMDiT,
    `pooled_projections`)."""

    _optional_components = ["vae", *TEXT, *SLOTS["transformer"], *SLOTS["unet"]]
    _lora_loadable_modules = [*SLOTS["transformer"], *SLOTS["unet"]]  # ediff_lora.py

    def __init__(
        self,
        scheduler: Any,
        vae: Any = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
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
        text: dict[str, Any] | None = None,
        packing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        given = dict(locals())
        slots = [*TEXT, *SLOTS["transformer"], *SLOTS["unet"]]
        self.register_modules(scheduler=scheduler, vae=vae, **{k: given[k] for k in slots})
        self.register_to_config(
            experts=list(experts or []),
            param=dict(param or {"name": "edm"}),
            timestep_scale=float(timestep_scale),
            boundary_ratio=boundary_ratio,
            sample=dict(sample or {}),
            text=dict(text) if text else None,
            packing=dict(packing) if packing else None,
        )
        self.warned: set[tuple[int, float]] = set()  # (expert, scale) warned outside its w range

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

    def inputs(self, streams: dict[str, Tensor]) -> dict[str, Any]:
        """What the experts take for these streams: the streams themselves (ediff-train's own
        backbones), or packed tokens, key mask and pooled vector (diffusers models)."""
        device = self._execution_device
        streams = {k: streams[k].to(device) for k in STREAMS}
        if getattr(self.expert(0), "takes_streams", False):
            return {"streams": streams}
        if not self.config.packing:
            raise ValueError("this folder's experts take packed embeddings, not text streams")
        ctx, mask, pooled = pack(streams, self.config.packing)
        return {"ctx": ctx, "mask": mask, "pooled": pooled}

    def distilled(self, i: int) -> list[float] | None:
        """The w range expert i was guidance-distilled for, or None (a CFG expert)."""
        return self.expert(i).config.get("guidance_range")

    def check_scale(self, i: int, w: float, w_range: list[float]) -> None:
        """One line, once per expert and scale, as ediff-train's sampler warns: outside its range
        the student extrapolates its w embedding, with no teacher to say how well."""
        lo, hi = float(w_range[0]), float(w_range[1])
        if lo <= w <= hi or (i, w) in self.warned:
            return
        self.warned.add((i, w))
        logger.warning(
            f"warning: guidance {w:g} for {self.config.experts[i]['node']} is outside the range "
            f"it was distilled for [{lo:g}, {hi:g}]: its output there is extrapolated"
        )

    def backbone(
        self, model: Any, x: Tensor, c_noise: Tensor, inp: dict[str, Any], guidance: Any = None
    ) -> Tensor:
        """F(c_in·x, c_noise) through one expert, called as its own pipelines do (an MMDiT's
        joint attention takes no key mask; a U-Net's cross-attention does); `guidance`: the w
        of a guidance-distilled expert."""
        if getattr(model, "takes_streams", False):  # ediff_models.py: raw c_noise, streams
            kw = {} if guidance is None else {"guidance": guidance}
            return model(x, c_noise, **kw, **inp["streams"]).to(torch.float32)
        if guidance is not None:
            raise ValueError(f"{type(model).__name__} has no guidance (w) input")
        ts = (c_noise * float(self.config.timestep_scale)).to(x.dtype)
        x, ctx, pooled = x.to(model.dtype), inp["ctx"].to(model.dtype), inp["pooled"]
        if hasattr(model.config, "pooled_projection_dim"):  # SD3Transformer2DModel
            out = model(
                hidden_states=x,
                timestep=ts,
                encoder_hidden_states=ctx,
                pooled_projections=pooled.to(model.dtype),
                return_dict=False,
            )[0]
        else:  # UNet2DConditionModel
            kw: dict[str, Any] = {"encoder_attention_mask": inp["mask"]}
            if pooled is not None and model.config.class_embed_type == "projection":
                kw["class_labels"] = pooled.to(model.dtype)
            out = model(x, ts, encoder_hidden_states=ctx, return_dict=False, **kw)[0]
        return out.to(torch.float32)

    def denoise(
        self, i: int, x: Tensor, sigma: Tensor, inp: dict[str, Any], guidance: Any = None
    ) -> Tensor:
        """D(x; c, σ[, w]) of expert i, in float32 as ediff-train's EDMPrecond computes it."""
        sigma = sigma.to(torch.float32).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = coefficients(self.config.param, sigma)
        b = (-1,) + (1,) * (x.ndim - 1)
        model = self.expert(i)
        self.activate(model, self.config.experts[i])  # a LoRA expert: its adapter on the base
        f = self.backbone(model, c_in.view(b) * x, c_noise, inp, guidance)
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

    def conditions(self, prompt: Any, negative_prompt: Any, kw: dict[str, Any]) -> tuple:
        """(conditional inputs, conditional + negative inputs, batch) from plain text, from a
        dict of streams, or from packed embeddings (`kw`: the embedding arguments)."""
        embeds, n_img = kw["prompt_embeds"], int(kw["num_images_per_prompt"])
        neg = kw["negative_prompt_embeds"]
        if prompt is not None:
            streams = self.encode_prompt(prompt)
            neg = self.negative_streams(negative_prompt, streams) if neg is None else neg
        elif isinstance(embeds, dict):
            streams = embeds
            neg = null_streams(streams) if neg is None else neg
        else:
            return self.packed_conditions(kw)
        if n_img > 1:
            streams = {k: v.repeat_interleave(n_img, 0) for k, v in streams.items()}
            neg = {k: v.repeat_interleave(n_img, 0) for k, v in neg.items()}
        both = cat_streams(streams, neg)
        return self.inputs(streams), self.inputs(both), streams["t5"].shape[0]

    def packed_conditions(self, kw: dict[str, Any]) -> tuple:
        """Packed embeddings for a diffusers backbone; negatives default to zeros (every text
        embedding dropped), the negative mask to the prompt's (ediff-train's null input keeps
        the mask)."""
        device, kw = self._execution_device, dict(kw)
        n_img = int(kw.pop("num_images_per_prompt"))
        kw = {k: None if v is None else v.repeat_interleave(n_img, 0) for k, v in kw.items()}
        if kw["prompt_embeds"] is None:
            raise ValueError("pass a prompt, or prompt_embeds")
        ctx = kw["prompt_embeds"].to(device, torch.float32)
        pooled = kw["pooled_prompt_embeds"]
        pooled = None if pooled is None else pooled.to(device)
        neg = kw["negative_prompt_embeds"]
        neg = torch.zeros_like(ctx) if neg is None else neg
        neg_pooled = kw["negative_pooled_prompt_embeds"]
        if pooled is not None and neg_pooled is None:
            neg_pooled = torch.zeros_like(pooled)
        both_pooled = None if pooled is None else torch.cat([pooled, neg_pooled.to(device)])
        mask = both_mask = None
        if kw["prompt_attention_mask"] is not None:
            mask = kw["prompt_attention_mask"].to(device, torch.bool)
            neg_mask = kw["negative_prompt_attention_mask"]
            neg_mask = mask if neg_mask is None else neg_mask
            both_mask = torch.cat([mask, neg_mask.to(device, torch.bool)])
        cond = {"ctx": ctx, "mask": mask, "pooled": pooled}
        both = {"ctx": torch.cat([ctx, neg.to(device, torch.float32)]), "mask": both_mask}
        return cond, {**both, "pooled": both_pooled}, ctx.shape[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | dict[str, Tensor] | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | dict[str, Tensor] | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        prompt_attention_mask: Tensor | None = None,
        negative_prompt_attention_mask: Tensor | None = None,
        num_images_per_prompt: int = 1,
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
        """`prompt`: text (the folder's encoders embed it); or `prompt_embeds`: the streams
        `encode_prompt` returns (a dict), or a diffusers backbone's packed tokens. `latents`:
        unit-variance starting noise [B, C, H, W] (scaled by σ_max here), else drawn from
        `generator`. output_type: pil, np, pt or latent."""
        kw = {k: v for k, v in locals().items() if k.endswith(("embeds", "mask", "per_prompt"))}
        s = self.config.sample
        steps = int(num_inference_steps or s.get("steps", 32))
        solver = solver or s.get("solver", "heun")
        if solver not in ("euler", "heun"):
            raise ValueError(f"solver must be euler or heun, got {solver!r}")
        device = self._execution_device
        cond, both, n = self.conditions(prompt, negative_prompt, kw)
        scales = self.scales(guidance_scale, guidance_scale_2)

        def d(x: Tensor, sigma: Tensor) -> Tensor:
            i = self.owner(float(sigma))
            w_range = self.distilled(i)
            if w_range is not None:  # one forward with its own scale: no CFG branches
                self.check_scale(i, scales[i], w_range)
                return self.denoise(i, x, sigma, cond, guidance=scales[i])
            if scales[i] == 1.0:
                return self.denoise(i, x, sigma, cond)
            d_c, d_u = self.denoise(i, torch.cat([x, x]), sigma, both).chunk(2)
            return d_u + scales[i] * (d_c - d_u)

        if latents is None:
            shape = (n, int(s["channels"]), int(s["image_size"]), int(s["image_size"]))
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
        elif output_type == "pil":  # numpy_to_pil takes [0, 1] floats (it scales by 255)
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
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
