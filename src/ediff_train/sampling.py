"""Samplers as plain functions over a denoiser D(x, σ) -> x̂, plus guidance and the ensemble.

The ensemble is what makes a set of experts one model: every solver step asks the expert whose
noise band holds the current σ (experts.Router), so solvers never know experts exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ediff_train import solvers
from ediff_train.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.experts import Node, Router
from ediff_train.offload import Offloader
from ediff_train.solvers import Denoiser
from ediff_train.sr import SIGMA_AUG_FLOOR, sampling_condition


def karras_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """EDM's σ grid (steps values from σ_max down to σ_min, then a final 0)."""
    i = torch.arange(steps, dtype=torch.float64)
    ramp = i / max(steps - 1, 1)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])


def heun_sample(denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """EDM Algorithm 1 (deterministic 2nd-order Heun); x starts as σ_max·N(0, I)."""
    return solvers.heun(denoiser, x, sigmas)


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
            raise EdiffError(f"guidance per expert names {', '.join(unknown)}, not in the "
                             f"ensemble ({', '.join(names)})")
        if self.interval is not None and not 0 <= self.interval[0] < self.interval[1]:
            raise EdiffError(f"guidance interval must be (lo, hi] with 0 ≤ lo < hi, got "
                             f"{tuple(self.interval)}")


TEXT_MODES = ("both", "t5", "clip")


def style_guided(model: Callable[[Tensor, Tensor, Conditioning], Tensor], styled: Conditioning,
                 uncond: Conditioning, scale: float, style_scale: float) -> Denoiser:
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
    import numpy as np
    from PIL import Image, UnidentifiedImageError

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
        return replace(cond, clip_txt=torch.zeros_like(cond.clip_txt),
                       clip_pool=torch.zeros_like(cond.clip_pool))
    if mode == "clip":
        return replace(cond, t5=torch.zeros_like(cond.t5))
    return cond


def guided(
    model: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    scale: float | Guidance,
) -> Denoiser:
    """Classifier-free guidance: D_u + s·(D_c − D_u), both branches in one batched call; where
    the scale is 1 (or σ is outside a Guidance's interval) only the conditional branch runs."""
    g = scale if isinstance(scale, Guidance) else Guidance(float(scale))
    router = getattr(model, "router", None) if g.per_expert else None
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


class Ensemble(nn.Module):
    """Experts that tile the noise axis, called like a single denoiser D(x, σ, cond)."""

    def __init__(self, nodes: Sequence[Node], denoisers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.router = Router(nodes)
        self.experts = nn.ModuleList(denoisers)
        self.calls = [0] * len(denoisers)  # how often each expert was asked (for reports/tests)
        self.offloader: Offloader | None = None

    def offload(self, device: str | torch.device) -> Ensemble:
        """Keep the experts in host memory; each sits on `device` only while it runs, and the
        next one is copied over meanwhile (offload.Offloader). Returns self."""
        self.offloader = Offloader(list(self.experts), device)
        return self

    def plan(self, sigmas: Tensor) -> None:
        """The σ the sampler will visit, so offloading knows which expert comes next."""
        if self.offloader is not None:
            owners = self.router.index(sigmas[sigmas > 0].detach().cpu()).tolist()
            self.offloader.plan(owners)

    def _run(self, i: int, *args: Any, **kw: Any) -> Tensor:
        self.calls[i] += 1
        if self.offloader is not None:
            self.offloader.activate(i)
        return self.experts[i](*args, **kw)

    def forward(self, x: Tensor, sigma: Tensor, cond: Conditioning, **kw: Any) -> Tensor:
        """`kw` (e.g. cross_attn_bias) goes to the expert; only for batches of one σ."""
        s = sigma.reshape(-1)
        owners = self.router.index(s.detach().cpu())
        if bool((owners == owners[0]).all()):
            return self._run(int(owners[0]), x, sigma, cond, **kw)
        if kw:
            raise EdiffError("per-call options need one σ for the whole batch")
        out = torch.empty_like(x)  # mixed σ in one batch: ask each owner for its rows
        for i in owners.unique().tolist():
            rows = (owners == i).nonzero().squeeze(1).to(x.device)
            sub = cond.rows(rows)
            sig = sigma.reshape(-1).expand(x.shape[0])[rows]
            out[rows] = self._run(i, x[rows], sig, sub)
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
) -> Tensor:
    """Text-to-image with Heun + CFG; returns images in [0, 1]. One sample per cond row.

    `noise` [N,C,H,W] (unit variance) replaces the seeded draw, so a caller can give every
    image its own seed and get the same image whatever batch it lands in. A super-resolution
    stage also takes `lowres` [N,3,h,w] in [0, 1] (the stage below's images), augmented once
    at noise level `sigma_aug` (sr.py); guidance's unconditional branch sees it too.
    `solver` is one of solvers.SOLVERS (`order`: deis_ab's), `guidance` a scale or a Guidance,
    `text` both / t5 / clip (text_only). `style` [Di] (style_embedding) conditions every image
    on a reference image's CLIP embedding, weighted by `style_guidance` (style_guided). `paint`
    (paint.Painter for these rows) paints phrases onto regions in every cross-attention."""
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
    if paint is not None:
        model = paint.wrap(model)
    if style is not None:
        if isinstance(guidance, Guidance) and (guidance.per_expert or guidance.interval):
            raise EdiffError("a style image takes one guidance scale (no per-expert scales or "
                             "interval)")
        styled = replace(cond, clip_img=style.to(cond.clip_img)[None].expand_as(cond.clip_img))
        scale = guidance.scale if isinstance(guidance, Guidance) else float(guidance)
        denoise = style_guided(model, styled, cond.null(), scale, float(style_guidance))
    else:
        denoise = guided(model, cond, cond.null(), guidance)
    out = solvers.solve(solver, denoise, x, sigmas, order)
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
