"""The text/image conditioning bundle and its per-embedding dropout.

Dropout lives here (and is applied in the training step) so the shards never freeze a choice of
which embeddings are null; zeroing all three gives the unconditional model used by CFG.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ediff_train.core.perf import to_device

# Default drop rates (eDiff-I via a secondary source): CLIP text 0.2, T5 0.25, CLIP image 0.9.
DEFAULT_DROP = {"clip_txt": 0.2, "t5": 0.25, "clip_img": 0.9}


TEXT_FIELDS = ("t5", "t5_mask", "clip_txt", "clip_pool", "clip_img")


@dataclass
class Conditioning:
    """Embeddings for one batch. Shapes: t5 [B,L,Dt5], t5_mask [B,L] bool, clip_txt [B,77,Dc],
    clip_pool [B,Dp], clip_img [B,Di]. A dropped embedding is all zeros (the null input).

    A super-resolution stage is also conditioned on its low-res image: `lowres` [B,3,h,w] in
    [-1, 1] with its augmentation noise already added, and that noise level `sigma_aug` [B]
    (sr.py). They are not text: guidance's unconditional branch keeps them (`null`)."""

    t5: Tensor
    t5_mask: Tensor
    clip_txt: Tensor
    clip_pool: Tensor
    clip_img: Tensor
    lowres: Tensor | None = None
    sigma_aug: Tensor | None = None

    @classmethod
    def from_batch(cls, batch: dict) -> Conditioning:
        """The text/image embeddings of a loader batch (the low-res image is made by sr.py)."""
        return cls(**{name: batch[name] for name in TEXT_FIELDS})

    def rows(self, index: Tensor) -> Conditioning:
        """The bundle for a subset of the batch's rows."""
        return Conditioning(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                for f in fields(self)
            }
        )

    @property
    def batch_size(self) -> int:
        return self.t5.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        def move(name: str, t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if name == "t5_mask" or dtype is None:
                return t.to(device)
            return t.to(device, dtype)

        return Conditioning(**{f.name: move(f.name, getattr(self, f.name)) for f in fields(self)})

    def null(self) -> Conditioning:
        """All three embeddings dropped: the unconditional input for classifier-free guidance."""
        return replace(
            self,
            t5=torch.zeros_like(self.t5),
            clip_txt=torch.zeros_like(self.clip_txt),
            clip_pool=torch.zeros_like(self.clip_pool),
            clip_img=torch.zeros_like(self.clip_img),
        )

    def without_image(self) -> Conditioning:
        """Text-only conditioning (the usual text-to-image case: no reference image)."""
        return replace(self, clip_img=torch.zeros_like(self.clip_img))

    def cat(self, other: Conditioning) -> Conditioning:
        """Stack two bundles along the batch (T5 padded to the longer length) for one CFG pass."""
        la, lb = self.t5.shape[1], other.t5.shape[1]
        length = max(la, lb)

        def pad(t: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
            extra = length - t.shape[1]
            if extra == 0:
                return t, m
            t = torch.nn.functional.pad(t, (0, 0, 0, extra))
            m = torch.nn.functional.pad(m, (0, extra), value=False)
            return t, m

        ta, ma = pad(self.t5, self.t5_mask)
        tb, mb = pad(other.t5, other.t5_mask)
        return Conditioning(
            t5=torch.cat([ta, tb]),
            t5_mask=torch.cat([ma, mb]),
            clip_txt=torch.cat([self.clip_txt, other.clip_txt]),
            clip_pool=torch.cat([self.clip_pool, other.clip_pool]),
            clip_img=torch.cat([self.clip_img, other.clip_img]),
            lowres=_cat_optional(self.lowres, other.lowres, "lowres"),
            sigma_aug=_cat_optional(self.sigma_aug, other.sigma_aug, "sigma_aug"),
        )


def _cat_optional(a: Tensor | None, b: Tensor | None, name: str) -> Tensor | None:
    if (a is None) != (b is None):
        raise ValueError(f"cannot stack a conditioning with '{name}' and one without")
    return None if a is None else torch.cat([a, b])


def drop_embeddings(
    cond: Conditioning, p: dict[str, float], generator: torch.Generator | None = None
) -> Conditioning:
    """Zero each embedding independently per sample with its own probability.

    Pooled CLIP text is dropped together with the CLIP text tokens: both come from one encoder
    pass, and keeping one would leak the caption into the 'unconditional' model.
    """
    b = cond.batch_size
    names = ("t5", "clip_txt", "clip_img")
    # drawn on the host (the same stream on every device), moved in one non-blocking copy
    r = torch.stack([torch.rand(b, generator=generator, device="cpu") for _ in names])
    rates = torch.tensor([float(p.get(name, 0.0)) for name in names])[:, None]
    keep = to_device(r >= rates, cond.t5.device).to(cond.t5.dtype)
    k_t5, k_txt, k_img = keep[0], keep[1], keep[2]
    return replace(
        cond,
        t5=cond.t5 * k_t5[:, None, None],
        clip_txt=cond.clip_txt * k_txt[:, None, None],
        clip_pool=cond.clip_pool * k_txt[:, None],
        clip_img=cond.clip_img * k_img[:, None],
    )
