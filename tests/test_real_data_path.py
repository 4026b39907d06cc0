"""The README's real-data path, end to end, as a user types it (README "Preparing a real
dataset", "Train a root", "Sampling"): `data_prep/embed.py input=coco output=shards/...
encoders=tiny`, then `train.py data=shards data.root=shards/...`, then `sample.py run_dir=R
expert=E0_0 prompt=...`, all from one working folder with its relative paths, the sampler
finding the encoders that embed.py saved in the shard folder. Sizes are cut to 16 px and the
steps to 2 (README options: `stage.size`, `stage.min_side`, `data.image_size`) so the three
processes fit the CI budget; what is exercised is that the commands fit together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env
from omegaconf import OmegaConf
from PIL import Image
from test_embed import make_jsonl

from ediff_train.data.manifest import read_manifest
from ediff_train.errors import EdiffError
from ediff_train.run.weights import load_expert, load_weights
from ediff_train.sampling.pipeline import Sampler

SHARDS = "shards/coco16_tiny"
PROMPT = "a red cat on the table"


def cli(tmp: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=tmp,
        env=run_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_embed_then_train_then_sample_as_the_readme_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captions = make_jsonl(tmp_path / "coco", 12, seed=5)  # 20-40 px images, captions.jsonl

    # 1. python data_prep/embed.py input=coco output=shards/coco64_tiny encoders=tiny
    embed = ok(
        cli(
            tmp_path,
            "data_prep/embed.py",
            "input=coco",
            f"output={SHARDS}",
            "encoders=tiny",
            "stage.size=16",
            "stage.min_side=16",
            "progress=false",
        )
    )
    assert f"all 1 units done: {SHARDS}/manifest.json" in embed.stdout
    manifest = read_manifest(tmp_path / SHARDS)
    assert manifest["num_samples"] == len(captions) and manifest["image"]["size"] == 16
    enc = manifest["encoders"]
    dims = {
        "t5": enc["t5"]["dim"],
        "clip_txt": enc["clip"]["text_dim"],
        "clip_pool": enc["clip"]["pool_dim"],
        "clip_img": enc["clip"]["image_dim"],
    }
    # ...the dims the trainer's `encoders=tiny` builds its network for (the same yaml)
    assert dims == dict(OmegaConf.load(ROOT / "conf" / "encoders" / "tiny.yaml").dims)
    saved = json.loads((tmp_path / SHARDS / "encoders" / "encoders.json").read_text())
    assert saved["fingerprints"] == {k: enc[k]["fingerprint"] for k in ("t5", "clip")}

    # 2. python train.py data=shards data.root=shards/coco64_tiny (run_dir, steps, batch: README)
    run = "runs/coco"
    train = ok(
        cli(
            tmp_path,
            "train.py",
            "data=shards",
            f"data.root={SHARDS}",
            "data.image_size=16",
            f"run_dir={run}",
            "steps=2",
            "data.batch_size=4",
            "data.num_workers=0",
            "sample.per_prompt=0",
            "logger=none",
            "monitor.every=0",
            "probe.enabled=false",
        )
    )
    assert "Traceback" not in train.stderr
    ndir = tmp_path / run / "E0_0"
    node = json.loads((ndir / "node.json").read_text())
    assert node["step"] == 2 and node["data_root"] == SHARDS
    model, ema, meta = load_weights(ndir / "weights.safetensors")
    # images = the tree's samples seen (EMA half-life in images): 2 steps × batch 4
    assert meta == {"node": "E0_0", "step": 2, "images": 8} and model.keys() == ema.keys()
    # the network reads embeddings of the shards' widths, and the weights load into it strictly
    assert ema["backbone.cond.t5_tok.0.weight"].shape[1] == dims["t5"]
    expert, denoiser = load_expert(ndir)
    assert expert.name == "E0_0" and not denoiser.training

    # 3. python sample.py run_dir=R expert=E0_0 prompt="..." n=16 out=DIR
    sample = ok(
        cli(
            tmp_path,
            "sample.py",
            f"run_dir={run}",
            "expert=E0_0",
            f"prompt={PROMPT}",
            "n=2",
            "out=samples",
            "steps=2",
            "progress=false",
        )
    )
    assert "expert calls: E0_0: 3" in sample.stdout  # 2 Heun steps = 3 calls
    out = tmp_path / "samples"
    for i in range(2):
        with Image.open(out / f"sample_{i:04d}.png") as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    assert (out / "grid.png").is_file()
    assert json.loads((out / "settings.json").read_text())["prompts"] == [PROMPT]

    # bad input on this path: the encoders are not where the shards say (a shard folder copied
    # without its encoders/). Checked in-process, the CLI's cost being its imports: the same
    # call sample.py makes, from the same working folder; `reporting_errors` turns the one-line
    # EdiffError into `error: ...` and exit 2 (tests/test_train.py checks that wrapper).
    (tmp_path / SHARDS / "encoders").rename(tmp_path / "encoders.moved")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdiffError, match=f"^no saved encoders at {SHARDS}/encoders ") as e:
        Sampler.from_run(run, ["E0_0"])
    assert "\n" not in str(e.value)
