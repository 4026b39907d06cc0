"""The loader's fast paths: tar and .npy readers, compact batches in reused shared memory."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_loader import DIMS, make_sample, npy, write_set

from ediff_train.data.batching import (
    SLABS_PER_WORKER,
    NonFiniteRows,
    SlabPool,
    collate,
    expand_batch,
)
from ediff_train.data.datamodule import ShardLoader
from ediff_train.data.loader import ShardStream, decode_sample
from ediff_train.data.tario import iter_tar, read_npy
from ediff_train.errors import EdiffError


def tar_bytes(members: dict[str, bytes], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(fmt: int) -> None:
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90
    members = {
        "a.txt": b"x",
        f"{long_dir}/k{'e' * 110}y.t5.npy": bytes(range(256)) * 5,
        "empty.json": b"",
        "ünïcode.txt": "é".encode(),
    }
    if fmt == tarfile.USTAR_FORMAT:  # ustar: 155-char prefix + 100-char name, ascii
        members = {
            "a.txt": b"x",
            f"{long_dir}/key.t5.npy": bytes(range(256)) * 5,
            "empty.json": b"",
        }
    data = tar_bytes(members, fmt)
    got = {name: bytes(body) for name, body in iter_tar(data)}
    assert got == members


def test_tar_reader_refuses_truncation_and_corrupt_headers() -> None:
    data = tar_bytes({"a.txt": b"hello", "b.txt": b"world" * 200}, tarfile.USTAR_FORMAT)
    for cut in (100, 512 + 3, 1024 + 100, 1536 + 1000):  # in headers, in data, no end block
        with pytest.raises(tarfile.ReadError):
            list(iter_tar(data[:cut]))
    broken = bytearray(data)
    broken[1024 + 5] ^= 0xFF  # second header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar(bytes(broken)))


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.ones((77, 5), np.float32),
        np.float64(2.5),
        np.zeros((0, 8), np.float16),
        np.arange(6, dtype=np.int32).reshape(2, 3),  # not float: numpy's reader
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.arange(4, dtype=">f4"),  # big-endian
    ],
)
def test_npy_reader_matches_numpy(arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    got = read_npy(bytearray(buf.getvalue()))
    assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)


def test_npy_reader_rejects_truncated_data() -> None:
    buf = io.BytesIO()
    np.save(buf, np.ones((4, 4), np.float16))
    with pytest.raises(ValueError, match="header says"):
        read_npy(buf.getvalue()[:-2])


def test_slabs_are_reused_only_after_their_batch_was_expanded() -> None:
    flags = torch.zeros(2, SLABS_PER_WORKER, dtype=torch.uint8)
    pool = SlabPool(flags, worker=1)
    rng = np.random.default_rng(0)
    raws = [{**make_sample(f"k{i}", rng), "__shard__": "x.tar"} for i in range(4)]
    samples = [decode_sample(r, 16, DIMS) for r in raws]
    batches = [collate(samples, compact=True, pool=pool) for _ in range(SLABS_PER_WORKER + 1)]
    slabs = [SLABS_PER_WORKER + k for k in range(SLABS_PER_WORKER)]  # worker 1's flat indices
    assert [b.get("slab") for b in batches] == slabs + [None]
    assert flags[1].tolist() == [1] * SLABS_PER_WORKER and not flags[0].any()
    first_ptr = batches[0]["t5"].data_ptr()
    out = expand_batch(batches[0], flags)
    assert flags[1, 0] == 0 and out["image"].dtype == torch.float32
    reused = collate(samples, compact=True, pool=pool)
    assert reused["slab"] == slabs[0] and reused["t5"].data_ptr() == first_ptr
    reused["t5"].fill_(7.0)  # refilling the slab must not reach the expanded batch
    reused["image"].fill_(0)
    assert not (out["t5"] == 7.0).any() and out["image"].max() > -1
    plain = collate([decode_sample(r, 16, DIMS) for r in raws])
    for name in ("t5", "t5_mask", "clip_txt", "clip_pool", "clip_img", "image"):
        assert torch.equal(out[name], plain[name]), name


def test_worker_batches_equal_in_process_batches(tmp_path: Path) -> None:
    paths = write_set(tmp_path, [20, 20])
    n = SLABS_PER_WORKER * 3  # every slab refilled several times

    def batches(workers: int) -> list[dict]:
        stream = ShardStream(
            paths[:1], 4, 16, DIMS, batches_per_epoch=n, shuffle_buffer=8, lowres_size=8
        )
        return list(ShardLoader(stream, num_workers=workers))

    inproc, worker = batches(0), batches(1)
    assert len(inproc) == len(worker) == n
    for a, b in zip(inproc, worker):
        assert a["key"] == b["key"] and "compact" not in b and "slab" not in b
        for name in ("image", "lowres", "t5", "t5_mask", "clip_txt", "clip_pool", "clip_img"):
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_collate_finds_nonfinite_rows_and_frees_the_slab() -> None:
    """The NaN/Inf check runs inside collate (on rows still in cache): one bad value anywhere
    in a row refuses the batch, names every bad row, and gives the slab back."""
    rng = np.random.default_rng(6)
    raws = [{**make_sample(f"k{i}", rng, t5_len=4), "__shard__": "x.tar"} for i in range(5)]
    t5 = np.ones((4, DIMS.t5), np.float16)
    t5[3, 7] = np.nan  # the last real token only
    raws[1]["t5.npy"] = npy(t5)
    img = np.zeros(DIMS.clip_img, np.float16)
    img[-1] = -np.inf
    raws[3]["clip_img.npy"] = npy(img)
    raws[3]["clip_txt.npy"] = npy(np.full((77, DIMS.clip_txt), np.inf, np.float16))
    raws[4]["clip_pool.npy"] = npy(np.full(DIMS.clip_pool, 1e300))  # float64: inf in float32
    with np.errstate(over="ignore"):
        samples = [decode_sample(r, 16, DIMS) for r in raws]  # decoding does not look for NaN
    flags = torch.zeros(1, SLABS_PER_WORKER, dtype=torch.uint8)
    pool = SlabPool(flags, worker=0)
    with pytest.raises(NonFiniteRows) as err:
        collate(samples, compact=True, pool=pool)
    assert err.value.rows == [(1, "t5"), (3, "clip_img"), (3, "clip_txt"), (4, "clip_pool")]
    assert not flags.any()  # the refused batch's slab is free again
    with pytest.raises(NonFiniteRows):
        collate(samples)  # the float32 path checks too
    good = collate(
        [s for i, s in enumerate(samples) if i not in (1, 3, 4)], compact=True, pool=pool
    )
    assert good["key"] == ["k0", "k2"] and flags[0].tolist() == [1, 0, 0, 0]
    assert good["t5"].dtype == torch.float16  # the float64 sample no longer widens the batch


def test_nonfinite_samples_dropped_when_a_pass_never_fills_a_batch(tmp_path: Path, caplog) -> None:
    """Shards smaller than a batch: NaN samples never reach a batch, and a shard set with
    nothing usable fails after one pass (each bad sample logged once), instead of cycling."""
    rng = np.random.default_rng(7)
    bad = []
    for name in ("t5", "clip_txt", "clip_pool"):
        sample = make_sample(f"nan_{name}", rng, t5_len=2)
        sample[f"{name}.npy"] = npy(
            np.full_like(decode_sample({**sample, "__shard__": "x"}, 16, DIMS)[name], np.nan)
        )
        bad.append(sample)
    paths = write_set(tmp_path, [1], bad={"000000.tar": bad[:1]})
    stream = ShardStream(paths, 4, 16, DIMS, batches_per_epoch=2, shuffle_buffer=0)
    batches = list(ShardLoader(stream, num_workers=0))
    assert [b["key"] for b in batches] == [["s0_0"] * 4] * 2  # the one good sample, cycled
    assert sum(b["skipped"]["nonfinite"] for b in batches) == 8  # once per pass read

    only_nan = write_set(tmp_path / "bad", [0], bad={"000000.tar": bad})
    caplog.clear()
    with caplog.at_level("WARNING", logger="ediff_train.data.loader"):
        with pytest.raises(EdiffError, match="no usable sample in shards 000000.tar"):
            list(ShardStream(only_nan, 4, 16, DIMS, batches_per_epoch=1, shuffle_buffer=0))
    logged = [r.getMessage() for r in caplog.records if "nonfinite" in r.getMessage()]
    assert len(logged) == 3 and all("hold NaN/Inf" in line for line in logged)
