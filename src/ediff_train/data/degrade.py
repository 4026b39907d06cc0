"""Real-ESRGAN-style degradations of the low-res input of the super-resolution stages.

Why: an SR stage trained on clean bicubic down-samples learns to sharpen only that one kernel, and
at sampling time its input is the previous stage's output, which is blurrier, noisier and
differently resampled. eDiff-I therefore corrupts the low-res input, beyond the noise
augmentation Imagen and DeepFloyd IF use, with Real-ESRGAN's second-order chain (docs/design.md §8):
blur with random kernels → resize with a random mode → Gaussian or Poisson noise → JPEG → a
second, milder pass → final resize (+ sinc) and JPEG in random order.

The chain runs batched on the training device: every op draws its per-sample parameters on the
CPU from the caller's `torch.Generator` (same seed → same output) and applies them to the whole
batch in one call per op (kornia's per-sample `filter2d` and `jpeg_codec_differentiable`,
`F.interpolate` grouped by mode). Noise tensors are drawn on the device from a generator seeded
from the caller's, so no noise has to cross the bus. Ops work on [0, 1] images, the range in
which Real-ESRGAN states its noise levels and JPEG works; `DegradationChain` maps [-1, 1] in/out.

Where we differ from Real-ESRGAN (basicsr 1.4): the resize scale is drawn once per batch (as
there: a batch must keep one size) but the mode, and the order of the final resize and JPEG,
per sample (there: per batch); Poisson noise uses
256 levels (there: the next power of two above the image's number of distinct values, 256 for
8-bit photographs); every op clamps to [0, 1] (there: only noise, JPEG and the end).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import filter2d
from torch import Tensor

MODES = ("area", "bilinear", "bicubic")
KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _device_generator(g: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from `g`: noise is drawn where it is used, yet follows g."""
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    return torch.Generator(device=device).manual_seed(seed)


