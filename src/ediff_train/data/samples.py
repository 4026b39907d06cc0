"""One shard sample's raw tar members → tensors, with every check that can skip it.

Embeddings keep their stored dtype (float16) here; the batch step decides what to convert.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from ediff_train.data.tario import read_npy
from ediff_train.errors import EdiffError

EMBEDDINGS = ("t5", "clip_txt", "clip_pool", "clip_img")
IMAGE_EXTS = ("png", "jpg", "jpeg")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class EmbedDims:
    """Expected embedding widths; a sample whose arrays disagree is skipped as `bad_shape`."""

    t5: int
    clip_txt: int
    clip_pool: int
    clip_img: int
    t5_max_length: int | None = None
    context_length: int = 77

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> EmbedDims:
        enc = manifest.get("encoders", {})
        t5, clip = enc.get("t5", {}), enc.get("clip", {})
        try:
            return cls(
                t5=int(t5["dim"]),
                clip_txt=int(clip["text_dim"]),
                clip_pool=int(clip["pool_dim"]),
                clip_img=int(clip["image_dim"]),
                t5_max_length=t5.get("max_length"),
                context_length=int(clip.get("context_length", 77)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EdiffError(f"manifest lacks embedding dims ({e!r} missing or invalid)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Expected shape; -1 marks T5's free token count."""
        return {
            "t5": (-1, self.t5),
            "clip_txt": (self.context_length, self.clip_txt),
            "clip_pool": (self.clip_pool,),
            "clip_img": (self.clip_img,),
        }[name]


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def missing_fields(raw: Mapping[str, Any]) -> list[str]:
    need = [f"{e}.npy" for e in EMBEDDINGS if f"{e}.npy" not in raw]
    if not any(ext in raw for ext in IMAGE_EXTS):
        need.append("png|jpg")
    return need


_PIL_FORMATS = {"png": ("PNG",), "jpg": ("JPEG",), "jpeg": ("JPEG",)}


def load_image(data: bytes, size: int, ext: str | None = None) -> Image.Image:
    """RGB at size×size: shorter side resized to `size`, then centre-cropped. `ext` names the
    expected format (skips PIL's format probing; a mislabelled file still opens)."""
    if ext in ("jpg", "jpeg"):
        # A stored image is already size×size: hand the bytes straight to libjpeg, skipping
        # Image.open's marker parsing in Python (77 → 42 µs at 64 px). The decoder refuses any
        # other size, CMYK and damaged data; those take the general path below.
        try:
            return Image.frombytes("RGB", (size, size), data, "jpeg", "RGB", "")
        except (OSError, ValueError):
            pass
    try:
        im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS.get(ext or ""))
    except Image.UnidentifiedImageError:
        im = Image.open(io.BytesIO(data))
    im.load()
    if im.mode != "RGB":
        im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 pixels → float32 in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def image_array(im: Image.Image) -> np.ndarray:
    """uint8 [3,H,W] (a channel-first view of PIL's HWC copy)."""
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _load_embedding(name: str, data: bytes | bytearray | memoryview, dims: EmbedDims) -> np.ndarray:
    """The stored array in its own dtype (float16 in our shards; float64 → float32), checked
    for shape; a read-only view of the shard's bytes where possible. NaN/Inf is found later,
    by `collate`, while the batch copy has the data in cache."""
    try:
        arr = read_npy(data)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError for broken npy bytes
        raise _Skip("bad_npy", f"{name}.npy: {e}") from None
    want = dims.shape(name)
    ok = arr.ndim == len(want) and all(w in (-1, s) for w, s in zip(want, arr.shape))
    if name == "t5" and ok:
        max_len = dims.t5_max_length
        ok = arr.shape[0] >= 1 and (max_len is None or arr.shape[0] <= max_len)
    if not ok or arr.dtype not in _FLOATS:
        shown = tuple("L" if w == -1 else w for w in want)
        raise _Skip("bad_shape", f"{name}.npy is {arr.dtype}{list(arr.shape)}, want {shown}")
    return arr.astype(np.float32) if arr.dtype == np.float64 else arr


# A float is NaN or ±Inf exactly when its exponent bits are all ones.
_EXPONENT = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
}


def all_finite(arr: np.ndarray) -> bool:
    """No NaN/Inf in a native float16/float32 array. One masked max over the raw bits: as fast
    as torch's float32 sum, ~20x numpy's isfinite on float16, and fine on read-only views."""
    if arr.size == 0:
        return True
    utype, mask = _EXPONENT[arr.dtype]
    return int(np.bitwise_and(arr.view(utype), mask).max()) != mask


def nonfinite_fields(sample: Mapping[str, Any]) -> list[str]:
    """The embeddings (and latent) of a decoded sample that hold NaN/Inf (collate checks whole
    batches; this is for samples that never reach one)."""
    names = (*EMBEDDINGS, "latent") if "latent" in sample else EMBEDDINGS
    return [name for name in names if not all_finite(sample[name])]


