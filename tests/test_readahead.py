"""Read-ahead depth means what it says: `readahead=0` fetches each shard when it is read (the
"off" figure of bench/loader.py), and `depth` d keeps exactly d shards downloading behind the
one being read (memory ~d+2 shards per worker, as documented)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

import ediff_train.data.readahead as readahead


class CountingPool(ThreadPoolExecutor):
    """Counts downloads as they are started (in the reader's thread: no timing involved)."""

    submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        CountingPool.submitted += 1
        return super().submit(*args, **kwargs)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_shards_fetched_beyond_the_one_being_read(
    monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    monkeypatch.setattr(readahead, "fetch", lambda url, retry: url.encode())
    monkeypatch.setattr(readahead, "ThreadPoolExecutor", CountingPool)
    CountingPool.submitted = 0
    urls = [f"s3://b/{i:06d}.tar" for i in range(6)]
    ahead = []
    for i, (url, data) in enumerate(readahead.prefetch(urls, depth=depth)):
        assert url == urls[i] and data == url.encode()
        ahead.append(CountingPool.submitted - (i + 1))
    assert ahead == [min(depth, len(urls) - 1 - i) for i in range(len(urls))]


def test_failed_shard_is_handed_over_as_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fetch(url: str, retry: object) -> bytes:
        if url.endswith("1.tar"):
            raise ConnectionResetError("dropped")
        return b"ok"

    monkeypatch.setattr(readahead, "fetch", fetch)
    got = list(readahead.prefetch(["a/0.tar", "a/1.tar", "a/2.tar"], depth=0))
    assert [d if isinstance(d, bytes) else type(d).__name__ for _, d in got] == [
        b"ok",
        "ConnectionResetError",
        b"ok",
    ]
