"""Writing shard sets in the docs/design.md §4 format: `NNNNNN.tar` files + `manifest.json`.

Each tar is written under a temporary name and renamed when complete, so a reader (or a job
that resumes after a crash) never sees half a shard. Embeddings are stored as float16 .npy, T5
with only its real tokens. A writer can start at any shard index and use a name prefix, so
per-unit embedding jobs can write into one folder and merge their counts afterwards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ediff_train.data.manifest import new_manifest, write_manifest
from ediff_train.errors import EdiffError

IMAGE_FORMATS = ("png", "jpg")
EMBEDDINGS = ("t5", "clip_txt", "clip_pool", "clip_img")
LATENT = "latent"  # `latent.npy`: float16 [C, H/f, W/f], a VAE codec's latent (docs/latent.md)


def _f16(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(x, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise EdiffError(f"{name} embedding holds NaN or inf values")
    return arr.astype(np.float16)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_image(image: Any, fmt: str) -> tuple[bytes, int, int]:
    """(encoded bytes, width, height). Already-encoded bytes are kept as they are (no
    re-compression of a source JPEG); PIL images and HxWx3 uint8 arrays are encoded as RGB."""
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as im:
            return bytes(image), im.width, im.height
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise EdiffError(f"image arrays must be HxWx3 uint8, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise EdiffError(f"unsupported image type {type(image).__name__}")
    image = image.convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), image.width, image.height


class ShardWriter:
    """Writes samples into `{prefix}{index:06d}.tar`, `samples_per_shard` each.

    `encoders` is `Encoders.manifest_entry()`; its dims validate every sample's shapes.
    Use as a context manager, or call `close()` (counts only, for one unit of a larger job) or
    `finish()` (also writes manifest.json). On an exception inside `with`, the partial shard
    is discarded and no manifest is written.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        encoders: dict[str, dict[str, Any]],
        image_format: str = "png",
        image_size: int | None = None,
        samples_per_shard: int = 1000,
        start_index: int = 0,
        prefix: str = "",
        codec: dict[str, Any] | None = None,
    ) -> None:
        if image_format not in IMAGE_FORMATS:
            raise EdiffError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if samples_per_shard < 1:
            raise EdiffError(f"samples_per_shard must be ≥ 1, got {samples_per_shard}")
        if "/" in prefix or prefix.startswith("."):
            raise EdiffError(f"shard prefix {prefix!r} may not contain '/' or start with '.'")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.encoders = encoders
        self.image_format = image_format
        self.image_size = image_size
        self.samples_per_shard = int(samples_per_shard)
        self.prefix = prefix
        # a VAE codec's spec (nn/codec.py): every sample then carries its latent, and the
        # manifest records which VAE made them; None: pixel shards, as before codecs
        self.codec = dict(codec) if codec and codec.get("class") != "PixelCodec" else None
        self.index = int(start_index)
        self.shards: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._name = ""
        self._count = 0
        self._keys: set[str] = set()
        t5, clip = encoders["t5"], encoders["clip"]
        self._shapes = {
            "t5": (None, int(t5["dim"])),
            "clip_txt": (int(clip.get("context_length", 77)), int(clip["text_dim"])),
            "clip_pool": (int(clip["pool_dim"]),),
            "clip_img": (int(clip["image_dim"]),),
        }

    def _open(self) -> None:
        name = f"{self.prefix}{self.index:06d}.tar"
        self._tmp = self.root / f".{name}.tmp{os.getpid()}"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._name = name
        self._count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644  # mtime stays 0 so the same samples give byte-identical shards
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def _seal(self) -> None:
        """Close the open tar and rename it into place (the only moment it becomes visible)."""
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        os.replace(self._tmp, self.root / self._name)
        self.shards[self._name] = self._count
        self._tar, self._tmp = None, None
        self.index += 1

    def write(
        self,
        key: str,
        image: Any,
        caption: str,
        t5: Any,
        clip_txt: Any,
        clip_pool: Any,
        clip_img: Any,
        meta: dict[str, Any] | None = None,
        latent: Any = None,
    ) -> None:
        """Add one sample. Embeddings: tensors or arrays of any float dtype (stored float16);
        `latent` [C, H/f, W/f] is required exactly when the writer has a VAE codec."""
        if not key or "." in key or "/" in key:
            raise EdiffError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if key in self._keys:
            raise EdiffError(f"sample key {key!r} written twice")
        arrays = {n: _f16(v, n) for n, v in zip(EMBEDDINGS, (t5, clip_txt, clip_pool, clip_img))}
        for n, arr in arrays.items():
            want = self._shapes[n]
            if arr.ndim != len(want) or any(
                w is not None and w != s for w, s in zip(want, arr.shape)
            ):
                shown = tuple("L" if w is None else w for w in want)
                raise EdiffError(f"sample {key}: {n} has shape {arr.shape}, expected {shown}")
        if arrays["t5"].shape[0] < 1:
            raise EdiffError(f"sample {key}: t5 has no tokens")
        if (latent is None) != (self.codec is None):
            raise EdiffError(
                f"sample {key}: a latent is written exactly when the writer has a VAE codec"
            )
        if latent is not None:
            assert self.codec is not None
            arrays[LATENT] = _f16(latent, LATENT)
            want = (int(self.codec["channels"]),)
            if self.image_size is not None:
                side = int(self.image_size) // int(self.codec["factor"])
                want += (side, side)
            if arrays[LATENT].shape[: len(want)] != want or arrays[LATENT].ndim != 3:
                raise EdiffError(
                    f"sample {key}: latent has shape {arrays[LATENT].shape}, expected {want}"
                )
        data, width, height = encode_image(image, self.image_format)
        info = {"width": width, "height": height, "source": "", **(meta or {})}
        if self._tar is None:
            self._open()
        self._add(f"{key}.{self.image_format}", data)
        self._add(f"{key}.txt", str(caption).encode("utf-8"))
        for n in (*EMBEDDINGS, LATENT) if latent is not None else EMBEDDINGS:
            self._add(f"{key}.{n}.npy", npy_bytes(arrays[n]))
        self._add(f"{key}.json", json.dumps(info, sort_keys=True).encode("utf-8"))
        self._keys.add(key)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._seal()

    def close(self) -> dict[str, int]:
        """Seal the last partial shard; returns {shard name: sample count} of this writer."""
        self._seal()
        return dict(self.shards)

    def abort(self) -> None:
        """Drop the shard being written (complete shards already renamed stay)."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar, self._tmp = None, None

    def manifest(self, **extra: Any) -> dict[str, Any]:
        """This writer's manifest (shards sealed so far); `extra` keys are stored as given."""
        image = {"format": self.image_format, "size": self.image_size}
        m = new_manifest(self.encoders, image, **extra)
        if self.codec is not None:
            m["codec"] = dict(self.codec)
        m["shards"] = dict(self.shards)
        m["num_samples"] = int(sum(self.shards.values()))
        return m

    def finish(self, **extra: Any) -> Path:
        """Seal the last shard and write manifest.json (atomically) next to the shards."""
        self.close()
        return write_manifest(self.root, self.manifest(**extra))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
