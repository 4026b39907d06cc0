"""EDM2's post-hoc EMA (posthoc_ema.py, training/posthoc.py): the σ_rel ↔ γ map, the power EMA
against its closed form, a reconstruction on a synthetic trajectory against a directly tracked
EMA, and the real training path: a root and a child whose trackers continue the root's, resumed
runs that continue them exactly, the reconstruction command and the evaluate.py sweep."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from scipy.optimize import brentq
from torch import nn

from ediff_train.cli import register_nodes
from ediff_train.errors import EdiffError
from ediff_train.run.posthoc_ema import (
    gamma_to_sigma_rel,
    main,
    node_snapshots,
    plan,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_path,
    solve_coefficients,
)
from ediff_train.run.weights import load_weights
from ediff_train.training.posthoc import PostHocEMA


# ---- (a) σ_rel ↔ γ -----------------------------------------------------------------------------
def test_sigma_rel_gamma_round_trip_and_edm2_values() -> None:
    def width2(g: float, s: float) -> float:  # the defining equation, solved independently
        return (g + 1) / ((g + 2) ** 2 * (g + 3)) - s * s

    for s in (0.01, 0.03, 0.05, 0.075, 0.1, 0.2, 0.29):
        g = sigma_rel_to_gamma(s)
        ref = brentq(width2, -0.38, 1e4, args=(s,), xtol=1e-14)  # right of the width maximum
        assert g == pytest.approx(ref, rel=1e-10)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-12)
    # EDM2 (Karras et al. 2024) pairs σ_rel 0.05 with γ ≈ 16.97 and 0.10 with γ ≈ 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for bad in (0.0, -0.1, 0.31):
        with pytest.raises(EdiffError, match="sigma_rel must lie in"):
            sigma_rel_to_gamma(bad)


# ---- a callback driven by hand: the trajectory is chosen, not trained ---------------------------
def curve(steps: int, dim: int, seed: int) -> np.ndarray:
    """A smooth random weight trajectory w_1..w_steps (rows), zero-mean so that relative errors
    measure the EMA's shape, not a constant offset."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, steps + 1)[:, None] / steps
    w = np.zeros((steps, dim))
    for k in range(1, 6):
        w += rng.normal(size=dim) / k * np.sin(2 * np.pi * k * t + rng.uniform(0, 6, size=dim))
    return w


def drive(
    folder: Path, w: np.ndarray, sigma_rels: tuple[float, ...], every: int, dtype: str = "float32"
) -> PostHocEMA:
    """PostHocEMA following a one-parameter 'model' whose weights are the rows of `w`."""
    net = nn.Linear(w.shape[1], 1, bias=False)
    module = SimpleNamespace(denoiser=net, total_step=0)
    trainer = SimpleNamespace(is_global_zero=True, ckpt_path=None, global_step=0, max_steps=len(w))
    cb = PostHocEMA(folder, sigma_rels, every, dtype=dtype)
    cb.setup(trainer, module, "fit")
    cb.on_train_start(trainer, module)
    for t, row in enumerate(w, start=1):
        with torch.no_grad():
            net.weight.copy_(torch.from_numpy(row).float()[None])
        module.total_step = trainer.global_step = t
        cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_end(trainer, module)
    return cb


def closed_form(w: np.ndarray, sigma_rel: float, t: int) -> np.ndarray:
    """The power EMA at step t as the weighted average it is: step τ's weight is
    ∫_{τ−1}^{τ} p(s) ds = (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1), in float64."""
    g = sigma_rel_to_gamma(sigma_rel)
    tau = np.arange(1, t + 1, dtype=np.float64)
    c = (tau / t) ** (g + 1) - ((tau - 1) / t) ** (g + 1)
    assert c.sum() == pytest.approx(1.0, abs=1e-12)
    return c @ w[:t]


def weight(path: Path) -> np.ndarray:
    return load_file(str(path))["weight"].double().numpy()[0]


