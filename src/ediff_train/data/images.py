"""Per-stage image handling for data_prep: minimum side, resize + centre crop, CLIP's input.

eDiff-I trains a 64 px base model and 256 / 1024 px super-resolution models; each stage's shard
set holds images at its own size. An image whose shorter side is below the stage's minimum is
skipped (upscaled pixels would teach the model blur). The CLIP image embedding is computed from
the source image cropped the same way, not from the (possibly 64 px) stage image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ediff_train.errors import EdiffError

_ORIENTATION = 0x0112
_KEEP = {"jpg": "JPEG", "png": "PNG"}


@dataclass(frozen=True)
class ImageSpec:
    """A stage's images: `size`² RGB stored as `format`; shorter side ≥ `min_side` required."""

    size: int
    min_side: int
    format: str = "jpg"

    def __post_init__(self) -> None:
        if self.size < 1 or self.min_side < 1:
            raise EdiffError(f"image size ({self.size}) and min_side ({self.min_side}) must be ≥ 1")
        if self.format not in _KEEP:
            raise EdiffError(f"image format must be one of {sorted(_KEEP)}, got {self.format!r}")


class ImageSkip(Exception):
    """This image cannot be used; `reason` is counted in the job's skip totals."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class PreparedImage:
    stored: bytes | np.ndarray  # the source bytes when already right, else HxWx3 uint8
    clip: np.ndarray  # HxWx3 uint8 at CLIP's input size
    width: int  # of the source image
    height: int


def resize_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers `size` (h, w), then cut out the centre."""
    th, tw = size
    w, h = im.size
    if (w, h) == (tw, th):
        return im
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return im.crop((left, top, left + tw, top + th))


def _rgb(im: Image.Image) -> Image.Image:
    """RGB; transparent pixels composited on white rather than on whatever colour they hold."""
    if im.mode == "RGB":
        return im
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_source(data: bytes | bytearray | None, path: Path | None) -> bytes | bytearray:
    if data is not None:
        return data
    assert path is not None
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageSkip("missing_image", f"{path} does not exist") from None
    except OSError as e:
        raise ImageSkip("missing_image", f"{path}: {e.strerror or e}") from None


def prepare_image(
    data: bytes | bytearray, spec: ImageSpec, clip_size: tuple[int, int]
) -> PreparedImage:
    """Decode, check the minimum side, make the stage image and CLIP's input image."""
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        if min(width, height) < spec.min_side:
            raise ImageSkip("too_small", f"{width}x{height} < min_side {spec.min_side}")
        fmt, mode = im.format, im.mode
        need = max(spec.size, *clip_size)
        if fmt == "JPEG":  # decode at 1/2..1/8 scale straight from the DCT when that suffices
            scale = need / min(width, height)
            im.draft("RGB", (int(width * scale + 1), int(height * scale + 1)))
        im.load()
        rotated = im.getexif().get(_ORIENTATION, 1) not in (1, None)
        if rotated:
            im = ImageOps.exif_transpose(im)
        im = _rgb(im)
    except ImageSkip:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageSkip("bad_image", detail) from None
    keep = (
        fmt == _KEEP[spec.format]
        and mode == "RGB"
        and not rotated
        and (width, height) == (spec.size, spec.size)
    )
    stored: bytes | np.ndarray = (
        bytes(data) if keep else np.array(resize_crop(im, (spec.size, spec.size)))
    )
    clip = np.array(resize_crop(im, clip_size))
    return PreparedImage(stored, clip, width, height)
