"""LightningDataModule over a §4 shard set: build (optional), check the manifest, stream.

The manifest is checked in `setup()`, before any training step, so shards embedded with other
encoders or dims, or stored at another image size, are refused with one line rather than
trained on.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from ediff_train.data.batching import expand_batch
from ediff_train.data.heldout import validation_source
from ediff_train.data.loader import (
    EmbedDims,
    ShardStream,
    SkipCounter,
    resolve_rank_world,
    usable_workers,
)
from ediff_train.data.manifest import check_manifest, read_manifest
from ediff_train.data.position import POSITION, StreamPosition
from ediff_train.data.samples import check_sizes
from ediff_train.data.wds_reader import READERS, stream_class
from ediff_train.errors import EdiffError
from ediff_train.io.remote import Retry, is_remote, join, listing, normalize
from ediff_train.nn.codec import PIXEL_SPEC, codec_mismatch, recorded_codec

log = logging.getLogger(__name__)

# data_prep stage that writes each image size (for the hint when a stage reads the wrong set)
_PREP_STAGES = {64: "base64", 256: "sr256", 1024: "sr1024"}


def check_image_size(
    manifest: dict, root: str | Path, image_size: int, lowres_size: int | None
) -> None:
    """Refuse shards stored at another size than the stage trains at: smaller ones would be
    upscaled (blurred targets, e.g. an SR stage pointed at base-stage shards), larger ones are
    another stage's set (e.g. a base stage pointed at SR shards). No recorded size: no check."""
    stored = (manifest.get("image") or {}).get("size")
    if stored is None or int(stored) == image_size:
        return
    stored = int(stored)
    stage = _PREP_STAGES.get(image_size)
    fix = f"use data_prep stage={stage}" if stage else f"embed the images at {image_size} px"
    if stored < image_size:
        guess = (
            "an SR stage pointed at base-stage shards?"
            if lowres_size is not None
            else "they would be upscaled, i.e. blurred:"
        )
    else:
        guess = (
            "a base stage pointed at SR-stage shards?"
            if lowres_size is None
            else "an SR stage pointed at a larger stage's shards?"
        )
    raise EdiffError(
        f"shards at {root} hold {stored} px images, this stage trains at "
        f"{image_size} px ({guess} {fix})"
    )


