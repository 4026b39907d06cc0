"""The embedded default dataset: scikit-learn's 1,797 real 8x8 handwritten digits.

Upsampled (bicubic) to `image_size`, drawn as a white digit on black (sklearn's values are ink
intensity, so no inversion), captioned from the label with varied wording, embedded by the tiny
offline encoders and written as ordinary shards, so the default run exercises the same data path
as a real T5/CLIP shard set. Before embedding, the tiny encoders are trained contrastively on the
training split's image–caption pairs (data/align.py), so that "the number 3" and "a handwritten
three" mean the same thing to them, as they would to pretrained T5/CLIP. `val_size` images are
held out in `val/` (a shard set of its own, named in the manifest as "validation"): training
never reads them; evaluation and loss-by-σ do. The build is cached by its parameters and safe
to race: it is made in a temporary folder, renamed into place under a lock, and a complete
build is never rebuilt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ediff_train.data.align import align_encoders
from ediff_train.data.latents import encode_arrays
from ediff_train.data.manifest import MANIFEST, read_manifest
from ediff_train.data.shards import ShardWriter
from ediff_train.data.toys.digits_vae import codec_params, digits_codec
from ediff_train.errors import EdiffError
from ediff_train.nn.encoders import Encoders

DIGITS_VERSION = 3  # bump when images, captions or embeddings change, so caches rebuild
# (3: the encoders' alignment seeded and run to convergence, 600 steps; docs/data.md)
SOURCE = "sklearn.datasets.load_digits"
ENCODER_SEED = 0  # the tiny encoders are the same for every digits build
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "{n}",
    "{w}",
    "the number {n}",
    "the number {w}",
    "the digit {n}",
    "the digit {w}",
    "a handwritten {w}",
    "a handwritten {n}",
    "handwritten digit {n}",
    "a photo of the digit {w}",
    "the digit {n} written by hand",
    "a drawing of the number {w}",
    "a white {w} on a black background",
    "a blurry handwritten {w}",
    "number {w}, written by hand",
)


def digit_captions(digit: int) -> list[str]:
    """Every caption wording used for `digit` (e.g. "the number 3", "a handwritten three")."""
    if not 0 <= int(digit) <= 9:
        raise EdiffError(f"digit must be 0..9, got {digit}")
    return [t.format(n=int(digit), w=WORDS[int(digit)]) for t in TEMPLATES]


def digit_images(image_size: int, stroke: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, S, S, 3] RGB images, int labels [N]) in sklearn's order.

    The 8x8 source is bicubic-upsampled. `stroke` > 0 then sharpens the ink with a logistic
    contrast curve of that slope: the super-resolution toy needs it, since a bicubic 8 px digit
    holds nothing a bicubic up-sampling of its 16 px version lacks (bicubic would be the truth);
    crisp strokes are detail the low-res has lost and an SR stage must restore."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise EdiffError(f"digits image_size must be ≥ 8 (the source is 8x8), got {image_size}")
    data = load_digits()
    grey = np.clip(np.rint(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    out = np.empty((len(grey), image_size, image_size, 3), dtype=np.uint8)
    for i, g in enumerate(grey):
        big = np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BICUBIC))
        if stroke > 0:
            big = _stroke(big, stroke)
        out[i] = big[:, :, None]
    return out, data.target.astype(np.int64)


def _stroke(grey: np.ndarray, slope: float) -> np.ndarray:
    """Logistic contrast curve through (0, 0), (0.5, 0.5), (1, 1) on uint8 ink."""

    def curve(v: np.ndarray | float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-slope * (np.asarray(v, dtype=np.float64) - 0.5)))

    lo, hi = curve(0.0), curve(1.0)
    v = (curve(grey / 255.0) - lo) / (hi - lo)
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)


VAL_DIR = "val"


def _params(
    image_size: int,
    seed: int,
    samples_per_shard: int,
    val_size: int,
    align_steps: int,
    stroke: float = 0.0,
) -> dict[str, int | float]:
    out: dict[str, int | float] = {
        "image_size": int(image_size),
        "seed": int(seed),
        "samples_per_shard": int(samples_per_shard),
        "val_size": int(val_size),
        "align_steps": int(align_steps),
        "version": DIGITS_VERSION,
    }
    if stroke:  # only when set, so builds made before `stroke` existed stay valid
        out["stroke"] = float(stroke)
    return out


def split_indices(n: int, seed: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sklearn indices: a seeded permutation, the first `val_size` held out."""
    if not 0 <= val_size < n:
        raise EdiffError(f"digits val_size must lie in [0, {n - 1}], got {val_size}")
    order = np.random.default_rng([seed, 1]).permutation(n)
    return order[val_size:], order[:val_size]


