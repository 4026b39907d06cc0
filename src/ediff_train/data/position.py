"""Where the training stream stands, so a resumed run continues it instead of replaying it.

Each (seed, epoch, rank, worker) stream is deterministic (loader.ShardStream), so a position is
a few counts: the epoch, the batches of it this rank consumed, and per worker the raw samples
it had drawn from its shuffled shard stream when it made its last consumed batch. Those counts
live where they are true, not in the workers: every batch carries `[worker, drawn]`
(`POSITION`) and the main process records it when the batch is *consumed* (by the training
step, not when a worker or a prefetcher produced it), so prefetched batches are never counted.

Resuming: each worker reads its shards again up to `drawn` without decoding anything, then goes
on. The DataLoader takes batches round-robin from its workers, starting at worker 0 each epoch;
after `n` consumed batches the next one is worker `n % K`'s, so in the resumed epoch physical
worker p plays logical worker `(p + n) % K`, which keeps the batch order of an uninterrupted run.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

POSITION = "position"  # batch key: [logical worker, raw samples it had drawn this epoch]
MAX_WORKERS = 256  # per rank, for the shared resume point
_FORMAT = 1


def share(n: int, worker: int, workers: int) -> int:
    """Worker `worker`'s part of `n` batches taken round-robin from `workers` workers (the
    first `n % workers` have one more): its epoch quota, or what it delivered of the first n."""
    k = max(workers, 1)
    return n // k + (1 if worker < n % k else 0)


class ResumePoint:
    """Where the workers of one rank restart in one epoch. In shared memory, so workers that
    were started earlier (persistent ones) see it: [epoch, consumed, workers, drawn per worker];
    epoch -1 = nowhere to resume (start every epoch at its beginning)."""

    def __init__(self) -> None:
        self.t = torch.full((3 + MAX_WORKERS,), -1, dtype=torch.int64).share_memory_()

    def set(self, epoch: int, consumed: int, workers: int, drawn: Sequence[int]) -> None:
        if workers > MAX_WORKERS:
            raise ValueError(f"cannot resume {workers} workers per rank (max {MAX_WORKERS})")
        self.t[3:] = 0
        self.t[3 : 3 + len(drawn)] = torch.tensor(list(drawn), dtype=torch.int64)
        self.t[1], self.t[2] = consumed, workers
        self.t[0] = epoch  # last: the point is complete once it names an epoch

    def clear(self) -> None:
        self.t[0] = -1

    def for_worker(self, epoch: int, physical: int, workers: int) -> tuple[int, int, int]:
        """(logical worker, batches it already delivered, raw samples to pass over) for the
        DataLoader worker `physical` of `workers` in `epoch`; (physical, 0, 0) when not resuming."""
        t = self.t.tolist()
        if t[0] != epoch or t[2] != workers or t[1] <= 0:
            return physical, 0, 0
        consumed = t[1]
        logical = (physical + consumed) % workers
        return logical, share(consumed, logical, workers), t[3 + logical]


def _gather(own: dict[str, Any], rank: int) -> dict[str, dict[str, Any]]:
    """Every rank's entry, keyed by rank (a collective when torch.distributed runs: Lightning
    builds a checkpoint on every rank, and rank 0 alone writes it)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, own)
        return {str(e["rank"]): e for e in out}
    return {str(rank): own}


class StreamPosition:
    """The main process's record of one rank's place in the stream, and its checkpoint form.

    `identity` names what makes the stream (seed, shards, world, batch sizes, workers): a
    position saved under another identity cannot be mapped onto this stream, so it is refused
    with a warning and the epoch starts at its beginning (what happened before positions existed).
    """

    def __init__(
        self, rank: int, identity: Mapping[str, Any], workers: int, batches_per_epoch: int
    ) -> None:
        self.rank, self.workers, self.batches_per_epoch = rank, workers, batches_per_epoch
        self.identity = dict(identity)
        self.epoch, self.consumed = 0, 0
        self.drawn = [0] * max(workers, 1)
        self._restored: dict[str, Any] | None = None
        self._started = False

    def begin(self, epoch: int | None, point: ResumePoint) -> int:
        """Start a pass over the loader and return its data epoch. The stream is continuous:
        a pass goes on where the consumed batches stand (an epoch the consumer left early
        continues, e.g. when Lightning closes its epoch at max_steps and a resumed run opens the
        next one), then the next epoch follows. `epoch` (the trainer's) is used only when there
        is no position at all, e.g. resuming from a checkpoint written before positions."""
        restored, self._restored = self._restored, None
        if restored is not None:
            e, n = int(restored["epoch"]), int(restored["consumed"])
            drawn = [int(d) for d in restored["drawn"]]
        elif self._started:
            e, n, drawn = self.epoch, self.consumed, self.drawn
        else:
            e, n, drawn = (epoch or 0), 0, []
        if n >= self.batches_per_epoch:  # that epoch is done: the next one starts
            e, n = e + 1, 0
        self._started = True
        self.epoch, self.consumed = e, n
        self.drawn = list(drawn) if n > 0 else [0] * max(self.workers, 1)
        point.clear()
        if n > 0:
            point.set(e, n, self.workers, self.drawn)
        return e

    def consume(self, position: Sequence[int]) -> None:
        """A batch tagged `[worker, drawn]` reached its consumer."""
        worker, drawn = int(position[0]), int(position[1])
        self.consumed += 1
        self.drawn[worker] = drawn

    def state_dict(self, skipped: Mapping[str, int]) -> dict[str, Any]:
        own = {
            "rank": self.rank,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "drawn": list(self.drawn),
            "skipped": dict(skipped),
        }
        return {"format": _FORMAT, "identity": self.identity, "ranks": _gather(own, self.rank)}

    def load_state_dict(self, state: Mapping[str, Any]) -> dict[str, int] | None:
        """Take this rank's saved position for the next epoch start; returns its skip counts,
        or None (with a warning) when the position does not fit this stream."""
        why = None
        if state.get("format") != _FORMAT:
            why = f"format {state.get('format')!r}, expected {_FORMAT}"
        elif dict(state.get("identity", {})) != self.identity:
            old, new = state.get("identity", {}), self.identity
            names = [*new, *(k for k in old if k not in new)]  # a key only one of them has too
            diff = [
                f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in names if old.get(k) != new.get(k)
            ]
            why = "the stream changed: " + ", ".join(diff)
        elif str(self.rank) not in state.get("ranks", {}):
            why = f"no position saved for rank {self.rank}"
        if why is not None:
            warnings.warn(
                f"data position not restored ({why}); the epoch starts over", stacklevel=3
            )
            return None
        self._restored = dict(state["ranks"][str(self.rank)])
        return {str(k): int(v) for k, v in self._restored.get("skipped", {}).items()}


def shards_digest(shards: Sequence[str]) -> str:
    """A short name for a shard list (by file name: the same set moved elsewhere matches)."""
    names = "\n".join(sorted(s.rsplit("/", 1)[-1] for s in shards))
    return f"{len(shards)}:{zlib.crc32(names.encode()):08x}"
