"""Scorers: what a folder of generated images is worth, for one caption set.

- `DigitsScorer` (the embedded data): prompt accuracy and digits-FID from the cached digit
  classifier (metrics/digits.py), against the held-out real digits.
- `RealScorer` (real data): FID with the standard Inception features against a reference set
  (statistics cached per reference set and extractor) and CLIP score with open_clip.

Both stream images from disk in chunks, so 30K images never sit in memory at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ediff_train.data.heldout import read_records
from ediff_train.errors import EdiffError
from ediff_train.metrics.captions import Item
from ediff_train.metrics.clip_score import CLIPScorer
from ediff_train.metrics.digits import caption_wording, load_or_train, records_tensor
from ediff_train.metrics.fid import FeatureStats, cached_stats, fid_from_stats, stats_key
from ediff_train.metrics.generation import image_path, load_images
from ediff_train.metrics.inception import InceptionFeatures

CHUNK = 256
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EdiffError(f"reference folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise EdiffError(f"reference folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
    return files


class DigitsScorer:
    """Prompt accuracy (the toy CLIP score) and digits-FID (the toy FID)."""

    x_key, y_key = "digits_fid", "prompt_accuracy"
    x_label, y_label = "digits-FID (classifier features) ↓", "prompt accuracy ↑"

    def __init__(
        self,
        data_root: str | os.PathLike,
        val_root: str | os.PathLike,
        classifier_steps: int = 400,
        seed: int = 0,
    ) -> None:

        self.model, self.info = load_or_train(data_root, val_root, classifier_steps, seed)
        real, _ = records_tensor(read_records(val_root))
        self.reference = FeatureStats(meta={"images": len(real)}).update(self._features(real))
        # the floor: as many real *training* digits as the reference holds, scored the same way
        train, _ = records_tensor(read_records(data_root, limit=len(real)))
        self.info["digits_fid_real_train_vs_heldout"] = round(
            fid_from_stats(FeatureStats().update(self._features(train)), self.reference), 3
        )
        self.name = (
            f"digit classifier (held-out accuracy {self.info['heldout_accuracy']:.4f}),"
            f" 64-d features; reference = {len(real)} held-out real digits"
        )

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        return torch.cat(
            [self.model.features(images[i : i + 512]) for i in range(0, len(images), 512)]
        )

    @torch.no_grad()
    def score(self, folder: str | os.PathLike, items: Sequence[Item]) -> dict[str, Any]:

        stats = FeatureStats()
        right = torch.zeros(10)
        total = torch.zeros(10)
        by_wording: dict[str, list[int]] = {}
        for i in range(0, len(items), CHUNK):
            chunk = items[i : i + CHUNK]
            images = load_images([image_path(folder, it) for it in chunk])
            feats = self.model.features(images)
            stats.update(feats)
            guess = self.model.head(feats).argmax(1)
            want = torch.tensor([-1 if it.digit is None else it.digit for it in chunk])
            known = want >= 0
            for it, ok in zip(chunk, (guess == want).tolist()):
                if it.digit is not None:
                    by_wording.setdefault(caption_wording(it.caption), []).append(int(ok))
            total += torch.bincount(want[known], minlength=10).float()
            right += torch.bincount(want[known & (guess == want)], minlength=10).float()
        per = {str(d): round(float(right[d] / total[d]), 4) for d in range(10) if total[d] > 0}
        return {
            "prompt_accuracy": round(float(right.sum() / total.sum().clamp(min=1)), 4),
            "prompt_accuracy_per_digit": per,
            "prompt_accuracy_per_wording": {
                w: round(sum(v) / len(v), 4) for w, v in by_wording.items()
            },
            "digits_fid": round(fid_from_stats(stats, self.reference), 3),
            "images": len(items),
        }


class RealScorer:
    """FID (Inception, local weights) and CLIP score (open_clip, local checkpoint)."""

    x_key, y_key = "fid", "clip_score"
    x_label, y_label = "FID ↓", "CLIP score ↑"

    def __init__(
        self,
        inception_weights: str | None,
        clip_model: str,
        clip_checkpoint: str | None,
        reference: Sequence[str | os.PathLike],
        reference_size: int,
        cache_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
    ) -> None:

        self.device = torch.device(device)
        self.inception = InceptionFeatures(inception_weights).to(self.device).eval()
        self.clip = CLIPScorer(clip_model, clip_checkpoint, device=self.device)
        key = stats_key(f"{self.inception.name}@{reference_size}", [str(p) for p in reference])
        path = Path(cache_dir) / "fid_stats" / f"{key}.npz"
        self.reference = cached_stats(path, lambda: self._stats(reference, reference_size))
        self.name = (
            f"FID: {self.inception.name}, reference {self.reference.count} images "
            f"resized/centre-cropped to {reference_size}; CLIP score: {self.clip.name}, "
            "100·max(cos, 0)"
        )

    @torch.no_grad()
    def _stats(self, paths: Sequence[str | os.PathLike], size: int | None) -> FeatureStats:
        stats = FeatureStats(meta={"images": len(paths)})
        for i in range(0, len(paths), CHUNK):
            images = load_images(paths[i : i + CHUNK], size)
            stats.update(self.inception(images.to(self.device)).cpu())
        return stats

    @torch.no_grad()
    def score(self, folder: str | os.PathLike, items: Sequence[Item]) -> dict[str, Any]:
        paths = [image_path(folder, it) for it in items]
        stats = self._stats(paths, None)
        scores: list[Tensor] = []
        for i in range(0, len(items), CHUNK):
            images = load_images(paths[i : i + CHUNK])
            scores.append(self.clip.score(images, [it.caption for it in items[i : i + CHUNK]]))
        return {
            "fid": round(fid_from_stats(stats, self.reference), 3),
            "clip_score": round(float(torch.cat(scores).mean()), 3),
            "images": len(items),
        }