def is_built(root: str | os.PathLike, params: dict[str, int], dataset: str = "digits") -> bool:
    """A complete build with these parameters: manifest, every shard and the encoders present."""
    root = Path(root)
    if not (root / MANIFEST).is_file() or not (root / "encoders" / "encoders.json").is_file():
        return False
    try:
        manifest = read_manifest(root)
    except EdiffError:
        return False
    if manifest.get("dataset") != dataset or manifest.get("params") != params:
        return False
    if "own_vae" in (params.get("codec") or {}) and not (root / "vae" / "config.json").is_file():
        return False
    sets = [root] + ([root / VAL_DIR] if params["val_size"] else [])
    try:
        return all((r / name).is_file() for r in sets for name in read_manifest(r)["shards"])
    except EdiffError:
        return False


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The tiny encoders gain nothing from intra-op threads, and on a busy 2-core machine
    OpenMP spinning made embedding 5x slower; restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def lock(path: Path) -> Iterator[None]:
    """Exclusive lock so racing processes build once; best effort where flock is unsupported
    (the temp-folder rename keeps a build correct even then)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)


def _write(
    out: Path, params: dict[str, Any], codec_cfg: dict | None = None, final: Path | None = None
) -> None:
    """Build the whole shard set into `out` (a fresh private folder; `final`: where it goes).
    With a VAE codec (`params["codec"]`) every sample also holds its latent (docs/latent.md)."""

    size, seed = params["image_size"], params["seed"]
    images, labels = digit_images(size, float(params.get("stroke", 0.0)))
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(TEMPLATES), size=len(labels))  # by sklearn index
    captions = [TEMPLATES[c].format(n=int(d), w=WORDS[int(d)]) for c, d in zip(choice, labels)]
    train, val = split_indices(len(labels), seed, params["val_size"])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels)

    enc = Encoders.tiny(ENCODER_SEED)
    report = None
    with one_thread():
        if params["align_steps"] > 0:
            holdout = (pixels[val], y[val]) if len(val) else None
            report = align_encoders(
                enc,
                pixels[train],
                y[train],
                [digit_captions(d) for d in range(10)],
                steps=params["align_steps"],
                seed=seed,
                holdout=holdout,
            )
    # Embed with the saved-and-reloaded copy: exactly what sampling will load later.
    enc.save(out / "encoders")
    enc = Encoders.load(out / "encoders")
    extra: dict[str, Any] = {"align": report} if report else {}
    codec = None
    if params.get("codec"):
        codec, vae_record = digits_codec(out, final or out, codec_cfg or {}, params, images[train])
        extra["vae"] = vae_record or {"given": str(codec.path)}
    write_split(
        out,
        enc,
        train,
        images,
        pixels,
        labels,
        captions,
        params,
        validation=VAL_DIR if len(val) else None,
        codec=codec,
        **extra,
    )
    if len(val):
        write_split(
            out / VAL_DIR,
            enc,
            val,
            images,
            pixels,
            labels,
            captions,
            params,
            split="val",
            codec=codec,
        )


def write_split(
    out: Path,
    enc: Any,
    indices: np.ndarray,
    images: np.ndarray,
    pixels: Any,
    labels: np.ndarray,
    captions: list[str],
    params: dict[str, int],
    dataset: str = "digits",
    codec: Any = None,
    **extra: Any,
) -> None:
    """One shard set of the given sklearn indices, shuffled so every shard mixes all digits;
    with a VAE `codec`, each sample's latent too."""
    order = np.random.default_rng([params["seed"], 2, len(indices)]).permutation(indices)
    caps = [captions[i] for i in order]
    unique = sorted(set(caps))  # at most 150 distinct captions: embed each once
    with one_thread():
        emb = enc.encode_text(unique, batch_size=256)
        img = enc.encode_image(pixels[order], batch_size=256)
        latents = encode_arrays(codec, images[order], 256) if codec is not None else None
    row = {c: j for j, c in enumerate(unique)}
    writer = ShardWriter(
        out,
        enc.manifest_entry(),
        image_format="png",
        image_size=params["image_size"],
        samples_per_shard=params["samples_per_shard"],
        codec=codec.spec() if codec is not None else None,
    )
    with writer:
        for j, i in enumerate(order):
            r = row[caps[j]]
            writer.write(
                f"digit{i:04d}",
                images[i],
                caps[j],
                emb["t5"][r],
                emb["clip_txt"][r],
                emb["clip_pool"][r],
                img[j],
                meta={"source": SOURCE, "index": int(i), "label": int(labels[i])},
                latent=latents[j] if latents is not None else None,
            )
    writer.finish(
        created_by=f"ediff_train.data.toys.{dataset}", dataset=dataset, params=params, **extra
    )


