"""Embedding projections: σ features, pooled vectors added to the σ embedding, context tokens.

eDiff-I §4.2 / App. A: cross-attention keys are [T5 tokens, CLIP text tokens, one CLIP image
token, one learnable null token]; pooled CLIP text and the CLIP image embedding are projected
and added to the σ embedding. A dropped embedding arrives as zeros and stays a valid input:
the pooled path maps zeros to zeros before its projection, and the null token keeps at least one
real key in every row even when the T5 mask is empty.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError

# Context layout order; `ConditionEmbedder.slices` turns it into index ranges.
CONTEXT_ORDER = ("t5", "clip_txt", "clip_img", "null")


class NoiseEmbedding(nn.Module):
    """c_noise (= ¼ ln σ, about [-1.6, 1.1] over σ ∈ [0.002, 80]) → sinusoids → MLP.

    Frequencies are geometric in [1/8, 256] rad per unit of c_noise: the slowest spans the whole
    σ range, the fastest separates neighbouring sampler steps (ADM's integer-timestep
    frequencies would be nearly constant over so narrow an input range).
    """

    def __init__(
        self, features: int, emb_dim: int, min_freq: float = 0.125, max_freq: float = 256.0
    ) -> None:
        super().__init__()
        if features % 2:
            raise EdiffError(f"noise embedding width must be even, got {features}")
        self.half, self.min_freq, self.max_freq = features // 2, min_freq, max_freq
        self.mlp = nn.Sequential(
            nn.Linear(features, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, c_noise: Tensor) -> Tensor:
        # Built here in float32 rather than kept as a buffer, which .to(bf16) would round.
        logf = torch.linspace(
            math.log(self.min_freq),
            math.log(self.max_freq),
            self.half,
            device=c_noise.device,
            dtype=torch.float32,
        )
        arg = c_noise.float().reshape(-1, 1) * logf.exp()[None]
        feats = torch.cat([arg.cos(), arg.sin()], dim=1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def _token_proj(dim: int, context_dim: int) -> nn.Sequential:
    """Linear to the shared key width, then LayerNorm so every stream enters at unit scale."""
    return nn.Sequential(nn.Linear(dim, context_dim), nn.LayerNorm(context_dim))


class ConditionEmbedder(nn.Module):
    """Turns a `Conditioning` into (vector added to the σ embedding, context tokens, key mask)."""

    def __init__(
        self,
        t5_dim: int,
        clip_txt_dim: int,
        clip_pool_dim: int,
        clip_img_dim: int,
        context_dim: int,
        emb_dim: int,
    ) -> None:
        super().__init__()
        self.dims = {
            "t5": t5_dim,
            "clip_txt": clip_txt_dim,
            "clip_pool": clip_pool_dim,
            "clip_img": clip_img_dim,
        }
        self.pool_proj = nn.Linear(clip_pool_dim, emb_dim)
        self.img_proj = nn.Linear(clip_img_dim, emb_dim)
        self.t5_tok = _token_proj(t5_dim, context_dim)
        self.txt_tok = _token_proj(clip_txt_dim, context_dim)
        self.img_tok = _token_proj(clip_img_dim, context_dim)
        self.null = nn.Parameter(torch.randn(context_dim))

    def check(self, cond: Conditioning) -> None:
        """Name the embedding whose width does not fit the network (shards from other encoders)."""
        for name, want in self.dims.items():
            got = getattr(cond, name).shape[-1]
            if got != want:
                raise EdiffError(f"conditioning '{name}' has width {got}, the model expects {want}")

    def vector(self, cond: Conditioning) -> Tensor:
        """Projection of pooled CLIP text + CLIP image, to add to the σ embedding [B, emb_dim].

        Inputs are layer-normalised without affine so encoder scale does not matter and a
        dropped (all-zero) embedding stays zero, leaving only the projection bias.
        """
        w = self.pool_proj.weight.dtype
        pool = F.layer_norm(cond.clip_pool.to(w), (cond.clip_pool.shape[-1],))
        img = F.layer_norm(cond.clip_img.to(w), (cond.clip_img.shape[-1],))
        return self.pool_proj(pool) + self.img_proj(img)

    def context(self, cond: Conditioning) -> tuple[Tensor, Tensor]:
        """Context tokens [B, N, context_dim] and key mask [B, N] (True = real token)."""
        w = self.null.dtype
        b = cond.batch_size
        t5 = self.t5_tok(cond.t5.to(w))
        txt = self.txt_tok(cond.clip_txt.to(w))
        img = self.img_tok(cond.clip_img.to(w))[:, None]
        null = self.null.to(t5.dtype)[None, None].expand(b, 1, -1)
        tokens = torch.cat([t5, txt, img.to(t5.dtype), null], dim=1)
        real = torch.ones(b, txt.shape[1] + 2, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([cond.t5_mask.to(device=tokens.device, dtype=torch.bool), real], dim=1)
        return tokens, mask

    @staticmethod
    def slices(t5_len: int, clip_len: int = 77) -> dict[str, slice]:
        """Where each stream sits along the context axis for a given T5 length."""
        sizes = {"t5": t5_len, "clip_txt": clip_len, "clip_img": 1, "null": 1}
        out, start = {}, 0
        for name in CONTEXT_ORDER:
            out[name] = slice(start, start + sizes[name])
            start += sizes[name]
        return out
