"""What the diffusers-wrapping backbones share (nn/mmdit.py, nn/sd_unet.py): finding the class
in the installed diffusers, loading a local pretrained folder with one-line errors, and packing
our conditioning into the token/pooled inputs diffusers models take.

Packing (docs/backbones.md). Context tokens are SD3's layout: CLIP text tokens first, then T5,
along the sequence axis, each stream brought to the model's context width either by zero-padding
its channels (`context_proj: pad`, SD3's own way: parameter-free, so a pretrained model sees
what it was trained on) or by a learned linear map per stream (`context_proj: linear`, for
encoders wider than the model). Padded T5 positions (mask False) are zeroed first. The pooled
vector is [pooled CLIP text, CLIP image embedding] concatenated (SD3 concatenates its two pooled
CLIP vectors the same way), zero-padded to the model's pooled width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.nn.unet import TextBackbone

CONTEXT_PROJ = ("pad", "linear")


def diffusers_class(name: str) -> type:
    """The model class from the installed diffusers, or one line saying it is missing."""
    try:
        import diffusers
    except ImportError:
        raise EdiffError(f"{name} needs diffusers; pip install 'diffusers>=0.30'") from None
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise EdiffError(
            f"the installed diffusers {diffusers.__version__} has no {name}; "
            "install diffusers>=0.30"
        )
    return cls


def read_model_config(folder: str, subfolder: str | None, class_name: str) -> tuple[dict, str]:
    """config.json of a local diffusers model folder (under `subfolder` when it has one) and the
    subfolder actually used ('' for a bare model folder). One line when it is not a diffusers
    folder or holds another class."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EdiffError(f"pretrained folder {folder!r} does not exist (a local diffusers folder)")
    candidates = ([subfolder] if subfolder else []) + [""]
    for sub in candidates:
        path = root / sub / "config.json"
        if path.is_file():
            break
    else:
        where = f"{folder}/{subfolder}" if subfolder else folder
        raise EdiffError(
            f"pretrained {where!r} has no config.json: not a diffusers model folder "
            f"(save one with {class_name}.save_pretrained)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdiffError(f"pretrained config {str(path)!r} is not readable JSON: {e}") from None
    got = config.get("_class_name") if isinstance(config, dict) else None
    if got is None:
        raise EdiffError(
            f"pretrained config {str(path)!r} has no _class_name: not a diffusers model folder"
        )
    if got != class_name:
        raise EdiffError(f"pretrained {str(path.parent)!r} holds a {got}, expected a {class_name}")
    return config, sub


def load_pretrained(class_name: str, folder: str, subfolder: str | None) -> nn.Module:
    """`class_name.from_pretrained(folder, subfolder)` from local files only, after the checks."""
    cls = diffusers_class(class_name)
    _, sub = read_model_config(folder, subfolder, class_name)
    kw: dict[str, Any] = {"subfolder": sub} if sub else {}
    return cls.from_pretrained(str(Path(folder).expanduser()), local_files_only=True, **kw)


def fit_width(t: Tensor, width: int) -> Tensor:
    """Zero-pad the last axis up to `width` (the caller has checked it is not wider)."""
    extra = width - t.shape[-1]
    return F.pad(t, (0, extra)) if extra else t


class DiffusersBackbone(TextBackbone):
    """A TextBackbone around a diffusers model `self.model`; subclasses build it and call
    `setup_packing`, then pack with `context()` and `pooled()`."""

    model: nn.Module
    kind = "diffusers"

    def setup_packing(
        self,
        dims: dict[str, int],
        context_dim: int,
        pooled_dim: int | None,
        context_proj: str,
        t5_tokens: int | None,
        clip_tokens: int | None,
        where: str,
        keys: tuple[str, str],
    ) -> None:
        """Check the widths fit the model (`where` names it, `keys` its context and pooled
        config keys, in the message) and make the per-stream projections when `context_proj`
        is linear."""
        if context_proj not in CONTEXT_PROJ:
            raise EdiffError(f"context_proj must be pad or linear, got {context_proj!r}")
        for key, n in (("t5_tokens", t5_tokens), ("clip_tokens", clip_tokens)):
            if n is not None and int(n) < 1:
                raise EdiffError(f"{key} must be ≥ 1 or null, got {n!r}")
        self.dims = {k: int(v) for k, v in dims.items()}
        self.context_dim, self.pooled_dim = int(context_dim), pooled_dim
        self.context_proj = context_proj
        self.t5_tokens = None if t5_tokens is None else int(t5_tokens)
        self.clip_tokens = None if clip_tokens is None else int(clip_tokens)
        if context_proj == "pad":
            wide = {k: self.dims[k] for k in ("clip_txt", "t5") if self.dims[k] > self.context_dim}
            if wide:
                name = max(wide, key=wide.__getitem__)
                raise EdiffError(
                    f"{where} has {keys[0]}={self.context_dim}, narrower than the {name} "
                    f"embeddings ({wide[name]}): use ≥ {wide[name]} or context_proj=linear"
                )
            self.token_proj = None
        else:
            self.token_proj = nn.ModuleDict(
                {k: nn.Linear(self.dims[k], self.context_dim) for k in ("clip_txt", "t5")}
            )
        need = self.dims["clip_pool"] + self.dims["clip_img"]
        if pooled_dim is not None and pooled_dim < need:
            raise EdiffError(
                f"{where} has {keys[1]}={pooled_dim}, narrower than clip_pool + clip_img "
                f"({self.dims['clip_pool']} + {self.dims['clip_img']} = {need})"
            )

    @property
    def diffusers_model(self) -> nn.Module:
        return self.model

    @property
    def grad_checkpointing(self) -> bool:
        return bool(self.model.is_gradient_checkpointing)

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        if on:
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()

    def context_slices(self, t5_len: int, clip_len: int = 77) -> dict[str, slice]:
        """Positions of 'clip_txt' and 't5' along the packed context (no image or null token)."""
        n_clip = min(clip_len, self.clip_tokens or clip_len)
        n_t5 = self.t5_tokens or t5_len
        return {"clip_txt": slice(0, n_clip), "t5": slice(n_clip, n_clip + n_t5)}

    def check_input(self, x: Tensor, cond: Conditioning) -> None:
        if x.shape[1] != self.in_channels:
            raise EdiffError(
                f"input has {x.shape[1]} channels, the model expects {self.in_channels}"
            )
        for name, want in self.dims.items():
            got = getattr(cond, name).shape[-1]
            if got != want:
                raise EdiffError(f"conditioning '{name}' has width {got}, the model expects {want}")

    def refuse_hook(self, cross_attn_bias: object) -> None:
        if cross_attn_bias is not None:
            raise EdiffError(
                "paint-with-words and attention recording need the U-Net's cross-attention "
                f"hook; model={self.kind} does not support them (use a TextUNet model)"
            )

    def context(self, cond: Conditioning, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Tokens [B, 77 + L, context_dim] = [CLIP text, T5] and key mask [B, 77 + L] (True =
        real). With `t5_tokens` the T5 part is padded or cut to that many tokens (SD3's
        max_sequence_length), so the packing does not depend on the batch's longest caption;
        `clip_tokens` keeps the first that many of CLIP's 77 (SD3 keeps all; a toy whose
        captions are short saves the compute)."""
        mask = cond.t5_mask.to(device=cond.t5.device, dtype=torch.bool)
        t5 = cond.t5.to(dtype) * mask[..., None].to(dtype)
        if self.t5_tokens is not None:
            n = self.t5_tokens
            t5, mask = t5[:, :n], mask[:, :n]
            if t5.shape[1] < n:
                t5 = F.pad(t5, (0, 0, 0, n - t5.shape[1]))
                mask = F.pad(mask, (0, n - mask.shape[1]), value=False)
        txt = cond.clip_txt.to(dtype)[:, : self.clip_tokens]
        if self.token_proj is None:
            txt, t5 = fit_width(txt, self.context_dim), fit_width(t5, self.context_dim)
        else:
            txt, t5 = self.token_proj["clip_txt"](txt), self.token_proj["t5"](t5)
        real = torch.ones(txt.shape[:2], dtype=torch.bool, device=mask.device)
        return torch.cat([txt, t5], dim=1), torch.cat([real, mask], dim=1)

    def pooled(self, cond: Conditioning, dtype: torch.dtype) -> Tensor:
        """[pooled CLIP text, CLIP image] [B, pooled_dim], zero-padded to the model's width."""
        vec = torch.cat([cond.clip_pool.to(dtype), cond.clip_img.to(dtype)], dim=-1)
        return fit_width(vec, self.pooled_dim) if self.pooled_dim else vec

    def timestep(self, c_noise: Tensor, batch: int) -> Tensor:
        """diffusers' `timestep` = timestep_scale · c_noise, one per row (docs/backbones.md)."""
        return c_noise.reshape(-1).float().expand(batch) * self.timestep_scale
