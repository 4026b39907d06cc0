"""Caption sets to evaluate on: the embedded digits prompts, or a COCO-style captions file.

Every item has a stable integer id (its position in the set), which fixes its file name and its
noise seed: a caption gives the same image whatever rank, batch or rerun generates it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ediff_train.data.heldout import read_records
from ediff_train.data.toys.digits import TEMPLATES, WORDS
from ediff_train.errors import EdiffError


@dataclass(frozen=True)
class Item:
    id: int
    caption: str
    digit: int | None = None  # the prompted digit (digits sets only)
    image: str | None = None  # a real image for this caption (COCO-style files), if given
    claims: dict | None = field(default=None, hash=False, compare=False)  # shapes: the label


def digits_items(per_caption: int = 2, templates: str = "all") -> list[Item]:
    """Every digit × wording ("the number 3", "a handwritten three", ...), `per_caption` each.

    templates="plain" keeps only "the number {n}" (the README's prompts)."""

    if per_caption < 1:
        raise EdiffError(f"captions.per_caption must be ≥ 1, got {per_caption}")
    chosen = {"all": TEMPLATES, "plain": ("the number {n}",)}.get(templates)
    if chosen is None:
        raise EdiffError(f"captions.templates must be 'all' or 'plain', got {templates!r}")
    items: list[Item] = []
    for t in chosen:
        for d in range(10):
            for _ in range(per_caption):
                items.append(Item(len(items), t.format(n=d, w=WORDS[d]), digit=d))
    return items


def file_items(path: str | os.PathLike, n: int | None = None, seed: int = 0) -> list[Item]:
    """A jsonl of {"caption": ..., "image": optional path (relative to the file)}, one per line
    (the COCO-2014-val protocol: 30K captions drawn at random; `n` draws them, seeded).
    A bad line stops with its line number; nothing is generated before the file is read."""
    path = Path(path)
    if not path.is_file():
        raise EdiffError(f"captions file {path} does not exist")
    rows: list[tuple[str, str | None]] = []
    with path.open(encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                caption = row["caption"]
                if not isinstance(caption, str) or not caption.strip():
                    raise ValueError("empty caption")
            except (ValueError, KeyError, TypeError) as e:
                raise EdiffError(f'{path}:{no}: not a {{"caption": ...}} json line ({e})') from None
            image = row.get("image")
            rows.append((caption, str(path.parent / image) if image else None))
    if not rows:
        raise EdiffError(f"captions file {path} holds no captions")
    if n is not None and n < len(rows):
        rows = random.Random(seed).sample(rows, int(n))
    return [Item(i, c, image=img) for i, (c, img) in enumerate(rows)]


def shapes_items(val_root: str | os.PathLike, n: int, per_caption: int = 1) -> list[Item]:
    """The first `n` held-out shapes captions with their claims (the structured label stored
    beside each caption: scoring never parses text), `per_caption` images each."""
    if n < 1 or per_caption < 1:
        raise EdiffError(f"shapes captions need n ≥ 1 and per_caption ≥ 1, got {n}, {per_caption}")
    records = read_records(val_root, limit=n)
    if any("claims" not in r["meta"] for r in records):
        raise EdiffError(
            f"{val_root} holds no shapes claims beside its captions (not a shapes build?)"
        )
    items: list[Item] = []
    for r in records:
        for _ in range(per_caption):
            items.append(Item(len(items), r["caption"], claims=r["meta"]["claims"]))
    return items
