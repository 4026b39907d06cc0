"""The captioned shapes benchmark: compositional scenes rendered from a seed, as a shard set.

Where the digits are solved by the default net, this set leaves room: 1–3 objects of 4 shapes,
6 colours, 2 sizes in 9 cells on varied backgrounds, captioned in five wordings (attributes,
colours, positions, a relation, counts). Image i of the training set is drawn from
(seed, 0, i), image j of the held-out set from (seed, 1, j): the two streams never share an
index, so the held-out scenes were never trained on. Beside each caption the shard's json
holds its scene and its claims (shapes_scene.caption), which metric=shapes checks against what
the exact scorer (metrics/shapes_reader.py) reads in a generated image.

The tiny encoders are the digits' ones, aligned contrastively on the training pairs
(data/align.align_pairs) and saved beside the shards. The build is written to a private folder
and renamed into place under a lock, like the digits', and never rebuilt when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ediff_train.data.align import align_pairs
from ediff_train.data.manifest import read_manifest
from ediff_train.data.shards import ShardWriter
from ediff_train.data.toys.digits import (
    ENCODER_SEED,
    VAL_DIR,
    build_once,
    build_summary,
    one_thread,
)
from ediff_train.data.toys.shapes_render import render, scene_rng
from ediff_train.data.toys.shapes_scene import (
    Obj,
    caption,
    sample_scene,
    scene_json,
    vocabulary,
    wordings_for,
)
from ediff_train.errors import EdiffError
from ediff_train.nn.encoders import Encoders

SHAPES_VERSION = 1  # bump when scenes, renders, captions or embeddings change
DATASET = "shapes"
SOURCE = "ediff_train.data.toys.shapes (procedural)"
T5_MAX_LENGTH = 128  # bytes: the longest caption is 118 characters
TRAIN_STREAM, VAL_STREAM = 0, 1
CHUNK = 4096  # images rendered, embedded and written at a time
ALIGN_BATCH = 32  # pairs per alignment step (T5 over ~80 bytes a caption is the cost)


def params_of(
    image_size: int,
    seed: int,
    train_size: int,
    val_size: int,
    samples_per_shard: int,
    align_steps: int,
) -> dict[str, Any]:
    """The build's identity: the manifest stores it, the scorer's fingerprint is it."""
    if image_size < 24:
        raise EdiffError(f"shapes image_size must be ≥ 24 (9 cells of objects), got {image_size}")
    if train_size < 1 or val_size < 0:
        raise EdiffError(
            f"shapes train_size must be ≥ 1 and val_size ≥ 0: {train_size}, {val_size}"
        )
    return {
        "image_size": int(image_size),
        "seed": int(seed),
        "train_size": int(train_size),
        "val_size": int(val_size),
        "samples_per_shard": int(samples_per_shard),
        "align_steps": int(align_steps),
        "version": SHAPES_VERSION,
    }


def sample(
    seed: int, stream: int, index: int, size: int
) -> tuple[list[Obj], np.ndarray, str, dict[str, Any]]:
    """(scene, uint8 image, caption, claims) of one index: everything from (seed, stream,
    index); the wording is drawn after the render from the same generator."""
    rng = scene_rng(seed, stream, index)
    scene = sample_scene(rng)
    image = render(scene, size, rng)
    options = wordings_for(scene)
    text, claims = caption(scene, options[int(rng.integers(len(options)))])
    return scene, image, text, claims


def samples(
    seed: int, stream: int, start: int, count: int, size: int
) -> tuple[list[list[Obj]], np.ndarray, list[str], list[dict[str, Any]]]:
    scenes, texts, claims = [], [], []
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    for k in range(count):
        s, images[k], t, c = sample(seed, stream, start + k, size)
        scenes.append(s)
        texts.append(t)
        claims.append(c)
    return scenes, images, texts, claims


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _write_split(
    out: Path, enc: Encoders, params: dict[str, Any], stream: int, count: int, **extra: Any
) -> None:
    size, seed = params["image_size"], params["seed"]
    split = "train" if stream == TRAIN_STREAM else "val"
    writer = ShardWriter(
        out,
        enc.manifest_entry(),
        image_format="png",
        image_size=size,
        samples_per_shard=params["samples_per_shard"],
    )
    with writer:
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            scenes, images, texts, claims = samples(seed, stream, start, n, size)
            unique = sorted(set(texts))
            emb = enc.encode_text(unique, batch_size=512)
            img = enc.encode_image(_pixels(images), batch_size=512)
            row = {c: j for j, c in enumerate(unique)}
            for k in range(n):
                r = row[texts[k]]
                writer.write(
                    f"shapes-{split}-{start + k:07d}",
                    images[k],
                    texts[k],
                    emb["t5"][r],
                    emb["clip_txt"][r],
                    emb["clip_pool"][r],
                    img[k],
                    meta={
                        "source": SOURCE,
                        "stream": stream,
                        "index": start + k,
                        "scene": scene_json(scenes[k]),
                        "claims": claims[k],
                    },
                )
    writer.finish(
        created_by="ediff_train.data.toys.shapes",
        dataset=DATASET,
        params=params,
        split=split,
        stream=stream,
        vocabulary=sorted(vocabulary()),
        **extra,
    )


def _write(out: Path, params: dict[str, Any]) -> None:
    """One thread throughout: the tiny encoders gain nothing from more, and on a busy machine
    OpenMP's spinning threads made alignment 9x costlier (as for the digits)."""
    with one_thread():
        _write_all(out, params)


