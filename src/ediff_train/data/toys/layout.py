"""The layout set: two real digits side by side, so composition and paint-with-words can be shown
on a CPU.

Each 16×16 image holds two of scikit-learn's 8×8 scans at native resolution, one in the left half
and one in the right (rows 4–11), on black. Half of the captions say where each digit is ("a 3 on
the left and a 7 on the right", either order of mention); the other half only name them ("a 3
and a 7", either order), so a model must place those itself — and paint-with-words can tell it
where. The text is embedded with the digits build's trained encoders (data/align.py), which are
copied next to these shards; the held-out split lives in val/ as for digits.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from ediff_train.data.toys.digits import (
    VAL_DIR,
    build_digits,
    is_built,
    lock,
    one_thread,
    split_indices,
    write_split,
)
from ediff_train.nn.encoders import Encoders

LAYOUT_VERSION = 1
SIZE = 16


def layout_sample(
    rng: np.random.Generator, grey: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, int, int, str]:
    """One canvas [16,16] uint8, its left and right digits, and its caption."""
    i, j = rng.integers(0, len(labels), 2)
    canvas = np.zeros((SIZE, SIZE), np.uint8)
    canvas[4:12, 0:8], canvas[4:12, 8:16] = grey[i], grey[j]
    a, b = int(labels[i]), int(labels[j])
    if rng.random() < 0.5:
        text = (
            f"a {a} on the left and a {b} on the right"
            if rng.random() < 0.5
            else f"a {b} on the right and a {a} on the left"
        )
    else:
        text = f"a {a} and a {b}" if rng.random() < 0.5 else f"a {b} and a {a}"
    return canvas, a, b, text


def build_layout(
    root: str | os.PathLike,
    samples: int = 4000,
    seed: int = 0,
    val_size: int = 400,
    samples_per_shard: int = 256,
    encoders_from: str | os.PathLike | None = None,
) -> Path:
    """Build (or find cached) the layout shard set at `root`. `encoders_from`: a digits build
    whose trained encoders embed the captions (default: the digits16 build next to `root`)."""
    from sklearn.datasets import load_digits

    root = Path(root).absolute()
    params = {
        "image_size": SIZE,
        "seed": int(seed),
        "samples": int(samples),
        "val_size": int(val_size),
        "samples_per_shard": int(samples_per_shard),
        "version": LAYOUT_VERSION,
    }
    if is_built(root, params, dataset="layout"):
        return root
    digits_root = Path(encoders_from) if encoders_from else root.parent / "digits16"
    build_digits(digits_root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with lock(root.parent / f".{root.name}.lock"):
        if is_built(root, params, dataset="layout"):
            return root
        data = load_digits()
        grey = np.clip(np.rint(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        rng = np.random.default_rng(seed)
        made = [layout_sample(rng, grey, data.target) for _ in range(samples)]
        images = np.stack([np.repeat(m[0][:, :, None], 3, axis=2) for m in made])
        labels = np.array([10 * m[1] + m[2] for m in made])  # left digit·10 + right digit
        captions = [m[3] for m in made]
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        train, val = split_indices(samples, seed, val_size)
        tmp = root.parent / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            enc = Encoders.load(digits_root / "encoders")
            shutil.copytree(digits_root / "encoders", tmp / "encoders")
            with one_thread():
                write_split(
                    tmp,
                    enc,
                    train,
                    images,
                    pixels,
                    labels,
                    captions,
                    params,
                    dataset="layout",
                    validation=VAL_DIR,
                )
                write_split(
                    tmp / VAL_DIR,
                    enc,
                    val,
                    images,
                    pixels,
                    labels,
                    captions,
                    params,
                    dataset="layout",
                    split="val",
                )
            if root.exists():
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
