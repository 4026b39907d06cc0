"""Self- and cross-attention over image tokens, both through PyTorch's fused SDPA kernels.

Bias convention (what paint-with-words relies on): a cross-attention bias B [B, HW, N] is added
to the *unscaled* logits, so the layer computes softmax((QKᵀ + B)/√d)·V, the form of eDiff-I
§4.3. Internally B/√d goes to SDPA as its additive mask, so a large negative B still removes a
key. Keys whose mask is False get −∞ in the same mask.

Paint-with-words needs max(QKᵀ) of the layer and analyses need the attention weights, neither of
which the fused kernel exposes: an `AttentionHook` with a paint matrix switches that one call to
an explicit softmax(QKᵀ) path. A hook that only records keeps the fused output (the weights are
computed beside it, for the recorder), so recording never changes the images. Without a hook the
fused path runs, untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ediff_train.errors import EdiffError


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels, so narrow test nets still work."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def num_heads(channels: int, head_channels: int) -> int:
    if head_channels <= 0 or channels % head_channels:
        raise EdiffError(
            f"attention width {channels} is not a multiple of head_channels {head_channels}"
        )
    return channels // head_channels


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """[B, T, C] -> [B, heads, T, C/heads]."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """[B, heads, T, d] -> [B, T, heads·d]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


@dataclass
class AttentionHook:
    """What a sampler asks of one cross-attention call (the bias function returns it).

    paint [B, HW, N] ≥ 0 and weight [B]: paint-with-words, eDiff-I §4.3: the layer adds
    weight·max(QKᵀ)·paint to QKᵀ, the max taken per sample over its heads, queries and keys.
    record: receives the attention weights [B, heads, HW, N] (after the softmax)."""

    paint: Tensor | None = None
    weight: Tensor | None = None
    record: Callable[[Tensor], None] | None = None


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W tokens of a feature map, pre-norm, residual.

    The output projection starts at zero so a freshly built block is the identity.
    """

    def __init__(self, channels: int, head_channels: int = 64) -> None:
        super().__init__()
        self.heads = num_heads(channels, head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(tokens).chunk(3, dim=-1))
        out = _merge_heads(F.scaled_dot_product_attention(q, k, v))
        out = self.proj(out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to context tokens (keys, values).

    `key_mask` [B, N] is True for real tokens. `bias` [B, HW, N] is added to QKᵀ before the
    1/√d scaling (see module docstring). Every row must keep at least one real key; the U-Net
    guarantees this with its always-present null token.
    """

    def __init__(self, channels: int, context_dim: int, head_channels: int = 64) -> None:
        super().__init__()
        self.heads = num_heads(channels, head_channels)
        self.head_dim = head_channels
        self.norm = group_norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def attn_mask(
        self, key_mask: Tensor, bias: Tensor | None, hw: int, dtype: torch.dtype
    ) -> Tensor:
        """SDPA's mask: bool [B,1,1,N] without a bias, else float bias/√d with −∞ at padding."""
        if bias is None:
            return key_mask[:, None, None, :]
        b, n = key_mask.shape
        if bias.shape != (b, hw, n):
            raise EdiffError(
                f"cross-attention bias has shape {tuple(bias.shape)}, expected {(b, hw, n)}"
            )
        scaled = bias.float() / math.sqrt(self.head_dim)
        scaled = scaled.masked_fill(~key_mask[:, None, :], float("-inf"))
        return scaled[:, None].to(dtype)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        key_mask: Tensor,
        bias: Tensor | AttentionHook | None = None,
    ) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q = _split_heads(self.q(tokens), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        if isinstance(bias, AttentionHook) and bias.paint is not None:
            out = _merge_heads(self._explicit(q, k, v, key_mask, bias))
        elif isinstance(bias, AttentionHook):  # record only: the fused output, bit for bit
            if bias.record is not None:
                bias.record(self._probs(q, k, key_mask).detach())
            mask = self.attn_mask(key_mask, None, h * w, q.dtype)
            out = _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        else:
            mask = self.attn_mask(key_mask, bias, h * w, q.dtype)
            out = _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        out = self.proj(out).transpose(1, 2).reshape(b, c, h, w)
        return x + out

    def _probs(
        self,
        q: Tensor,
        k: Tensor,
        key_mask: Tensor,
        paint: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor:
        """softmax((QKᵀ + w·max(QKᵀ)·A)/√d) in float32: the attention weights [B, heads, HW, N]."""
        scores = q.float() @ k.float().transpose(-1, -2)  # [B, heads, HW, N], unscaled
        if paint is not None and weight is not None:
            if paint.shape != (scores.shape[0], scores.shape[2], scores.shape[3]):
                raise EdiffError(
                    f"paint mask has shape {tuple(paint.shape)}, expected "
                    f"{(scores.shape[0], scores.shape[2], scores.shape[3])}"
                )
            top = scores.amax(dim=(1, 2, 3), keepdim=True)
            w = weight.float().view(-1, 1, 1, 1)
            scores = scores + w * top * paint.float()[:, None]
        scores = scores / math.sqrt(self.head_dim)
        return scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(dim=-1)

    def _explicit(
        self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, hook: AttentionHook
    ) -> Tensor:
        """The painted attention output in float32, with the weights handed to hook.record."""
        probs = self._probs(q, k, key_mask, hook.paint, hook.weight)
        if hook.record is not None:
            hook.record(probs.detach())
        return (probs @ v.float()).to(v.dtype)
