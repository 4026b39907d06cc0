"""Super-resolution conditioning: the low-res image, its degradations and noise augmentation.

An SR stage denoises a high-res image given the caption *and* a low-res image (Imagen/CDM,
eDiff-I §4). Training makes the low-res from the high-res; sampling takes it from the stage
below, whose output is never as clean as a downsampled photo. Noise-conditioning augmentation
closes that gap: the low-res is corrupted with Gaussian noise of level σ_aug, and the network is
told σ_aug, so at sampling the stage can be asked to trust its input more or less.

Choices (docs/design.md §8 lists the anchors; they disagree, so these are ours, documented in
README "Super-resolution and the cascade"):

- **Direction**: σ_aug is a noise standard deviation in the EDM units of the images ([-1, 1]
  pixels): 0 = clean, larger = noisier. Never a "strength" that runs the other way.
- **Law (training)**: ln σ_aug ~ N(aug_p_mean, aug_p_std²), clipped to [sigma_min, sigma_max];
  defaults N(−3, 2²) on [0.002, 2]: median 0.05, ~5 % at the clean floor, ~3 % at the top, so the
  network sees clean inputs as well as inputs it must mostly ignore. (NeMo reuses the denoiser's
  N(−1.2, 1.2²), which almost never shows it the σ_aug = 0.002 it then samples with.)
- **Where**: noise is added at low resolution, before up-sampling (as NeMo), so a level means
  the same per-pixel noise whatever the stage's up-sampling factor.
- **Scaling**: the noisy low-res is scaled by c_in(σ_aug) = 1/√(σ_aug² + σ_data²) (EDM's input
  scaling), bicubic up-sampled to the high-res size inside the network and concatenated with
  the noisy high-res; ¼·ln max(σ_aug, 0.002) goes through its own embedding, added to σ's.
- **Sampling**: one draw of the noise per image, fixed for all solver steps; the level is a
  setting of each stage (`sigma_aug`, default 0.002 for the toy stages; see README for why).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.edm import SIGMA_DATA
from ediff_train.core.perf import to_device
from ediff_train.errors import EdiffError

SIGMA_AUG_FLOOR = 0.002  # below this the embedding sees the floor: 0 and 0.002 look the same


def aug_noise_feature(sigma_aug: Tensor) -> Tensor:
    """¼·ln σ_aug (as EDM's c_noise), with σ_aug = 0 read as the floor."""
    return sigma_aug.float().clamp(min=SIGMA_AUG_FLOOR).log() / 4.0


def lowres_input(
    lowres: Tensor, sigma_aug: Tensor, size: tuple[int, int], sigma_data: float = SIGMA_DATA
) -> Tensor:
    """The network's low-res channels: c_in(σ_aug)·lowres, bicubic up-sampled to `size`."""
    c_in = 1.0 / (sigma_aug.float() ** 2 + sigma_data**2).sqrt()
    scaled = lowres.float() * c_in.view(-1, 1, 1, 1)
    if tuple(scaled.shape[-2:]) == tuple(size):
        return scaled
    return F.interpolate(scaled, size=size, mode="bicubic", align_corners=False)


def check_sigma_aug(value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise EdiffError(f"sigma_aug must be a finite noise level ≥ 0, got {value}")
    return value


class NoiseAugment:
    """The training law of σ_aug and the corruption itself (see the module docstring)."""

    def __init__(
        self,
        p_mean: float = -3.0,
        p_std: float = 2.0,
        sigma_min: float = 0.002,
        sigma_max: float = 2.0,
    ) -> None:
        if not 0 <= sigma_min <= sigma_max or p_std < 0:
            raise EdiffError(
                f"noise augmentation needs 0 ≤ sigma_min ≤ sigma_max and p_std ≥ 0 "
                f"(got sigma_min={sigma_min}, sigma_max={sigma_max}, p_std={p_std})"
            )
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n levels (float32, CPU) from the training law."""
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        sigma = torch.exp(self.p_mean + self.p_std * z)
        return sigma.clamp(self.sigma_min, self.sigma_max).float()

    def describe(self) -> dict[str, float]:
        return {
            "p_mean": self.p_mean,
            "p_std": self.p_std,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
        }


def corrupt(lowres: Tensor, sigma_aug: Tensor, noise: Tensor | None = None) -> Tensor:
    """lowres + σ_aug·n: the augmented low-res (noise drawn here unless given)."""
    if noise is None:
        noise = torch.randn_like(lowres, dtype=torch.float32)
    sigma = sigma_aug.to(device=lowres.device, dtype=torch.float32).view(-1, 1, 1, 1)
    return lowres.float() + sigma * noise.to(lowres.device, torch.float32)


class SRConditioner:
    """Builds an SR stage's low-res conditioning in the training step, on the batch's device.

    The low-res comes from the loader (`lowres`, a plain bicubic down-sampling of the high-res),
    or, when `degrade` (data/degrade.py's DegradationChain) is set, from degrading the high-res
    batch itself by the stage's `factor` (high-res size / low-res size; a crop keeps it); then
    noise augmentation is applied."""

    def __init__(
        self, augment: NoiseAugment | None = None, degrade: Any = None, factor: int | None = None
    ) -> None:
        self.augment = augment or NoiseAugment()
        self.degrade = degrade
        self.factor = int(factor) if factor else None
        if degrade is not None and not self.factor:
            raise EdiffError(
                "degradations need the stage's factor (data.image_size / data.lowres_size)"
            )

    def condition(
        self,
        cond: Conditioning,
        hires: Tensor,
        lowres: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Conditioning:
        """`cond` with the augmented low-res and its σ_aug for a batch of high-res images."""
        if self.degrade is not None and self.factor:
            lowres = self.degrade(
                hires, hires.shape[-1] // self.factor, generator or torch.Generator()
            )
        if lowres is None:
            raise EdiffError("an SR stage needs low-res images: set data.lowres_size")
        sigma_aug = to_device(self.augment.sample(hires.shape[0], generator), hires.device)
        return replace(cond, lowres=corrupt(lowres, sigma_aug), sigma_aug=sigma_aug)


def sampling_condition(
    cond: Conditioning, lowres: Tensor, sigma_aug: float, seed: int = 0, noise: Tensor | None = None
) -> Conditioning:
    """`cond` for sampling an SR stage from `lowres` [N,3,h,w] in [-1, 1]: augmented once at
    the stage's fixed level (seeded, or with the given unit noise)."""
    level = check_sigma_aug(sigma_aug)
    if lowres.shape[0] != cond.batch_size:
        raise EdiffError(f"{lowres.shape[0]} low-res images for {cond.batch_size} captions")
    if noise is None:
        g = torch.Generator().manual_seed(int(seed) + 7_777)
        noise = torch.randn(lowres.shape, generator=g)
    sigma = torch.full((lowres.shape[0],), level, device=lowres.device)
    return replace(cond, lowres=corrupt(lowres, sigma, noise), sigma_aug=sigma)
