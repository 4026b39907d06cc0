"""Decoded samples → batches, and the way batches leave DataLoader worker processes.

In the main process `collate` gives the float32 batch contract directly. A worker instead
builds a compact batch (uint8 images, embeddings in their stored float16) inside a reusable
shared-memory slab; the main process expands it to float32 (`expand_batch`) and hands the slab
back. Measured on real-size embeddings (T5 4096-d, CLIP 768-d) at 64 px: fresh shared memory
costs ~0.8 ms per MB (allocation + page faults), which made handing over a float32 batch cost
more than decoding it; compact batches halve the bytes and reused slabs remove the faults.

NaN/Inf is looked for here, in each row just after it was copied (so it is still in cache),
not at decode time: by the time a sample reaches a batch, a 1,000-sample shuffle buffer and 63
other samples have pushed it out of cache, and a separate check cost one more pass over memory
(~55 µs of ~275 per sample at real dims). A batch holding such rows is refused whole
(`NonFiniteRows`); the stream drops those samples, counts them and builds the batch again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from ediff_train.data.samples import EMBEDDINGS, all_finite, to_unit_range

SLABS_PER_WORKER = 4  # ≥ prefetch_factor (2) + the batch being expanded + one spare
MAX_POOLED_WORKERS = 64  # workers beyond this id allocate fresh memory per batch
_ALIGN = 64


def new_slab_flags() -> Tensor:
    """Slab ownership shared by the main process and all workers: 1 = filled, in flight."""
    return torch.zeros(MAX_POOLED_WORKERS, SLABS_PER_WORKER, dtype=torch.uint8).share_memory_()


def _shared_bytes(n: int) -> Tensor:
    """n bytes, in shared memory when called in a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(n, dtype=torch.uint8)
    elem = torch.empty(0, dtype=torch.uint8)
    return elem.new(elem._typed_storage()._new_shared(n, device=elem.device))