def _load_latent(data: bytes | bytearray | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """A VAE codec's stored latent (docs/latent.md), checked for shape [C, h, w]."""
    try:
        arr = read_npy(data)
    except Exception as e:  # as _load_embedding
        raise _Skip("bad_npy", f"latent.npy: {e}") from None
    if tuple(arr.shape) != tuple(shape) or arr.dtype not in _FLOATS:
        raise _Skip("bad_shape", f"latent.npy is {arr.dtype}{list(arr.shape)}, want {shape}")
    return arr.astype(np.float32) if arr.dtype == np.float64 else arr


def check_sizes(
    image_size: int, lowres_size: int | None = None, crop_size: int | None = None
) -> int:
    """Refuse sizes that cannot give exactly aligned (low-res, high-res) pairs; returns the
    upscaling factor (1 without a low-res).

    Rules: image_size >= 1; lowres_size (SR stages) lies in [1, image_size) and divides
    image_size (a crop offset must map to a whole low-res pixel); crop_size lies in
    [1, image_size] and is a multiple of the factor (its low-res crop is crop_size // factor
    wide). crop_size without lowres_size is a plain random crop; crop_size == image_size is
    no crop."""
    if image_size < 1:
        raise EdiffError(f"image_size must be >= 1, got {image_size}")
    factor = 1
    if lowres_size is not None:
        if not 1 <= lowres_size < image_size:
            raise EdiffError(
                f"lowres_size {lowres_size} must lie in [1, image_size="
                f"{image_size}): a super-resolution stage upsamples"
            )
        if image_size % lowres_size:
            raise EdiffError(
                f"lowres_size {lowres_size} does not divide image_size "
                f"{image_size}: low-res and high-res pixels would not align"
            )
        factor = image_size // lowres_size
    if crop_size is not None:
        if not 1 <= crop_size <= image_size:
            raise EdiffError(f"crop_size {crop_size} must lie in [1, image_size={image_size}]")
        if crop_size % factor:
            raise EdiffError(
                f"crop_size {crop_size} is not a multiple of image_size // "
                f"lowres_size = {image_size} // {lowres_size} = {factor}: "
                "its low-res crop would not align"
            )
    return factor


def crop_offset(
    image_size: int,
    crop_size: int,
    factor: int,
    key: str,
    seed: int = 0,
    epoch: int = 0,
    centre: bool = False,
) -> tuple[int, int]:
    """Top-left (y, x) of a crop, both multiples of `factor` so the low-res crop starts at a
    whole low-res pixel. Random offsets hash (seed, epoch, key): the same crop of a sample on
    every run, rank and worker, another one next epoch. `centre`: the aligned centre crop."""
    n = (image_size - crop_size) // factor + 1  # aligned positions per axis
    if centre:
        return (n - 1) // 2 * factor, (n - 1) // 2 * factor
    h = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=16).digest()
    return (
        int.from_bytes(h[:8], "little") % n * factor,
        int.from_bytes(h[8:], "little") % n * factor,
    )


def decode_sample(
    raw: Mapping[str, Any],
    image_size: int,
    dims: EmbedDims,
    lowres_size: int | None = None,
    *,
    crop_size: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    centre_crop: bool = False,
    latent_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Raw tar members → numpy arrays; raises _Skip with a reason for anything unusable
    except NaN/Inf in an embedding, which `collate` finds (see batching.py).

    Embeddings keep their stored dtype, images are uint8 [3,H,W]: `collate` decides what the
    batch holds, so nothing is converted twice. `lowres` is the whole image_size image
    downsampled (as a base stage's output is, at inference); with `crop_size` the image is a
    crop_size² crop (see crop_offset; sizes as check_sizes allows) and `lowres` the low-res
    pixels under exactly that crop. `latent_shape` [C, h, w] (a VAE codec's shards): the
    sample's `latent.npy` is read instead of its image, which is not decoded at all."""
    missing = missing_fields(raw)
    if latent_shape is not None and "latent.npy" not in raw:
        missing.append("latent.npy")
    if missing:
        raise _Skip("missing_field", "no " + ", ".join(missing))
    out: dict[str, Any] = {
        name: _load_embedding(name, raw[f"{name}.npy"], dims) for name in EMBEDDINGS
    }
    if latent_shape is not None:
        out["latent"] = _load_latent(raw["latent.npy"], latent_shape)
        return _text_and_key(raw, out)
    ext = next(e for e in IMAGE_EXTS if e in raw)
    try:
        im = load_image(raw[ext], image_size, ext)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError
        raise _Skip("bad_image", f"{ext}: {e}") from None
    low = (
        im.resize((lowres_size, lowres_size), Image.Resampling.BICUBIC)
        if lowres_size is not None
        else None
    )
    if crop_size is not None and crop_size < image_size:
        f = image_size // lowres_size if lowres_size is not None else 1
        oy, ox = crop_offset(image_size, crop_size, f, raw["__key__"], seed, epoch, centre_crop)
        im = im.crop((ox, oy, ox + crop_size, oy + crop_size))
        if low is not None:
            c = crop_size // f
            low = low.crop((ox // f, oy // f, ox // f + c, oy // f + c))
    out["image"] = image_array(im)
    if low is not None:
        out["lowres"] = image_array(low)
    return _text_and_key(raw, out)


def _text_and_key(raw: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    txt = raw.get("txt", b"")
    out["caption"] = (
        bytes(txt).decode("utf-8", "replace")
        if isinstance(txt, (bytes, bytearray, memoryview))
        else str(txt)
    )
    out["key"], out["shard"] = raw["__key__"], raw["__shard__"]
    return out
