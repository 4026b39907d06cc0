"""Remote shards fetched ahead of the reader, so a loader worker never waits on one request.

Each worker keeps `depth` shards downloading in background threads while it parses the current
one from memory (tario.iter_tar over the fetched bytes, the same parser as mapped local
shards). An object-store shard is fetched as concurrent ranged reads of CHUNK bytes, and a
range that fails is fetched again on its own (backoff per remote.Retry), so a connection
dropped mid-shard costs one chunk, not the shard. HTTP and pipe: shards come in one request
each (servers need not support ranges). A shard that still fails is handed to the reader as
its exception: skipped and counted, never fatal.

Memory per worker: about (depth + 2) shards (the fetched ones, the one being read, and the
samples of the previous one still in the shuffle buffer).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ediff_train.io.remote import PIPE, RETRY, Retry, filesystem, protocols, read_bytes, transient

CHUNK = 16 * 2**20


def fetch(url: str, retry: Retry = RETRY, chunk: int = CHUNK) -> bytes | bytearray:
    """The whole shard at `url`; raises the last backend error once retries are spent."""
    if url.startswith(PIPE):
        return read_bytes(url, retry)
    fs, path = filesystem(url)
    if "http" in protocols(fs) or not getattr(fs, "async_impl", False):
        return read_bytes(url, retry)
    size = int(retry.call(lambda: fs.size(path), url))
    if size <= 2 * chunk:
        data = read_bytes(url, retry)
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes")
        return data
    buf = bytearray(size)
    todo = [(s, min(s + chunk, size)) for s in range(0, size, chunk)]
    for attempt in range(1, max(1, retry.attempts) + 1):
        got = fs.cat_ranges(
            [path] * len(todo), [s for s, _ in todo], [e for _, e in todo], on_error="return"
        )
        failed, error = [], None
        for (start, end), part in zip(todo, got):
            if isinstance(part, BaseException) or len(part) != end - start:
                error = (
                    part
                    if isinstance(part, BaseException)
                    else OSError(f"range {start}-{end}: got {len(part)} bytes")
                )
                failed.append((start, end))
            else:
                buf[start:end] = part
        if error is None:
            return buf
        if attempt >= retry.attempts or not transient(error):
            raise error
        time.sleep(retry.wait(attempt))
        todo = failed
    raise AssertionError("unreachable")


def prefetch(
    urls: Sequence[str], retry: Retry = RETRY, depth: int = 2
) -> Iterator[tuple[str, bytes | bytearray | Exception]]:
    """(url, bytes or the error that stopped its download) in order: while the caller reads one
    shard, the next `depth` are downloading (0: each is fetched when asked for, no read-ahead).
    The next download starts when the caller asks for the next shard, not before."""
    pool = ThreadPoolExecutor(max(1, depth + 1), thread_name_prefix="ediff-readahead")
    pending: deque[tuple[str, Future]] = deque()
    todo = iter(urls)
    try:
        for url in todo:  # the shard read first, and `depth` behind it
            pending.append((url, pool.submit(fetch, url, retry)))
            if len(pending) > depth:
                break
        while pending:
            url, future = pending.popleft()
            try:
                data: bytes | bytearray | Exception = future.result()
            except Exception as e:
                data = e
            yield url, data
            del data  # the caller has read it: not held while the next one arrives
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fetch, nxt, retry)))
    finally:  # the reader may stop early (its quota is met): drop what it will not read
        pool.shutdown(wait=False, cancel_futures=True)
