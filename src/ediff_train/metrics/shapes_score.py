"""What a folder of generated shapes is worth: exact caption accuracy and shapes-FID.

The scorer reads each image back into a scene (metrics/shapes_reader.py) and checks the claims
stored beside its caption (data/toys/shapes_scene.score_claims): accuracy per attribute
(colour, shape, size, position, count, relation: each over the captions that make that claim),
per wording, and for the whole caption (every claim held). shapes-FID is the Fréchet distance
between the reader's 128-d features of the samples and of the held-out renders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ediff_train.data.heldout import read_records, stack_images
from ediff_train.data.toys.shapes import check_heldout, shapes_params
from ediff_train.data.toys.shapes_scene import ATTRIBUTES, Obj, score_claims
from ediff_train.errors import EdiffError
from ediff_train.metrics.captions import Item
from ediff_train.metrics.fid import FeatureStats, fid_from_stats
from ediff_train.metrics.generation import image_path, load_images
from ediff_train.metrics.shapes_reader import as_tensor, load_or_train_reader

CHUNK = 256


def accuracy_table(claims: Sequence[dict[str, Any]], seen: Sequence[list[Obj]]) -> dict[str, Any]:
    """Per attribute, per wording and whole-caption accuracy of scenes `seen` against their
    captions' `claims` (each attribute over the captions that claim it)."""
    hits: dict[str, list[int]] = {a: [] for a in (*ATTRIBUTES, "caption")}
    wording: dict[str, list[int]] = {}
    for c, s in zip(claims, seen):
        ok = score_claims(c, s)
        for k, v in ok.items():
            if v is not None:
                hits[k].append(int(v))
        wording.setdefault(c["wording"], []).append(int(bool(ok["caption"])))

    def mean(v: list[int]) -> float | None:
        return round(sum(v) / len(v), 4) if v else None

    return {
        "caption_accuracy": mean(hits["caption"]),
        "attribute_accuracy": {a: mean(hits[a]) for a in ATTRIBUTES},
        "wording_accuracy": {w: mean(v) for w, v in sorted(wording.items())},
    }


class ShapesScorer:
    """Whole-caption accuracy (the toy CLIP score) and shapes-FID (the toy FID)."""

    x_key, y_key = "shapes_fid", "caption_accuracy"
    x_label, y_label = "shapes-FID (reader features) ↓", "whole-caption accuracy ↑"

    def __init__(
        self, data_root: str | os.PathLike, val_root: str | os.PathLike, reader_steps: int = 600
    ) -> None:
        check_heldout(data_root, val_root)
        self.model, self.info = load_or_train_reader(
            data_root, shapes_params(data_root), reader_steps
        )
        real = as_tensor(stack_images(read_records(val_root)))
        self.reference = FeatureStats(meta={"images": len(real)}).update(self._features(real))
        train = as_tensor(stack_images(read_records(data_root, limit=len(real))))
        self.info["shapes_fid_real_train_vs_heldout"] = round(
            fid_from_stats(FeatureStats().update(self._features(train)), self.reference), 3
        )
        acc = self.info["heldout_accuracy"]
        self.name = (
            f"shapes reader (held-out renders: scene {acc['scene']:.4f}, shape "
            f"{acc['shape']:.4f}, colour {acc['colour']:.4f}), 128-d features; "
            f"reference = {len(real)} held-out renders"
        )

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.model.features(images[i : i + 512]) for i in range(0, len(images), 512)]
        )

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[list[Obj]]:
        return self.model.read(images)

    @torch.no_grad()
    def score(self, folder: str | os.PathLike, items: Sequence[Item]) -> dict[str, Any]:
        if any(it.claims is None for it in items):
            raise EdiffError("shapes scoring needs captions with claims (captions.source=shapes)")
        stats = FeatureStats()
        seen: list[list[Obj]] = []
        for i in range(0, len(items), CHUNK):
            images = load_images([image_path(folder, it) for it in items[i : i + CHUNK]])
            feats = self.model.features(images)
            stats.update(feats)
            from_feats = self.model.cells(feats)
            seen.extend(self.model.decode(from_feats))
        table = accuracy_table([it.claims for it in items], seen)  # type: ignore[misc]
        return {
            **table,
            "shapes_fid": round(fid_from_stats(stats, self.reference), 3),
            "images": len(items),
        }
