"""data_prep/embed.py: images + captions → shards, exactly once, restartable, split over tasks."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import ROOT, run_env
from PIL import Image

from ediff_train.data.datamodule import ShardDataModule
from ediff_train.data.images import ImageSpec, prepare_image
from ediff_train.data.manifest import read_manifest
from ediff_train.data.prep import EmbedJob, PrepConfig, resolve_task
from ediff_train.data.sources import list_input
from ediff_train.errors import EdiffError
from ediff_train.nn.encoders import Encoders

SPEC = ImageSpec(size=16, min_side=16, format="jpg")
WORDS = "cat dog red blue small large photo of a the on table street tree".split()


def jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 14))))


def make_jsonl(root: Path, n: int, seed: int = 0) -> dict[str, str]:
    """n images (20-40 px) + captions.jsonl; returns {key: caption} (keys are line numbers)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    lines, keys = [], {}
    for i in range(n):
        (root / "img" / f"{i}.jpg").write_bytes(jpeg(rng, *rng.integers(20, 41, size=2)))
        cap = caption(rng)
        lines.append(json.dumps({"image": f"img/{i}.jpg", "caption": cap}))
        keys[f"{i + 1:09d}"] = cap
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return keys


def run(
    inp: Path,
    out: Path,
    enc: Encoders,
    unit_size: int = 50,
    spec: ImageSpec = SPEC,
    min_sim: float | None = None,
    **kw,
):  # noqa: ANN201
    cfg = PrepConfig(
        inp,
        out,
        spec,
        unit_size=unit_size,
        batch_size=16,
        sort_window=32,
        workers=2,
        clip_min_similarity=min_sim,
    )
    return EmbedJob(cfg, enc).run(progress=False, cpu_threads=1, **kw)


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard; a key seen twice fails the test."""
    found: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                sample = found.setdefault(key, {})
                assert ext not in sample, f"{key} written twice"
                sample[ext] = tf.extractfile(m).read()
    return found


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.tar")}


@pytest.fixture(scope="module")
def enc() -> Encoders:
    return Encoders.tiny(0)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("src")
    return root, make_jsonl(root, 200)


@pytest.fixture(scope="module")
def full(
    src: tuple[Path, dict[str, str]], enc: Encoders, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("full") / "shards"
    report = run(src[0], out, enc)
    assert report.embedded == 4 and report.written == 200
    return out


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def test_every_input_key_once_with_its_own_embeddings(src, full: Path, enc: Encoders) -> None:
    _, captions = src
    got = samples(full)
    assert set(got) == set(captions)  # each exactly once (samples() asserts no repeat)
    manifest = read_manifest(full)
    assert manifest["num_samples"] == 200 and manifest["units"] == 4
    assert manifest["shards"] == {f"{i:06d}.tar": 50 for i in range(4)}
    assert not any(manifest["skipped"].values())
    assert manifest["image"] == {"format": "jpg", "size": 16}
    # captions were embedded in batches sorted by length: each sample must still hold its own
    keys = sorted(got)
    caps = [captions[k] for k in keys]
    want = enc.encode_text(caps)
    lengths = [len(ids) for ids in enc.t5_tokenizer(caps)["input_ids"]]
    for i, k in enumerate(keys):
        s = got[k]
        assert s["txt"].decode() == caps[i]
        t5 = npy(s["t5.npy"])
        assert t5.dtype == np.float16 and t5.shape == (lengths[i], 32)  # no padding stored
        np.testing.assert_allclose(t5, want["t5"][i].numpy(), atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(
            npy(s["clip_pool.npy"]), want["clip_pool"][i].numpy(), atol=2e-2, rtol=1e-2
        )
        assert Image.open(io.BytesIO(s["jpg"])).size == (16, 16)
        meta = json.loads(s["json"])
        assert meta["source"] == f"img/{int(k) - 1}.jpg" and 20 <= meta["original_width"] <= 40
    # the CLIP image embedding comes from the source image, centre-cropped to CLIP's size
    k = keys[7]
    data = (src[0] / f"img/{int(k) - 1}.jpg").read_bytes()
    clip_in = prepare_image(data, SPEC, enc.image_size).clip
    img = enc.encode_image(torch.from_numpy(clip_in).permute(2, 0, 1)[None].float() / 255)
    np.testing.assert_allclose(npy(got[k]["clip_img.npy"]), img[0].numpy(), atol=2e-2, rtol=1e-2)


def test_two_tasks_cover_the_input_exactly_once(
    src, full: Path, enc: Encoders, tmp_path: Path
) -> None:
    out = tmp_path / "split"
    first = run(src[0], out, enc, task_id=0, num_tasks=2)
    assert first.embedded == 2 and first.manifest is None
    assert not (out / "manifest.json").exists()  # half a data set is never loadable
    second = run(src[0], out, enc, task_id=1, num_tasks=2)
    assert second.embedded == 2 and second.manifest == out / "manifest.json"
    assert set(samples(out)) == set(src[1])
    assert shard_hashes(out) == shard_hashes(full)  # and byte for byte the same shards
    assert read_manifest(out)["shards"] == read_manifest(full)["shards"]


def test_run_killed_after_first_unit_resumes_to_the_same_set(
    src, full: Path, enc: Encoders, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    report = run(src[0], out, enc, max_units=1)
    assert report.embedded == 1 and not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["000000.json"]
    # what a kill leaves: a half-written temp shard, and a renamed shard whose part is missing
    (out / ".000001.tar.tmp4242").write_bytes(b"half a tar")
    (out / "000002.tar").write_bytes(b"not what unit 2 holds")
    again = run(src[0], out, enc)
    assert again.done_before == 1 and again.embedded == 3
    assert set(samples(out)) == set(src[1])
    assert shard_hashes(out) == shard_hashes(full)
    assert not list(out.glob(".*tmp*"))
    assert read_manifest(out) == read_manifest(full)


def test_sigkill_mid_run_then_rerun_gives_every_key_once(src, tmp_path: Path) -> None:
    """The real thing: the CLI is killed with SIGKILL as soon as its first unit is done, then
    run again; the result holds every input key exactly once and no temporary files."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "data_prep" / "embed.py"),
        f"input={src[0]}",
        f"output={out}",
        "stage.size=16",
        "stage.min_side=16",
        "unit_size=10",
        "workers=0",
        "progress=false",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=run_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "parts" / "000000.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first unit never finished"
            time.sleep(0.002)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    done = len(list((out / "parts").glob("*.json")))
    assert 1 <= done < 20 and not (out / "manifest.json").exists()  # really cut short
    again = subprocess.run(
        cmd, cwd=tmp_path, env=run_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert f"{20 - done} of my 20 units embedded now, {done} were done before" in again.stdout
    assert set(samples(out)) == set(src[1])  # samples() fails on any key seen twice
    assert read_manifest(out)["num_samples"] == 200
    assert not [p.name for p in out.rglob("*") if "tmp" in p.name]


def test_rerunning_a_finished_job_changes_nothing(src, full: Path, enc: Encoders) -> None:
    before = snapshot(full)
    report = run(src[0], full, enc)
    assert report.embedded == 0 and report.done_before == 4
    assert snapshot(full) == before


def test_other_settings_on_an_existing_output_are_refused(src, full: Path, enc: Encoders) -> None:
    before = snapshot(full)
    with pytest.raises(EdiffError, match=r"other settings \(image.size differ\)"):
        run(src[0], full, enc, spec=ImageSpec(32, 16))
    with pytest.raises(EdiffError, match=r"input.unit_size"):
        run(src[0], full, enc, unit_size=40)
    assert snapshot(full) == before


def test_output_loads_through_the_datamodule_with_matching_expectations(
    full: Path, enc: Encoders
) -> None:
    expect = {
        "t5_dim": 32,
        "clip_txt_dim": 32,
        "clip_pool_dim": 24,
        "clip_img_dim": 24,
        "t5_fingerprint": enc.fingerprint("t5"),
    }
    dm = ShardDataModule(
        str(full),
        batch_size=8,
        image_size=16,
        num_workers=0,
        batches_per_epoch=3,
        expect=expect,
        rank=0,
        world_size=1,
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and batches[0]["image"].shape == (8, 3, 16, 16)
    assert batches[0]["t5"].shape[2] == 32 and batches[0]["clip_img"].shape == (8, 24)
    bad = ShardDataModule(str(full), batch_size=8, image_size=16, expect={**expect, "t5_dim": 4096})
    with pytest.raises(EdiffError, match="t5.dim is 32 but the model expects 4096"):
        bad.setup("fit")
    saved = Encoders.load(full / "encoders")  # where the trainer and sampler look
    assert saved.fingerprint("t5") == read_manifest(full)["encoders"]["t5"]["fingerprint"]


def write_img2dataset(root: Path, n_per_tar: int, seed: int = 1) -> dict[str, str]:
    """Tars as img2dataset writes them; one sample in the second tar lacks its caption."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    keys = {}
    for t in range(2):
        with wds.TarWriter(str(root / f"{t:05d}.tar")) as w:
            for j in range(n_per_tar):
                key = f"{t:05d}{j:04d}"
                sample = {
                    "__key__": key,
                    "jpg": jpeg(rng, 32, 24),
                    "json": json.dumps({"url": f"http://x/{key}.jpg", "key": key}),
                }
                if t == 1 and j == 3:
                    keys[key] = None  # no caption: skipped
                else:
                    sample["txt"] = keys[key] = caption(rng)
                w.write(sample)
        (root / f"{t:05d}_stats.json").write_text(json.dumps({"successes": n_per_tar}))
    return keys


def test_img2dataset_tars_become_one_shard_each(enc: Encoders, tmp_path: Path) -> None:
    keys = write_img2dataset(tmp_path / "tars", 12)
    report = run(tmp_path / "tars", tmp_path / "out", enc)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["shards"] == {"000000.tar": 12, "000001.tar": 11}
    assert manifest["skipped"]["no_caption"] == 1 and report.skipped["no_caption"] == 1
    got = samples(tmp_path / "out")
    assert {k: s["txt"].decode() for k, s in got.items()} == {
        k: c for k, c in keys.items() if c is not None
    }
    meta = json.loads(got["000010002"]["json"])
    assert meta["url"] == "http://x/000010002.jpg" and meta["source"] == "00001.tar/000010002.jpg"


def test_too_small_missing_and_corrupt_images_are_skipped_and_counted(
    enc: Encoders, tmp_path: Path
) -> None:
    rng = np.random.default_rng(2)
    inp = tmp_path / "in"
    (inp / "img").mkdir(parents=True)
    lines, good = [], set()
    for i in range(12):
        name = f"img/{i}.jpg"
        if i in (3, 7):  # 12x30: shorter side below min_side 16
            (inp / name).write_bytes(jpeg(rng, 30, 12))
        elif i == 5:
            pass  # listed but never downloaded
        elif i == 9:
            (inp / name).write_bytes(b"\xff\xd8 this is not a jpeg")
        else:
            (inp / name).write_bytes(jpeg(rng, 24, 24))
            good.add(f"{i + 1:09d}")
        lines.append(json.dumps({"image": name, "caption": caption(rng)}))
    (inp / "captions.jsonl").write_text("\n".join(lines))
    run(inp, tmp_path / "out", enc)
    manifest = read_manifest(tmp_path / "out")
    assert set(samples(tmp_path / "out")) == good and manifest["num_samples"] == 8
    assert {k: v for k, v in manifest["skipped"].items() if v} == {
        "too_small": 2,
        "missing_image": 1,
        "bad_image": 1,
    }


def test_clip_similarity_filter_drops_pairs_below_the_threshold(
    enc: Encoders, tmp_path: Path
) -> None:
    captions = make_jsonl(tmp_path / "in", 40, seed=3)
    keys = sorted(captions)
    pooled = enc.encode_text([captions[k] for k in keys])["clip_pool"]
    clip_in = [
        prepare_image(
            (tmp_path / "in" / f"img/{int(k) - 1}.jpg").read_bytes(), SPEC, enc.image_size
        ).clip
        for k in keys
    ]
    img = enc.encode_image(torch.from_numpy(np.stack(clip_in)).permute(0, 3, 1, 2).float() / 255)
    sim = torch.nn.functional.cosine_similarity(pooled, img).tolist()
    ranked = sorted(sim)
    gaps = [(ranked[i + 1] - ranked[i], i) for i in range(10, 30)]
    _, i = max(gaps)  # a threshold well clear of every pair's value
    threshold = (ranked[i] + ranked[i + 1]) / 2
    run(tmp_path / "in", tmp_path / "out", enc, min_sim=threshold)
    kept = {k for k, s in zip(keys, sim) if s >= threshold}
    got = samples(tmp_path / "out")
    assert set(got) == kept and 10 < len(kept) < 31
    assert read_manifest(tmp_path / "out")["skipped"]["low_similarity"] == 40 - len(kept)
    assert all(json.loads(s["json"])["clip_similarity"] >= threshold for s in got.values())


def test_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(EdiffError, match="does not exist"):
        list_input(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdiffError, match="neither captions.jsonl nor .tar files"):
        list_input(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captions.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n\n{"image": oops\n')
    with pytest.raises(EdiffError, match=r"captions.jsonl:3: not a JSON object") as e:
        list_input(bad)
    assert "\n" not in str(e.value)
    (bad / "captions.jsonl").write_text('{"image": "a.jpg"}\n')
    with pytest.raises(EdiffError, match=r"captions.jsonl:1: \"caption\" must be a string"):
        list_input(bad)
    (bad / "captions.jsonl").write_text('{"image": "a.jpg", "caption": "x", "key": "a.b"}\n')
    with pytest.raises(EdiffError, match="key 'a.b' must be"):
        list_input(bad)


def test_task_split_defaults_to_the_slurm_array() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_task(None, None, env) == (3, 4)
    assert resolve_task(1, None, env) == (1, 4)
    assert resolve_task(None, None, {}) == (0, 1)
    with pytest.raises(EdiffError, match="numbered from 0"):
        resolve_task(None, None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_command_line(tmp_path: Path) -> None:
    make_jsonl(tmp_path / "in", 20, seed=4)
    cmd = [
        sys.executable,
        str(ROOT / "data_prep" / "embed.py"),
        f"input={tmp_path / 'in'}",
        "stage.size=16",
        "stage.min_side=16",
        "unit_size=10",
        "workers=0",
        "progress=false",
    ]
    ok = subprocess.run(
        cmd + [f"output={tmp_path / 'out'}"],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "all 2 units done" in ok.stdout
    assert read_manifest(tmp_path / "out")["num_samples"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no Hydra litter
    bad = subprocess.run(
        [*cmd[:2], f"input={tmp_path / 'nowhere'}", f"output={tmp_path / 'o'}"],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"error: input {tmp_path / 'nowhere'} does not exist"


def test_unit_counts_are_visible_to_the_progress_bar(src) -> None:
    listing = list_input(src[0], 64)
    assert [u.size for u in listing.units] == [64, 64, 64, 8] and listing.size == 200
    assert Counter(len(u.records) for u in listing.units) == Counter({64: 3, 8: 1})
