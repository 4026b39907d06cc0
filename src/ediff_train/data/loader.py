"""Streaming loader for a §4 shard set: shard assignment, tar reading, decoding, collation.

Every (epoch, rank, worker) gets a deterministic, disjoint slice of the shard list and a fixed
batch quota, so all ranks yield the same number of batches (no DDP hang at epoch end) no matter
how many samples their shards hold. Bad samples are skipped and counted, never fatal; counts
travel inside the batches (`batch["skipped"]`) because that is correct with any number of
worker processes and needs no shared state.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ediff_train.data.batching import NonFiniteRows, SlabPool, collate, new_slab_flags
from ediff_train.data.heldout import in_holdout
from ediff_train.data.position import POSITION, ResumePoint, shards_digest, share
from ediff_train.data.readahead import prefetch
from ediff_train.data.samples import (
    EmbedDims,
    _Skip,
    check_sizes,
    decode_sample,
    missing_fields,
    nonfinite_fields,
)
from ediff_train.data.tario import split_key, tar_members
from ediff_train.errors import EdiffError
from ediff_train.io.remote import Retry, is_remote, shard_name

log = logging.getLogger(__name__)

# Why a sample (or the rest of a shard) was dropped; every batch reports all of them.
SKIP_REASONS = (
    "truncated_tar",
    "bad_image",
    "bad_npy",
    "bad_shape",
    "nonfinite",
    "missing_field",
    "unreadable_shard",
)


class SkipCounter:
    """Skip counts by reason. In a worker it hands out deltas per batch (`take`); in the main
    process it sums the deltas carried by batches (`update`), so totals are exact for any
    number of worker processes."""

    def __init__(self) -> None:
        self._total: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()

    def skip(self, reason: str, shard: str, key: str | None, detail: object = "") -> None:
        text = str(detail).splitlines()[0][:200] if str(detail) else ""
        log.warning(
            "skipped %s in %s: %s%s", key or "<shard>", shard, reason, f" ({text})" if text else ""
        )
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
        raise EdiffError(
            f"{n_shards} shard(s) for {world} ranks: each rank needs at least one "
            "shard; write the data into more, smaller shards"
        )


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


def worker_shards(
    shards: Sequence[str],
    epoch: int,
    seed: int,
    rank: int,
    world: int,
    worker: int,
    num_workers: int,
) -> list[str]:
    return rank_shards(shards, epoch, seed, rank, world)[worker :: max(num_workers, 1)]


def worker_quota(batches: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` yields: an even split, the first `batches % K` get one more."""
    return share(batches, worker, num_workers)


# ----------------------------------------------------------------------------- reading


