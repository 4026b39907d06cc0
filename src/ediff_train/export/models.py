"""Our own backbones (nn/unet.py's TextUNet, nn/dit.py's TextDiT) as diffusers models.

`ediff-export` copies this file as `ediff_models.py` into each expert's component folder
(`unet/`, `transformer/`, …) and names it in model_index.json, so
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` builds the experts from
it: the user of the folder has torch and diffusers, not ediff_train, so nothing here imports
ediff_train. The layers repeat the training code's with the same parameter names and the same
operations in the same order, which is what makes the exported images equal ediff-sample's;
export/folder.py checks every exported expert against its training module on one input before
writing, and tests/test_export_text.py compares whole samplings. Inference only: no activation
checkpointing or paint-with-words hooks. A guidance-distilled student keeps its w input
(`guidance_features` > 0; `guidance_range`: the w it was distilled for, the pipeline warns outside).

Conditioning comes in as the five streams the shards store (t5 [B,L,Dt5], t5_mask [B,L] bool,
clip_txt [B,77,Dc], clip_pool [B,Dp], clip_img [B,Di]); an all-zero stream is a dropped one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

STREAMS = ("t5", "t5_mask", "clip_txt", "clip_pool", "clip_img")


def group_norm(channels: int) -> nn.GroupNorm:
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def _split(t: Tensor, heads: int) -> Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class NoiseEmbedding(nn.Module):
    """c_noise → geometric sinusoids in [1/8, 256] → MLP (frequencies built in float32). With
    [1/32, 4] it is a student's w embedding (nn/guidance_embed.py's, the same operations)."""

    def __init__(
        self, features: int, emb_dim: int, min_freq: float = 0.125, max_freq: float = 256.0
    ) -> None:
        super().__init__()
        self.half, self.min_freq, self.max_freq = features // 2, min_freq, max_freq
        self.mlp = nn.Sequential(
            nn.Linear(features, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, c_noise: Tensor) -> Tensor:
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
    return nn.Sequential(nn.Linear(dim, context_dim), nn.LayerNorm(context_dim))


class ConditionEmbedder(nn.Module):
    """Streams → (vector added to the σ embedding, context tokens [T5, CLIP text, CLIP image,
    null], key mask)."""

    def __init__(
        self, t5: int, clip_txt: int, clip_pool: int, clip_img: int, context: int, emb: int
    ) -> None:
        super().__init__()
        self.pool_proj = nn.Linear(clip_pool, emb)
        self.img_proj = nn.Linear(clip_img, emb)
        self.t5_tok = _token_proj(t5, context)
        self.txt_tok = _token_proj(clip_txt, context)
        self.img_tok = _token_proj(clip_img, context)
        self.null = nn.Parameter(torch.randn(context))

    def vector(self, s: dict[str, Tensor]) -> Tensor:
        w = self.pool_proj.weight.dtype
        pool = F.layer_norm(s["clip_pool"].to(w), (s["clip_pool"].shape[-1],))
        img = F.layer_norm(s["clip_img"].to(w), (s["clip_img"].shape[-1],))
        return self.pool_proj(pool) + self.img_proj(img)

    def context(self, s: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        w = self.null.dtype
        b = s["t5"].shape[0]
        t5 = self.t5_tok(s["t5"].to(w))
        txt = self.txt_tok(s["clip_txt"].to(w))
        img = self.img_tok(s["clip_img"].to(w))[:, None]
        null = self.null.to(t5.dtype)[None, None].expand(b, 1, -1)
        tokens = torch.cat([t5, txt, img.to(t5.dtype), null], dim=1)
        real = torch.ones(b, txt.shape[1] + 2, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([s["t5_mask"].to(device=tokens.device, dtype=torch.bool), real], dim=1)
        return tokens, mask


class ResBlock(nn.Module):
    takes = "emb"

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SelfAttention(nn.Module):
    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        self.heads = channels // head_channels
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (_split(t, self.heads) for t in self.qkv(tokens).chunk(3, dim=-1))
        out = _merge(F.scaled_dot_product_attention(q, k, v))
        return x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class CrossAttention(nn.Module):
    takes = "context"

    def __init__(self, channels: int, context_dim: int, head_channels: int) -> None:
        super().__init__()
        self.heads = channels // head_channels
        self.head_dim = head_channels
        self.norm = group_norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q = _split(self.q(tokens), self.heads)
        k, v = (_split(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        mask = key_mask[:, None, None, :]
        out = _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        return x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)


def _run(layer: nn.Module, h: Tensor, emb: Tensor, ctx: tuple[Tensor, Tensor]) -> Tensor:
    """A U-Net layer with the inputs its kind takes. By a class attribute, not isinstance:
    diffusers re-executes this module for every component it loads, so the second expert's
    classes are new objects and the first expert's layers are not instances of them."""
    takes = getattr(layer, "takes", "")
    if takes == "emb":
        return layer(h, emb)
    if takes == "context":
        return layer(h, ctx[0], ctx[1])
    return layer(h)


