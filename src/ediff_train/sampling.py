"""Samplers as plain functions over a denoiser D(x, σ) -> x̂, plus guidance and the ensemble.

The ensemble is what makes a set of experts one model: every solver step asks the expert whose
noise band holds the current σ (experts.Router), so solvers never know experts exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ediff_train.conditioning import Conditioning
from ediff_train.experts import Node, Router
from ediff_train.sr import SIGMA_AUG_FLOOR, sampling_condition

Denoiser = Callable[[Tensor, Tensor], Tensor]


def karras_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """EDM's σ grid (steps values from σ_max down to σ_min, then a final 0)."""
    i = torch.arange(steps, dtype=torch.float64)
    ramp = i / max(steps - 1, 1)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """EDM Algorithm 1 (deterministic 2nd-order Heun); x starts as σ_max·N(0, I)."""
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        sc = s_cur.to(x.device, torch.float32)
        sn = s_next.to(x.device, torch.float32)
        d = (x - denoiser(x, sc)) / sc
        x_next = x + (sn - sc) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next, sn)) / sn
            x_next = x + (sn - sc) * 0.5 * (d + d2)
        x = x_next
    return x


def guided(
    model: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    scale: float,
) -> Denoiser:
    """Classifier-free guidance: D_u + s·(D_c − D_u), both branches in one batched call."""
    if scale == 1.0:
        return lambda x, sigma: model(x, sigma, cond)
    both = cond.cat(uncond)

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        out = model(torch.cat([x, x]), sigma, both)
        d_c, d_u = out.chunk(2)
        return d_u + scale * (d_c - d_u)

    return denoise


class Ensemble(nn.Module):
    """Experts that tile the noise axis, called like a single denoiser D(x, σ, cond)."""

    def __init__(self, nodes: Sequence[Node], denoisers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.router = Router(nodes)
        self.experts = nn.ModuleList(denoisers)
        self.calls = [0] * len(denoisers)  # how often each expert was asked (for reports/tests)

    def forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        s = sigma.reshape(-1)
        owners = self.router.index(s.detach().cpu())
        if bool((owners == owners[0]).all()):
            i = int(owners[0])
            self.calls[i] += 1
            return self.experts[i](x, sigma, cond)
        out = torch.empty_like(x)  # mixed σ in one batch: ask each owner for its rows
        for i in owners.unique().tolist():
            rows = (owners == i).nonzero().squeeze(1).to(x.device)
            sub = cond.rows(rows)
            sig = sigma.reshape(-1).expand(x.shape[0])[rows]
            self.calls[i] += 1
            out[rows] = self.experts[i](x[rows], sig, sub)
        return out


def save_images(images: Tensor, out_dir: str | Path, prefix: str = "sample",
                grid: Any = None) -> Path:
    """Write each image as PNG plus grid.png (`grid`, a PIL image, or a square-ish grid of the
    images); images in [0, 1], [N,3,H,W]."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(out / f"{prefix}_{i:04d}.png")
    grid_path = out / "grid.png"
    (grid if grid is not None else Image.fromarray(make_grid(images))).save(grid_path)
    return grid_path


def make_grid(images: Tensor, pad: int = 1, upscale: int | None = None,
              cols: int | None = None) -> object:
    """A uint8 HxWx3 numpy grid of [N,3,H,W] images in [0, 1], upscaled so small images show."""
    n, _, h, w = images.shape
    cols = cols or int(n**0.5 + 0.999)
    rows = (n + cols - 1) // cols
    scale = upscale or max(1, 64 // max(h, w))
    grid = torch.zeros(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = images[k].clamp(0, 1).cpu().float()
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def labelled_grid(images: Tensor, labels: Sequence[str], per_row: int,
                  upscale: int | None = None) -> object:
    """A grid with one row per label (`per_row` images each) and the label written on its left,
    so a reader sees at once whether each row follows its prompt. Returns a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    grid = Image.fromarray(make_grid(images, upscale=upscale, cols=per_row))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    width = max(int(draw.textlength(str(t), font=font)) for t in labels) + 8
    out = Image.new("RGB", (grid.width + width, grid.height), (255, 255, 255))
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    row_h = grid.height / max(len(labels), 1)
    for r, text in enumerate(labels):
        draw.text((4, int(r * row_h + row_h / 2 - 5)), str(text), fill=(0, 0, 0), font=font)
    return out


@torch.no_grad()
def generate(
    model: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning,
    image_size: int,
    steps: int = 32,
    guidance: float = 2.0,
    seed: int = 0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    channels: int = 3,
    noise: Tensor | None = None,
    lowres: Tensor | None = None,
    sigma_aug: float = SIGMA_AUG_FLOOR,
) -> Tensor:
    """Text-to-image with Heun + CFG; returns images in [0, 1]. One sample per cond row.

    `noise` [N,C,H,W] (unit variance) replaces the seeded draw, so a caller can give every
    image its own seed and get the same image whatever batch it lands in. A super-resolution
    stage also takes `lowres` [N,3,h,w] in [0, 1] (the stage below's images), augmented once
    at noise level `sigma_aug` (sr.py); guidance's unconditional branch sees it too."""
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
    denoise = guided(model, cond, cond.null(), guidance)
    out = heun_sample(denoise, x, sigmas)
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


def load_ensemble(run_dir: str | Path, names: Sequence[str], which: str = "ema") -> Ensemble:
    """Experts trained in run_dir, each rebuilt from its saved config and weights."""
    from ediff_train.checkpoints import load_expert

    nodes, denoisers = [], []
    for name in names:
        node, denoiser = load_expert(Path(run_dir) / name, which)
        nodes.append(node)
        denoisers.append(denoiser)
    return Ensemble(nodes, denoisers)
