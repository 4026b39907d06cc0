"""`init=slice`: a narrower or shallower child's weights as a structured selection of its
parent's (docs/handoff.md, "Sized experts").

The rule, per tensor of the child:

- **blocks** (TextUNet): the same number of levels; of each level the first `num_res_blocks`
  down blocks, the downsampler, the first up blocks and the level's last up block (the one that
  holds the upsampler and takes the level's outer skip);
- **channels**: along every dimension the first k entries, where k is the child's size. A
  dimension that concatenates parts takes the first k of each part: q|k|v of a self-attention,
  k|v of a cross-attention, scale|shift of a ResBlock's embedding projection, cos|sin of the σ
  features, and the (h, skip) input of an up block. Heads are contiguous in q, k and v, so the
  first channels are the first heads whole.

The same plan slices AdamW's moments (`optimizer: sliced`). It is a selection, not a function-
preserving map: GroupNorm's groups and the σ features' frequencies follow the narrower width.
Other backbone classes take only the channel rule, with the parent's tensor names unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ediff_train.errors import EdiffError

# name pattern → (dimension, equal parts) of a concatenated projection
_EQUAL_PARTS = (
    (re.compile(r"(^|\.)qkv\.(weight|bias)$"), 0, 3),
    (re.compile(r"(^|\.)kv\.(weight|bias)$"), 0, 2),
    (re.compile(r"(^|\.)emb\.(weight|bias)$"), 0, 2),  # ResBlock: scale | shift
    (re.compile(r"(^|\.)noise_emb\.mlp\.0\.weight$"), 1, 2),  # cos | sin features
)
_UP_INPUT = re.compile(r"^up\.(\d+)\.0\.(norm1\.weight|norm1\.bias|conv1\.weight|skip\.weight)$")
_BLOCK = re.compile(r"^(down|up)\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class Piece:
    """One child tensor: which parent tensor, and per dimension (parent parts, child parts)."""

    source: str
    parts: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    def take(self, tensor: Tensor) -> Tensor:
        """The selected entries of the parent's tensor (a copy)."""
        out = tensor
        for dim, (have, want) in enumerate(self.parts):
            if have == want:
                continue
            index, start = [], 0
            for p, c in zip(have, want):
                index.extend(range(start, start + c))
                start += p
            out = out.index_select(dim, torch.tensor(index, dtype=torch.long, device=out.device))
        return out.clone()


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The backbone inside a denoiser (EDMPrecond.backbone) and its state-dict prefix."""
    inner = getattr(model, "backbone", None)
    return (inner, "backbone.") if isinstance(inner, nn.Module) else (model, "")


def _layout(net: nn.Module) -> list[tuple[str, int, int]] | None:
    levels, blocks = getattr(net, "levels", None), getattr(net, "num_res_blocks", None)
    if levels is None or blocks is None:
        return None
    down = [("res", lv, i) for lv in range(levels) for i in range(blocks)]
    down += [("down", lv, 0) for lv in range(levels - 1)]
    down.sort(key=lambda e: (e[1], e[0] == "down", e[2]))
    up = [("up", lv, i) for lv in reversed(range(levels)) for i in range(blocks + 1)]
    return [*down, *up]


def _block_map(child: nn.Module, parent: nn.Module) -> dict[tuple[str, int], tuple[str, int]]:
    """(down|up, child index) → (down|up, parent index) under the blocks rule."""
    cl, pl = _layout(child), _layout(parent)
    if cl is None or pl is None:
        return {}
    if child.levels != parent.levels:
        raise EdiffError(
            f"init=slice keeps the parent's resolution levels: the child has {child.levels} "
            f"(model.channel_mult), the parent {parent.levels}; use init=distill"
        )
    if child.num_res_blocks > parent.num_res_blocks:
        raise EdiffError(
            f"init=slice needs a child no deeper than its parent: model.num_res_blocks="
            f"{child.num_res_blocks} > the parent's {parent.num_res_blocks}; use init=distill "
            "or init=scratch"
        )
    nc, npar = child.num_res_blocks, parent.num_res_blocks

    def index(layout: list[tuple[str, int, int]], kind: str) -> dict[tuple[str, int, int], int]:
        keys = [e for e in layout if (e[0] == "up") == (kind == "up")]
        return {e: i for i, e in enumerate(keys)}

    out = {}
    for kind in ("down", "up"):
        ci, pi = index(cl, kind), index(pl, kind)
        for (what, lv, i), j in ci.items():
            src = (what, lv, npar if what == "up" and i == nc else i)
            out[(kind, j)] = (kind, pi[src])
    return out


def slice_plan(child: nn.Module, parent: nn.Module) -> dict[str, Piece]:
    """Where each tensor of `child` comes from in `parent` (modules may be on the meta device);
    one line naming the first tensor that cannot be sliced."""
    cnet, prefix = backbone_of(child)
    pnet, _ = backbone_of(parent)
    if type(cnet) is not type(pnet):
        raise EdiffError(
            f"init=slice needs the parent's backbone class: the child is {type(cnet).__name__}, "
            f"the parent {type(pnet).__name__}; use init=distill"
        )
    blocks = _block_map(cnet, pnet)
    have = {k: tuple(v.shape) for k, v in pnet.state_dict().items()}
    plan: dict[str, Piece] = {}
    for name, value in cnet.state_dict().items():
        src = name
        m = _BLOCK.match(name)
        if m and blocks:
            kind, j = blocks[(m.group(1), int(m.group(2)))]
            src = f"{kind}.{j}.{m.group(3)}"
        if src not in have:
            raise EdiffError(
                f"init=slice: the parent has no tensor {src} for the child's {name} "
                "(the child adds a layer: another attn_resolutions or block kind); use init=distill"
            )
        plan[prefix + name] = Piece(
            prefix + src, _parts(name, src, tuple(value.shape), have[src], cnet, pnet)
        )
    return plan


def _parts(
    name: str,
    src: str,
    want: tuple[int, ...],
    have: tuple[int, ...],
    cnet: nn.Module,
    pnet: nn.Module,
) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    if len(want) != len(have):
        raise EdiffError(f"init=slice: {name} has {len(want)} dimensions, the parent's {len(have)}")
    parts = []
    for dim, (c, p) in enumerate(zip(want, have)):
        if c > p:
            raise EdiffError(
                f"init=slice needs a child no wider than its parent: {name} is {list(want)}, "
                f"the parent's {src} {list(have)}; use init=distill or init=scratch"
            )
        split = _split(name, src, dim, c, p, cnet, pnet)
        parts.append(split)
    return tuple(parts)


def _split(
    name: str, src: str, dim: int, c: int, p: int, cnet: nn.Module, pnet: nn.Module
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    up, up_src = _UP_INPUT.match(name), _UP_INPUT.match(src)
    conv_in_dim = 1 if name.endswith("weight") and "norm1" not in name else 0
    if up and up_src and dim == conv_in_dim and hasattr(cnet, "up_splits"):
        return tuple(pnet.up_splits[int(up_src.group(1))]), tuple(cnet.up_splits[int(up.group(1))])
    for pattern, pdim, n in _EQUAL_PARTS:
        if pdim == dim and pattern.search(name) and p % n == 0 and c % n == 0:
            return (p // n,) * n, (c // n,) * n
    return (p,), (c,)


@torch.no_grad()
def apply_plan(plan: dict[str, Piece], state: dict[str, Tensor], prefix: str = "") -> dict:
    """The child's state dict cut from the parent's `state` (keys `prefix` + plan names)."""
    return {prefix + k: piece.take(state[prefix + piece.source]) for k, piece in plan.items()}
