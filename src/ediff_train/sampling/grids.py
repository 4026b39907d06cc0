"""Image files and labelled grids of samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def save_images(
    images: Tensor, out_dir: str | Path, prefix: str = "sample", grid: Any = None
) -> Path:
    """Write each image as PNG plus grid.png (`grid`, a PIL image, or a square-ish grid of the
    images); images in [0, 1], [N,3,H,W]."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(out / f"{prefix}_{i:04d}.png")
    grid_path = out / "grid.png"
    (grid if grid is not None else Image.fromarray(make_grid(images))).save(grid_path)
    return grid_path


def make_grid(
    images: Tensor, pad: int = 1, upscale: int | None = None, cols: int | None = None
) -> object:
    """A uint8 HxWx3 numpy grid of [N,3,H,W] images in [0, 1], upscaled so small images show."""
    n, _, h, w = images.shape
    cols = cols or int(n**0.5 + 0.999)
    rows = (n + cols - 1) // cols
    scale = upscale or max(1, 64 // max(h, w))
    grid = torch.zeros(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = images[k].clamp(0, 1).cpu().float()
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def labelled_grid(
    images: Tensor, labels: Sequence[str], per_row: int, upscale: int | None = None
) -> object:
    """A grid with one row per label (`per_row` images each) and the label written on its left,
    so a reader sees at once whether each row follows its prompt. Returns a PIL image."""

    grid = Image.fromarray(make_grid(images, upscale=upscale, cols=per_row))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    width = max(int(draw.textlength(str(t), font=font)) for t in labels) + 8
    out = Image.new("RGB", (grid.width + width, grid.height), (255, 255, 255))
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    row_h = grid.height / max(len(labels), 1)
    for r, text in enumerate(labels):
        draw.text((4, int(r * row_h + row_h / 2 - 5)), str(text), fill=(0, 0, 0), font=font)
    return out
