"""DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo, bf16 as configured) through the real entry point:
consolidated hand-off weights, an EMA equal to one recomputed without ZeRO from DeepSpeed's own
fp32 master weights, a child initialised exactly from a ZeRO-3 parent, and resume from a
DeepSpeed checkpoint folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env

from ediff_train.run.weights import load_expert, load_weights

pytest.importorskip("deepspeed")

FAST = [
    "logger=csv",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=8",
    "trainer=ddp_cpu",
    "strategy._target_=cpu_deepspeed.CPUDeepSpeed",
    "module.lr=3e-3",  # steps large enough that EMA and raw weights visibly differ
    "module.ema_halflife_images=null",  # the per-step EMA rule (images: test_handoff.py)
    "monitor.every=0",
    "probe.batches=1",
    "probe.batch_size=8",
]
DECAY = 0.9999  # conf/train.yaml module.ema_decay, with warmup


def train(tmp: Path, *args: str) -> None:
    env = run_env(tmp)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def record(tmp: Path, name: str) -> list[str]:
    path = tmp / f"{name}.pt"
    return [
        "+callbacks.record._target_=cpu_deepspeed.RecordWeights",
        f"+callbacks.record.path={path}",
    ]


def reference_ema(ema0: dict, steps: dict[int, dict], first: int = 1) -> dict:
    """The EMA recomputed in plain torch from the recorded raw fp32 weights after each step."""
    ema = {k: v.clone() for k, v in ema0.items()}
    for n in range(first, max(steps) + 1):
        decay = min(DECAY, (1 + n) / (10 + n))
        for k, v in steps[n].items():
            ema[k].lerp_(v, 1.0 - decay)
    return ema


def close(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, worst
    return worst


@pytest.fixture(scope="module")
def z3_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ds")
    train(
        tmp,
        "run_dir=R",
        "steps=4",
        "strategy=deepspeed_stage_3",
        "checkpoint_every=4",
        *record(tmp, "parent"),
    )
    return tmp


def test_zero3_handoff_and_ema_match_reference(z3_parent: Path) -> None:
    ndir = z3_parent / "R" / "E0_0"
    model, ema, meta = load_weights(ndir / "weights.safetensors")
    assert meta["step"] == 4 and json.loads((ndir / "node.json").read_text())["step"] == 4
    steps = torch.load(z3_parent / "parent.pt", weights_only=True)
    assert sorted(steps) == [0, 1, 2, 3, 4]
    close(model, steps[4], 0.0)  # consolidated fp32 master weights, bit for bit
    assert all(v.numel() > 0 for v in ema.values())  # not the empty ZeRO-3 placeholders
    ema0 = torch.load(z3_parent / "parent.ema0", weights_only=True)
    close(ema0, steps[0], 0.0)  # a root's EMA starts at its initial weights
    close(ema, reference_ema(ema0, steps), 1e-6)
    assert max(float((ema[k] - model[k]).abs().max()) for k in ema) > 1e-3  # EMA lags
    node, denoiser = load_expert(ndir)  # what the sampler does, unchanged
    assert node.name == "E0_0"
    close(denoiser.state_dict(), ema, 0.0)
    ckpt = ndir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and json.loads((ckpt / "ediff_ckpt.json").read_text())["global_step"] == 4


def test_zero3_child_starts_from_parent_weights(z3_parent: Path) -> None:
    train(
        z3_parent,
        "run_dir=R",
        "expert=E1_1",
        "steps=2",
        "strategy=deepspeed_stage_3",
        "checkpoint_every=10",
        *record(z3_parent, "child"),
    )
    parent_model, parent_ema, _ = load_weights(z3_parent / "R" / "E0_0" / "weights.safetensors")
    steps = torch.load(z3_parent / "child.pt", weights_only=True)
    close(steps[0], parent_model, 0.0)  # partitioned by DeepSpeed after loading, unchanged
    ema0 = torch.load(z3_parent / "child.ema0", weights_only=True)
    close(ema0, parent_ema, 0.0)
    model, ema, meta = load_weights(z3_parent / "R" / "E1_1" / "weights.safetensors")
    assert meta["step"] == 6
    close(model, steps[2], 0.0)
    close(ema, reference_ema(ema0, steps), 1e-6)


def test_zero2_bf16_resume_keeps_ema(tmp_path: Path) -> None:
    """bf16 weights, fp32 master fragments: the EMA follows the master weights, and survives a
    resume from the DeepSpeed checkpoint folder."""
    common = ["run_dir=R", "strategy=deepspeed_stage_2", "checkpoint_every=2"]
    train(tmp_path, *common, "steps=2", *record(tmp_path, "a"))
    train(tmp_path, *common, "steps=3", *record(tmp_path, "b"))  # resumes at step 2
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert sorted(a) == [0, 1, 2] and sorted(b) == [2, 3]
    close(b[2], a[2], 0.0)  # fp32 master weights restored exactly
    model, ema, meta = load_weights(tmp_path / "R" / "E0_0" / "weights.safetensors")
    assert meta["step"] == 3
    close(model, b[3], 0.0)
    ema0 = torch.load(tmp_path / "a.ema0", weights_only=True)
    close(ema0, a[0], 0.0)  # fp32 master weights start at the fp32 init, not its bf16 copy
    close(ema, reference_ema(ema0, {**a, **b}), 1e-6)
    assert max(float((ema[k] - model[k]).abs().max()) for k in ema) > 1e-3


def test_zero2_lora_child_trains_only_its_adapter(tmp_path: Path) -> None:
    """`lora=default` under ZeRO-2 on 2 processes: the base the sampler rebuilds is the parent's
    EMA bit for bit, the adapter (peft's files, raw and EMA) has moved off its zero start, and
    the EMA adapter is what `load_expert` answers with."""
    from safetensors.torch import load_file

    common = ["run_dir=R", "strategy=deepspeed_stage_2", "checkpoint_every=10"]
    train(tmp_path, *common, "steps=2")
    train(tmp_path, *common, "expert=E1_1", "lora=default", "steps=2")
    root, child = tmp_path / "R" / "E0_0", tmp_path / "R" / "E1_1"
    _, root_ema, _ = load_weights(root / "weights.safetensors")
    info = json.loads((child / "node.json").read_text())
    assert info["step"] == 4 and info["lora"]["base"] == "E0_0"
    assert not (child / "weights.safetensors").exists()  # adapters only
    ema = load_file(child / "adapter_model.safetensors")
    raw = load_file(child / "raw" / "adapter_model.safetensors")
    assert (
        ema.keys() == raw.keys()
        and sum(v.numel() for v in ema.values()) == (info["lora"]["adapter_params"])
    )
    assert all(float(v.abs().sum()) > 0 for k, v in raw.items() if ".lora_B." in k)  # trained
    _, denoiser = load_expert(child)
    state = denoiser.state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert base.keys() == root_ema.keys()
    assert all(torch.equal(base[k], root_ema[k]) for k in base)  # the frozen base, untouched
    lora_b = [k for k in state if ".lora_B." in k]
    assert lora_b and all(float(state[k].abs().sum()) > 0 for k in lora_b)