def check_codec(
    manifest: dict, root: str | Path, codec: dict | None, image_size: int
) -> tuple[int, int, int] | None:
    """Refuse shards encoded with another codec than the config's (another VAE, pixel shards
    under a VAE config or the reverse: nn/codec.codec_mismatch); returns the latent shape
    [C, h, w] the samples must hold (None: pixel shards)."""
    want = dict(codec or PIXEL_SPEC)
    why = codec_mismatch(recorded_codec(manifest), want)
    if why:
        raise EdiffError(f"shards at {root} do not fit the codec: {why}")
    if want.get("class") == "PixelCodec":
        return None
    factor = int(want["factor"])
    if image_size % factor:
        raise EdiffError(
            f"data.image_size {image_size} is not divisible by the VAE's downsample {factor}"
        )
    return (int(want["channels"]), image_size // factor, image_size // factor)


def quiet_worker(worker_id: int, rank: int = 0) -> None:
    """A DataLoader worker's start: Ctrl-C, SIGTERM and SIGUSR1 sent to the whole process group
    are the main process's to act on (it saves a checkpoint, then stops its workers); a worker
    they killed would end the run with `DataLoader worker ... killed by signal` instead. Then
    Lightning's worker seeding, which it adds only to loaders without a worker_init_fn."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


class ShardLoader(DataLoader):
    """DataLoader over a ShardStream that (1) sets the stream's epoch before each pass, so
    persistent workers reshuffle, (2) sums the per-batch skip counts in the main process, and
    (3) expands the workers' compact batches (uint8 images, float16 embeddings) to float32 —
    unless `expand=False`: then the consumer calls `finish(batch)`, e.g. after the batch reached
    the GPU, where the cast is free and half the bytes travel.

    Resumable (`state_dict`/`load_state_dict`, which Lightning keeps in its checkpoints): the
    loader is one continuous stream of epochs (position.py); a pass goes on where the consumed
    batches stand. A batch counts as consumed when the iterator yields it or, with
    `consume_on_yield=False`, when the consumer calls `consume(batch)` (a trainer that
    prefetches batches must, e.g. ShardDataModule's hook). `epoch_fn()` (e.g. the trainer's
    epoch) names the first epoch when no position was restored (an older checkpoint).
    """

    def __init__(
        self,
        dataset: ShardStream,
        num_workers: int = 0,
        epoch_fn: Callable[[], int | None] | None = None,
        expand: bool = True,
        consume_on_yield: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("persistent_workers", num_workers > 0)
        kwargs.setdefault(
            "worker_init_fn", functools.partial(quiet_worker, rank=getattr(dataset, "rank", 0))
        )
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self.epoch_fn, self.expand = epoch_fn, expand
        self.consume_on_yield = consume_on_yield
        self.skips = SkipCounter()
        self.position = StreamPosition(
            dataset.rank,
            dataset.identity(num_workers),
            dataset.active_workers(num_workers),
            dataset.batches_per_epoch,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        epoch = self.position.begin(epoch, self.dataset.resume_point)
        self.dataset.set_epoch(epoch)  # before super().__iter__() wakes the workers
        return self._count(super().__iter__())

    def consume(self, batch: dict[str, Any]) -> None:
        """Count `batch` as consumed (see the class docstring); a batch without a position
        (consumed already, or not from this loader) changes nothing."""
        position = batch.pop(POSITION, None)
        if position is not None:
            self.position.consume(position)

    def state_dict(self) -> dict[str, Any]:
        """The stream position of every rank (a collective under torch.distributed)."""
        return self.position.state_dict(self.skips.totals())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `state`'s position from the next epoch start (iter) on."""
        skipped = self.position.load_state_dict(state)
        if skipped is not None:
            self.skips = SkipCounter()
            self.skips.update(skipped)

    def _count(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        try:
            for batch in batches:
                self.skips.update(batch.get("skipped", {}))
                if self.consume_on_yield:
                    self.consume(batch)
                yield self.finish(batch) if self.expand else batch
        except Exception as e:
            self._stop_workers()
            if not isinstance(e, EdiffError):
                raise
            # from a worker, torch prepends a traceback: keep the one-line message
            last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise EdiffError(last.split("EdiffError: ", 1)[-1]) from None

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The float32 batch contract (on the batch's device); hands its worker slab back."""
        return expand_batch(batch, self.dataset.slab_flags)

    def _stop_workers(self) -> None:
        """Shut the workers down now: left to the cyclic GC (the traceback holds this loader),
        their shutdown can stall 5 s per worker when it fires at an unlucky moment."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._iterator = None


def _trainer_epoch(dm: L.LightningDataModule) -> Callable[[], int | None]:
    """The attached trainer's epoch, via a weak reference: a strong one would make a
    datamodule↔loader cycle, and a loader freed by the cyclic GC shuts its workers down at an
    arbitrary moment (seen stalling 10 s when that moment was inside an import)."""
    ref = weakref.ref(dm)

    def epoch() -> int | None:
        owner = ref()
        trainer = owner.trainer if owner is not None else None
        return None if trainer is None else int(trainer.current_epoch)

    return epoch


class ShardDataModule(L.LightningDataModule):
    """Streams `root` (shards + manifest.json) as batches for one node's training.

    `expect` holds manifest checks (keys of manifest.check_manifest, e.g. t5_dim); `builder`,
    if given, creates the shard set in `prepare_data` (runs once per node, before setup).
    `cast_on_device`: batches travel compact (uint8 images, float16 embeddings) and become
    float32 in `on_after_batch_transfer`, on the training device; None = only when that device
    is a GPU (on a CPU it changes nothing). `rank`/`world_size` override the detected ones.

    Super-resolution stages: `lowres_size` adds `lowres`, the image_size image downsampled;
    `crop_size` trains on crop_size² crops of it (a multiple of the factor), `lowres` being
    the aligned low-res crop; held-out batches take the centre crop. Size rules are in
    samples.check_sizes, checked here; the shard set must store image_size px images (setup).

    `codec`: the config codec's spec (nn/codec.py; None = pixels). Shards encoded with another
    codec are refused in `setup` (check_codec); a VAE's shards yield each sample's stored latent
    as `image` (docs/latent.md).

    `root` may be a URL (s3://, gs://, https://, pipe:; see remote.py): its shards stream with
    `readahead` shards fetched ahead per worker, each request tried `retries` times.

    `reader`: "fast" (tario's mapped zero-copy reading, the default) or "webdataset" (the same
    stream through webdataset's pipeline, wds_reader.py); held-out batches always use fast.
    """

    def __init__(
        self,
        root: str,
        batch_size: int,
        image_size: int,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        lowres_size: int | None = None,
        expect: dict | None = None,
        builder: Callable[[], Any] | None = None,
        cast_on_device: bool | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.0,
        crop_size: int | None = None,
        readahead: int = 2,
        retries: int = 5,
        reader: str = "fast",
        codec: dict | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        check_sizes(image_size, lowres_size, crop_size)  # before any work
        if reader not in READERS:
            raise EdiffError(f"data.reader must be one of {', '.join(READERS)}, got {reader!r}")
        self.reader = reader
        self.crop_size = crop_size
        self.root = normalize(root) if is_remote(root) else str(root)
        self.readahead, self.retries = int(readahead), int(retries)
        self.batch_size, self.image_size = batch_size, image_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.batches_per_epoch, self.lowres_size = batches_per_epoch, lowres_size
        self.expect, self.builder = dict(expect or {}), builder
        self.cast_on_device = cast_on_device
        self.rank, self.world_size = rank, world_size
        self.val_root, self.val_fraction = val_root, float(val_fraction or 0.0)
        self.codec = dict(codec) if codec else None  # the config codec's spec (nn/codec.py)
        self.latent_shape: tuple[int, int, int] | None = None
        self.manifest: dict | None = None
        self.dims: EmbedDims | None = None
        self.shard_paths: list[str] = []
        self._loader: ShardLoader | None = None

    def prepare_data(self) -> None:
        if self.builder is not None:
            self.builder()

    def setup(self, stage: str | None = None) -> None:
        retry = Retry(attempts=max(1, self.retries))
        manifest = read_manifest(self.root, retry)  # first: the error users see first
        if self.expect:
            check_manifest(manifest, self.expect, where=f"shards at {self.root}")
        check_image_size(manifest, self.root, self.image_size, self.lowres_size)
        self.latent_shape = check_codec(manifest, self.root, self.codec, self.image_size)
        shards = manifest.get("shards") or {}
        if not shards:
            raise EdiffError(f"manifest at {self.root} lists no shards")
        names = sorted(shards)
        if is_remote(self.root):  # one listing; none where the backend cannot list (pipe:)
            found = listing(self.root, retry)
            missing = [n for n in names if found is not None and n not in found]
        else:
            missing = [n for n in names if not (Path(self.root) / n).is_file()]
        if missing:
            raise EdiffError(
                f"{len(missing)} shard(s) listed in {self.root}/manifest.json are "
                f"missing, e.g. {missing[0]}"
            )
        self.manifest, self.dims = manifest, EmbedDims.from_manifest(manifest)
        self.shard_paths = [join(self.root, n) for n in names]

    def train_dataloader(self) -> ShardLoader:
        if self.manifest is None or self.dims is None:
            self.setup("fit")
        assert self.manifest is not None and self.dims is not None
        rank, world = resolve_rank_world(self.rank, self.world_size)
        workers = usable_workers(len(self.shard_paths), world, self.num_workers)
        if workers < self.num_workers:
            log.warning(
                "only %d shard(s) per rank: using %d dataloader worker(s), not %d",
                len(self.shard_paths) // world,
                workers,
                self.num_workers,
            )
        num_samples = self.manifest.get("num_samples", sum(self.manifest["shards"].values()))
        num_samples = int(num_samples * (1.0 - self.val_fraction))  # the key split holds out
        stream = stream_class(self.reader)(
            self.shard_paths,
            self.batch_size,
            self.image_size,
            self.dims,
            num_samples=int(num_samples),
            batches_per_epoch=self.batches_per_epoch,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            lowres_size=self.lowres_size,
            rank=rank,
            world=world,
            holdout=(self.val_fraction, False) if self.val_fraction else None,
            crop_size=self.crop_size,
            readahead=self.readahead,
            retries=self.retries,
            latent_shape=self.latent_shape,
        )
        # under a trainer a batch is consumed when its step takes it (on_before_batch_transfer):
        # Lightning fetches one batch ahead, and that one must not count if the run stops now
        # on a GPU: pinned host batches, so the trainer's non-blocking copy does not wait
        self._loader = ShardLoader(
            stream,
            num_workers=workers,
            epoch_fn=_trainer_epoch(self),
            expand=not self._casts_on_device(),
            consume_on_yield=self.trainer is None,
            pin_memory=self._trains_on_cuda(),
        )
        return self._loader

    def validation(self) -> tuple[Path | str, float] | None:
        """(shard set, key fraction) of the held-out data, or None (see data/heldout.py)."""
        return validation_source(self.root, self.val_root, self.val_fraction)

    def val_batches(self, num_batches: int, batch_size: int | None = None) -> list[dict[str, Any]]:
        """The first `num_batches` held-out batches, float32, in a fixed order (no shuffling,
        in-process): the same samples on every call, rank and run, centre-cropped when
        crop_size is set. [] when none are named."""
        source = self.validation()
        if source is None or num_batches < 1:
            return []
        root, fraction = source
        manifest = read_manifest(root)
        check_image_size(manifest, root, self.image_size, self.lowres_size)
        latent_shape = check_codec(manifest, root, self.codec, self.image_size)
        paths = [join(root, name) for name in sorted(manifest.get("shards") or {})]
        stream = ShardStream(
            paths,
            batch_size or self.batch_size,
            self.image_size,
            EmbedDims.from_manifest(manifest),
            batches_per_epoch=num_batches,
            shuffle_buffer=0,
            seed=0,
            lowres_size=self.lowres_size,
            rank=0,
            world=1,
            holdout=(fraction, True) if fraction else None,
            crop_size=self.crop_size,
            centre_crop=True,
            readahead=self.readahead,
            retries=self.retries,
            latent_shape=latent_shape,
        )
        return [{k: v for k, v in b.items() if k not in ("skipped", POSITION)} for b in stream]

    def _trains_on_cuda(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _casts_on_device(self) -> bool:
        if self.cast_on_device is not None:
            return self.cast_on_device
        return self._trains_on_cuda()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The trainer takes this batch for a step now (its prefetched successor is not
        counted yet): this is the moment the data position moves (position.py)."""
        if isinstance(batch, dict) and self._loader is not None:
            self._loader.consume(batch)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Compact batches (see cast_on_device) become float32 here, after the move to the
        device: the copy to a GPU has left the worker's slab, which is handed back."""
        if isinstance(batch, dict) and batch.get("compact") and self._loader is not None:
            return self._loader.finish(batch)
        return batch

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason (summed from the batches seen)."""
        return self._loader.skips.totals() if self._loader is not None else SkipCounter().totals()
