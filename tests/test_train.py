"""End to end through the real entry point: a root, a child from it, the errors users hit,
and a 2-process DDP run (gloo) whose ranks read disjoint shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir

from ediff_train.cli import register_nodes
from ediff_train.core.experts import parse_node
from ediff_train.errors import EdiffError
from ediff_train.run.weights import load_weights

FAST = [
    "logger=csv",
    "data.num_workers=0",
    "sample.per_prompt=1",
    "sample.steps=3",
    "checkpoint_every=5",
    "data.batch_size=16",
    "monitor.every=0",
    "probe.batches=1",
    "probe.batch_size=8",
]  # instruments: cheap here


def train(
    tmp: Path, *args: str, check: bool = True, probes: bool = False
) -> subprocess.CompletedProcess:
    """train.py in a subprocess; `probes`: tests/ on its path, for train_probes.Probe."""
    env = run_env(tmp)
    if probes:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])]
        )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def root_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    train(tmp, "run_dir=R", "steps=12")
    return tmp


def test_root_writes_handoff(root_run: Path) -> None:
    ndir = root_run / "R" / "E0_0"
    info = json.loads((ndir / "node.json").read_text())
    assert info["node"] == "E0_0" and info["parent"] is None and info["step"] == 12
    assert info["quantile_interval"] == [0.0, 1.0]
    lo, hi = info["sigma_seen"]
    assert 0 < lo < hi
    model, ema, meta = load_weights(ndir / "weights.safetensors")
    assert meta["step"] == 12 and model.keys() == ema.keys()
    assert any(not torch.equal(model[k], ema[k]) for k in model)  # EMA lags the raw weights
    assert (ndir / "samples.png").is_file() and (ndir / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture(scope="module")
def child_run(root_run: Path) -> Path:
    """root_run with the root's high-noise child E1_1 trained from it (10 steps on top)."""
    if not (root_run / "R" / "E1_1" / "weights.safetensors").is_file():
        train(root_run, "run_dir=R", "expert=E1_1", "steps=10")
    return root_run


@pytest.fixture(scope="module")
def pair_run(child_run: Path) -> Path:
    """child_run with the low-noise child E1_0 as well (2 steps): an ensemble E1_0 + E1_1."""
    if not (child_run / "R" / "E1_0" / "weights.safetensors").is_file():
        train(child_run, "run_dir=R", "expert=E1_0", "steps=2", "sample.per_prompt=0")
    return child_run


def test_child_continues_from_parent(child_run: Path) -> None:
    info = json.loads((child_run / "R" / "E1_1" / "node.json").read_text())
    assert info["parent"] == "E0_0" and info["step"] == 22
    assert info["sigma_seen"][0] >= 0.3012 and info["quantile_interval"] == [0.5, 1.0]


def test_child_weights_equal_parent_before_first_step(root_run: Path) -> None:
    from ediff_train.training.loop import build_module

    register_nodes(["E1_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={root_run / 'R'}", "expert=E1_0"])
    module, resume = build_module(cfg, parse_node("E1_0"), root_run / "R" / "E1_0")
    assert resume is None and module.step_offset == 12
    model, ema, _ = load_weights(root_run / "R" / "E0_0" / "weights.safetensors")
    for k, v in module.denoiser.state_dict().items():
        assert torch.equal(v, model[k]), k
    for k, v in module.ema.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_rerun_after_finish_keeps_total(root_run: Path) -> None:
    train(root_run, "run_dir=R", "steps=12")  # resumes last.ckpt, already at its target
    info = json.loads((root_run / "R" / "E0_0" / "node.json").read_text())
    assert info["step"] == 12


def test_nan_loss_stops_with_clear_error(tmp_path: Path) -> None:
    """A real run whose batch turns NaN at step 3, after three optimiser steps: train.py stops
    with one line, and the last checkpoint holds the weights after step 3 (the NaN step never
    reached the optimiser), not the initial ones."""
    dump = tmp_path / "probe.pt"
    proc = train(
        tmp_path,
        "run_dir=N",
        "steps=8",
        "checkpoint_every=3",
        "sample.per_prompt=0",
        "+callbacks.probe._target_=train_probes.Probe",
        "+callbacks.probe.key=nan",
        "+callbacks.probe.nan_at=3",
        f"+callbacks.probe.dump={dump}",
        check=False,
        probes=True,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "loss is nan at step 3 of E0_0" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    rec = torch.load(dump, weights_only=True)
    assert rec["optimizer_steps"] == [0, 1, 2]  # three real steps, then the NaN one stopped
    w0, w3 = rec["weights"][0], rec["weights"][3]
    assert any(not torch.equal(w0[k], w3[k]) for k in w0)  # the steps changed the weights
    assert all(torch.equal(rec["at_exception"][k], w3[k]) for k in w3)
    ckpt = torch.load(
        tmp_path / "N" / "E0_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["global_step"] == 3
    saved = {k.removeprefix("denoiser."): v for k, v in ckpt["state_dict"].items()}
    assert w3.keys() <= saved.keys() and all(torch.equal(saved[k].float(), w3[k]) for k in w3)
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())
    assert not (tmp_path / "N" / "E0_0" / "weights.safetensors").exists()  # no hand-off


def test_manifest_expectations_name_the_configured_encoders() -> None:
    from ediff_train.data.manifest import check_manifest
    from ediff_train.training.loop import manifest_expectations

    register_nodes(["E0_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        tiny = compose("train")
        paper = compose(
            "train", overrides=["encoders=t5xxl_clipl14", "encoders.t5_path=/models/t5-v1_1-xxl"]
        )
    want = manifest_expectations(paper)
    assert want["t5_name"] == "t5-v1_1-xxl" and want["clip_name"] == "ViT-L-14"
    assert want["t5_dim"] == 4096 and manifest_expectations(tiny)["clip_name"] == "tiny-clip"
    made = {
        "encoders": {
            "t5": {"name": "flan-t5-xxl", "dim": 4096},
            "clip": {"name": "ViT-L-14", "text_dim": 768, "pool_dim": 768, "image_dim": 768},
        }
    }
    with pytest.raises(
        EdiffError, match="t5.name is 'flan-t5-xxl' but the model expects 't5-v1_1-xxl'$"
    ):
        check_manifest(made, want)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["expert=E9_600"], "0–511"),
        (["expert=E1_1", "run_dir=EMPTY"], "EMPTY/E0_0/weights.safetensors"),
        (["encoders.dims.t5=48", "run_dir=D"], "t5.dim is 32 but the model expects 48"),
        (
            [
                "encoders=t5xxl_clipl14",
                "encoders.dims.t5=32",
                "encoders.dims.clip_txt=32",
                "encoders.dims.clip_pool=24",
                "encoders.dims.clip_img=24",
                "run_dir=D",
            ],
            "clip.name is 'tiny-clip' but the model expects 'ViT-L-14'",
        ),
    ],
)
def test_bad_input_one_line_error(root_run: Path, args: list[str], needle: str) -> None:
    proc = train(root_run, *args, "steps=2", check=False)
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if "run_dir=D" in args:  # refused before training: nothing written for the node
        assert not (root_run / "D" / "E0_0" / "weights.safetensors").exists()


