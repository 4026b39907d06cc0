"""Super-resolution data path: (low-res, high-res) pairs, random crops aligned to the low-res
grid and reproducible per (seed, epoch, key), centre crops for held-out batches, and the size
and shard-set mistakes refused before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from ediff_train.data.datamodule import ShardDataModule, ShardLoader
from ediff_train.data.loader import ShardStream, SkipCounter, read_shard
from ediff_train.data.manifest import read_manifest
from ediff_train.data.samples import EmbedDims, crop_offset, decode_sample, to_unit_range
from ediff_train.data.shards import ShardWriter
from ediff_train.errors import EdiffError

ENC = {
    "t5": {
        "name": "t",
        "version": "1",
        "dim": 6,
        "max_length": 8,
        "dtype": "float16",
        "fingerprint": "f",
    },
    "clip": {
        "name": "c",
        "version": "1",
        "text_dim": 5,
        "pool_dim": 4,
        "image_dim": 3,
        "context_length": 77,
        "dtype": "float16",
        "fingerprint": "g",
    },
}
DIMS = EmbedDims.from_manifest({"encoders": ENC})
SIZE, LOW, CROP = 32, 8, 16  # factor 4: crops of 16 px at offsets 0, 4, ..., 16; low-res 4 px
F = SIZE // LOW


def write_set(root: Path, n: int, size: int = SIZE, prefix: str = "s") -> Path:
    """n noise images (any misalignment changes every pixel) in two shards + manifest."""
    rng = np.random.default_rng(len(prefix) + size)
    with ShardWriter(
        root, ENC, image_format="png", image_size=size, samples_per_shard=-(-n // 2)
    ) as w:
        for i in range(n):
            w.write(
                f"{prefix}{i}",
                rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                f"caption {i}",
                rng.standard_normal((3, 6)),
                rng.standard_normal((77, 5)),
                rng.standard_normal(4),
                rng.standard_normal(3),
            )
    w.finish()
    return root


@pytest.fixture(scope="module")
def sr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_set(tmp_path_factory.mktemp("sr"), 16)
    write_set(root / "val", 4, prefix="v")
    return root


def full_pairs(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key → (whole image, whole low-res), decoded without cropping."""
    out = {}
    for name in sorted(read_manifest(root)["shards"]):
        for raw in read_shard(str(root / name), SkipCounter()):
            s = decode_sample(raw, SIZE, DIMS, LOW)
            out[s["key"]] = (s["image"], s["lowres"])
    return out


