"""ShardWriter writes exactly the docs/design.md §4 members; the digits build is complete, shuffled,
correctly captioned, embedded by the encoders saved next to it, cached and safe to race."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ediff_train.data.manifest import merge_manifests, read_manifest
from ediff_train.data.shards import ShardWriter
from ediff_train.data.toys.digits import build_digits, digit_captions, main
from ediff_train.errors import EdiffError

ENC = {
    "t5": {
        "name": "t",
        "version": "1",
        "dim": 6,
        "max_length": 113,
        "dtype": "float16",
        "fingerprint": "f",
    },
    "clip": {
        "name": "c",
        "version": "1",
        "text_dim": 5,
        "pool_dim": 4,
        "image_dim": 3,
        "context_length": 77,
        "dtype": "float16",
        "fingerprint": "g",
    },
}
SUFFIXES = ["png", "txt", "t5.npy", "clip_txt.npy", "clip_pool.npy", "clip_img.npy", "json"]


def _sample(i: int, rng: np.random.Generator) -> dict:
    return dict(
        image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        caption=f"caption {i}",
        t5=rng.standard_normal((i + 1, 6)),
        clip_txt=rng.standard_normal((77, 5)),
        clip_pool=rng.standard_normal(4),
        clip_img=rng.standard_normal(3),
    )


def _read(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {suffix: bytes}} from a tar, with plain tarfile (what any reader can do)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, suffix = m.name.split(".", 1)
            assert suffix not in out.setdefault(key, {}), f"{m.name} twice"
            out[key][suffix] = tar.extractfile(m).read()
    return out


def _npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def test_shard_writer_members_dtypes_shapes_and_manifest(tmp_path) -> None:
    rng = np.random.default_rng(0)
    samples = [_sample(i, rng) for i in range(5)]
    w = ShardWriter(tmp_path, ENC, image_format="png", image_size=8, samples_per_shard=2)
    with w:
        for i, s in enumerate(samples):
            w.write(f"k{i}", **s, meta={"source": "test", "i": i})
    w.finish(dataset="test")
    assert sorted(os.listdir(tmp_path)) == [
        "000000.tar",
        "000001.tar",
        "000002.tar",
        "manifest.json",
    ]  # no temp files left behind
    m = read_manifest(tmp_path)
    assert m["shards"] == {"000000.tar": 2, "000001.tar": 2, "000002.tar": 1}
    assert m["num_samples"] == 5 and m["dataset"] == "test" and m["encoders"] == ENC
    assert m["image"] == {"format": "png", "size": 8}
    seen = {}
    for name, count in m["shards"].items():
        content = _read(tmp_path / name)
        assert len(content) == count
        seen.update(content)
    for i, s in enumerate(samples):
        got = seen[f"k{i}"]
        assert sorted(got) == sorted(SUFFIXES)
        for n in ("t5", "clip_txt", "clip_pool", "clip_img"):
            arr = _npy(got[f"{n}.npy"])
            assert arr.dtype == np.float16 and arr.shape == np.shape(s[n])
            np.testing.assert_array_equal(arr, np.asarray(s[n]).astype(np.float16))
        assert _npy(got["t5.npy"]).shape == (i + 1, 6)  # only the real tokens
        img = Image.open(io.BytesIO(got["png"]))
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), s["image"])
        assert got["txt"].decode() == s["caption"]
        assert json.loads(got["json"]) == {"width": 8, "height": 8, "source": "test", "i": i}


def test_shard_writer_units_prefix_and_merge(tmp_path) -> None:
    rng = np.random.default_rng(1)
    parts = []
    for unit in range(2):
        w = ShardWriter(
            tmp_path, ENC, samples_per_shard=3, start_index=10 * unit, prefix=f"u{unit}-"
        )
        for i in range(4):
            w.write(f"u{unit}_{i}", **_sample(i, rng))
        first = 10 * unit
        assert w.close() == {f"u{unit}-{first:06d}.tar": 3, f"u{unit}-{first + 1:06d}.tar": 1}
        parts.append(w.manifest())
    assert not (tmp_path / "manifest.json").exists()  # close() only seals shards
    assert merge_manifests(parts)["num_samples"] == 8


def test_shard_writer_rejects_bad_samples_and_drops_partial_shard(tmp_path) -> None:
    rng = np.random.default_rng(2)
    w = ShardWriter(tmp_path, ENC, samples_per_shard=2)
    bad = _sample(0, rng) | {"clip_txt": np.zeros((76, 5))}
    with pytest.raises(EdiffError, match="clip_txt"):
        w.write("a", **bad)
    with pytest.raises(EdiffError, match="key"):
        w.write("a.b", **_sample(0, rng))
    with pytest.raises(EdiffError, match="NaN"):
        w.write("n", **(_sample(0, rng) | {"clip_pool": np.full(4, np.nan)}))
    with pytest.raises(RuntimeError), w:
        for i in range(3):
            w.write(f"s{i}", **_sample(i, rng))
        with pytest.raises(EdiffError, match="twice"):
            w.write("s0", **_sample(0, rng))
        raise RuntimeError("crash mid-shard")
    assert sorted(os.listdir(tmp_path)) == ["000000.tar"]  # the partial second shard is gone


@pytest.fixture(scope="module")
def digits(digits_root: Path) -> Path:
    return digits_root


def _all_samples(root: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for name, count in read_manifest(root)["shards"].items():
        content = _read(root / name)
        assert len(content) == count
        assert not out.keys() & content.keys()
        out.update(content)
    return out


def test_digits_build_is_complete_shuffled_and_captioned(digits: Path) -> None:
    m = read_manifest(digits)
    assert m["num_samples"] == 1500 and len(m["shards"]) == 12 and m["validation"] == "val"
    assert m["dataset"] == "digits" and m["created_by"] == "ediff_train.data.toys.digits"
    assert m["params"]["image_size"] == 16 and m["image"] == {"format": "png", "size": 16}
    val = read_manifest(digits / "val")
    assert val["num_samples"] == 297 and val["split"] == "val"
    train, held = _all_samples(digits), _all_samples(digits / "val")
    assert not train.keys() & held.keys()  # training never sees a held-out digit
    samples = {**train, **held}
    assert sorted(samples) == [f"digit{i:04d}" for i in range(1797)]
    wordings = set()
    for s in samples.values():
        meta = json.loads(s["json"])
        caption = s["txt"].decode()
        assert caption in digit_captions(meta["label"])
        wordings.add(caption.replace(str(meta["label"]), "N"))
    assert len(wordings) > 20  # varied wording, not one template
    first = _read(digits / "000000.tar")
    assert {json.loads(s["json"])["label"] for s in first.values()} == set(range(10))
    img = np.asarray(Image.open(io.BytesIO(samples["digit0000"]["png"])))
    assert img.shape == (16, 16, 3) and img[0, 0].max() < 30 and img.max() > 200  # white on black


def test_digits_embeddings_come_from_the_saved_encoders(digits: Path) -> None:
    from ediff_train.nn.encoders import Encoders

    enc = Encoders.load(digits / "encoders")
    assert read_manifest(digits)["encoders"] == enc.manifest_entry()
    samples = _all_samples(digits)
    keys = ["digit0000", "digit0777", "digit1796"]
    out = enc.encode_text([samples[k]["txt"].decode() for k in keys])
    for j, k in enumerate(keys):
        # Equal to float16 precision (batch composition may move the last float32 bits).
        for n in ("t5", "clip_txt", "clip_pool"):
            np.testing.assert_allclose(
                _npy(samples[k][f"{n}.npy"]).astype(np.float32),
                out[n][j].numpy(),
                rtol=2e-3,
                atol=2e-3,
            )
        assert _npy(samples[k]["clip_img.npy"]).shape == (24,)


def test_digits_cache_hit_does_not_rebuild(digits: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in digits.iterdir()}
    start = time.perf_counter()
    assert build_digits(digits) == digits
    assert time.perf_counter() - start < 1.0
    assert main(["--root", str(digits)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in digits.iterdir()} == before


def test_digits_race_then_rebuild_on_new_params(digits: Path, tmp_path) -> None:
    root = tmp_path / "d"
    results: list[Path] = []
    # align_steps=0 (random encoders) keeps this fast: caching and racing do not depend on it
    threads = [
        threading.Thread(
            target=lambda: results.append(
                build_digits(root, samples_per_shard=600, val_size=0, align_steps=0)
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [root, root]
    assert read_manifest(root)["shards"] == {
        "000000.tar": 600,
        "000001.tar": 600,
        "000002.tar": 597,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]  # no temp folders
    # Same seed → same caption for every key, whatever the sharding and split.
    a = {k: s["txt"] for k, s in _all_samples(root).items()}
    b = {k: s["txt"] for r in (digits, digits / "val") for k, s in _all_samples(r).items()}
    assert a == b
    build_digits(root, samples_per_shard=1000, val_size=0, align_steps=0)
    assert read_manifest(root)["shards"] == {"000000.tar": 1000, "000001.tar": 797}
    assert sorted(os.listdir(root)) == ["000000.tar", "000001.tar", "encoders", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]