def _on_rows(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Apply fn(rows, idx) to the rows where `mask` (CPU bool) holds; the others pass through.
    Only the selected rows are computed, so an op with probability p costs p of the batch."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == len(x):
        return fn(x, idx).clamp(0, 1)
    dev_idx = idx.to(x.device)
    out = x.clone()
    out[dev_idx] = fn(x[dev_idx], idx).clamp(0, 1)
    return out


def blur_kernels(
    g: torch.Generator,
    n: int,
    kernel_sizes: Sequence[int] = (7, 21),
    sigma: Sequence[float] = (0.2, 3.0),
    kernel_probs: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    betag: Sequence[float] = (0.5, 4.0),
    betap: Sequence[float] = (1.0, 2.0),
    sinc_prob: float = 0.1,
    sinc_cutoff: Sequence[float] = (0.2, 1.0),
) -> Tensor:
    """[n, K, K] normalised kernels, K = the largest size; each row has its own odd size in
    `kernel_sizes` (zero outside it), family from KERNELS by `kernel_probs`, σ per axis, rotation
    (anisotropic ones), shape β (generalised: exp(-q^β/2), plateau: 1/(1+q^β)), and with
    `sinc_prob` is instead a circular low-pass (sinc) with cutoff in `sinc_cutoff`·π (at least π/3
    below size 13, as Real-ESRGAN). Drawn on the CPU from g."""
    lo, hi = int(kernel_sizes[0]) // 2, int(kernel_sizes[-1]) // 2
    half = torch.randint(lo, hi + 1, (n,), generator=g)  # per-sample radius: size 2r+1
    family = torch.multinomial(torch.tensor(kernel_probs, dtype=torch.float), n, True, generator=g)
    aniso = family % 2 == 1
    sx = _uniform(g, n, *sigma)
    sy = torch.where(aniso, _uniform(g, n, *sigma), sx)
    theta = torch.where(aniso, _uniform(g, n, -math.pi, math.pi), torch.zeros(n))
    bg = torch.where(
        torch.rand(n, generator=g) < 0.5,
        _uniform(g, n, betag[0], 1.0),
        _uniform(g, n, 1.0, betag[1]),
    )
    beta = torch.where(family < 2, 1.0, torch.where(family < 4, bg, _uniform(g, n, *betap)))
    is_sinc = torch.rand(n, generator=g) < sinc_prob
    low = torch.where(half < 6, max(sinc_cutoff[0], 1 / 3), sinc_cutoff[0])
    cutoff = (torch.rand(n, generator=g) * (sinc_cutoff[1] - low) + low) * math.pi

    ax = torch.arange(-hi, hi + 1, dtype=torch.float)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u, v = xx * c + yy * s, yy * c - xx * s
    q = (u / sx[:, None, None]) ** 2 + (v / sy[:, None, None]) ** 2
    qb = q ** beta[:, None, None]
    k = torch.where((family >= 4)[:, None, None], 1 / (1 + qb), torch.exp(-0.5 * qb))
    r = torch.sqrt(xx**2 + yy**2)
    wc = cutoff[:, None, None]
    sinc = torch.where(
        r == 0,
        wc**2 / (4 * math.pi),
        wc * torch.special.bessel_j1(wc * r) / (2 * math.pi * r.clamp_min(1e-8)),
    )
    k = torch.where(is_sinc[:, None, None], sinc, k)
    inside = (xx.abs() <= half[:, None, None]) & (yy.abs() <= half[:, None, None])
    k = k * inside
    k = k / k.sum((1, 2), keepdim=True)
    # Tails below 1e-12 of the sum are dropped: denormal floats there slow CPU convolution 3x.
    return torch.where(k.abs() < 1e-12, 0.0, k)


class RandomBlur:
    """Blur each selected sample with its own kernel from `blur_kernels` (one batched filter2d,
    reflect padding as basicsr). A kernel wider than the image allows is cropped and renormed."""

    def __init__(
        self,
        p: float = 1.0,
        kernel_sizes: Sequence[int] = (7, 21),
        sigma: Sequence[float] = (0.2, 3.0),
        kernel_probs: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
        betag: Sequence[float] = (0.5, 4.0),
        betap: Sequence[float] = (1.0, 2.0),
        sinc_prob: float = 0.1,
        sinc_cutoff: Sequence[float] = (0.2, 1.0),
    ) -> None:
        self.p = p
        self.kw = dict(
            kernel_sizes=tuple(kernel_sizes),
            sigma=tuple(sigma),
            kernel_probs=tuple(kernel_probs),
            betag=tuple(betag),
            betap=tuple(betap),
            sinc_prob=sinc_prob,
            sinc_cutoff=tuple(sinc_cutoff),
        )

    def __call__(self, x: Tensor, g: torch.Generator, out_size: int | None = None) -> Tensor:
        mask = torch.rand(len(x), generator=g) < self.p
        k = blur_kernels(g, len(x), **self.kw)
        big, fit = k.shape[-1], 2 * min(x.shape[-2:]) - 1  # reflect pad needs side > k // 2
        if fit < big:
            c = (big - fit) // 2
            k = k[:, c : c + fit, c : c + fit]
            k = k / k.sum((1, 2), keepdim=True)
        return _on_rows(x, mask, lambda rows, idx: filter2d(rows, k[idx].to(x.device), "reflect"))


class RandomResize:
    """Resize the batch to base·s, s drawn once per batch from one of `scale_ranges` (picked by
    `scale_probs`; Real-ESRGAN's up/down/keep), base = the input's size or `out_size`
    (`relative_to`), with an interpolation mode per sample from `modes` (one call per mode).
    No anti-aliasing, as Real-ESRGAN: aliasing is part of the corruption."""

    def __init__(
        self,
        scale_ranges: Sequence[Sequence[float]] = ((1.0, 1.0),),
        scale_probs: Sequence[float] = (1.0,),
        modes: Sequence[str] = MODES,
        relative_to: str = "input",
    ) -> None:
        if relative_to not in ("input", "output") or any(m not in MODES for m in modes):
            raise ValueError(f"relative_to in (input, output), modes in {MODES}")
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.scale_probs, self.modes = tuple(scale_probs), tuple(modes)
        self.relative_to = relative_to

    def __call__(self, x: Tensor, g: torch.Generator, out_size: int | None = None) -> Tensor:
        which = int(torch.multinomial(torch.tensor(self.scale_probs), 1, generator=g))
        s = float(_uniform(g, 1, *self.scale_ranges[which]))
        mode = torch.randint(len(self.modes), (len(x),), generator=g)
        if self.relative_to == "output":
            if out_size is None:
                raise ValueError("RandomResize(relative_to='output') needs out_size")
            base = (out_size, out_size)
        else:
            base = tuple(x.shape[-2:])
        size = (max(1, int(base[0] * s)), max(1, int(base[1] * s)))
        out = x.new_empty(*x.shape[:2], *size)
        for m in mode.unique().tolist():
            idx = (mode == m).nonzero().squeeze(1).to(x.device)
            name = self.modes[m]
            kw = {} if name == "area" else {"align_corners": False}
            out[idx] = F.interpolate(x[idx], size=size, mode=name, **kw)
        return out.clamp(0, 1)


class GaussianNoise:
    """Add N(0, σ²) with σ in `sigma`/255 per sample; with `gray_prob` the same noise in all
    three channels (luminance-only noise), else independent per channel."""

    def __init__(
        self, sigma: Sequence[float] = (1.0, 30.0), gray_prob: float = 0.4, p: float = 1.0
    ) -> None:
        self.sigma, self.gray_prob, self.p = tuple(sigma), gray_prob, p

    def __call__(self, x: Tensor, g: torch.Generator, out_size: int | None = None) -> Tensor:
        n = len(x)
        mask = torch.rand(n, generator=g) < self.p
        sig = _uniform(g, n, *self.sigma) / 255
        gray = torch.rand(n, generator=g) < self.gray_prob
        dg = _device_generator(g, x.device)

        def add(rows: Tensor, idx: Tensor) -> Tensor:
            noise = torch.randn(rows.shape, generator=dg, device=rows.device)
            noise = torch.where(gray[idx].to(rows.device)[:, None, None, None], noise[:, :1], noise)
            return rows + noise * sig[idx].to(rows.device)[:, None, None, None]

        return _on_rows(x, mask, add)


class PoissonNoise:
    """Shot noise: Poisson(levels·img)/levels − img on the 8-bit-rounded image, times a scale in
    `scale`; with `gray_prob` computed on the luminance and shared by the channels."""

    def __init__(
        self,
        scale: Sequence[float] = (0.05, 3.0),
        gray_prob: float = 0.4,
        p: float = 1.0,
        levels: int = 256,
    ) -> None:
        self.scale, self.gray_prob, self.p, self.levels = tuple(scale), gray_prob, p, levels

    def __call__(self, x: Tensor, g: torch.Generator, out_size: int | None = None) -> Tensor:
        n = len(x)
        mask = torch.rand(n, generator=g) < self.p
        scale = _uniform(g, n, *self.scale)
        gray = torch.rand(n, generator=g) < self.gray_prob
        dg = _device_generator(g, x.device)

        def shot(img: Tensor) -> Tensor:
            img = (img * 255).round() / 255
            return torch.poisson(img * self.levels, generator=dg) / self.levels - img

        def add(rows: Tensor, idx: Tensor) -> Tensor:
            noise = shot(rows)
            gsel = gray[idx].to(rows.device)[:, None, None, None]
            if bool(gray[idx].any()):
                noise = torch.where(gsel, shot(rgb_to_grayscale(rows)), noise)
            return rows + noise * scale[idx].to(rows.device)[:, None, None, None]

        return _on_rows(x, mask, add)


class RandomJPEG:
    """JPEG-compress each selected sample at its own quality in `quality` (kornia's batched
    differentiable codec; it pads to multiples of 16 itself and crops back)."""

    def __init__(self, quality: Sequence[float] = (30.0, 95.0), p: float = 1.0) -> None:
        self.quality, self.p = tuple(quality), p

    def __call__(self, x: Tensor, g: torch.Generator, out_size: int | None = None) -> Tensor:
        mask = torch.rand(len(x), generator=g) < self.p
        q = _uniform(g, len(x), *self.quality)
        return _on_rows(
            x,
            mask,
            lambda rows, idx: jpeg_codec_differentiable(rows.clamp(0, 1), q[idx].to(rows.device)),
        )


class OneOf:
    """Per sample, run one of `branches` (each a list of ops) chosen by `probs`; probability left
    over (1 − Σ probs) leaves the sample as it is. All branches must give the same size."""

    def __init__(self, branches: Sequence[Sequence[Callable]], probs: Sequence[float]) -> None:
        self.branches = [list(b) for b in branches]
        self.probs = tuple(probs)
        if len(self.probs) != len(self.branches) or sum(self.probs) > 1 + 1e-6:
            raise ValueError("one probability per branch, summing to at most 1")

    def __call__(self, x: Tensor, g: torch.Generator, out_size: int | None = None) -> Tensor:
        rest = 1.0 - sum(self.probs)
        rest = rest if rest > 1e-6 else 0.0  # rounding of probabilities meant to sum to 1
        choice = torch.multinomial(torch.tensor([*self.probs, rest]), len(x), True, generator=g)
        out: Tensor | None = x if rest > 0 else None
        for b, ops in enumerate(self.branches):
            idx = (choice == b).nonzero().squeeze(1).to(x.device)
            if idx.numel() == 0:
                continue
            y = x[idx]
            for op in ops:
                y = op(y, g, out_size)
            if out is None:
                out = x.new_empty(len(x), *y.shape[1:])
            elif out.shape[1:] != y.shape[1:]:
                raise ValueError(f"OneOf branches give different sizes: {tuple(y.shape)}")
            elif out is x:
                out = x.clone()
            out[idx] = y
        return x if out is None else out


def realesrgan_ops() -> list[Callable]:
    """The second-order chain with Real-ESRGAN's published x4plus settings (conf/degrade/
    realesrgan.yaml spells out the same values with their provenance)."""
    noise1 = OneOf([[GaussianNoise((1, 30), 0.4)], [PoissonNoise((0.05, 3.0), 0.4)]], (0.5, 0.5))
    noise2 = OneOf([[GaussianNoise((1, 25), 0.4)], [PoissonNoise((0.05, 2.5), 0.4)]], (0.5, 0.5))
    final_resize = RandomResize(relative_to="output")
    final_sinc = RandomBlur(p=0.8, sinc_prob=1.0, sinc_cutoff=(1 / 3, 1.0))
    return [
        RandomBlur(p=1.0, sigma=(0.2, 3.0)),
        RandomResize(((1.0, 1.5), (0.15, 1.0), (1.0, 1.0)), (0.2, 0.7, 0.1)),
        noise1,
        RandomJPEG((30, 95)),
        RandomBlur(p=0.8, sigma=(0.2, 1.5)),
        RandomResize(((1.0, 1.2), (0.3, 1.0), (1.0, 1.0)), (0.3, 0.4, 0.3), relative_to="output"),
        noise2,
        OneOf(
            [
                [final_resize, final_sinc, RandomJPEG((30, 95))],
                [RandomJPEG((30, 95)), final_resize, final_sinc],
            ],
            (0.5, 0.5),
        ),
    ]


class DegradationChain:
    """hires [B, 3, H, W] in [-1, 1] → degraded low-res [B, 3, out_size, out_size] in [-1, 1],
    float32, on hires's device. `ops` run in order on [0, 1] images (None: `realesrgan_ops()`,
    []: only the final resize); a plain antialiased bicubic resize to out_size follows when the ops
    end elsewhere, and the result is rounded to 8-bit levels (`quantize`) as Real-ESRGAN does."""

    def __init__(self, ops: Sequence[Callable] | None = None, quantize: bool = True) -> None:
        self.ops = realesrgan_ops() if ops is None else list(ops)
        self.quantize = quantize

    @torch.no_grad()
    def __call__(self, hires: Tensor, out_size: int, generator: torch.Generator) -> Tensor:
        with torch.autocast(hires.device.type, enabled=False):  # float32 even inside autocast
            x = ((hires.float() + 1) * 0.5).clamp(0, 1)
            for op in self.ops:
                x = op(x, generator, out_size)
            if tuple(x.shape[-2:]) != (out_size, out_size):
                x = F.interpolate(
                    x,
                    size=(out_size, out_size),
                    mode="bicubic",
                    align_corners=False,
                    antialias=True,
                )
            x = x.clamp(0, 1)
            if self.quantize:
                x = (x * 255).round() / 255
            return x * 2 - 1
