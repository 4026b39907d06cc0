"""Efficient U-Net (Imagen, App. B): the super-resolution denoiser backbone F.

What makes it "efficient" and what we keep of it:
- more residual blocks at low resolution, where they are cheap (`num_res_blocks` per level);
- down-sampling *before* a level's convolutions and up-sampling *after*, so the blocks of the
  top (full-resolution) level are few and everything deeper runs at 1/4 the pixels or less;
- skip connections scaled by 1/√2 before they join the decoder.
The input is the noisy high-res image concatenated with the low-res conditioning image (sr.py:
noise-augmented, c_in-scaled, bicubic up-sampled here to the input's size). Text conditioning is
the base's (nn/embed.py): T5 + CLIP tokens + null in cross-attention, pooled CLIP + CLIP image
added to the σ embedding, plus σ_aug through its own embedding.

Attention sits at the levels whose training resolution is in `attn_resolutions`. With
`self_attention=False` (SR1024) only cross-attention is used: its cost is linear in the pixels,
so a network trained on 256² crops runs on the whole 1024² image (attention is placed by level,
so at 1024 the same layer simply sees 4× the tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.sr import aug_noise_feature, lowres_input
from ediff_train.errors import EdiffError
from ediff_train.nn.attention import CrossAttention, SelfAttention, group_norm
from ediff_train.nn.blocks import Downsample, ResBlock, Upsample
from ediff_train.nn.embed import ConditionEmbedder, NoiseEmbedding
from ediff_train.nn.unet import BiasFn, TextBackbone, run_layer

SKIP_SCALE = 2**-0.5


class EfficientUNet(TextBackbone):
    """F(x; c, c_noise) of an SR stage. Arguments are plain ints/lists so Hydra can build it.

    `image_size` is the training size (a crop for SR1024); any multiple of 2^(levels−1) runs.
    `num_res_blocks` is one count for every level or one per level."""

    is_super_resolution = True

    def __init__(
        self,
        image_size: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        attn_resolutions: Sequence[int],
        t5_dim: int,
        clip_txt_dim: int,
        clip_pool_dim: int,
        clip_img_dim: int,
        context_dim: int,
        self_attention: bool = True,
        in_channels: int = 3,
        out_channels: int = 3,
        lowres_channels: int = 3,
        head_channels: int = 64,
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        mult = [int(m) for m in channel_mult]
        blocks = (
            [int(num_res_blocks)] * len(mult)
            if isinstance(num_res_blocks, int)
            else [int(n) for n in num_res_blocks]
        )
        if not mult or len(blocks) != len(mult) or min(blocks) < 1:
            raise EdiffError(
                f"num_res_blocks needs one count ≥ 1 per level of channel_mult "
                f"({len(mult)}), got {list(blocks)}"
            )
        self.downscale = 2 ** (len(mult) - 1)
        if image_size % self.downscale:
            raise EdiffError(f"image_size {image_size} is not divisible by 2^{len(mult) - 1}")
        self.image_size = int(image_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lowres_channels = lowres_channels
        self.grad_checkpointing = bool(grad_checkpointing)
        attn_at = {int(r) for r in attn_resolutions}
        emb_dim = 4 * model_channels

        self.noise_emb = NoiseEmbedding(model_channels, emb_dim)
        self.aug_emb = NoiseEmbedding(model_channels, emb_dim)
        self.cond = ConditionEmbedder(
            t5_dim, clip_txt_dim, clip_pool_dim, clip_img_dim, context_dim, emb_dim
        )

        def attn(ch: int, res: int) -> list[nn.Module]:
            if res not in attn_at:
                return []
            cross = [CrossAttention(ch, context_dim, head_channels)]
            return ([SelfAttention(ch, head_channels)] if self_attention else []) + cross

        self.conv_in = nn.Conv2d(in_channels + lowres_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch, res, skips = model_channels, self.image_size, []
        for level, (m, n) in enumerate(zip(mult, blocks)):
            layers: list[nn.Module] = [Downsample(ch)] if level else []
            res //= 2 if level else 1
            for _ in range(n):
                layers.append(ResBlock(ch, m * model_channels, emb_dim, dropout))
                ch = m * model_channels
            layers += attn(ch, res)
            self.down.append(nn.ModuleList(layers))
            skips.append(ch)

        self.up = nn.ModuleList()
        for level, (m, n) in reversed(list(enumerate(zip(mult, blocks)))):
            layers = [ResBlock(ch + skips.pop(), m * model_channels, emb_dim, dropout)]
            ch = m * model_channels
            layers += [ResBlock(ch, ch, emb_dim, dropout) for _ in range(n - 1)]
            layers += attn(ch, res)
            if level:
                layers.append(Upsample(ch))
                res *= 2
            self.up.append(nn.ModuleList(layers))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Conditioning, cross_attn_bias: BiasFn | None = None
    ) -> Tensor:
        """x [B,C,H,W] (H, W multiples of 2^(levels−1)), c_noise [B], cond with `lowres`
        [B,3,h,w] and `sigma_aug` [B] → F [B,out_channels,H,W]."""
        self.check_input(x, cond)
        if x.shape[-1] % self.downscale or x.shape[-2] % self.downscale:
            raise EdiffError(
                f"image size {tuple(x.shape[-2:])} is not a multiple of "
                f"{self.downscale} (this network's down-sampling)"
            )
        if cond.lowres is None or cond.sigma_aug is None:
            raise EdiffError(
                "a super-resolution model needs the low-res image and its "
                "sigma_aug in the conditioning"
            )
        b = x.shape[0]
        sigma_aug = cond.sigma_aug.reshape(-1).expand(b).to(x.device)
        low = lowres_input(cond.lowres.to(x.device), sigma_aug, tuple(x.shape[-2:]))
        dtype = self.conv_in.weight.dtype
        h = self.conv_in(torch.cat([x.float(), low], dim=1).to(dtype))
        emb, ctx = self.embed(c_noise, cond, b, self.aug_emb(aug_noise_feature(sigma_aug)))
        ckpt = self.grad_checkpointing

        skips = []
        for block in self.down:
            for layer in block:
                h = run_layer(layer, h, emb, ctx, cross_attn_bias, ckpt)
            skips.append(h)
        for block in self.up:
            h = torch.cat([h, (skips.pop() * SKIP_SCALE).to(h.dtype)], dim=1)
            for layer in block:
                h = run_layer(layer, h, emb, ctx, cross_attn_bias, ckpt)
        return self.head(h)