def _write_all(out: Path, params: dict[str, Any]) -> None:
    size, seed = params["image_size"], params["seed"]
    enc = Encoders.tiny(ENCODER_SEED, t5_max_length=T5_MAX_LENGTH)
    enc.restrict_to(sorted(vocabulary()))
    report = None
    if params["align_steps"] > 0:
        n = min(params["train_size"], 20000)  # alignment pairs: the first training images
        _, images, texts, _ = samples(seed, TRAIN_STREAM, 0, n, size)
        held = min(params["val_size"], 512)
        holdout = None
        if held >= 32:
            _, vimg, vtxt, _ = samples(seed, VAL_STREAM, 0, held, size)
            holdout = (_pixels(vimg), vtxt)
        report = align_pairs(
            enc,
            _pixels(images),
            texts,
            steps=params["align_steps"],
            batch=ALIGN_BATCH,
            seed=seed,
            holdout=holdout,
        )
    enc.save(out / "encoders")
    enc = Encoders.load(out / "encoders")  # embed with what sampling will load
    extra: dict[str, Any] = {"align": report} if report else {}
    has_val = params["val_size"] > 0
    _write_split(
        out,
        enc,
        params,
        TRAIN_STREAM,
        params["train_size"],
        validation=VAL_DIR if has_val else None,
        **extra,
    )
    if has_val:
        _write_split(out / VAL_DIR, enc, params, VAL_STREAM, params["val_size"])


def build_shapes(
    root: str | os.PathLike,
    image_size: int = 32,
    seed: int = 0,
    train_size: int = 100_000,
    val_size: int = 2000,
    samples_per_shard: int = 2000,
    align_steps: int = 400,
    force: bool = False,
) -> Path:
    """Build (or find cached) the shapes shard set at `root`; returns `root`.

    `train_size` training images (stream 0) and `val_size` held-out ones (stream 1, in
    root/val); `align_steps` of contrastive alignment of the tiny encoders first."""
    root = Path(root).absolute()
    params = params_of(image_size, seed, train_size, val_size, samples_per_shard, align_steps)
    return build_once(root, params, DATASET, lambda tmp: _write(tmp, params), force)


def shapes_params(root: str | os.PathLike) -> dict[str, Any]:
    """The build parameters of a shapes shard set; one line when `root` is not one."""
    manifest = read_manifest(root)
    if manifest.get("dataset") != DATASET:
        raise EdiffError(
            f"{root} is not a shapes build (dataset {manifest.get('dataset')!r}); "
            "train with data=shapes or point data.root at an ediff-shapes folder"
        )
    return dict(manifest["params"])


def is_shapes(root: str | os.PathLike) -> bool:
    """Whether `root` is a shapes build (False for any other or an unreadable manifest)."""
    try:
        return read_manifest(root).get("dataset") == DATASET
    except EdiffError:
        return False


def check_heldout(root: str | os.PathLike, val_root: str | os.PathLike) -> None:
    """A held-out set must come from the held-out stream of the same build: one line if it
    overlaps training (the training shards themselves, or another seed's)."""
    train, val = read_manifest(root), read_manifest(val_root)
    if val.get("dataset") != DATASET or val.get("stream") != VAL_STREAM:
        raise EdiffError(
            f"held-out set {val_root} is not a shapes held-out stream (it would overlap "
            f"training); use the build's own {VAL_DIR}/ (data.val_root=null)"
        )
    if val.get("params") != train.get("params"):
        raise EdiffError(
            f"held-out set {val_root} belongs to another shapes build than {root}; "
            f"use the build's own {VAL_DIR}/ (data.val_root=null)"
        )


def default_root(image_size: int = 32) -> Path:
    base = os.environ.get("EDIFF_CACHE") or Path.home() / ".cache" / "ediff_train"
    return Path(base) / f"shapes{image_size}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the captioned shapes shard set (cached).")
    p.add_argument("--root", type=Path, default=None, help="output folder (default: cache)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--val-size", type=int, default=2000, help="held-out images in val/")
    p.add_argument("--samples-per-shard", type=int, default=2000)
    p.add_argument("--align-steps", type=int, default=400)
    p.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        root = build_shapes(
            a.root or default_root(a.image_size),
            a.image_size,
            a.seed,
            a.train_size,
            a.val_size,
            a.samples_per_shard,
            a.align_steps,
            a.force,
        )
    except EdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(build_summary(root, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
