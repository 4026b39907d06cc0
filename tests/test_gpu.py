"""Checks that need a CUDA GPU (skipped elsewhere; `pytest tests/test_gpu.py` on a GPU machine):
bf16 DeepSpeed ZeRO-2 on one GPU with NCCL through the real entry point, its hand-off loaded by a
child, its EMA recomputed without ZeRO, resume after kill -9; a compiled channels-last run with
fused AdamW and pinned compact batches; a training step that never waits for the GPU; the SDPA
kernels each attention gets; bench/train_step.py's CUDA path with MFU.

Written without a GPU to run them on (none was lent when they were made): they follow the CPU
tests they mirror (test_deepspeed.py, test_resume.py, test_training_loop.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = [
    "trainer=gpu",
    "trainer.devices=1",
    "logger=csv",
    "sample.per_prompt=0",
    "data.batch_size=32",
    "module.lr=3e-3",
    "module.ema_halflife_images=null",
]  # lr: EMA and raw weights visibly apart; per-step EMA
DECAY = 0.9999  # conf/train.yaml module.ema_decay, with warmup


def env_for(tmp: Path) -> dict[str, str]:
    env = run_env(tmp)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *GPU, *args]


def train(tmp: Path, *args: str) -> str:
    proc = subprocess.run(
        command(*args), cwd=tmp, env=env_for(tmp), capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stderr


def record(tmp: Path, name: str) -> list[str]:
    return [
        "+callbacks.record._target_=cpu_deepspeed.RecordWeights",
        f"+callbacks.record.path={tmp / f'{name}.pt'}",
    ]


def reference_ema(ema0: dict, steps: dict[int, dict]) -> dict:
    """The EMA recomputed in float64 from the recorded fp32 weights after each step."""
    ema = {k: v.double() for k, v in ema0.items()}
    for n in range(1, max(steps) + 1):
        d = min(DECAY, (1 + n) / (10 + n))
        for k, v in steps[n].items():
            ema[k] = d * ema[k] + (1.0 - d) * v.double()
    return ema


def close(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= tol, worst
    return worst


ZERO2 = ["strategy=deepspeed_stage_2", "run_dir=R"]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root trained 2 steps under bf16 ZeRO-2 on one GPU, then resumed to 4."""
    tmp = tmp_path_factory.mktemp("gpu_ds")
    train(tmp, *ZERO2, "steps=2", "checkpoint_every=2", *record(tmp, "a"))
    train(tmp, *ZERO2, "steps=4", "checkpoint_every=2", *record(tmp, "b"))
    return tmp


def test_zero2_one_gpu_handoff_resume_and_ema(zero2: Path) -> None:
    from ediff_train.run.weights import load_weights

    ndir = zero2 / "R" / "E0_0"
    a = torch.load(zero2 / "a.pt", weights_only=True)
    b = torch.load(zero2 / "b.pt", weights_only=True)
    assert sorted(a) == [0, 1, 2] and sorted(b) == [2, 3, 4]  # resumed at 2: 2 more steps
    close(b[2], a[2], 0.0)  # fp32 master weights restored exactly from the DeepSpeed folder
    model, ema, meta = load_weights(ndir / "weights.safetensors")
    assert meta["step"] == 4 and json.loads((ndir / "node.json").read_text())["step"] == 4
    close(model, b[4], 0.0)  # consolidated fp32 master weights
    ema0 = torch.load(zero2 / "a.ema0", weights_only=True)
    close(ema0, a[0], 0.0)  # the fp32 init, not its bf16 copy
    close(ema, reference_ema(ema0, {**a, **b}), 1e-5)
    assert max(float((ema[k] - model[k]).abs().max()) for k in ema) > 1e-3  # the EMA lags
    marker = json.loads((ndir / "checkpoints" / "last.ckpt" / "ediff_ckpt.json").read_text())
    assert marker["global_step"] == 4


def test_zero2_child_loads_parent_weights(zero2: Path) -> None:
    from ediff_train.run.weights import load_expert, load_weights

    train(zero2, *ZERO2, "expert=E1_1", "steps=2", "checkpoint_every=10", *record(zero2, "child"))
    parent_model, parent_ema, _ = load_weights(zero2 / "R" / "E0_0" / "weights.safetensors")
    steps = torch.load(zero2 / "child.pt", weights_only=True)
    close(steps[0], parent_model, 0.0)  # the parent's fp32 weights, not a bf16 rounding
    close(torch.load(zero2 / "child.ema0", weights_only=True), parent_ema, 0.0)
    info = json.loads((zero2 / "R" / "E1_1" / "node.json").read_text())
    assert info["step"] == 6 and info["parent"] == "E0_0" and info["sigma_seen"][0] >= 0.3012
    node, denoiser = load_expert(zero2 / "R" / "E1_1")
    assert node.name == "E1_1" and not any(p.isnan().any() for p in denoiser.parameters())


