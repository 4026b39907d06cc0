"""What a denoiser costs: parameters, and FLOPs per forward at its real input shapes.

FLOPs are what `torch.utils.flop_counter.FlopCounterMode` counts (matrix products, convolutions
and scaled-dot-product attention, self and cross; elementwise work and norms are not counted),
on a meta-device copy of the model: no memory, no time, any size. A forward at batch 2 is what
classifier-free guidance costs per image when its scale is not 1 (both branches in one call).
bench/train_step.py counts a training step (forward + backward) with the same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.edm import EDMPrecond, edm_loss
from ediff_train.core.sr import NoiseAugment

DEFAULT_T5_LEN = 16  # T5 tokens per sample of a short caption (the digits' are shorter)
CLIP_LEN = 77


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs FlopCounterMode counts while `fn()` runs (its backward too, if it calls one)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def fwd_bwd_flops(loss: Callable[[], torch.Tensor]) -> int:
    """FLOPs of `loss()` and its backward."""
    return counted_flops(lambda: loss().backward())


def is_sr(cfg: Mapping[str, Any]) -> bool:
    return str(cfg.get("_target_", "")).endswith("EfficientUNet")


def random_cond(
    cfg: Mapping[str, Any],
    batch: int,
    t5_len: int,
    device: torch.device,
    size: int | None = None,
    factor: int = 4,
) -> Conditioning:
    """Random embeddings of a model config's widths; the last quarter of T5 tokens is padding.
    SR configs also get a noise-augmented low-res image of (size or image_size) / factor."""
    mask = torch.ones(batch, t5_len, dtype=torch.bool)
    mask[:, t5_len - t5_len // 4 :] = False
    sr: dict[str, Any] = {}
    if is_sr(cfg):
        low = (size or int(cfg["image_size"])) // factor
        sr = {
            "lowres": torch.rand(batch, 3, low, low) * 2 - 1,
            "sigma_aug": NoiseAugment().sample(batch),
        }
    return Conditioning(
        t5=torch.randn(batch, t5_len, cfg["t5_dim"]),
        t5_mask=mask,
        clip_txt=torch.randn(batch, CLIP_LEN, cfg["clip_txt_dim"]),
        clip_pool=torch.randn(batch, cfg["clip_pool_dim"]),
        clip_img=torch.randn(batch, cfg["clip_img_dim"]),
        **sr,
    ).to(device)


def meta_denoiser(cfg: Mapping[str, Any]) -> EDMPrecond:
    """The model config's network on the meta device, inside EDM's preconditioning."""
    with torch.device("meta"):
        return EDMPrecond(instantiate(cfg, grad_checkpointing=False))


def parameters(cfg: Mapping[str, Any]) -> int:
    """Parameters of a model config (counted on the meta device)."""
    return sum(p.numel() for p in meta_denoiser(cfg).parameters())


def forward_flops(
    cfg: Mapping[str, Any],
    batch: int = 1,
    t5_len: int = DEFAULT_T5_LEN,
    factor: int = 4,
    backward: bool = False,
) -> int:
    """FLOPs of one forward of a model config at `batch` (with `backward`: one training step's
    forward + backward of EDM's loss), at its own image size and channels."""
    den = meta_denoiser(cfg)
    net: nn.Module = den.backbone
    with torch.device("meta"):
        x = torch.randn(batch, net.in_channels, net.image_size, net.image_size)
        sigma = torch.ones(batch)
    cond = random_cond(cfg, batch, t5_len, torch.device("meta"), factor=factor)
    if backward:
        return fwd_bwd_flops(lambda: edm_loss(den, x, sigma, cond).mean())
    with torch.no_grad():
        return counted_flops(lambda: den(x, sigma, cond))


def evaluation_flops(
    cfg: Mapping[str, Any], guidance: float = 1.0, t5_len: int = DEFAULT_T5_LEN
) -> int:
    """FLOPs of one sampler evaluation for one image: CFG's conditional and unconditional rows
    are one batch of two when the guidance scale is not 1."""
    return forward_flops(cfg, 1 if float(guidance) == 1.0 else 2, t5_len)
