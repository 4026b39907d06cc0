"""data.reader=webdataset (data/wds_reader.py): the same stream as the fast reader, through
webdataset's pipeline. Known answers: the fast reader's batches (same seed → same keys, same
order, bit-identical tensors), each epoch's keys once each, the skip counts of test_loader's
corrupt set, and the position rules of position.py."""

from __future__ import annotations

import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_resume import recorded, stream_keys, take, train
from test_loader import DIMS, corrupt_samples, member_offsets, write_set

from ediff_train.data.datamodule import ShardDataModule, ShardLoader
from ediff_train.data.loader import ShardStream, SkipCounter, rank_shards, read_shard
from ediff_train.data.wds_reader import WdsStream
from ediff_train.errors import EdiffError

SIZES = [5, 7, 3, 9]  # 24 samples in 4 shards of unequal size


def loader(root: Path, reader: str, **kw: object) -> ShardLoader:
    args = {"batch_size": 4, "image_size": 16, "num_workers": 0, "shuffle_buffer": 8, **kw}
    args.setdefault("rank", 0)
    args.setdefault("world_size", 1)
    dm = ShardDataModule(str(root), reader=reader, seed=3, **args)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm.train_dataloader()


def test_same_batches_as_the_fast_reader_and_every_key_once_per_epoch(tmp_path: Path) -> None:
    write_set(tmp_path, SIZES)
    fast, wds_ = loader(tmp_path, "fast"), loader(tmp_path, "webdataset")
    assert type(wds_.dataset) is WdsStream and type(fast.dataset) is ShardStream
    everything = Counter(f"s{i}_{j}" for i, n in enumerate(SIZES) for j in range(n))
    orders = []
    for _epoch in range(2):
        a, b = list(fast), list(wds_)
        assert len(a) == len(b) == 6  # 24 samples // batch 4
        keys = [k for batch in b for k in batch["key"]]
        assert Counter(keys) == everything
        orders.append(keys)
        for x, y in zip(a, b):  # the same samples in the same order, decoded bit for bit
            assert x["key"] == y["key"] and x["caption"] == y["caption"]
            for name, t in x.items():
                if torch.is_tensor(t):
                    assert t.dtype == y[name].dtype and torch.equal(t, y[name]), name
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_two_ranks_disjoint_with_equal_batch_counts(tmp_path: Path) -> None:
    """2 simulated ranks × 2 worker processes: 24 // (2 × 4) = 3 batches each, although their
    shards hold different numbers of samples (a short rank cycles its own shards)."""
    paths = write_set(tmp_path, SIZES)
    per_rank = []
    for rank in range(2):
        batches = list(loader(tmp_path, "webdataset", rank=rank, world_size=2, num_workers=2))
        assert len(batches) == 3 and all(len(b["key"]) == 4 for b in batches)
        mine = {Path(p).name for p in rank_shards(paths, 0, 3, rank, 2)}
        keys = {k for b in batches for k in b["key"]}
        assert {f"{int(k[1:].split('_')[0]):06d}.tar" for k in keys} <= mine
        per_rank.append(keys)
    assert not per_rank[0] & per_rank[1]


def test_corrupt_samples_skipped_and_counted_by_the_same_reasons(tmp_path: Path) -> None:
    write_set(tmp_path, [4, 4], bad={"000000.tar": corrupt_samples(np.random.default_rng(1))})
    want = {  # test_loader.test_corrupt_samples_are_skipped_and_counted's answer
        "bad_image": 1,
        "bad_shape": 2,
        "nonfinite": 2,
        "bad_npy": 1,
        "missing_field": 1,
        "truncated_tar": 0,
        "unreadable_shard": 0,
    }
    for reader in ("fast", "webdataset"):
        ld = loader(
            tmp_path, reader, batch_size=2, num_workers=2, shuffle_buffer=0, batches_per_epoch=4
        )
        keys = sorted(k for b in ld for k in b["key"])
        assert keys == sorted(f"s{i}_{j}" for i in range(2) for j in range(4))
        assert ld.skips.totals() == want, reader