def test_zero2_sigkill_then_same_command_finishes(tmp_path: Path) -> None:
    args = [*ZERO2, "steps=40", "checkpoint_every=5"]
    ndir = tmp_path / "R" / "E0_0"
    marker = ndir / "checkpoints" / "last.ckpt" / "ediff_ckpt.json"
    proc = subprocess.Popen(
        command(*args),
        cwd=tmp_path,
        env=env_for(tmp_path),
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    end = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, f"exited before a checkpoint:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < end, "no checkpoint within 300 s"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))  # somewhere in the run, maybe mid-save
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train(tmp_path, *args)
    assert json.loads((ndir / "node.json").read_text())["step"] == 40
    assert json.loads(marker.read_text())["global_step"] == 40
    assert not [p.name for p in (ndir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_compiled_channels_last_run(tmp_path: Path) -> None:
    """torch.compile (inductor), channels_last, fused AdamW, pinned compact batches cast on the
    GPU, the deferred NaN check: the run finishes, its losses are finite, and its hand-off
    loads into a plain network."""
    import csv

    from ediff_train.run.weights import load_expert

    setup = tmp_path / "setup.json"
    err = train(
        tmp_path,
        "run_dir=R",
        "steps=6",
        "checkpoint_every=3",
        "module.compile=true",
        "module.channels_last=true",
        "module.finite_check_every=2",
        "trainer.log_every_n_steps=1",
        "data.num_workers=2",
        "+callbacks.setup._target_=gpu_probes.RecordSetup",
        f"+callbacks.setup.path={setup}",
    )
    assert "warning: torch.compile" not in err, err[-3000:]
    info = json.loads(setup.read_text())
    assert info["device"].startswith("cuda") and info["compiled"] and info["fused"]
    assert info["channels_last"] and info["pin_memory"]
    assert info["image_device"].startswith("cuda") and info["image_dtype"] == "torch.float32"
    ndir = tmp_path / "R" / "E0_0"
    rows = [r for f in ndir.glob("logs/**/metrics.csv") for r in csv.DictReader(f.open())]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), losses
    assert json.loads((ndir / "node.json").read_text())["step"] == 6
    _, net = load_expert(ndir)
    ckpt = torch.load(ndir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    net.load_state_dict({k.removeprefix("denoiser."): v for k, v in ckpt["state_dict"].items()})


def test_training_step_never_waits_for_the_gpu(tmp_path: Path) -> None:
    """Forward, backward, clipping, fused AdamW and the EMA of three steps under CUDA's sync
    debug mode set to raise: no `.item()`, no blocking host-to-device copy, nothing that makes
    the host wait for the GPU (the deferred NaN check is read once, after)."""
    from hydra import compose, initialize_config_dir

    from ediff_train.cli import register_nodes
    from ediff_train.core.experts import parse_node
    from ediff_train.core.perf import adamw, clip_gradients, is_fused
    from ediff_train.training.loop import build_module

    register_nodes(["E0_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={tmp_path / 'R'}"])
    module, _ = build_module(cfg, parse_node("E0_0"), tmp_path / "R" / "E0_0")
    module = module.cuda()
    dims, b, size = cfg.encoders.dims, 16, int(cfg.data.image_size)
    batch = {
        "image": torch.rand(b, 3, size, size) * 2 - 1,
        "t5": torch.randn(b, 6, dims.t5),
        "t5_mask": torch.ones(b, 6, dtype=torch.bool),
        "clip_txt": torch.randn(b, 77, dims.clip_txt),
        "clip_pool": torch.randn(b, dims.clip_pool),
        "clip_img": torch.randn(b, dims.clip_img),
    }
    batch = {k: v.cuda() for k, v in batch.items()}
    params = list(module.denoiser.parameters())
    opt = adamw(params, 1e-4, (0.9, 0.999), 0.01, fusable=True)
    assert is_fused(opt)
    module.ema_state.attach(module.denoiser)
    module._gen = torch.Generator().manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module.training_step(batch, 0)
            loss.backward()
            clip_gradients(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            module.ema_state.update(0.999)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    module.raise_if_nonfinite()
    assert torch.isfinite(loss).item()


def test_attention_runs_on_fused_sdpa_kernels() -> None:
    """Self-attention (no mask) runs on the flash kernel alone; cross-attention has a key mask,
    which flash does not take, and runs on flash or memory-efficient (never the math path)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ediff_train.nn.attention import CrossAttention, SelfAttention

    x = torch.randn(2, 256, 16, 16, device="cuda")
    ctx = torch.randn(2, 40, 1024, device="cuda")
    mask = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    mask[:, 30:] = False
    selfattn = SelfAttention(256, 64).cuda()
    cross = CrossAttention(256, 1024, 64).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            selfattn(x).float().sum().backward()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            cross(x, ctx, mask).float().sum().backward()


def test_bench_cuda_reports_mfu(tmp_path: Path) -> None:
    out = tmp_path / "bench_gpu.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench/train_step.py"),
        "--device",
        "cuda",
        "--configs",
        "base64",
        "--batch",
        "8,16",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--optim",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [8, 16]
    for r in rows:
        assert not r["oom"] and r["img_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["gflop_per_step"] > 0 and r["dtype"] == "bf16-autocast"
        if r["peak_bf16_tflops"] is not None:  # a GPU in PEAK_BF16_TFLOPS (H100/H200/A100)
            assert 0 < r["mfu"] < 1
