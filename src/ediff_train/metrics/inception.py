"""The standard FID Inception (torch-fidelity's "inception-v3-compat"), from a local file only.

FID numbers are comparable only under one extractor *and* one resize convention. This one takes
uint8 images and resizes them to 299 with torch-fidelity's TF1-compatible bilinear resize, which
is what pytorch-fid, torch-fidelity and torchmetrics < 1.8 (or `antialias=False`) compute;
`name` states it so reports can print it next to the number.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import Tensor

from ediff_train.errors import EdiffError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048


def _check_weights(weights_path: str | os.PathLike | None) -> Path:
    """Fail with the config option to set before anything (torch-fidelity, a download) starts."""
    where = "not set" if weights_path is None else f"file not found: {weights_path}"
    if weights_path is None or not Path(weights_path).is_file():
        raise EdiffError(
            "FID needs local Inception weights: set "
            f"metrics.inception_weights=/path/to/{WEIGHTS_FILE} ({where})"
        )
    return Path(weights_path)


class InceptionFeatures(torch.nn.Module):
    """images [B,3,H,W] in [0,1] (or already uint8) → 2048-d pool3 features [B,2048] float32."""

    name = (
        "torch-fidelity inception-v3-compat pool3 (2048), TF1-compatible bilinear resize "
        "to 299, uint8 input"
    )
    dim = FEATURE_DIM

    def __init__(
        self, weights_path: str | os.PathLike | None, internal_dtype: str = "float32"
    ) -> None:
        super().__init__()
        path = _check_weights(weights_path)
        if internal_dtype not in ("float32", "float64"):
            raise EdiffError(
                f"Inception internal_dtype must be float32 or float64, not {internal_dtype!r}"
            )
        data = path.read_bytes()
        try:
            # weights_only first: the file must be a plain state dict (no pickled code), since
            # torch-fidelity itself unpickles it with weights_only=False.
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # any unpickling failure means "not a weights file"
            raise EdiffError(f"cannot read Inception weights {path}: {e}".splitlines()[0]) from None
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # internal_dtype is passed only when asked for: torch-fidelity 0.3 does not know it
        extra = (
            {}
            if internal_dtype == "float32"
            else {"feature_extractor_internal_dtype": internal_dtype}
        )
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                [str(FEATURE_DIM)],
                feature_extractor_weights_path=io.BytesIO(data),
                **extra,
            )
        except (RuntimeError, ValueError) as e:  # state-dict keys or shapes differ
            raise EdiffError(
                f"{path} is not torch-fidelity's Inception v3 weights: {e}".splitlines()[0]
            ) from None
        if str(next(self.net.parameters()).dtype) != f"torch.{internal_dtype}":
            raise EdiffError(f"Inception internal_dtype={internal_dtype} needs torch-fidelity>=0.4")
        self.weights_path = path

    @staticmethod
    def to_uint8(images: Tensor) -> Tensor:
        """[0,1] floats → uint8 by rounding (x·255), the input torch-fidelity was built for."""
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise EdiffError(f"Inception wants [B,3,H,W] images, got {tuple(images.shape)}")
        x = images if images.dtype == torch.uint8 else self.to_uint8(images.float())
        (features,) = self.net(x.to(next(self.net.parameters()).device))
        return features
