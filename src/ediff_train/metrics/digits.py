"""The digits analogues of CLIP score and FID, for the embedded data (no Inception or CLIP needed).

A small CNN is trained once on the digits' *training* split and cached next to the data; its
accuracy on the held-out split (which neither it nor any denoiser saw) is reported with every
figure. It gives:
- prompt accuracy: the fraction of samples classified as the digit their prompt names (the toy
  CLIP score: does the image follow the text?);
- digits-FID: the Fréchet distance between samples and real held-out digits in the classifier's
  64-d penultimate features (the toy FID: do the images look like real digits?).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ediff_train.data.heldout import read_records, stack_images, validation_source
from ediff_train.data.manifest import read_manifest
from ediff_train.errors import EdiffError
from ediff_train.io.files import save_safetensors

CLASSIFIER_VERSION = 2
FEATURES = 64
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT = re.compile(r"\b([0-9])\b|\b(" + "|".join(_WORDS) + r")\b")


def prompt_digit(caption: str) -> int | None:
    """The digit a caption names ("the number 3", "a handwritten three"), or None."""
    m = _DIGIT.search(caption.lower())
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) is not None else _WORDS.index(m.group(2))


def caption_wording(caption: str) -> str:
    """The wording with its digit replaced by N ("the number N"), to report accuracy per wording."""
    return _DIGIT.sub("N", caption.lower())


class DigitClassifier(nn.Module):
    """Three conv blocks → 64-d features → 10 logits, on images resized to 16×16 grey."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.SiLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, FEATURES),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def prepare(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] → [B,1,size,size] in [-1,1]."""
        x = images.float().mean(1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return x * 2 - 1

    def features(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random ±1 px translations: handwriting is never centred exactly."""
    pad = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_classifier(
    images: Tensor, labels: Tensor, steps: int = 400, batch: int = 64, seed: int = 0, size: int = 16
) -> DigitClassifier:
    """Fit on [N,3,H,W] images in [0,1] with their labels (AdamW, cosine lr)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(labels), (batch,), generator=gen)
        loss = F.cross_entropy(model(_shift(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    pred = torch.cat([model(images[i : i + 512]).argmax(1) for i in range(0, len(images), 512)])
    return float((pred == labels).float().mean())


def records_tensor(records: list[dict[str, Any]]) -> tuple[Tensor, Tensor]:

    x = torch.from_numpy(stack_images(records)).permute(0, 3, 1, 2).float() / 255.0
    labels = [r["meta"].get("label", prompt_digit(r["caption"])) for r in records]
    if any(label is None for label in labels):
        raise EdiffError("digit labels missing from the shards' json (not a digits build?)")
    return x, torch.tensor(labels, dtype=torch.long)


def load_or_train(
    data_root: str | os.PathLike,
    val_root: str | os.PathLike,
    steps: int = 400,
    seed: int = 0,
    size: int = 16,
) -> tuple[DigitClassifier, dict[str, Any]]:
    """The cached classifier of a digits build (trained on first use), and its report.
    `size`: the resolution it looks at (images are resized to it); the SR evaluation uses the
    stage's own size, so sharpness a 16 px view would average away counts."""

    folder = Path(data_root) / ("classifier" if size == 16 else f"classifier{size}")
    info_path, weights = folder / "classifier.json", folder / "classifier.safetensors"
    want = {"version": CLASSIFIER_VERSION, "steps": steps, "seed": seed}
    if info_path.is_file() and weights.is_file():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in want} == want:
            model = DigitClassifier(size)
            model.load_state_dict(load_file(str(weights)))
            return model.eval().requires_grad_(False), info
    start = time.perf_counter()
    x_train, y_train = records_tensor(read_records(data_root))
    x_val, y_val = records_tensor(read_records(val_root))
    model = train_classifier(x_train, y_train, steps=steps, seed=seed, size=size)
    info = {
        **want,
        "train_images": len(y_train),
        "heldout_images": len(y_val),
        "heldout_accuracy": round(accuracy(model, x_val, y_val), 4),
        "train_accuracy": round(accuracy(model, x_train, y_train), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(weights, {k: v.contiguous() for k, v in model.state_dict().items()})
    tmp_info = folder / f".info.tmp{os.getpid()}"  # per process: concurrent first uses
    tmp_info.write_text(json.dumps(info, indent=1))
    os.replace(tmp_info, info_path)
    return model, info


def digit_pairs(n: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """n random ordered pairs of different digits."""
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        a, b = torch.randint(0, 10, (2,), generator=generator).tolist()
        if a != b:
            pairs.append((a, b))
    return pairs


def classifier_for(train_cfg: Any, size: int, steps: int) -> DigitClassifier | None:
    """The cached classifier of the digits build a run trained on, looking at `size` px; None
    for other data (or a build without held-out digits)."""

    root = Path(str(train_cfg.data.root))
    if read_manifest(root).get("dataset") != "digits":
        return None
    val = validation_source(root, train_cfg.data.get("val_root"))
    return None if val is None else load_or_train(root, val[0], steps, size=size)[0]