def build_digits(
    root: str | os.PathLike,
    image_size: int = 16,
    seed: int = 0,
    samples_per_shard: int = 128,
    val_size: int = 297,
    align_steps: int = 600,
    force: bool = False,
    stroke: float = 0.0,
    codec: dict | None = None,
    vae_steps: int = 300,
) -> Path:
    """Build (or find cached) the digits shard set at `root`; returns `root`.

    `seed` fixes the split, the sample order and each sample's caption wording; `val_size`
    images are held out in `root/val`; `align_steps` trains the tiny encoders on the training
    pairs first (0 = leave them random). `force` rebuilds even when a matching build exists.
    `stroke` renders crisp ink (digit_images), for the super-resolution toy. `codec` (a
    `codec:` config, conf/codec/vae.yaml) adds each sample's VAE latent; with `codec.path` null
    the build trains its own VAE for `vae_steps` steps on the training split, into root/vae."""
    root = Path(root).absolute()
    params: dict[str, Any] = _params(
        image_size, seed, samples_per_shard, val_size, align_steps, stroke
    )
    latent = codec_params(codec, vae_steps)
    if latent is not None:
        params["codec"] = latent
    return build_once(root, params, "digits", lambda tmp: _write(tmp, params, codec, root), force)


def build_once(
    root: Path, params: dict[str, Any], dataset: str, write: Callable[[Path], None], force: bool
) -> Path:
    """A toy set built once, safe to race: `write` fills a private folder, which is renamed
    into place under a lock; a complete build with these params is never rebuilt (unless
    `force`), and a process that waited for another's build uses it."""
    if not force and is_built(root, params, dataset):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with lock(root.parent / f".{root.name}.lock"):
        if not force and is_built(root, params, dataset):
            return root  # another process built it while we waited
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = root.parent / f".{root.name}.building-{tag}"
        old = root.parent / f".{root.name}.old-{tag}"
        try:
            write(tmp)
            if root.exists():
                os.rename(root, old)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return root


def default_root(image_size: int = 16) -> Path:
    """Where conf/data/digits.yaml puts the build: $EDIFF_CACHE or ~/.cache/ediff_train."""
    base = os.environ.get("EDIFF_CACHE") or Path.home() / ".cache" / "ediff_train"
    return Path(base) / f"digits{image_size}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the embedded digits shard set (cached).")
    p.add_argument("--root", type=Path, default=None, help="output folder (default: cache)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--val-size", type=int, default=297, help="images held out in val/")
    p.add_argument(
        "--align-steps",
        type=int,
        default=600,
        help="contrastive steps that give the tiny encoders meaning (0: random)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    p.add_argument(
        "--stroke",
        type=float,
        default=0.0,
        help="crisp-ink contrast slope (the super-resolution toy uses 14; 0: off)",
    )
    p.add_argument("--codec", choices=("pixel", "vae"), default="pixel", help="vae: latents too")
    p.add_argument("--vae-path", default=None, help="codec vae: a diffusers AutoencoderKL folder")
    p.add_argument("--vae-steps", type=int, default=300, help="codec vae without --vae-path")
    a = p.parse_args(argv)
    start = time.perf_counter()
    codec = {"_target_": "ediff_train.nn.codec.VAECodec", "path": a.vae_path}
    suffix = "_vae" if a.codec == "vae" else ""  # conf/codec/vae.yaml's data_suffix
    try:
        root = build_digits(
            a.root or default_root(a.image_size).with_name(f"digits{a.image_size}{suffix}"),
            a.image_size,
            a.seed,
            a.samples_per_shard,
            a.val_size,
            a.align_steps,
            a.force,
            a.stroke,
            codec if a.codec == "vae" else None,
            a.vae_steps,
        )
    except EdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(build_summary(root, time.perf_counter() - start))
    return 0


def build_summary(root: Path, seconds: float) -> str:
    """The one line a toy-set build command prints: what it holds and how long it took."""
    m = read_manifest(root)
    held = read_manifest(root / VAL_DIR)["num_samples"] if m.get("validation") else 0
    return (
        f"{root}: {m['num_samples']} training samples in {len(m['shards'])} shards, {held} "
        f"held out ({seconds:.1f} s); encoders: {m.get('align')}"
    )


if __name__ == "__main__":
    sys.exit(main())
