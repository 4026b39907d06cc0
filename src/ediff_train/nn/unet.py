"""ADM-style text-conditioned U-Net: the eDiff-I base (64×64) denoiser backbone F.

Shape follows ADM (Dhariwal & Nichol 2021): residual blocks with scale-shift norm, strided-conv
downsampling, nearest+conv upsampling, skip concatenation from every encoder stage. At each
resolution listed in `attn_resolutions` a self-attention is followed by a cross-attention over
the context tokens (eDiff-I §4.2); the middle block always has both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.nn.attention import AttentionHook, CrossAttention, SelfAttention, group_norm
from ediff_train.nn.blocks import Downsample, ResBlock, Upsample
from ediff_train.nn.embed import ConditionEmbedder, NoiseEmbedding

# cross_attn_bias(h, w) -> additive bias [B, h*w, N_ctx] for a cross-attention at that size, or
# an AttentionHook (paint-with-words, attention recording), or None.
BiasFn = Callable[[int, int], "Tensor | AttentionHook | None"]


def run_layer(
    layer: nn.Module,
    h: Tensor,
    emb: Tensor,
    ctx: tuple[Tensor, Tensor],
    bias_fn: BiasFn | None,
    checkpointing: bool = False,
) -> Tensor:
    """Run one U-Net layer with the inputs its kind takes; the heavy ones through activation
    checkpointing when enabled and training (recomputed in backward instead of stored)."""
    if isinstance(layer, ResBlock):
        args: tuple = (h, emb)
    elif isinstance(layer, CrossAttention):
        bias = bias_fn(h.shape[-2], h.shape[-1]) if bias_fn is not None else None
        args = (h, ctx[0], ctx[1], bias)
    else:
        args = (h,)
    heavy = isinstance(layer, (ResBlock, SelfAttention, CrossAttention))
    if heavy and checkpointing and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class TextBackbone(nn.Module):
    """What the text-conditioned backbones share: the context layout, the input check, the
    σ + condition embedding and the output head. Subclasses set in_channels, noise_emb, cond,
    norm_out and conv_out."""

    in_channels: int

    def context_slices(self, t5_len: int, clip_len: int = 77) -> dict[str, slice]:
        """Positions of 't5', 'clip_txt', 'clip_img', 'null' along the context (key) axis."""
        return ConditionEmbedder.slices(t5_len, clip_len)

    def check_input(self, x: Tensor, cond: Conditioning) -> None:
        if x.shape[1] != self.in_channels:
            raise EdiffError(
                f"input has {x.shape[1]} channels, the model expects {self.in_channels}"
            )
        self.cond.check(cond)

    def embed(
        self,
        c_noise: Tensor,
        cond: Conditioning,
        batch: int,
        extra: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(SiLU(σ embedding + pooled-condition vector [+ extra] [+ guidance embedding]),
        (context tokens, key mask)). `guidance` (w per row) only for a guidance-distilled
        student, which holds `guidance_emb` (nn/guidance_embed.py)."""
        emb = self.noise_emb(c_noise.reshape(-1).expand(batch)) + self.cond.vector(cond)
        if extra is not None:
            emb = emb + extra
        if guidance is not None:
            g_emb = getattr(self, "guidance_emb", None)  # registered submodule, or absent
            if g_emb is None:
                raise EdiffError("a guidance scale was passed to a network without w input")
            emb = emb + g_emb(guidance.reshape(-1).expand(batch)).to(emb.dtype)
        return F.silu(emb), self.cond.context(cond)

    def head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))


class TextUNet(TextBackbone):
    """F(x; c, c_noise) for EDM. Arguments are plain ints/lists so Hydra can build it."""

    takes_guidance = True  # a guidance-distilled student's w input (nn/guidance_embed.py)

    def __init__(
        self,
        image_size: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        t5_dim: int,
        clip_txt_dim: int,
        clip_pool_dim: int,
        clip_img_dim: int,
        context_dim: int,
        in_channels: int = 3,
        out_channels: int = 3,
        head_channels: int = 64,
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        mult = [int(m) for m in channel_mult]
        if not mult or num_res_blocks < 1:
            raise EdiffError("channel_mult must be non-empty and num_res_blocks ≥ 1")
        if image_size % 2 ** (len(mult) - 1):
            raise EdiffError(f"image_size {image_size} is not divisible by 2^{len(mult) - 1}")
        self.image_size = int(image_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.grad_checkpointing = bool(grad_checkpointing)
        # the layout init=slice maps a parent's blocks by (nn/slicing.py)
        self.levels, self.num_res_blocks = len(mult), int(num_res_blocks)
        self.up_splits: list[tuple[int, int]] = []  # per up block: (h, skip) input channels
        attn_at = {int(r) for r in attn_resolutions}
        emb_dim = 4 * model_channels

        self.noise_emb = NoiseEmbedding(model_channels, emb_dim)
        self.cond = ConditionEmbedder(
            t5_dim, clip_txt_dim, clip_pool_dim, clip_img_dim, context_dim, emb_dim
        )

        def attn(ch: int) -> list[nn.Module]:
            return [
                SelfAttention(ch, head_channels),
                CrossAttention(ch, context_dim, head_channels),
            ]

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [model_channels]
        ch, res = model_channels, self.image_size
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, m * model_channels, emb_dim, dropout)]
                ch = m * model_channels
                if res in attn_at:
                    layers += attn(ch)
                self.down.append(nn.ModuleList(layers))
                skips.append(ch)
            if level < len(mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
                res //= 2

        self.middle = nn.ModuleList(
            [ResBlock(ch, ch, emb_dim, dropout), *attn(ch), ResBlock(ch, ch, emb_dim, dropout)]
        )

        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(num_res_blocks + 1):
                self.up_splits.append((ch, skips[-1]))
                layers = [ResBlock(ch + skips.pop(), m * model_channels, emb_dim, dropout)]
                ch = m * model_channels
                if res in attn_at:
                    layers += attn(ch)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.up.append(nn.ModuleList(layers))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        cond: Conditioning,
        cross_attn_bias: BiasFn | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """x [B,C,H,W], c_noise [B] → F [B,out_channels,H,W].

        `cross_attn_bias(h, w)` may return a bias [B, h·w, N_ctx] added to QKᵀ (before the
        1/√d scaling) in every cross-attention at that resolution, or None for none.
        `guidance`: w per row, for a guidance-distilled student only.
        """
        self.check_input(x, cond)
        x = x.to(self.conv_in.weight.dtype)
        emb, ctx = self.embed(c_noise, cond, x.shape[0], guidance=guidance)

        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            for layer in block:
                h = run_layer(layer, h, emb, ctx, cross_attn_bias, self.grad_checkpointing)
            hs.append(h)
        for layer in self.middle:
            h = run_layer(layer, h, emb, ctx, cross_attn_bias, self.grad_checkpointing)
        for block in self.up:
            h = torch.cat([h, hs.pop().to(h.dtype)], dim=1)
            for layer in block:
                h = run_layer(layer, h, emb, ctx, cross_attn_bias, self.grad_checkpointing)
        return self.head(h)