def _carve(
    buf: Tensor, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, Tensor]:
    out, off = {}, 0
    for name, (shape, dtype) in specs.items():
        n = math.prod(shape) * dtype.itemsize
        out[name] = buf[off : off + n].view(dtype).view(shape)
        off += -(-n // _ALIGN) * _ALIGN
    return out


def _nbytes(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(-(-math.prod(s) * d.itemsize // _ALIGN) * _ALIGN for s, d in specs.values())


class SlabPool:
    """One worker's reusable shared-memory buffers. A slab is written only while its flag is
    0; the worker sets it when the filled batch leaves, the main process clears it after
    expand_batch copied the batch out. When every slab is still in flight (e.g. a consumer
    that never calls expand_batch) a fresh buffer is used: slower, never unsafe."""

    def __init__(self, flags: Tensor, worker: int) -> None:
        self.flags_tensor = flags
        self.flags = flags.numpy()  # a view of the shared tensor: cheap to poll
        self.worker = worker
        self.slabs: list[Tensor | None] = [None] * flags.shape[1]

    def carve(
        self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    ) -> tuple[dict[str, Tensor], int | None]:
        """Views into a free slab and its flat flag index (None: a fresh, unpooled buffer).
        One int rather than (worker, slab): the DataLoader turns tuples into lists."""
        need = _nbytes(specs)
        if self.worker < self.flags.shape[0]:
            row = self.flags[self.worker]
            for k in np.flatnonzero(row == 0):
                buf = self.slabs[k]
                if buf is None or buf.numel() < need:  # grown with headroom for longer T5
                    buf = self.slabs[k] = _shared_bytes(need + need // 4)
                row[k] = 1
                return _carve(buf, specs), self.worker * self.flags.shape[1] + int(k)
        return _carve(_shared_bytes(need), specs), None


class NonFiniteRows(ValueError):
    """Rows of a batch whose embeddings hold NaN/Inf, as (row, embedding name). Checked on
    the batch's own copy, so a float64 value that overflowed float32 when decoded counts too.
    Nothing of the refused batch is kept."""

    def __init__(self, rows: list[tuple[int, str]]) -> None:
        super().__init__(", ".join(f"row {i}: {what}" for i, what in rows))
        self.rows = rows


def collate(
    samples: Sequence[Mapping[str, Any]], compact: bool = False, pool: SlabPool | None = None
) -> dict[str, Any]:
    """Stack decoded samples (numpy, see decode_sample); T5 zero-padded to the batch's longest
    sequence, mask True on real tokens. Raises NonFiniteRows if any embedding holds NaN/Inf.

    Default: the float32 batch contract. `compact`: images stay uint8, embeddings float16
    when stored so, the batch carries `compact=True` (and its slab when `pool` is given);
    `expand_batch` finishes it. The copies run in numpy: per row, its indexing costs a tenth
    of torch's."""
    lengths = np.fromiter((s["t5"].shape[0] for s in samples), np.int64, len(samples))
    b, lmax, d = len(samples), int(lengths.max()), samples[0]["t5"].shape[1]
    half = all(s[n].dtype == np.float16 for s in samples for n in EMBEDDINGS)
    emb = torch.float16 if half else torch.float32
    first = samples[0]
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "t5": ((b, lmax, d), emb),
        "t5_mask": ((b, lmax), torch.bool),
    }
    for name in ("clip_txt", "clip_pool", "clip_img"):
        specs[name] = ((b, *first[name].shape), emb)
    for name in ("image", "lowres"):
        if name in first:
            specs[name] = ((b, *first[name].shape), torch.uint8)
    if "latent" in first:  # a VAE codec's latents (docs/latent.md): the model input
        lat16 = all(s["latent"].dtype == np.float16 for s in samples)
        specs["latent"] = ((b, *first["latent"].shape), torch.float16 if lat16 else torch.float32)
    if pool is not None:
        out, slab = pool.carve(specs)
    else:
        buf, slab = _shared_bytes(_nbytes(specs)), None
        out = _carve(buf, specs)
    arrays = {name: t.numpy() for name, t in out.items()}
    t5, clip_txt = arrays["t5"], arrays["clip_txt"]
    bad: list[tuple[int, str]] = []
    for i, (s, n) in enumerate(zip(samples, lengths)):
        t5[i, :n] = s["t5"]
        t5[i, n:] = 0
        clip_txt[i] = s["clip_txt"]
        for name, row in (("t5", t5[i, :n]), ("clip_txt", clip_txt[i])):
            if not all_finite(row):
                bad.append((i, name))
    for name in specs.keys() - {"t5", "t5_mask", "clip_txt"}:
        np.stack([s[name] for s in samples], out=arrays[name])
    for name in ("clip_pool", "clip_img", "latent"):  # one check per batch, rows on a hit
        if name not in arrays:
            continue
        if not all_finite(arrays[name]):
            bad += [(i, name) for i in range(b) if not all_finite(arrays[name][i])]
    if bad:
        release_slab(slab, pool.flags_tensor if pool is not None else None)
        raise NonFiniteRows(sorted(bad))
    np.less(np.arange(lmax), lengths[:, None], out=arrays["t5_mask"])
    batch: dict[str, Any] = dict(out)
    for name in ("key", "caption", "shard"):
        batch[name] = [s[name] for s in samples]
    batch["compact"] = True
    if slab is not None:
        batch["slab"] = slab
    return batch if compact else expand_batch(batch)


def expand_batch(batch: dict[str, Any], flags: Tensor | None = None) -> dict[str, Any]:
    """A compact batch → the float32 contract (images in [-1, 1]), copied out of its slab,
    which is then handed back through `flags`. Other batches pass unchanged.

    Runs on one intra-op thread: the conversions are memory-bound, and with the DataLoader
    workers busy on the other cores, torch's thread pool made them ~20x slower (measured)."""
    if not batch.pop("compact", False):
        return batch
    slab = batch.pop("slab", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("image", "lowres"):
            if name in batch:
                batch[name] = to_unit_range(batch[name])  # .float() copies uint8
        for name in EMBEDDINGS:
            batch[name] = batch[name].to(torch.float32, copy=True)
        if "latent" in batch:  # latent shards: the latent is the model's input
            batch["image"] = batch.pop("latent").to(torch.float32, copy=True)
        batch["t5_mask"] = batch["t5_mask"].clone()
    finally:
        torch.set_num_threads(threads)
    release_slab(slab, flags)  # after every copy above: the worker may refill it now
    return batch


def release_slab(slab: int | None, flags: Tensor | None) -> None:
    """Hand a compact batch's slab (its "slab" entry) back to its worker; only once every
    tensor of the batch has been copied out (to float32, or to a GPU)."""
    if slab is not None and flags is not None:
        flags.view(-1)[int(slab)] = 0