def test_truncated_tar_keeps_the_complete_samples_before_the_cut(tmp_path: Path) -> None:
    (path,) = write_set(tmp_path, [6])
    data, offsets = Path(path).read_bytes(), member_offsets(path)
    stream = WdsStream([path], 2, 16, DIMS, batches_per_epoch=1, shuffle_buffer=0)
    cases = [
        (offsets["s0_3.png"][1] + 10, 3),  # inside sample 3's image: tarfile raises, drop it
        (offsets["s0_4.clip_img.npy"][0] + 100, 4),  # inside a header: tarfile is silent
        (offsets["s0_5.png"][0], 5),  # at a member boundary: no end-of-archive blocks
        (len(data), 6),  # intact
    ]
    for cut, kept in cases:
        Path(path).write_bytes(data[:cut])
        got = []
        for read in (
            lambda s: read_shard(path, s),
            lambda s: stream.raw_pass([path], s, random.Random(0)),
        ):
            skips = SkipCounter()
            got.append(([r["__key__"] for r in read(skips)], skips.totals()["truncated_tar"]))
        want = ([f"s0_{j}" for j in range(kept)], int(kept < 6))
        assert got == [want, want], cut


def test_pipe_root_matches_the_local_fast_reader_with_a_shard_cut_short(tmp_path: Path) -> None:
    """Remote shards (here `pipe:`) arrive as fetched bytes: the same stream and counts."""
    paths = write_set(tmp_path / "set", SIZES)
    cut = member_offsets(paths[1])["s1_5.png"][0]  # at a member boundary: 5 samples kept
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:cut])
    fast = loader(tmp_path / "set", "fast")
    piped = loader(f"pipe:cat {tmp_path}/set/{{name}}", "webdataset")  # type: ignore[arg-type]
    assert [b["key"] for b in piped] == [b["key"] for b in fast]
    # 22 samples for 6 batches of 4: a second pass, which reads the cut shard again
    assert piped.skips.totals()["truncated_tar"] == fast.skips.totals()["truncated_tar"] == 2


def test_resume_is_exact_and_a_position_of_the_other_reader_is_refused(tmp_path: Path) -> None:
    """2 workers, 4 batches per epoch; stopped mid-epoch 1 with one batch prefetched."""
    write_set(tmp_path, SIZES)
    kw = {"num_workers": 2, "batches_per_epoch": 4}
    ref_loader = loader(tmp_path, "webdataset", **kw)
    ref = take(ref_loader, 10)
    ref_loader._stop_workers()
    first = loader(tmp_path, "webdataset", **kw)
    got = take(first, 6, ahead=1)
    state = first.state_dict()
    first._stop_workers()
    assert state["ranks"]["0"]["epoch"] == 1 and state["identity"]["reader"] == "webdataset"
    second = loader(tmp_path, "webdataset", **kw)
    second.load_state_dict(state)
    got += take(second, 4)
    second._stop_workers()
    assert got == ref

    fast = loader(tmp_path, "fast", **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast.load_state_dict(state)  # and the other way round
        loader(tmp_path, "webdataset", **kw).load_state_dict(fast.state_dict())
    lines = [str(w.message) for w in caught]
    assert lines == [
        "data position not restored (the stream changed: reader 'webdataset' -> None); "
        "the epoch starts over",
        "data position not restored (the stream changed: reader None -> 'webdataset'); "
        "the epoch starts over",
    ]
    assert take(fast, 4) == ref[:4]  # epoch 0 from its start: the same stream as webdataset's


def test_bad_reader_is_one_line() -> None:
    with pytest.raises(
        EdiffError, match=r"^data.reader must be one of fast, webdataset, got 'tar'$"
    ):
        ShardDataModule("unused", batch_size=4, image_size=16, reader="tar")


def test_train_py_with_the_webdataset_reader(tmp_path: Path, digits_root: Path) -> None:
    """The real entry point trains on the fast reader's stream of the digits set (2 workers)."""
    train(tmp_path, "run_dir=W", "steps=4", "data.reader=webdataset", "+callbacks.keys.folder=k")
    assert [keys for _, keys in recorded(tmp_path / "k")] == stream_keys(digits_root, 4)
