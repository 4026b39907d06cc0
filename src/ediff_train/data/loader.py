"""Streaming loader for a §4 shard set: shard assignment, tar reading, decoding, collation.

Every (epoch, rank, worker) gets a deterministic, disjoint slice of the shard list and a fixed
batch quota, so all ranks yield the same number of batches (no DDP hang at epoch end) no matter
how many samples their shards hold. Bad samples are skipped and counted, never fatal; counts
travel inside the batches (`batch["skipped"]`) because that is correct with any number of
worker processes and needs no shared state.
"""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing
import os
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ediff_train.errors import EdiffError

log = logging.getLogger(__name__)

# Why a sample (or the rest of a shard) was dropped; every batch reports all of them.
SKIP_REASONS = ("truncated_tar", "bad_image", "bad_npy", "bad_shape", "nonfinite", "missing_field")
EMBEDDINGS = ("t5", "clip_txt", "clip_pool", "clip_img")
IMAGE_EXTS = ("png", "jpg", "jpeg")


@dataclass(frozen=True)
class EmbedDims:
    """Expected embedding widths; a sample whose arrays disagree is skipped as `bad_shape`."""

    t5: int
    clip_txt: int
    clip_pool: int
    clip_img: int
    t5_max_length: int | None = None
    context_length: int = 77

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> EmbedDims:
        enc = manifest.get("encoders", {})
        t5, clip = enc.get("t5", {}), enc.get("clip", {})
        try:
            return cls(t5=int(t5["dim"]), clip_txt=int(clip["text_dim"]),
                       clip_pool=int(clip["pool_dim"]), clip_img=int(clip["image_dim"]),
                       t5_max_length=t5.get("max_length"),
                       context_length=int(clip.get("context_length", 77)))
        except (KeyError, TypeError, ValueError) as e:
            raise EdiffError(f"manifest lacks embedding dims ({e!r} missing or invalid)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Expected shape; -1 marks T5's free token count."""
        return {"t5": (-1, self.t5), "clip_txt": (self.context_length, self.clip_txt),
                "clip_pool": (self.clip_pool,), "clip_img": (self.clip_img,)}[name]


class SkipCounter:
    """Skip counts by reason. In a worker it hands out deltas per batch (`take`); in the main
    process it sums the deltas carried by batches (`update`), so totals are exact for any
    number of worker processes."""

    def __init__(self) -> None:
        self._total: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()

    def skip(self, reason: str, shard: str, key: str | None, detail: object = "") -> None:
        text = str(detail).splitlines()[0][:200] if str(detail) else ""
        log.warning("skipped %s in %s: %s%s", key or "<shard>", shard, reason,
                    f" ({text})" if text else "")
        self._total[reason] += 1
        self._pending[reason] += 1

    def take(self) -> dict[str, int]:
        """Counts since the previous take, every reason present (stable keys for logging)."""
        out = {r: int(self._pending.get(r, 0)) for r in SKIP_REASONS}
        self._pending.clear()
        return out

    def update(self, counts: Mapping[str, int]) -> None:
        for reason, n in counts.items():
            self._total[reason] += int(n)

    def totals(self) -> dict[str, int]:
        return {r: int(self._total.get(r, 0)) for r in SKIP_REASONS}


# ----------------------------------------------------------------------------- assignment

def resolve_rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Explicit values win, then initialised torch.distributed, then RANK/WORLD_SIZE, then 0/1."""
    if rank is None or world is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world = w if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise EdiffError(f"invalid rank {rank} for world size {world}")
    return rank, world


def _rng(*parts: object) -> random.Random:
    """A generator seeded from a string: identical in every process (str seeds hash by sha512)."""
    return random.Random("/".join(map(str, parts)))


def check_shard_count(n_shards: int, world: int) -> None:
    if n_shards < world:
        raise EdiffError(f"{n_shards} shard(s) for {world} ranks: each rank needs at least one "
                         "shard; write the data into more, smaller shards")


def rank_shards(shards: Sequence[str], epoch: int, seed: int, rank: int, world: int) -> list[str]:
    """Epoch `epoch`'s shards for `rank`: one shuffle shared by all ranks, then every world-th."""
    check_shard_count(len(shards), world)
    order = sorted(shards)
    _rng(seed, "shards", epoch).shuffle(order)
    return order[rank::world]


def usable_workers(n_shards: int, world: int, num_workers: int) -> int:
    """Workers that can each own a shard on every rank (0 stays 0: load in-process)."""
    check_shard_count(n_shards, world)
    return min(num_workers, n_shards // world)


def worker_shards(shards: Sequence[str], epoch: int, seed: int, rank: int, world: int,
                  worker: int, num_workers: int) -> list[str]:
    return rank_shards(shards, epoch, seed, rank, world)[worker::max(num_workers, 1)]


def worker_quota(batches: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` yields: an even split, the first `batches % K` get one more."""
    k = max(num_workers, 1)
    return batches // k + (1 if worker < batches % k else 0)


# ----------------------------------------------------------------------------- reading

def read_shard(path: str, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples ({ext: bytes, __key__, __shard__}) of one tar; a truncated or corrupt tar
    ends the shard there (counted once) and keeps every complete sample read before it."""
    name = os.path.basename(path)
    current: dict[str, Any] | None = None
    try:
        with open(path, "rb") as f:
            for item in tar_file_iterator(f):
                key, ext = base_plus_ext(item["fname"])
                if key is None:
                    continue
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": name}
                current[ext.lower()] = item["data"]
            if not _ends_cleanly(f):
                raise tarfile.ReadError("no end-of-archive marker: cut at a member boundary")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        skips.skip("truncated_tar", name, None, e)
        if current is not None and not _missing(current):
            yield current
        return
    if current is not None:
        yield current


def _ends_cleanly(f: io.BufferedIOBase) -> bool:
    """tarfile silently stops at a header cut short; an uncompressed tar must end in zero blocks."""
    f.seek(257)
    if f.read(5) != b"ustar":
        return True  # compressed: the decompressor reports truncation itself
    size = f.seek(0, io.SEEK_END)
    if size < 1024 or size % 512:
        return False
    f.seek(size - 1024)
    return f.read(1024) == bytes(1024)


def _missing(raw: Mapping[str, Any]) -> list[str]:
    need = [f"{e}.npy" for e in EMBEDDINGS if f"{e}.npy" not in raw]
    if not any(ext in raw for ext in IMAGE_EXTS):
        need.append("png|jpg")
    return need


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def load_image(data: bytes, size: int) -> Image.Image:
    """RGB at size×size: shorter side resized to `size`, then centre-cropped."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def image_tensor(im: Image.Image) -> Tensor:
    """uint8 HWC → float32 [3,H,W] in [-1, 1]."""
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _load_embedding(name: str, data: bytes, dims: EmbedDims) -> Tensor:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError for broken npy bytes
        raise _Skip("bad_npy", f"{name}.npy: {e}") from None
    want = dims.shape(name)
    ok = arr.ndim == len(want) and all(w in (-1, s) for w, s in zip(want, arr.shape))
    if name == "t5" and ok:
        max_len = dims.t5_max_length
        ok = arr.shape[0] >= 1 and (max_len is None or arr.shape[0] <= max_len)
    if not ok or not np.issubdtype(arr.dtype, np.floating):
        shown = tuple("L" if w == -1 else w for w in want)
        raise _Skip("bad_shape", f"{name}.npy is {arr.dtype}{list(arr.shape)}, want {shown}")
    if not np.isfinite(arr).all():
        raise _Skip("nonfinite", f"{name}.npy holds NaN/Inf")
    return torch.from_numpy(arr.astype(np.float32))


def decode_sample(raw: Mapping[str, Any], image_size: int, dims: EmbedDims,
                  lowres_size: int | None = None) -> dict[str, Any]:
    """Raw tar members → tensors; raises _Skip with a reason for anything unusable."""
    missing = _missing(raw)
    if missing:
        raise _Skip("missing_field", "no " + ", ".join(missing))
    out: dict[str, Any] = {name: _load_embedding(name, raw[f"{name}.npy"], dims)
                           for name in EMBEDDINGS}
    ext = next(e for e in IMAGE_EXTS if e in raw)
    try:
        im = load_image(raw[ext], image_size)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError
        raise _Skip("bad_image", f"{ext}: {e}") from None
    out["image"] = image_tensor(im)
    if lowres_size is not None:
        small = im.resize((lowres_size, lowres_size), Image.Resampling.BICUBIC)
        out["lowres"] = image_tensor(small)
    txt = raw.get("txt", b"")
    out["caption"] = txt.decode("utf-8", "replace") if isinstance(txt, bytes) else str(txt)
    out["key"], out["shard"] = raw["__key__"], raw["__shard__"]
    return out


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a batch; T5 zero-padded to the batch's longest sequence, mask True on real tokens."""
    lengths = [s["t5"].shape[0] for s in samples]
    b, lmax, d = len(samples), max(lengths), samples[0]["t5"].shape[1]
    t5 = torch.zeros(b, lmax, d)
    mask = torch.zeros(b, lmax, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        t5[i, :n] = s["t5"]
        mask[i, :n] = True
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]),
                             "t5": t5, "t5_mask": mask}
    for name in ("clip_txt", "clip_pool", "clip_img"):
        batch[name] = torch.stack([s[name] for s in samples])
    if "lowres" in samples[0]:
        batch["lowres"] = torch.stack([s["lowres"] for s in samples])
    for name in ("key", "caption", "shard"):
        batch[name] = [s[name] for s in samples]
    return batch


# ----------------------------------------------------------------------------- dataset

class ShardStream(IterableDataset):
    """Yields ready batches (use DataLoader(batch_size=None)); exactly `batches_per_epoch` per
    rank per epoch, split evenly over the DataLoader's workers.

    The epoch lives in shared memory so persistent workers see `set_epoch` (ShardLoader calls it
    at the start of each epoch). rank/world are fixed at construction (see resolve_rank_world).
    """

    def __init__(self, shards: Sequence[str | os.PathLike], batch_size: int, image_size: int,
                 dims: EmbedDims, *, num_samples: int | None = None,
                 batches_per_epoch: int | None = None, shuffle_buffer: int = 1000, seed: int = 0,
                 lowres_size: int | None = None, rank: int | None = None,
                 world: int | None = None) -> None:
        super().__init__()
        if batch_size < 1 or image_size < 1:
            raise EdiffError(f"batch_size ({batch_size}) and image_size ({image_size}) "
                             "must be >= 1")
        self.shards = sorted(os.fspath(s) for s in shards)
        self.rank, self.world = resolve_rank_world(rank, world)
        check_shard_count(len(self.shards), self.world)
        if batches_per_epoch is None:
            if num_samples is None:
                raise EdiffError("give num_samples or batches_per_epoch")
            batches_per_epoch = max(1, num_samples // (self.world * batch_size))
        if batches_per_epoch < 1:
            raise EdiffError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.batches_per_epoch = int(batches_per_epoch)
        self.batch_size, self.image_size, self.dims = batch_size, image_size, dims
        self.shuffle_buffer, self.seed, self.lowres_size = shuffle_buffer, seed, lowres_size
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        active = min(n_workers, len(range(self.rank, len(self.shards), self.world)))
        quota = worker_quota(self.batches_per_epoch, worker, active) if worker < active else 0
        if quota == 0:
            return
        epoch = self.epoch
        tag = (self.seed, epoch, self.rank, worker)
        mine = worker_shards(self.shards, epoch, self.seed, self.rank, self.world, worker, active)
        skips, buffer_rng = SkipCounter(), _rng(*tag, "buffer")
        batch: list[dict[str, Any]] = []
        made = 0
        for pass_no in itertools.count():
            order = list(mine)
            if pass_no > 0:  # cycling: every later pass in a new order
                _rng(*tag, "pass", pass_no).shuffle(order)
            stream: Iterator[dict[str, Any]] = itertools.chain.from_iterable(
                read_shard(p, skips) for p in order)
            if self.shuffle_buffer > 1:  # per pass, so one pass never leaks into the next
                stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer,
                                     rng=buffer_rng)(stream)
            good = 0
            for raw in stream:
                try:
                    sample = decode_sample(raw, self.image_size, self.dims, self.lowres_size)
                except _Skip as s:
                    skips.skip(s.reason, raw["__shard__"], raw["__key__"], s)
                    continue
                good += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    out = collate(batch)
                    out["skipped"] = skips.take()
                    batch = []
                    made += 1
                    yield out
                    if made >= quota:
                        return
            if good == 0:
                names = ", ".join(os.path.basename(p) for p in mine[:3])
                raise EdiffError(f"no usable sample in shards {names}"
                                 f"{' ...' if len(mine) > 3 else ''} (see skip warnings)")
