"""The shapes benchmark's exact scorer: a small CNN that reads an image back into its scene.

It is trained on fresh renders only (its own stream of indices, never the training or held-out
images), with their known scenes as labels, for as many batches as it needs: the renderer is
unlimited. For each of the 9 grid cells it predicts whether an object is there and, if one is,
its shape, colour and size; the scene read off those is what `score_claims` checks a caption
against. Its 128-d penultimate features give shapes-FID. It is cached next to the shard set it
belongs to, with the build's fingerprint, so a scorer of another build is refused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ediff_train.data.toys.shapes_render import draw_many
from ediff_train.data.toys.shapes_scene import COLOURS, SHAPES, SIZES, Obj
from ediff_train.errors import EdiffError
from ediff_train.io.files import save_safetensors

READER_VERSION = 1
FEATURES = 128
CELL_OUT = 1 + len(SHAPES) + len(COLOURS) + len(SIZES)  # occupancy logit, then the three
SCORER_STREAM = 2  # render stream for the scorer's training batches (0: train, 1: held out)
CHECK_STREAM = 3  # and for its own held-out check


class ShapesReader(nn.Module):
    """Conv blocks (24, 48, 48, 64 channels) to a 4×4 map, 128-d features,
    then for each of the 9 cells: occupied, shape, colour, size."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, 24),
            nn.MaxPool2d(2),
            *block(24, 48),
            *block(48, 48),
            nn.MaxPool2d(2),
            *block(48, 64),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, FEATURES),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURES, 9 * CELL_OUT)

    def prepare(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] → [B,3,size,size] in [-1,1]."""
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return x * 2 - 1

    def features(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images))

    def cells(self, feats: Tensor) -> Tensor:
        """[B, 9, CELL_OUT] logits."""
        return self.head(feats).view(-1, 9, CELL_OUT)

    @torch.no_grad()
    def read(self, images: Tensor) -> list[list[Obj]]:
        """The scene in each image: an object in every cell whose occupancy logit is > 0."""
        return self.decode(
            torch.cat(
                [self.cells(self.features(images[i : i + 512])) for i in range(0, len(images), 512)]
            )
        )

    @staticmethod
    def decode(logits: Tensor) -> list[list[Obj]]:
        return [decode_cells(row) for row in logits]


def decode_cells(logits: Tensor) -> list[Obj]:
    """[9, CELL_OUT] → objects, in cell order."""
    s0, c0, z0 = 1, 1 + len(SHAPES), 1 + len(SHAPES) + len(COLOURS)
    objs = []
    for cell in range(9):
        row = logits[cell]
        if row[0] > 0:
            objs.append(
                Obj(
                    int(row[s0:c0].argmax()), int(row[c0:z0].argmax()), int(row[z0:].argmax()), cell
                )
            )
    return objs


def cell_targets(scenes: list[list[Obj]]) -> Tensor:
    """[B, 9, 4] long: occupied (0/1), shape, colour, size (−100 where the cell is empty)."""
    t = torch.full((len(scenes), 9, 4), -100, dtype=torch.long)
    t[:, :, 0] = 0
    for b, scene in enumerate(scenes):
        for o in scene:
            t[b, o.cell] = torch.tensor([1, o.shape, o.colour, o.size])
    return t


def reader_loss(logits: Tensor, target: Tensor) -> Tensor:
    s0, c0, z0 = 1, 1 + len(SHAPES), 1 + len(SHAPES) + len(COLOURS)
    occ = F.binary_cross_entropy_with_logits(logits[..., 0], target[..., 0].float())
    parts = [(logits[..., s0:c0], 1), (logits[..., c0:z0], 2), (logits[..., z0:], 3)]
    rest = sum(F.cross_entropy(lg.flatten(0, 1), target[..., k].flatten()) for lg, k in parts)
    return occ + rest


def renders(seed: int, stream: int, start: int, count: int, size: int) -> tuple[Tensor, list]:
    scenes, images = draw_many(seed, stream, start, count, size)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, scenes


def train_reader(
    seed: int, size: int, steps: int = 600, batch: int = 64, lr: float = 3e-3
) -> ShapesReader:
    """Fit on fresh renders of the scorer's own stream; light pixel noise on half of each
    batch, so that a sample a little off the render manifold is still read."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesReader(size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in range(steps):
        x, scenes = renders(seed, SCORER_STREAM, step * batch, batch, size)
        half = batch // 2
        x[:half] = (x[:half] + 0.03 * torch.randn(x[:half].shape, generator=gen)).clamp(0, 1)
        loss = reader_loss(model.cells(model.features(x)), cell_targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


def reader_accuracy(model: ShapesReader, seed: int, size: int, n: int = 2000) -> dict[str, float]:
    """Per attribute, on n renders of the check stream (never trained on): occupancy of every
    cell, and shape/colour/size of each object; the whole scene read right."""
    x, scenes = renders(seed, CHECK_STREAM, 0, n, size)
    seen = model.read(x)
    right = {"cells": 0, "shape": 0, "colour": 0, "size": 0, "scene": 0}
    objects = 0
    for want, got in zip(scenes, seen):
        by_cell = {o.cell: o for o in got}
        right["cells"] += sum((c in by_cell) == any(o.cell == c for o in want) for c in range(9))
        for o in want:
            objects += 1
            g = by_cell.get(o.cell)
            for k in ("shape", "colour", "size"):
                right[k] += int(g is not None and getattr(g, k) == getattr(o, k))
        right["scene"] += int(
            sorted(got, key=lambda o: o.cell) == sorted(want, key=lambda o: o.cell)
        )
    return {
        "cells": round(right["cells"] / (9 * n), 4),
        **{k: round(right[k] / objects, 4) for k in ("shape", "colour", "size")},
        "scene": round(right["scene"] / n, 4),
        "renders": n,
    }


def load_or_train_reader(
    data_root: str | os.PathLike, fingerprint: dict[str, Any], steps: int = 600
) -> tuple[ShapesReader, dict[str, Any]]:
    """The reader cached in <data_root>/scorer (trained on first use) and its report; one line
    when the cached one belongs to another build."""
    folder = Path(data_root) / "scorer"
    info_path, weights = folder / "scorer.json", folder / "scorer.safetensors"
    size, seed = int(fingerprint["image_size"]), int(fingerprint["seed"])
    want = {"version": READER_VERSION, "steps": int(steps), "build": fingerprint}
    if info_path.is_file() and weights.is_file():
        info = json.loads(info_path.read_text())
        if info.get("build") != fingerprint:
            raise EdiffError(
                f"the shapes scorer in {folder} belongs to another build ({info.get('build')}); "
                f"delete {folder} to train one for this build"
            )
        if {k: info.get(k) for k in want} == want:
            model = ShapesReader(size)
            model.load_state_dict(load_file(str(weights)))
            return model.eval().requires_grad_(False), info
    start = time.perf_counter()
    model = train_reader(seed, size, steps)
    info = {
        **want,
        "heldout_accuracy": reader_accuracy(model, seed, size),
        "seconds": round(time.perf_counter() - start, 1),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(weights, {k: v.contiguous() for k, v in model.state_dict().items()})
    tmp = folder / f".info.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, info_path)
    return model, info


def as_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
