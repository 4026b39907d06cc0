"""CLIP score of generated images against their prompts, with open_clip from a local checkpoint.

Two conventions exist and both are offered: `score` is 100·max(cos, 0) per pair (the CLIPScore
of Hessel et al. with w = 100, as torchmetrics reports it; torchmetrics clamps the *mean* rather
than each pair, which only differs when some cosines are negative), and `cosine` is the raw
cosine, which NeMo reports. Images go through `clip_pixels`, the same preprocessing the encoders
use for that model (shorter side bicubic, centre crop, the model's own mean/std).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ediff_train.errors import EdiffError
from ediff_train.nn.encoder_models import clip_pixels, load_clip


def _check_checkpoint(checkpoint: str | os.PathLike | None) -> Path:
    where = "not set" if checkpoint is None else f"file not found: {checkpoint}"
    if checkpoint is None or not Path(checkpoint).is_file():
        raise EdiffError(
            "CLIP score needs a local open_clip checkpoint: set "
            "metrics.clip_checkpoint=/path/to/open_clip_weights (and "
            f"metrics.clip_model=<open_clip model name>) ({where})"
        )
    return Path(checkpoint)


class CLIPScorer:
    """Frozen open_clip model scoring (image, caption) pairs; results are float32 on the CPU."""

    def __init__(
        self,
        model_name: str,
        checkpoint: str | os.PathLike | None,
        config: dict | None = None,
        device: str | torch.device = "cpu",
        quick_gelu: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        path = _check_checkpoint(checkpoint)
        model, self.tokenizer = load_clip(model_name, path, quick_gelu=quick_gelu, config=config)
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.name = f"open_clip {model_name} ({path.name})"

    @torch.no_grad()
    def image_embeddings(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """images [B,3,H,W] in [0,1] (any H, W) → unit-norm embeddings [B, D]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise EdiffError(f"CLIP score wants [B,3,H,W] images, got {tuple(images.shape)}")
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = clip_pixels(self.model, images[i : i + batch_size].to(self.device, torch.float32))
            out.append(F.normalize(self.model.encode_image(x.to(self.dtype)).float(), dim=-1))
        return torch.cat(out).cpu() if out else torch.zeros(0, self._dim())

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str], batch_size: int = 64) -> Tensor:
        """captions → unit-norm embeddings [B, D] (the tokenizer truncates to the context)."""
        if isinstance(captions, str):
            raise EdiffError("CLIP score takes a list of captions, not one string")
        captions = [str(c) for c in captions]
        out = []
        for i in range(0, len(captions), batch_size):
            ids = self.tokenizer(captions[i : i + batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_text(ids).float(), dim=-1))
        return torch.cat(out).cpu() if out else torch.zeros(0, self._dim())

    def cosine(self, images: Tensor, captions: Sequence[str], batch_size: int = 64) -> Tensor:
        """Raw cosine similarity of each image with its own caption, [B]."""
        if len(captions) != images.shape[0]:
            raise EdiffError(f"{images.shape[0]} images but {len(captions)} captions")
        img = self.image_embeddings(images, batch_size)
        return (img * self.text_embeddings(captions, batch_size)).sum(-1)

    def score(self, images: Tensor, captions: Sequence[str], batch_size: int = 64) -> Tensor:
        """CLIP score per pair, 100·max(cos, 0), [B]."""
        return 100 * self.cosine(images, captions, batch_size).clamp(min=0)

    def _dim(self) -> int:
        return int(self.model.visual.output_dim)