def read_shard(
    path: str, skips: SkipCounter, fetched: bytes | bytearray | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples ({ext: bytes-like, __key__, __shard__}) of one tar; a truncated or corrupt
    tar ends the shard there (counted once) and keeps every complete sample read before it.
    `fetched`: the shard's bytes when it was downloaded (remote shards)."""
    name = shard_name(path)
    current: dict[str, Any] | None = None
    try:
        for fname, data in tar_members(path if fetched is None else fetched):
            key, ext = split_key(fname)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": name}
            current[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        skips.skip("truncated_tar", name, None, e)
        if current is not None and not missing_fields(current):
            yield current
        return
    if current is not None:
        yield current


def read_shards(
    paths: Sequence[str], skips: SkipCounter, retry: Retry, readahead: int
) -> Iterator[dict[str, Any]]:
    """Raw samples of `paths` in order: local ones mapped, remote ones fetched `readahead`
    shards ahead; a remote shard that cannot be fetched is skipped and counted."""
    if not paths or not is_remote(paths[0]):
        for path in paths:
            yield from read_shard(path, skips)
        return
    for url, data in prefetch(paths, retry, readahead):
        if isinstance(data, Exception):
            skips.skip("unreadable_shard", shard_name(url), None, f"{type(data).__name__}: {data}")
        else:
            yield from read_shard(url, skips, data)


class ShardStream(IterableDataset):
    """Yields ready batches (use DataLoader(batch_size=None)); exactly `batches_per_epoch` per
    rank per epoch, split evenly over the DataLoader's workers.

    The epoch lives in shared memory so persistent workers see `set_epoch` (ShardLoader calls it
    at the start of each epoch), and so does `resume_point` (position.py): a resumed epoch goes
    on after the batches delivered before the interruption. Each batch carries its
    `[worker, samples drawn]` under `POSITION`. rank/world are fixed at construction (see
    resolve_rank_world).
    `lowres_size`/`crop_size`: SR pairs and crops (samples.decode_sample, rules in
    check_sizes); a sample's crop follows (seed, epoch, key), or is the centre (`centre_crop`).
    Remote shards (URLs, see remote.py) are fetched `readahead` shards ahead, each request
    tried `retries` times (readahead.py).
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike],
        batch_size: int,
        image_size: int,
        dims: EmbedDims,
        *,
        num_samples: int | None = None,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        lowres_size: int | None = None,
        rank: int | None = None,
        world: int | None = None,
        holdout: tuple[float, bool] | None = None,
        crop_size: int | None = None,
        centre_crop: bool = False,
        readahead: int = 2,
        retries: int = 5,
        latent_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if latent_shape is not None and (lowres_size is not None or crop_size is not None):
            raise EdiffError(
                "latent shards (codec=vae) train a base stage: lowres_size and crop_size "
                "must be null"
            )
        # VAE codec shards: batches carry each sample's latent as `image` (docs/latent.md)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        if batch_size < 1 or image_size < 1:
            raise EdiffError(
                f"batch_size ({batch_size}) and image_size ({image_size}) must be >= 1"
            )
        check_sizes(image_size, lowres_size, crop_size)
        self.crop_size, self.centre_crop = crop_size, centre_crop
        self.shards = sorted(os.fspath(s) for s in shards)
        self.readahead, self.retry = max(0, int(readahead)), Retry(attempts=max(1, int(retries)))
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
        # (fraction, wanted): keep only samples whose key is (wanted=True) or is not in the
        # key-hash validation split (heldout.in_holdout)
        self.holdout = holdout if holdout and holdout[0] > 0 else None
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self.slab_flags = new_slab_flags()  # see batching.SlabPool
        self.resume_point = ResumePoint()
        self._pool: SlabPool | None = None

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def active_workers(self, num_workers: int) -> int:
        """Workers that get shards on this rank (the others yield nothing)."""
        return min(max(num_workers, 1), len(range(self.rank, len(self.shards), self.world)))

    def identity(self, num_workers: int) -> dict[str, object]:
        """What fixes this rank's stream besides the epoch: a saved position fits only a
        stream with the same identity (position.StreamPosition)."""
        return {
            "seed": self.seed,
            "shards": shards_digest(self.shards),
            "world": self.world,
            "workers": self.active_workers(num_workers),
            "batch_size": self.batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "shuffle_buffer": self.shuffle_buffer,
            "holdout": list(self.holdout or ()),
        }

    def raw_pass(
        self, order: Sequence[str], skips: SkipCounter, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of one pass over `order`, through the shuffle buffer (per pass, so one
        pass never leaks into the next): the part `data.reader` swaps (wds_reader.py); the
        decoding, checks, batching and positions below are the same for every reader."""
        stream: Iterator[dict[str, Any]] = read_shards(order, skips, self.retry, self.readahead)
        if self.shuffle_buffer > 1:
            stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream)
        return stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        compact = info is not None  # crossing a process boundary: see batching.py
        if compact and self._pool is None:
            self._pool = SlabPool(self.slab_flags, physical)
        active = self.active_workers(n_workers)
        if physical >= active:
            return
        epoch = self.epoch
        # resuming: this worker plays the logical worker that is next in line, which has
        # already delivered `made` batches, made of the first `passed` samples it drew
        worker, made, passed = self.resume_point.for_worker(epoch, physical, active)
        quota = worker_quota(self.batches_per_epoch, worker, active)
        if made >= quota:
            return
        tag = (self.seed, epoch, self.rank, worker)
        mine = worker_shards(self.shards, epoch, self.seed, self.rank, self.world, worker, active)
        skips, buffer_rng = SkipCounter(), _rng(*tag, "buffer")
        batch: list[dict[str, Any]] = []
        drawn = 0  # raw samples taken from the shuffled stream this epoch
        for pass_no in itertools.count():
            order = list(mine)
            if pass_no > 0:  # cycling: every later pass in a new order
                _rng(*tag, "pass", pass_no).shuffle(order)
            stream = self.raw_pass(order, skips, buffer_rng)
            made_before, fresh = made, drawn >= passed
            for raw in stream:
                drawn += 1
                if drawn <= passed:  # delivered before the resume point: not even decoded
                    if drawn == passed:
                        skips.take()  # counted then; the checkpoint holds those counts
                    continue
                if self.holdout and in_holdout(raw["__key__"], self.holdout[0]) != self.holdout[1]:
                    continue
                try:
                    batch.append(
                        decode_sample(
                            raw,
                            self.image_size,
                            self.dims,
                            self.lowres_size,
                            crop_size=self.crop_size,
                            seed=self.seed,
                            epoch=epoch,
                            centre_crop=self.centre_crop,
                            latent_shape=self.latent_shape,
                        )
                    )
                except _Skip as s:
                    skips.skip(s.reason, raw["__shard__"], raw["__key__"], s)
                    continue
                if len(batch) < self.batch_size:
                    continue
                try:
                    out = collate(batch, compact=compact, pool=self._pool)
                except NonFiniteRows as e:  # drop those samples, keep filling
                    _drop(batch, {i: f"{name}.npy holds NaN/Inf" for i, name in e.rows}, skips)
                    continue
                out["skipped"] = skips.take()
                out[POSITION] = [worker, drawn]
                batch = []
                made += 1
                yield out
                if made >= quota:
                    return
            if made == made_before and fresh:  # a pass without a batch: anything usable?
                _drop(
                    batch,
                    {
                        i: f"{', '.join(bad)} hold NaN/Inf"
                        for i, s in enumerate(batch)
                        if (bad := nonfinite_fields(s))
                    },
                    skips,
                )
                if not batch:
                    names = ", ".join(shard_name(p) for p in mine[:3])
                    raise EdiffError(
                        f"no usable sample in shards {names}"
                        f"{' ...' if len(mine) > 3 else ''} (see skip warnings)"
                    )


def _drop(batch: list[dict[str, Any]], bad: Mapping[int, str], skips: SkipCounter) -> None:
    """Remove samples `bad` (index → why) from `batch` in place, counting each as nonfinite."""
    for i, why in sorted(bad.items()):
        skips.skip("nonfinite", batch[i]["shard"], batch[i]["key"], why)
    batch[:] = [s for i, s in enumerate(batch) if i not in bad]