def test_ddp_two_ranks_read_disjoint_shards(tmp_path: Path) -> None:
    train(tmp_path, "run_dir=R", "trainer=ddp_cpu", "steps=4", "sample.per_prompt=0")
    ndir = tmp_path / "R" / "E0_0"
    r0 = json.loads((ndir / "data" / "rank0.json").read_text())
    r1 = json.loads((ndir / "data" / "rank1.json").read_text())
    assert r0 and r1 and not set(r0) & set(r1)
    assert sum(r0.values()) == sum(r1.values()) == 4 * 16
    assert json.loads((ndir / "node.json").read_text())["step"] == 4


def test_sample_cli_writes_pngs_and_grid(child_run: Path) -> None:
    root_run = child_run
    out = root_run / "samples"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"run_dir={root_run / 'R'}",
            "expert=E0_0",
            "prompt=the number 3",
            "n=4",
            f"out={out}",
            "steps=3",
        ],
        cwd=root_run,
        env=run_env(root_run),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("sample_*.png")) == [
        f"sample_{i:04d}.png" for i in range(4)
    ]
    assert (out / "grid.png").is_file() and "E0_0: 5" in proc.stdout  # 3 Heun steps = 5 calls
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"run_dir={root_run / 'R'}",
            "experts=[E0_0,E1_1]",
            f"out={out}",
        ],
        cwd=root_run,
        env=run_env(root_run),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "overlap" in bad.stderr and "Traceback" not in bad.stderr


def test_guidance_per_expert_both_override_forms_compose() -> None:
    """The README's dict form and the `+key` form give the same per-expert scales."""
    want = {"E1_1": 7.0, "E1_0": 3.0}
    for overrides in (
        ["guidance_per_expert={E1_1: 7.0, E1_0: 3.0}"],
        ["+guidance_per_expert.E1_1=7.0", "+guidance_per_expert.E1_0=3.0"],
    ):
        with initialize_config_dir(str(ROOT / "conf" / "sampling"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        assert dict(cfg.guidance_per_expert) == want, overrides


def test_sample_cli_guidance_per_expert_as_documented(pair_run: Path) -> None:
    """The README's `'guidance_per_expert={E1_1: 7.0, E1_0: 3.0}'` through sample.py's command
    line: settings.json records those scales and the images are the ones an in-process sampler
    makes with them, not with the scales swapped, with either one left at `guidance`, or none."""
    import numpy as np
    from PIL import Image

    from ediff_train.sampling.guidance import Guidance
    from ediff_train.sampling.pipeline import Sampler

    run, out = pair_run / "R", pair_run / "guided"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"run_dir={run}",
            "experts=[E1_0,E1_1]",
            "prompt=the number 3",
            "n=2",
            "steps=6",
            "guidance=9",
            "progress=false",
            "guidance_per_expert={E1_1: 7.0, E1_0: 3.0}",
            f"out={out}",
        ],
        cwd=pair_run,
        env=run_env(pair_run),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["guidance"] == 9.0
    assert settings["guidance_per_expert"] == {"E1_1": 7.0, "E1_0": 3.0}
    got = (
        torch.from_numpy(np.stack([np.asarray(Image.open(out / f)) for f in settings["files"]]))
        .permute(0, 3, 1, 2)
        .float()
    )
    sampler = Sampler.from_run(run, ["E1_0", "E1_1"])

    def pixels(per: dict[str, float]) -> torch.Tensor:
        images = sampler(["the number 3"] * 2, seed=0, steps=6, guidance=Guidance(9.0, per))
        return (images.clamp(0, 1) * 255).round()

    # equal here (0 of 255); 1 level allows another thread count's rounding. The others differ
    # by 36 / 10 / 22 / 31 levels. E1_0 (σ < 0.30, the last steps) moves few pixels, so the
    # global scale (9) is set far from its 3: at guidance=5 "E1_0 left at 5" differed by 2-4
    assert float((got - pixels({"E1_1": 7.0, "E1_0": 3.0})).abs().max()) <= 1.0
    for other in ({"E1_1": 3.0, "E1_0": 7.0}, {"E1_1": 7.0}, {"E1_0": 3.0}, {}):
        assert float((got - pixels(other)).abs().max()) > 2.0, other
