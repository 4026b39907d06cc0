"""Images for a caption set, split across ranks and resumable.

Rank r of W generates the items whose id ≡ r (mod W), so ranks write disjoint files and need
no communication; a rerun skips every image already on disk (each is written to a temporary
name and renamed, so a killed run never leaves a half-written PNG that looks finished). Each
item's starting noise is seeded by (seed, item id): the same caption gives the same image
whichever rank or batch draws it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ediff_train.data.images import resize_crop
from ediff_train.errors import EdiffError
from ediff_train.metrics.captions import Item
from ediff_train.sampling.generation import image_noise


def rank_world() -> tuple[int, int]:
    """This process's (rank, world): torchrun's RANK/WORLD_SIZE, else SLURM's, else (0, 1)."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            rank, world = int(os.environ[r]), int(os.environ[w])
            if not 0 <= rank < world:
                raise EdiffError(f"invalid rank {rank} for world size {world}")
            return rank, world
    return 0, 1


def image_path(folder: str | os.PathLike, item: Item) -> Path:
    return Path(folder) / f"{item.id:06d}.png"


def item_noise(seed: int, item: Item, shape: Sequence[int]) -> Tensor:
    return image_noise(seed, item.id, shape)


def save_png(image: Tensor, path: Path) -> None:
    """[3,H,W] in [0,1] → PNG, atomically."""

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def claim_folder(folder: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record what a folder's images are made with; refuse to resume into a folder made with
    other settings (its images would silently be mixed with the new ones)."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.json"
    want = json.loads(json.dumps(settings))  # normalise tuples, numbers
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise EdiffError(
                f"{folder} holds images made with other settings ({', '.join(diff)}"
                "): choose another out= or delete that folder"
            )
        return
    tmp = path.with_name(f".settings.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(want, indent=1, sort_keys=True))
    os.replace(tmp, path)


def generate_items(
    sample: Callable[[list[str], Tensor], Tensor],
    items: Sequence[Item],
    folder: str | os.PathLike,
    shape: Sequence[int],
    seed: int = 0,
    batch_size: int = 64,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate this rank's missing images. `sample(captions, noise)` → images in [0, 1]."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mine = [it for it in items if it.id % world == rank]
    todo = [it for it in mine if not image_path(folder, it).is_file()]
    start = time.perf_counter()
    bar = tqdm(
        total=len(todo),
        desc=f"rank {rank}/{world} {folder.name}",
        unit="img",
        disable=not progress or not todo,
        leave=False,
    )
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        noise = torch.stack([item_noise(seed, it, shape) for it in chunk])
        images = sample([it.caption for it in chunk], noise)
        for it, img in zip(chunk, images):
            save_png(img, image_path(folder, it))
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "generated": len(todo),
        "already_there": len(mine) - len(todo),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(todo) / seconds, 2) if todo and seconds > 0 else None,
    }


def wait_for_images(
    folder: str | os.PathLike, items: Sequence[Item], timeout: float, poll: float = 2.0
) -> None:
    """Block until every item's image exists (rank 0 waiting for the other ranks' shares)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = sum(not image_path(folder, it).is_file() for it in items)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise EdiffError(
                f"{missing} of {len(items)} images still missing in {folder} after "
                f"{timeout:.0f} s (did another rank fail?); rerun to resume"
            )
        time.sleep(poll)


def load_images(paths: Sequence[str | os.PathLike], size: int | None = None) -> Tensor:
    """[N,3,H,W] in [0,1]; with `size`, shorter side resized and centre-cropped to it (reference
    photos), else every image must already share one size."""

    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size is not None:
                    im = resize_crop(im, (size, size))
                arrays.append(np.asarray(im, dtype=np.uint8))
        except OSError as e:
            raise EdiffError(f"cannot read image {p}: {e}") from None
    if not arrays:
        raise EdiffError("no images to score")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise EdiffError(f"images differ in size ({sorted(shapes)[:2]}); set a common size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