# ---- (b) the power EMA is its closed form ------------------------------------------------------
def test_power_ema_equals_closed_form_average(tmp_path: Path) -> None:
    w = curve(300, 16, seed=1)
    drive(tmp_path, w, (0.05, 0.10), every=100)
    for s in (0.05, 0.10):
        for t in (100, 200, 300):
            got, want = weight(snapshot_path(tmp_path, s, t)), closed_form(w, s, t)
            assert np.abs(got - want).max() < 1e-5 * np.abs(want).max(), (s, t)


# ---- (c) reconstruction against a directly tracked EMA ------------------------------------------
def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_reconstruct_075_from_005_and_010(tmp_path: Path) -> None:
    w = curve(1000, 64, seed=2)
    drive(tmp_path / "stored", w, (0.05, 0.10), every=50)
    drive(tmp_path / "direct", w, (0.075,), every=1000)
    direct = weight(snapshot_path(tmp_path / "direct", 0.075, 1000))
    assert rel(direct, closed_form(w, 0.075, 1000)) < 1e-6
    got = reconstruct(tmp_path / "stored", 0.075)["weight"].double().numpy()[0]
    err = rel(got, direct)
    # what the EMA length changes: the stored widths' EMAs differ by ~this much
    spread = rel(
        weight(snapshot_path(tmp_path / "stored", 0.05, 1000)),
        weight(snapshot_path(tmp_path / "stored", 0.10, 1000)),
    )
    print(f"reconstruction error {err:.2e} (stored widths differ by {spread:.2e})")
    assert err < 1e-3  # measured 5.6e-5 (the widths' EMAs differ by 4.6e-1)
    # the same snapshots combined for a γ only slightly off (σ_rel 0.074 or 0.076) miss it
    for wrong in (0.074, 0.076):  # measured 8.5e-3 each
        assert (
            rel(reconstruct(tmp_path / "stored", wrong)["weight"].double().numpy()[0], direct)
            > 5e-3
        )
    # and coefficients solved as if the two profiles were swapped are far off
    snaps = plan(node_snapshots(tmp_path / "stored"), 0.075)
    swapped = [sigma_rel_to_gamma(0.15 - s.sigma_rel) for s in snaps.snapshots]
    x, _ = solve_coefficients(
        [s.step for s in snaps.snapshots], swapped, 1000, sigma_rel_to_gamma(0.075)
    )
    wrong = sum(xi * weight(s.path) for xi, s in zip(x, snaps.snapshots))
    assert rel(wrong, direct) > 1e-1
    # at an earlier step, only the snapshots up to it are used
    mid = reconstruct(tmp_path / "stored", 0.075, step=600)["weight"].double().numpy()[0]
    assert rel(mid, closed_form(w, 0.075, 600)) < 1e-3  # measured 3.4e-4
    # fp16 snapshots: their rounding, through the coefficients, stays small
    drive(tmp_path / "half", w, (0.05, 0.10), every=50, dtype="float16")
    half = reconstruct(tmp_path / "half", 0.075)["weight"].double().numpy()[0]
    print(f"fp16 snapshots: error {rel(half, direct):.2e}")
    assert rel(half, direct) < 1e-3  # measured 1.9e-4


def test_constant_weights_come_back_exactly(tmp_path: Path) -> None:
    """Weights are mostly their constant part: a fit whose coefficients do not sum to 1 scales
    the whole network (unconstrained, 6 steps with snapshots every 2 gave 1.021×)."""
    w = np.full((6, 8), 3.0) + 1e-3 * curve(6, 8, seed=4)
    drive(tmp_path, w, (0.05, 0.10), every=2)
    for s in (0.06, 0.075, 0.09):
        got = reconstruct(tmp_path, s)["weight"].double().numpy()[0]
        assert np.abs(got - closed_form(w, s, 6)).max() < 1e-4, s
        assert plan(node_snapshots(tmp_path), s).coefficients.sum() == pytest.approx(1, abs=1e-12)