class StreamsModel(ModelMixin, ConfigMixin):
    """What both backbones share: F(x; streams, c_noise), called by the pipeline with the raw
    c_noise of the experts' parameterisation (no timestep scale)."""

    takes_streams = True  # export/pipeline.py calls these with the five streams

    def add_guidance(self, features: int, emb_dim: int) -> None:
        if features:  # a guidance-distilled student's w input (nn/guidance_embed.py)
            self.guidance_emb = NoiseEmbedding(features, emb_dim, 1 / 32, 4.0)

    def embed(self, c_noise: Tensor, s: dict[str, Tensor], batch: int, guidance: Any) -> Tensor:
        """SiLU(σ emb + condition vector [+ w emb]); no w is w = 1 (as GuidedStudent)."""
        emb = self.noise_emb(c_noise.reshape(-1).expand(batch)) + self.cond.vector(s)
        g_emb = getattr(self, "guidance_emb", None)
        if g_emb is not None:
            w = 1.0 if guidance is None else guidance
            w = torch.as_tensor(w, dtype=torch.float32, device=emb.device).reshape(-1)
            emb = emb + g_emb(w.expand(batch)).to(emb.dtype)
        elif guidance is not None:
            raise ValueError("a guidance scale was passed to an expert without w input")
        return F.silu(emb)

    def check(self, x: Tensor, s: dict[str, Tensor]) -> None:
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, not {self.config.in_channels}")
        for name in ("t5", "clip_txt", "clip_pool", "clip_img"):
            want = int(self.config[f"{name}_dim"])
            if s[name].shape[-1] != want:
                raise ValueError(f"{name} has width {s[name].shape[-1]}, the model takes {want}")


class TextUNetModel(StreamsModel):
    """ADM-style text U-Net (nn/unet.py), the eDiff-I base denoiser."""

    @register_to_config
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
        guidance_features: int = 0,
        guidance_range: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        mult, attn_at, emb_dim = list(channel_mult), set(attn_resolutions), 4 * model_channels
        self.noise_emb = NoiseEmbedding(model_channels, emb_dim)
        self.add_guidance(guidance_features, emb_dim)
        self.cond = ConditionEmbedder(
            t5_dim, clip_txt_dim, clip_pool_dim, clip_img_dim, context_dim, emb_dim
        )

        def attn(ch: int) -> list[nn.Module]:
            cross = CrossAttention(ch, context_dim, head_channels)
            return [SelfAttention(ch, head_channels), cross]

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res = [model_channels], model_channels, image_size
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, m * model_channels, emb_dim, dropout)]
                ch = m * model_channels
                layers += attn(ch) if res in attn_at else []
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
                layers = [ResBlock(ch + skips.pop(), m * model_channels, emb_dim, dropout)]
                ch = m * model_channels
                layers += attn(ch) if res in attn_at else []
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: Tensor, c_noise: Tensor, guidance: Any = None, **s: Tensor) -> Tensor:
        """x [B,C,H,W], c_noise [B], the streams → F [B,out_channels,H,W]; `guidance`: w."""
        self.check(x, s)
        x = x.to(self.conv_in.weight.dtype)
        emb = self.embed(c_noise, s, x.shape[0], guidance)
        ctx = self.cond.context(s)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            for layer in block:
                h = _run(layer, h, emb, ctx)
            hs.append(h)
        for layer in self.middle:
            h = _run(layer, h, emb, ctx)
        for block in self.up:
            h = torch.cat([h, hs.pop().to(h.dtype)], dim=1)
            for layer in block:
                h = _run(layer, h, emb, ctx)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the context, MLP (nn/dit.py)."""

    def __init__(self, width: int, heads: int, context_dim: int, mlp_ratio: float) -> None:
        super().__init__()
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

    def forward(self, x: Tensor, emb: Tensor, ctx: Tensor, key_mask: Tensor) -> Tensor:
        s1, c1, g1, s2, c2, g2 = self.ada(emb)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + c1) + s1
        q, k, v = (_split(t, self.heads) for t in self.qkv(h).chunk(3, dim=-1))
        x = x + g1 * self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        q = _split(self.q(self.norm_x(x)), self.heads)
        k, v = (_split(t, self.heads) for t in self.kv(ctx).chunk(2, dim=-1))
        mask = key_mask[:, None, None, :]
        x = x + self.proj_x(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        return x + g2 * self.mlp(self.norm2(x) * (1 + c2) + s2)


class TextDiTModel(StreamsModel):
    """Text-conditioned DiT (nn/dit.py): patches → adaLN-Zero blocks → patches."""

    @register_to_config
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
        guidance_features: int = 0,
        guidance_range: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.patch_in = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, n, width))
        self.noise_emb = NoiseEmbedding(width, width)
        self.add_guidance(guidance_features, width)
        self.cond = ConditionEmbedder(
            t5_dim, clip_txt_dim, clip_pool_dim, clip_img_dim, context_dim, width
        )
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, context_dim, mlp_ratio) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(width, 2 * width)
        self.patch_out = nn.Linear(width, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c_noise: Tensor, guidance: Any = None, **s: Tensor) -> Tensor:
        """x [B,C,H,W], c_noise [B], the streams → F [B,out_channels,H,W]; `guidance`: w."""
        self.check(x, s)
        b, _, hgt, wid = x.shape
        x = x.to(self.patch_in.weight.dtype)
        emb = self.embed(c_noise, s, b, guidance)
        ctx, key_mask = self.cond.context(s)
        h = self.patch_in(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, emb, ctx, key_mask)
        shift, scale = self.ada_out(emb)[:, None].chunk(2, dim=-1)
        out = self.patch_out(self.norm_out(h) * (1 + scale) + shift)
        p, ch = int(self.config.patch_size), int(self.config.out_channels)
        out = out.view(b, hgt // p, wid // p, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, ch, hgt, wid)
