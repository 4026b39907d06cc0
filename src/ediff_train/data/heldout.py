"""Held-out data: where a shard set's validation samples live, and reading them back.

A shard set names its validation set in two ways (config wins over manifest):
- a folder: `data.val_root`, or the manifest's "validation" entry (the digits build writes
  `val/`), a shard set of its own that training never reads;
- a split by key: `data.val_fraction` = f holds out every sample whose key hashes below f
  (crc32, so every process and every rerun agrees); training skips them, validation reads only
  them. Use it for shard sets that were written without a separate folder.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ediff_train.data.manifest import read_manifest
from ediff_train.data.tario import split_key, tar_members
from ediff_train.errors import EdiffError
from ediff_train.io.remote import is_remote, join, normalize, read_bytes

_BUCKETS = 1_000_000


def in_holdout(key: str, fraction: float) -> bool:
    """Whether sample `key` belongs to the key-hash validation split of size `fraction`."""
    return zlib.crc32(key.encode("utf-8")) % _BUCKETS < round(fraction * _BUCKETS)


def _place(root: str | os.PathLike, name: str | None = None) -> Path | str:
    """A local folder as a Path, a URL as its string (Path would fold its '//')."""
    if is_remote(root):
        return join(root, name) if name else normalize(root)
    return Path(root) / name if name else Path(root)


def validation_source(
    root: str | os.PathLike, val_root: str | os.PathLike | None = None, val_fraction: float = 0.0
) -> tuple[Path | str, float] | None:
    """(shard set to read, key fraction) for validation, or None when none is configured.

    fraction 0 means "every sample of that shard set"; > 0 means "only the held-out keys"."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise EdiffError(f"data.val_fraction must lie in [0, 1), got {val_fraction}")
    if val_root:
        path = _place(val_root)
        read_manifest(path)  # a clear error when it is not a shard set
        return path, 0.0
    if val_fraction > 0:
        return _place(root), float(val_fraction)
    name = read_manifest(root).get("validation")
    return (_place(root, name), 0.0) if name else None


def read_records(
    root: str | os.PathLike, fraction: float = 0.0, limit: int | None = None
) -> list[dict[str, Any]]:
    """Samples of a shard set as {key, image (uint8 HxWx3 as stored), caption, meta}, in
    shard order; with `fraction` > 0 only the key-hash held-out ones."""

    out: list[dict[str, Any]] = []

    def add(sample: dict[str, Any]) -> None:
        if fraction and not in_holdout(sample["__key__"], fraction):
            return
        data = sample.get("png", sample.get("jpg"))
        if data is None:
            return
        with Image.open(io.BytesIO(bytes(data))) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        out.append(
            {
                "key": sample["__key__"],
                "image": image,
                "caption": bytes(sample.get("txt", b"")).decode("utf-8", "replace"),
                "meta": json.loads(bytes(sample.get("json", b"{}")) or b"{}"),
            }
        )

    for name in sorted(read_manifest(root).get("shards") or {}):
        current: dict[str, Any] = {}
        where = _place(root, name)
        source = read_bytes(where) if isinstance(where, str) else where
        for fname, data in tar_members(source):
            key, ext = split_key(fname)
            if key is None:
                continue
            if current and key != current["__key__"]:
                add(current)
                current = {}
            current.setdefault("__key__", key)
            current[ext.lower()] = data
        if current:
            add(current)
        if limit is not None and len(out) >= limit:
            return out[:limit]
    if not out:
        raise EdiffError(f"no held-out samples found in {root}")
    return out


def stack_images(records: list[dict[str, Any]]) -> np.ndarray:
    """uint8 [N,H,W,3] from records; every image must have the same size."""
    sizes = {r["image"].shape for r in records}
    if len(sizes) != 1:
        raise EdiffError(f"held-out images differ in size: {sorted(sizes)[:3]}")
    return np.stack([r["image"] for r in records])
