"""The guidance-scale input of a guidance-distilled expert (docs/guidance_distillation.md).

A distilled student answers D̂_w = D_u + w·(D_c − D_u) in one forward. It learns w through the
σ embedding: w → sinusoids at geometric frequencies → Linear → SiLU → Linear, added to the σ +
pooled-condition embedding before its SiLU (`TextBackbone.embed`). The last Linear starts at
zero, so a fresh student is bit for bit its teacher's conditional model. Normal nodes have no
such module: their state dict is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ediff_train.core.edm import EDMPrecond
from ediff_train.errors import EdiffError

ATTR = "guidance_emb"  # the backbone attribute holding the embedding (state dict key prefix)


class GuidanceEmbedding(nn.Module):
    """w → [B, emb_dim]. Frequencies are geometric in [1/32, 4] rad per unit of w: the slowest
    is near-linear over w ∈ [0, 20], the fastest tells apart scales 0.5 apart."""

    def __init__(
        self, features: int, emb_dim: int, min_freq: float = 1 / 32, max_freq: float = 4.0
    ) -> None:
        super().__init__()
        if features < 2 or features % 2:
            raise EdiffError(f"guidance embedding width must be even and ≥ 2, got {features}")
        self.half, self.min_freq, self.max_freq = features // 2, min_freq, max_freq
        self.mlp = nn.Sequential(
            nn.Linear(features, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        nn.init.zeros_(self.mlp[2].weight)  # a fresh student is its teacher (module docstring)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, w: Tensor) -> Tensor:
        logf = torch.linspace(
            math.log(self.min_freq), math.log(self.max_freq), self.half, device=w.device
        )
        arg = w.float().reshape(-1, 1) * logf.exp()[None]
        feats = torch.cat([arg.cos(), arg.sin()], dim=1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def takes_guidance(backbone: nn.Module) -> bool:
    """Whether a backbone class feeds a guidance embedding into its σ embedding."""
    return bool(getattr(type(backbone), "takes_guidance", False))


def attach(backbone: nn.Module, features: int) -> nn.Module:
    """Give `backbone` its (zero-output) guidance embedding; one line for a backbone without
    the input (the diffusers and SR backbones form their σ embedding elsewhere)."""
    if not takes_guidance(backbone):
        raise EdiffError(
            f"guidance distillation needs a TextUNet or TextDiT student (model=tiny, base64, "
            f"dit_tiny); {type(backbone).__name__} has no guidance input yet"
        )
    emb_dim = backbone.noise_emb.mlp[-1].out_features
    setattr(backbone, ATTR, GuidanceEmbedding(features, emb_dim))
    return backbone


class GuidedStudent(EDMPrecond):
    """A guidance-distilled expert: D(x; c, σ, w), one forward per solver step. `w_range` is the
    range it was trained on (the sampler warns outside it); a call without w is w = 1, the
    conditional model (what a plain call of a denoiser means)."""

    def __init__(
        self, backbone: nn.Module, w_range: tuple[float, float], features: int, param: Any = None
    ) -> None:
        super().__init__(attach(backbone, features), param=param)
        self.w_range = (float(w_range[0]), float(w_range[1]))

    def forward(
        self, x: Tensor, sigma: Tensor, cond: Any, guidance: Any = None, **kwargs: Any
    ) -> Tensor:
        w = 1.0 if guidance is None else guidance
        w = torch.as_tensor(w, dtype=torch.float32, device=x.device).reshape(-1)
        if w.numel() == 1:
            w = w.expand(x.shape[0])
        return super().forward(x, sigma, cond, guidance=w, **kwargs)


def is_guided_student(model: Any) -> bool:
    return isinstance(model, GuidedStudent)


def student_from_config(denoiser: EDMPrecond, spec: Any) -> EDMPrecond:
    """`denoiser` as a GuidedStudent when `spec` (a config's `distill_guidance`) is enabled."""
    if not spec or not spec.get("enabled", False):
        return denoiser
    lo, hi = (float(v) for v in spec["w"])
    return GuidedStudent(denoiser.backbone, (lo, hi), int(spec["features"]), denoiser.param)
