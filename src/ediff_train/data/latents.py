"""Images → a VAE codec's latents, once, when shards are written (docs/latent.md).

The latent is computed from exactly the pixels the loader would have given a pixel model (the
stored image decoded at the stage's size), so a pixel run and a latent run of one shard set see
the same images. Stored float16 as `latent.npy` beside the embeddings (docs/design.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ediff_train.data.samples import image_array, load_image


def pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W,3] (or [N,3,H,W] tensor) → float32 [N,3,H,W] in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0


def encode_arrays(
    codec: Any, images: np.ndarray | torch.Tensor, batch_size: int = 64
) -> np.ndarray:
    """float16 latents [N,C,h,w] of uint8 images (see `pixels`)."""
    z = codec.encode(pixels(images), batch_size=batch_size)
    return z.float().cpu().numpy().astype(np.float16)


def encode_stored(
    codec: Any, stored: Sequence[bytes], size: int, batch_size: int = 64
) -> list[np.ndarray]:
    """Latents of encoded images (a shard's png/jpg bytes) decoded at `size`, as the loader
    decodes them."""
    if not stored:
        return []
    arrays = np.stack([image_array(load_image(bytes(b), size)) for b in stored])
    return list(encode_arrays(codec, torch.from_numpy(arrays), batch_size))