def expected(full: tuple[np.ndarray, np.ndarray], oy: int, ox: int) -> tuple[Tensor, Tensor]:
    img, low = full
    c = CROP // F
    return (
        to_unit_range(torch.from_numpy(img[:, oy : oy + CROP, ox : ox + CROP].copy())),
        to_unit_range(
            torch.from_numpy(low[:, oy // F : oy // F + c, ox // F : ox // F + c].copy())
        ),
    )


def stream(root: Path, epoch: int = 0, seed: int = 3, **kw) -> list[dict]:
    paths = [str(root / n) for n in sorted(read_manifest(root)["shards"])]
    s = ShardStream(
        paths,
        4,
        SIZE,
        DIMS,
        batches_per_epoch=4,
        shuffle_buffer=8,
        seed=seed,
        lowres_size=LOW,
        crop_size=CROP,
        **{"rank": 0, "world": 1, **kw},
    )
    s.set_epoch(epoch)
    return list(s)


def test_shapes_with_and_without_crop(sr_root: Path) -> None:
    def first(**kw) -> dict:
        dm = ShardDataModule(
            str(sr_root),
            batch_size=4,
            image_size=SIZE,
            num_workers=0,
            batches_per_epoch=1,
            rank=0,
            world_size=1,
            **kw,
        )
        return next(iter(dm.train_dataloader()))

    b = first(lowres_size=LOW)
    assert b["image"].shape == (4, 3, SIZE, SIZE) and b["lowres"].shape == (4, 3, LOW, LOW)
    b = first(lowres_size=LOW, crop_size=CROP)
    assert b["image"].shape == (4, 3, CROP, CROP) and b["lowres"].shape == (4, 3, 4, 4)
    assert b["image"].dtype == b["lowres"].dtype == torch.float32
    assert -1 <= float(b["lowres"].min()) and float(b["lowres"].max()) <= 1
    b = first(crop_size=12)  # no low-res: a plain crop, any offset
    assert b["image"].shape == (4, 3, 12, 12) and "lowres" not in b


def test_crops_align_exactly_with_the_whole_images_lowres(sr_root: Path) -> None:
    full = full_pairs(sr_root)
    offsets = set()
    for b in stream(sr_root, epoch=1):
        for i, key in enumerate(b["key"]):
            oy, ox = crop_offset(SIZE, CROP, F, key, seed=3, epoch=1)
            assert oy % F == 0 and ox % F == 0 and 0 <= min(oy, ox) <= max(oy, ox) <= SIZE - CROP
            img, low = expected(full[key], oy, ox)
            assert torch.equal(b["image"][i], img) and torch.equal(b["lowres"][i], low), key
            # shifted by one low-res pixel it would not match (noise images: every pixel moves)
            sy = oy + F if oy + F <= SIZE - CROP else oy - F
            assert not torch.equal(b["lowres"][i], expected(full[key], sy, ox)[1])
            offsets.add((oy, ox))
    assert len(offsets) >= 4  # really random, not one fixed window


def test_crops_reproducible_per_epoch_rank_and_worker(sr_root: Path) -> None:
    by_key = lambda bs: {k: b["image"][i] for b in bs for i, k in enumerate(b["key"])}  # noqa: E731
    e0 = by_key(stream(sr_root, epoch=0))
    assert all(torch.equal(e0[k], v) for k, v in by_key(stream(sr_root, epoch=0)).items())
    e1 = by_key(stream(sr_root, epoch=1))
    common = e0.keys() & e1.keys()
    moved = [k for k in common if not torch.equal(e0[k], e1[k])]
    assert len(common) >= 4 and len(moved) >= len(common) // 2
    moved_off = [
        k
        for k in common
        if crop_offset(SIZE, CROP, F, k, 3, 0) != crop_offset(SIZE, CROP, F, k, 3, 1)
    ]
    assert sorted(moved) == sorted(moved_off)
    # another rank reads other keys but crops each one where the analytic offset says
    full = full_pairs(sr_root)
    for b in stream(sr_root, epoch=0, rank=1, world=2)[:1]:
        for i, key in enumerate(b["key"]):
            oy, ox = crop_offset(SIZE, CROP, F, key, seed=3, epoch=0)
            assert torch.equal(b["image"][i], expected(full[key], oy, ox)[0])
    # a worker process sees the loader's epoch (shared memory), so crops match in-process
    paths = [str(sr_root / n) for n in sorted(read_manifest(sr_root)["shards"])]
    s = ShardStream(
        paths[:1],
        4,
        SIZE,
        DIMS,
        batches_per_epoch=2,
        shuffle_buffer=8,
        seed=3,
        lowres_size=LOW,
        crop_size=CROP,
        rank=0,
        world=1,
    )
    loader = ShardLoader(s, num_workers=1)
    for epoch in range(2):
        for b in loader:
            for i, key in enumerate(b["key"]):
                oy, ox = crop_offset(SIZE, CROP, F, key, seed=3, epoch=epoch)
                img, low = expected(full[key], oy, ox)
                assert torch.equal(b["image"][i], img) and torch.equal(b["lowres"][i], low)
    loader._stop_workers()


def test_val_batches_take_the_aligned_centre_crop(sr_root: Path) -> None:
    dm = ShardDataModule(
        str(sr_root),
        batch_size=4,
        image_size=SIZE,
        lowres_size=LOW,
        crop_size=CROP,
        val_root=str(sr_root / "val"),
        seed=9,
    )
    first, again = dm.val_batches(1), dm.val_batches(1)
    full = full_pairs(sr_root / "val")
    c = (SIZE - CROP) // 2  # 8: already a multiple of the factor
    assert crop_offset(SIZE, CROP, F, "any", centre=True) == (c, c)
    for i, key in enumerate(first[0]["key"]):
        img, low = expected(full[key], c, c)
        assert torch.equal(first[0]["image"][i], img) and torch.equal(first[0]["lowres"][i], low)
    assert first[0]["key"] == again[0]["key"] and torch.equal(first[0]["image"], again[0]["image"])
    # centre of a window that does not fit evenly: rounded down to the low-res grid
    assert crop_offset(32, 8, 4, "k", centre=True) == (12, 12)
    assert crop_offset(16, 4, 4, "k", centre=True) == (4, 4)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(image_size=32, lowres_size=12), "lowres_size 12 does not divide image_size 32"),
        (dict(image_size=32, lowres_size=32), r"lowres_size 32 must lie in \[1, image_size=32\)"),
        (dict(image_size=32, lowres_size=0), "lowres_size 0 must lie in"),
        (dict(image_size=32, lowres_size=8, crop_size=40), "crop_size 40 must lie in"),
        (dict(image_size=32, crop_size=0), "crop_size 0 must lie in"),
        (
            dict(image_size=32, lowres_size=8, crop_size=6),
            "crop_size 6 is not a multiple of image_size // lowres_size = 32 // 8 = 4",
        ),
        (dict(image_size=1024, lowres_size=256, crop_size=250), "not a multiple"),
    ],
)
def test_bad_sizes_refused_at_construction(tmp_path: Path, kw: dict, needle: str) -> None:
    with pytest.raises(EdiffError, match=needle) as e:
        ShardDataModule(str(tmp_path / "nothing-here"), batch_size=2, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(EdiffError, match=needle):
        ShardStream(
            ["x.tar"], 2, kw.pop("image_size"), DIMS, batches_per_epoch=1, rank=0, world=1, **kw
        )


def test_shard_set_of_another_stage_refused_in_setup(sr_root: Path, tmp_path: Path) -> None:
    base64 = write_set(tmp_path / "base64", 2, size=64)
    bad = [
        (
            dict(root=str(sr_root), image_size=64, lowres_size=16),  # SR64 on 32 px shards
            "shards at .* hold 32 px images, this stage trains at 64 px \\(an SR stage pointed at "
            "base-stage shards\\? use data_prep stage=base64\\)",
        ),
        (
            dict(root=str(base64), image_size=256, lowres_size=64, crop_size=64),
            "hold 64 px images, this stage trains at 256 px .*use data_prep stage=sr256",
        ),
        (
            dict(root=str(sr_root), image_size=16),  # a base stage on larger SR shards
            "hold 32 px images, this stage trains at 16 px \\(a base stage pointed at SR-stage",
        ),
        (
            dict(root=str(base64), image_size=32, lowres_size=8),
            "hold 64 px images, .*an SR stage pointed at a larger stage's shards",
        ),
        (dict(root=str(sr_root), image_size=128), "upscaled, i.e. blurred"),
    ]
    for kw, needle in bad:
        dm = ShardDataModule(batch_size=2, num_workers=0, **kw)
        with pytest.raises(EdiffError, match=needle) as e:
            dm.setup("fit")
        assert "\n" not in str(e.value)
    # the held-out set is checked too
    dm = ShardDataModule(
        str(sr_root), batch_size=2, image_size=SIZE, lowres_size=LOW, val_root=str(base64)
    )
    dm.setup("fit")
    with pytest.raises(EdiffError, match="shards at .*base64 hold 64 px images"):
        dm.val_batches(1)