def test_plan_refuses_extrapolation(tmp_path: Path) -> None:
    drive(tmp_path, curve(100, 4, seed=3), (0.05, 0.10), every=25)
    with pytest.raises(EdiffError, match=r"outside the stored profiles' range \[0.05, 0.1\]"):
        reconstruct(tmp_path, 0.12)
    with pytest.raises(EdiffError, match=r"step=101 is outside the post-hoc EMA snapshots"):
        reconstruct(tmp_path, 0.07, step=101)
    with pytest.raises(EdiffError, match="no post-hoc EMA snapshot"):
        reconstruct(tmp_path, 0.07, step=10)
    with pytest.raises(EdiffError, match="parent state .* does not exist"):
        PostHocEMA(tmp_path, every=5, parent_state=tmp_path / "missing.safetensors")


# ---- (d) the real training path ----------------------------------------------------------------
FAST = [
    "logger=none",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=4",
    "monitor.every=0",
    "probe.enabled=false",
    "checkpoint_every=100",
    "module.lr=3e-3",
    "posthoc_ema.enabled=true",
    "posthoc_ema.every=5",
]


def _train_script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("_script_train_posthoc", ROOT / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(run_dir: Path, data_root: Path, *overrides: str) -> None:
    """train.py's main on a composed config, in this process."""
    register_nodes(["E0_0", "E1_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*FAST, f"run_dir={run_dir}", f"data.root={data_root}", *overrides]
        )
    _train_script().main(cfg)


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, digits_root: Path, one_torch_thread: None
) -> Path:
    """R: root 20 steps, child E1_0 10 steps from it. F: the same child from a copy of the root
    without its tracker state (trackers start fresh). S: the root trained 10 steps, then
    resumed to 20."""
    base = tmp_path_factory.mktemp("posthoc")
    train(base / "R", digits_root, "steps=20")
    train(base / "R", digits_root, "expert=E1_0", "steps=10")
    shutil.copytree(base / "R" / "E0_0", base / "F" / "E0_0")
    (base / "F" / "E0_0" / "posthoc" / "state.safetensors").unlink()
    train(base / "F", digits_root, "expert=E1_0", "steps=10")
    train(base / "S", digits_root, "steps=10")
    train(base / "S", digits_root, "steps=20")
    return base


def test_child_trackers_continue_the_parents(runs: Path) -> None:
    root, child, fresh = runs / "R" / "E0_0", runs / "R" / "E1_0", runs / "F" / "E1_0"
    assert sorted(p.name for p in (root / "posthoc").iterdir()) == sorted(
        [f"{s}_{t:09d}.safetensors" for s in ("0.05", "0.1") for t in (5, 10, 15, 20)]
        + ["state.safetensors"]
    )
    parent_raw = load_weights(root / "weights.safetensors")[0]
    state = load_file(str(root / "posthoc" / "state.safetensors"))
    # the same child trajectory (raw weights equal), trackers started two ways: the difference
    # of the two at step t is exactly (20/t)^(γ+1)·(parent tracker − parent weights)
    raw_a = load_weights(child / "weights.safetensors")[0]
    raw_b = load_weights(fresh / "weights.safetensors")[0]
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    for s in (0.05, 0.1):
        g = sigma_rel_to_gamma(s)
        a = load_file(str(snapshot_path(child, s, 25)))
        b = load_file(str(snapshot_path(fresh, s, 25)))
        for k in a:
            want = (20 / 25) ** (g + 1) * (state[f"{s:g}/{k}"] - parent_raw[k])
            assert torch.allclose(a[k] - b[k], want, rtol=1e-3, atol=1e-6), k
        assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-5  # visibly apart


def test_resumed_run_continues_trackers_exactly(runs: Path) -> None:
    one, two = runs / "R" / "E0_0" / "posthoc", runs / "S" / "E0_0" / "posthoc"
    for name in ("0.05_000000015.safetensors", "0.1_000000020.safetensors", "state.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= 1e-6, (name, worst)


def test_command_writes_weights_format_from_the_lineage(
    runs: Path, capsys: pytest.CaptureFixture
) -> None:
    child = runs / "R" / "E1_0"
    assert main([f"run_dir={runs / 'R'}", "node=E1_0", "sigma_rel=0.08"]) == 0
    assert "from 12 snapshots" in capsys.readouterr().out  # the root's 8 + the child's 4
    model, ema, meta = load_weights(child / "posthoc" / "ema_0.08.safetensors")
    raw = load_weights(child / "weights.safetensors")[0]
    assert model.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(model[k], raw[k]) for k in raw)
    assert meta["posthoc_ema"]["sigma_rel"] == 0.08 and meta["posthoc_ema"]["step"] == 30
    # a stored width at a snapshot's step gives that snapshot back
    again = reconstruct(child, 0.05)
    snap = load_file(str(snapshot_path(child, 0.05, 30)))
    assert max(float((again[k] - snap[k]).abs().max()) for k in snap) < 1e-5
    # before the child's start: the root's snapshots alone
    early = reconstruct(child, 0.1, step=20)
    snap = load_file(str(snapshot_path(runs / "R" / "E0_0", 0.1, 20)))
    assert max(float((early[k] - snap[k]).abs().max()) for k in snap) < 1e-5


# ---- (e) bad input: one line, non-zero exit, nothing written -----------------------------------
def test_command_refuses_out_of_range(runs: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ediff_train.run.posthoc_ema",
            f"run_dir={runs / 'R'}",
            "node=E1_0",
            "sigma_rel=0.2",
        ],
        env=run_env(runs),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: sigma_rel=0.2 lies outside the stored profiles' range")
    assert not list((runs / "R" / "E1_0" / "posthoc").glob("ema_0.2*"))
    assert main([f"run_dir={runs / 'R'}", "node=E1_0", "sigma_rel=0.07", "step=31"]) == 2
    assert main([f"run_dir={runs / 'R'}", "node=E1_0"]) == 2
    assert not list((runs / "R" / "E1_0" / "posthoc").glob("ema_0.07*"))


def test_evaluate_ema_sweep(runs: Path) -> None:
    """evaluate.py's metric=ema_sweep on its own config (in-process: a fresh interpreter costs
    more than the sweep): the stored EMA and each σ_rel, in json and csv."""
    from omegaconf import OmegaConf

    from ediff_train.evaluation.ema_sweep import evaluate_ema_sweep

    cfg = OmegaConf.load(ROOT / "conf" / "evaluate" / "config.yaml")
    cfg.pop("hydra")
    cfg = OmegaConf.merge(
        cfg,
        OmegaConf.from_dotlist(
            [
                f"run_dir={runs / 'R'}",
                "expert=E0_0",
                "metric=ema_sweep",
                "device=cpu",
                "ema.sigma_rels=[0.05,0.075,0.1]",
                "loss_by_sigma.images=8",
                "loss_by_sigma.batch_size=8",
                "loss_by_sigma.sigmas=4",
            ]
        ),
    )
    evaluate_ema_sweep(cfg)
    report = json.loads((runs / "R" / "eval" / "ema_sweep.json").read_text())
    rows = report["runs"][0]["rows"]
    assert [r["sigma_rel"] for r in rows] == ["stored", 0.05, 0.075, 0.1]
    assert all(len(r["loss"]) == 4 and math.isfinite(r["mean_loss"]) for r in rows)
    assert rows[1]["posthoc"][0]["snapshots"] == 8
    lines = (runs / "R" / "eval" / "ema_sweep.csv").read_text().splitlines()
    assert lines[0].startswith("run,sigma_rel,mean_loss") and len(lines) == 5
