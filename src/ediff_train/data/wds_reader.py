"""`data.reader=webdataset`: the training stream read through webdataset's own pipeline.

The fast reader (loader.py, tario.py) maps each shard and hands out zero-copy views; this one
reads the same shards the way webdataset does, as a `wds.DataPipeline` per pass: a shard list
(`wds.SimpleShardList`), an opener stage (local files, or remote shards fetched by the same
readahead.prefetch as the fast reader), webdataset's tar parsing (`tar_file_iterator`, Python's
tarfile) and its grouping of members into samples (`group_by_keys`), then `wds.shuffle` with
the same seeded generator. Everything after the raw samples is shared with the fast reader
(ShardStream.__iter__): decoding and every check (samples.decode_sample, collate's NaN/Inf
search), skip counting by reason, batching through our collate, the per-worker batch quota and
the `[worker, drawn]` positions.

Shard splitting is ours, not `wds.split_by_node`/`split_by_worker`: those take every n-th shard
of an unshuffled list by torch's live rank and worker id, while ranks here must get a fresh
split each epoch (loader.rank_shards) and a resumed worker must be able to play another
worker's part (position.py). The split feeds the pipeline as its shard list. Instead of
`.with_epoch(n)`, each worker yields exactly its quota (loader.worker_quota), cycling its
shards if they run out, so every rank yields the same number of batches.

So with the same seed both readers yield the same batches in the same order, and resume is
exact in the same way (samples drawn before the resume point are read but not decoded). A
position saved under one reader is not applied under the other (the stream identity names the
reader): the epoch starts over, with a one-line warning.

Damaged tars: tarfile stops silently at a header cut short or corrupt, where tario raises. A
plain tar is therefore checked up front for its end: a size that is not a multiple of 512 or a
last block that is not zeros is a shard cut short (`truncated_tar`, once), read up to the cut;
an incomplete last sample is dropped as the fast reader drops it. Limit: a corrupt header in
the middle of an intact-length shard ends that shard silently here (the fast reader counts it).
"""

from __future__ import annotations

import functools
import io
import random
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from ediff_train.data.loader import ShardStream, SkipCounter
from ediff_train.data.readahead import prefetch
from ediff_train.data.samples import missing_fields
from ediff_train.data.tario import BLOCK, is_plain_tar
from ediff_train.io.remote import Retry, is_remote, shard_name

READERS = ("fast", "webdataset")
_DAMAGE = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)


def cut_short(head: bytes, tail: bytes, size: int) -> bool:
    """Whether a plain tar of `size` bytes (`head`: its first block, `tail`: its last) lacks
    its end: every complete one ends on a 512-byte boundary with zero blocks."""
    if not is_plain_tar(head):
        return False  # compressed: tarfile itself raises when one is cut short
    return size % BLOCK != 0 or tail != bytes(BLOCK)


def open_shards(
    sources: Iterable[dict[str, Any]], skips: SkipCounter, retry: Retry, readahead: int
) -> Iterator[dict[str, Any]]:
    """Pipeline stage {url} → {url, stream, cut}: local files opened, remote ones fetched
    `readahead` ahead (an unfetchable one counted `unreadable_shard`, as in the fast reader);
    `cut` marks a plain tar cut short (see cut_short)."""
    urls = [s["url"] for s in sources]
    if urls and is_remote(urls[0]):
        for url, data in prefetch(urls, retry, readahead):
            if isinstance(data, Exception):
                why = f"{type(data).__name__}: {data}"
                skips.skip("unreadable_shard", shard_name(url), None, why)
                continue
            tail = bytes(data[-BLOCK:])
            cut = cut_short(bytes(data[:BLOCK]), tail, len(data))
            yield {"url": url, "stream": io.BytesIO(data), "cut": cut}
        return
    for url in urls:
        try:
            f = open(url, "rb")  # noqa: SIM115  (closed by read_members)
            head, size = f.read(BLOCK), f.seek(0, 2)
            f.seek(max(0, size - BLOCK))
            tail = f.read(BLOCK)
            f.seek(0)
        except OSError as e:  # the fast reader counts a shard it cannot map the same way
            skips.skip("truncated_tar", shard_name(url), None, e)
            continue
        yield {"url": url, "stream": f, "cut": cut_short(head, tail, size)}


def read_members(sources: Iterable[dict[str, Any]], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Pipeline stage {url, stream} → webdataset's {fname, data, __url__} members, then its
    end-of-shard marker {}. A damaged shard is counted once (`truncated_tar`) and ends where
    tarfile stops; its last sample, if incomplete, is marked `__bad__` so that group_by_keys
    drops it (the fast reader keeps exactly the complete samples before a cut)."""
    for source in sources:
        url, stream = source["url"], source["stream"]
        errors: list[BaseException] = []

        def stop(exn: BaseException, errors: list[BaseException] = errors) -> bool:
            errors.append(exn)
            return False  # a damaged stream: nothing after the error can be trusted

        last: tuple[str | None, dict[str, bytes]] = (None, {})
        try:
            for member in tar_file_iterator(stream, handler=stop):
                key, ext = base_plus_ext(member["fname"])
                if key is not None:
                    last = (key, {} if key != last[0] else last[1])
                    last[1][ext.lower()] = b""
                member["__url__"] = url
                yield member
        except _DAMAGE as e:
            errors.append(e)
        finally:
            stream.close()
        if errors or source["cut"]:
            why = errors[0] if errors else "no end-of-archive blocks: the tar was cut short"
            skips.skip("truncated_tar", shard_name(url), None, why)
            key, exts = last
            if key is not None and missing_fields(exts):
                yield {"fname": f"{key}.__bad__", "data": True, "__url__": url}
        yield {}  # group_by_keys: the shard ends here, its last sample is complete


def name_shards(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset's `__url__` → our `__shard__` (the shard's file name, as in skip logs)."""
    for sample in samples:
        sample["__shard__"] = shard_name(sample.pop("__url__"))
        yield sample


class WdsStream(ShardStream):
    """ShardStream whose raw samples come from a webdataset pipeline (module docstring); the
    same batches, quotas, skip counts and positions as the fast reader."""

    reader = "webdataset"

    def identity(self, num_workers: int) -> dict[str, object]:
        """The fast reader's identity plus the reader (its own has no key, as before readers
        existed, so its saved positions keep fitting)."""
        return {**super().identity(num_workers), "reader": self.reader}

    def pipeline(
        self, order: Sequence[str], skips: SkipCounter, rng: random.Random
    ) -> wds.DataPipeline:
        """One pass over `order` as webdataset stages."""
        return wds.DataPipeline(
            wds.SimpleShardList(list(order)),
            lambda src: open_shards(src, skips, self.retry, self.readahead),
            lambda src: read_members(src, skips),
            # a member name twice in one sample: the first one is kept (the fast reader keeps
            # the last); no other error can reach it from read_members
            functools.partial(group_by_keys, handler=wds.ignore_and_continue),
            name_shards,
            wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)
            if self.shuffle_buffer > 1
            else None,
        )

    def raw_pass(
        self, order: Sequence[str], skips: SkipCounter, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        return iter(self.pipeline(order, skips, rng))


def stream_class(reader: str) -> type[ShardStream]:
    """The stream type of `data.reader`."""
    return WdsStream if reader == "webdataset" else ShardStream
