"""A plain text-conditioned DiT (Peebles & Xie 2023): patches → transformer blocks → patches.

Each block is adaLN-Zero self-attention, cross-attention to the T5/CLIP context tokens (the
same tokens and key mask the U-Net attends to) and an MLP; the σ embedding plus the pooled
CLIP vector modulate every block. Attention is torch's SDPA. It sits behind the same
preconditioning wrapper as the U-Net (core/edm.py, core/parameterisation.py), so EDM, flow
matching and VP all train it unchanged.

Paint-with-words and the attention analyses hook the U-Net's CrossAttention; this backbone
refuses a `cross_attn_bias` in one line rather than ignoring it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.nn.embed import ConditionEmbedder, NoiseEmbedding
from ediff_train.nn.unet import TextBackbone


def _heads(t: Tensor, heads: int) -> Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class DiTBlock(nn.Module):
    """adaLN-Zero: x += gate·f(norm(x)·(1+scale) + shift), for self-attention, cross-attention
    (ungated, zero-initialised output) and the MLP."""

    def __init__(self, width: int, heads: int, context_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise EdiffError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm_x = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim, 2 * width)
        self.proj_x = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU("tanh"), nn.Linear(hidden, width)
        )
        self.ada = nn.Linear(width, 6 * width)
        for zero in (self.ada, self.proj_x):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def forward(self, x: Tensor, emb: Tensor, ctx: Tensor, key_mask: Tensor) -> Tensor:
        s1, c1, g1, s2, c2, g2 = self.ada(emb)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + c1) + s1
        q, k, v = (_heads(t, self.heads) for t in self.qkv(h).chunk(3, dim=-1))
        x = x + g1 * self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        q = _heads(self.q(self.norm_x(x)), self.heads)
        k, v = (_heads(t, self.heads) for t in self.kv(ctx).chunk(2, dim=-1))
        mask = key_mask[:, None, None, :]
        x = x + self.proj_x(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        return x + g2 * self.mlp(self.norm2(x) * (1 + c2) + s2)


class TextDiT(TextBackbone):
    """F(x; c, c_noise): x [B,C,H,W] cut into patch×patch tokens; arguments are plain ints so
    Hydra can build it."""

    takes_guidance = True  # a guidance-distilled student's w input (nn/guidance_embed.py)

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        t5_dim: int,
        clip_txt_dim: int,
        clip_pool_dim: int,
        clip_img_dim: int,
        context_dim: int,
        in_channels: int = 3,
        out_channels: int = 3,
        mlp_ratio: float = 4.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise EdiffError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size, self.patch = int(image_size), int(patch_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.grad_checkpointing = bool(grad_checkpointing)
        n = (image_size // patch_size) ** 2
        self.patch_in = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.noise_emb = NoiseEmbedding(width, width)
        self.cond = ConditionEmbedder(
            t5_dim, clip_txt_dim, clip_pool_dim, clip_img_dim, context_dim, width
        )
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, context_dim, mlp_ratio) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(width, 2 * width)
        self.patch_out = nn.Linear(width, patch_size * patch_size * out_channels)
        for zero in (self.ada_out, self.patch_out):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        cond: Conditioning,
        cross_attn_bias: object = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """x [B,C,H,W], c_noise [B] → F [B,out_channels,H,W]; `guidance`: w per row, for a
        guidance-distilled student only."""
        if cross_attn_bias is not None:
            raise EdiffError(
                "paint-with-words and attention recording need the U-Net's cross-attention "
                "hook; model=dit does not support them (use a TextUNet model)"
            )
        self.check_input(x, cond)
        b, _, hgt, wid = x.shape
        x = x.to(self.patch_in.weight.dtype)
        emb, (ctx, key_mask) = self.embed(c_noise, cond, b, guidance=guidance)
        h = self.patch_in(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, emb, ctx, key_mask, use_reentrant=False)
            else:
                h = block(h, emb, ctx, key_mask)
        shift, scale = self.ada_out(emb)[:, None].chunk(2, dim=-1)
        out = self.patch_out(self.norm_out(h) * (1 + scale) + shift)  # [B, N, p·p·C]
        p, gh, gw = self.patch, hgt // self.patch, wid // self.patch
        out = out.view(b, gh, gw, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.out_channels, hgt, wid)
