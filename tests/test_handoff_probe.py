"""The hand-off instruments: the monitor's cadence follows the run's length, and the hand-off
probe measures a child's in-band held-out loss from its parent's weights on, warning when the
child lost ground. Unit checks of the step lists and the warning, then a tiny root + child run
through train.py whose files are checked row by row and against an independent computation."""

from __future__ import annotations

import copy
import csv
import io
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ediff_train.cli import register_nodes
from ediff_train.core.edm import EDMPrecond
from ediff_train.core.experts import parse_node
from ediff_train.errors import EdiffError
from ediff_train.metrics.handoff_probe import (
    PROBE_JSON,
    HandoffProbe,
    lost_ground,
    probe_steps,
    read_probe,
)
from ediff_train.metrics.loss_by_sigma import StepCadence, edm_loss, monitor_steps
from ediff_train.run.weights import load_weights

ROOT_STEPS, CHILD_STEPS = 4, 12
SMALL = ["model.model_channels=8", "model.head_channels=8", "model.context_dim=16"]
FAST = [
    "logger=csv",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "checkpoint_every=50",
    "data.batch_size=8",
    "monitor.batches=1",
    "monitor.batch_size=16",
    "monitor.sigmas=2",
    "probe.batches=1",
    "probe.batch_size=16",
    *SMALL,
]


# ---- step lists ----------------------------------------------------------------------------
def test_monitor_steps_auto_known_answers() -> None:
    assert monitor_steps(10) == [0, 10]  # a smoke node: its start and end only
    assert monitor_steps(50) == [0, 50]
    assert monitor_steps(7) == [0, 7]
    assert monitor_steps(230) == [0, 57, 114, 171, 228, 230]  # one point per 50 steps
    assert monitor_steps(1000) == [0, 1, 2, 3, 5, 10, *range(100, 1001, 100)]
    assert monitor_steps(1) == [0, 1]
    assert len(monitor_steps(123_457)) >= 10 and monitor_steps(123_457)[-1] == 123_457


def test_monitor_steps_integer_keeps_every_n() -> None:
    assert list(monitor_steps(12, 5)) == [5, 10]
    assert list(monitor_steps(12, 0)) == [] and 10**9 in monitor_steps(10**9, 1)


def test_probe_steps_known_answers() -> None:
    assert probe_steps(50) == [0, 1, 2, 3, 5, 10, 20, 50]
    assert probe_steps(7) == [0, 1, 2, 3, 5, 7]
    assert probe_steps(1000) == [0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert probe_steps(50, after=4) == [0, 1, 2, 3, 4, 5, 10, 20, 50]


def test_validation_accepts_auto_and_refuses_words() -> None:
    from ediff_train.training.settings import validate_train_config

    register_nodes()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train")
    assert cfg.monitor.every == "auto" and cfg.probe.after == 3
    validate_train_config(cfg)
    for key, value in [("monitor.every", "often"), ("probe.after", 0), ("probe.warn_ratio", -1.0)]:
        bad = copy.deepcopy(cfg)
        OmegaConf.update(bad, key, value)
        with pytest.raises(EdiffError, match=key.replace(".", r"\.")):
            validate_train_config(bad)


class _Counting(StepCadence):
    def __init__(self, steps: Any, start: int = 0) -> None:
        super().__init__(steps, start)
        self.seen: list[int] = []

    def measure(self, trainer: Any, module: Any, k: int) -> None:
        self.seen.append(k)


def _drive(cb: StepCadence, global_steps: list[int], start_at: int = 0, module: Any = None) -> None:
    # a Lightning Trainer's few attributes the cadence reads (a plain strategy: not ZeRO-3)
    trainer = SimpleNamespace(global_step=start_at, is_global_zero=True, strategy=SimpleNamespace())
    cb.on_train_start(trainer, module)
    for g in global_steps:
        trainer.global_step = g
        cb.on_train_batch_end(trainer, module, None, None, 0)


def test_cadence_once_per_step_accumulation_resume_and_continuation() -> None:
    every = list(range(8))  # measure at every step
    cb = _Counting(every)
    _drive(cb, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7])  # 2 micro-batches per step
    assert cb.seen == every
    resumed = _Counting(every)
    _drive(resumed, [3, 4, 5], start_at=3)  # step 3 was measured before the interruption
    assert resumed.seen == [4, 5]
    cont = _Counting(list(range(11)), start=500)  # continues a node that stopped at 500
    _drive(cont, list(range(501, 511)), start_at=500)
    assert cont.seen == list(range(11))


# ---- the warning ---------------------------------------------------------------------------
def _probe(handoff: bool = True, after: int = 3) -> tuple[HandoffProbe, io.StringIO]:
    err = io.StringIO()
    probe = HandoffProbe(
        parse_node("E1_1"),
        list,
        probe_steps(50, after),
        Path("unused.json"),
        handoff=handoff,
        after=after,
        warn_ratio=1.05,
        stream=err,
    )
    return probe, err


def _feed(probe: HandoffProbe, losses: dict[int, float]) -> None:
    for k, v in sorted(losses.items()):
        probe.losses[k] = v
        probe.record(k)


def test_warns_once_when_child_lost_ground() -> None:
    probe, err = _probe()
    _feed(probe, {0: 1.0, 1: 1.4, 2: 1.62, 3: 1.3, 5: 1.2, 10: 0.9})
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and probe.warned
    assert "E1_1" in lines[0] and "1.3×" in lines[0] and "lost ground" in lines[0]
    assert "handoff.optimizer" in lines[0] and "warmup" in lines[0]
    s = probe.summary()
    assert s["warned"] is True and s["ratio_after_3"] == pytest.approx(1.3)
    assert s["steps"] == [0, 1, 2, 3, 5, 10] and s["in_band_loss"][2] == 1.62
    assert s["band"][0] == pytest.approx(parse_node("E1_1").sigma_interval[0])
    assert s["band"][1] == "inf"


@pytest.mark.parametrize(
    "losses, handoff",
    [
        ({0: 1.0, 3: 1.04}, True),  # within warn_ratio
        ({0: 1.0, 3: 0.8}, True),
        ({0: 1.0, 3: 2.0}, False),
    ],
)  # a root: no parent
def test_no_warning(losses: dict[int, float], handoff: bool) -> None:
    probe, err = _probe(handoff)
    _feed(probe, losses)
    assert err.getvalue() == "" and not probe.warned and probe.summary()["warned"] is False


def test_configured_after_and_unknown_ratio() -> None:
    probe, err = _probe(after=5)
    _feed(probe, {0: 1.0, 3: 2.0, 5: 1.1})
    assert probe.warned and "after 5 steps" in err.getvalue()
    assert probe.summary()["ratio_after_5"] == pytest.approx(1.1)
    assert lost_ground({0: 1.0}, 3) is None and lost_ground({0: 0.0, 3: 1.0}, 3) is None


def test_read_probe_absent_or_broken(tmp_path: Path) -> None:
    assert read_probe(tmp_path) is None
    (tmp_path / PROBE_JSON).write_text("{not json")
    assert read_probe(tmp_path) is None


# ---- end to end ----------------------------------------------------------------------------
def _train(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, *args],
        cwd=tmp,
        env=run_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("probe")
    _train(tmp, "run_dir=R", f"steps={ROOT_STEPS}")
    return tmp, _train(tmp, "run_dir=R", "expert=E1_1", f"steps={CHILD_STEPS}")


def _csv_steps(path: Path) -> list[int]:
    rows = list(csv.reader(path.open()))
    assert rows[0][0] == "step" and len(rows[0]) == 3  # monitor.sigmas=2
    assert all(float(v) > 0 for r in rows[1:] for v in r[1:])
    return [int(r[0]) for r in rows[1:]]


def test_monitor_rows_follow_the_run(tree: tuple[Path, Any]) -> None:
    tmp, _ = tree
    assert _csv_steps(tmp / "R" / "E0_0" / "loss_by_sigma.csv") == monitor_steps(ROOT_STEPS)
    child = _csv_steps(tmp / "R" / "E1_1" / "loss_by_sigma.csv")
    assert child == [ROOT_STEPS + k for k in monitor_steps(CHILD_STEPS)]  # the tree's steps
    assert child[0] == ROOT_STEPS  # the hand-off weights, before the child's first update


def test_probe_files_and_warning_agree(tree: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp, proc = tree
    root = read_probe(tmp / "R" / "E0_0")
    assert root is not None and root["steps"] == probe_steps(ROOT_STEPS)
    assert root["handoff"] is False and root["warned"] is False and root["band"] == [0.0, "inf"]
    child = read_probe(tmp / "R" / "E1_1")
    assert child is not None and child["steps"] == probe_steps(CHILD_STEPS)
    assert child["handoff"] is True and len(child["in_band_loss"]) == len(child["steps"])
    assert all(math.isfinite(v) and v > 0 for v in child["in_band_loss"])
    ratio = child["in_band_loss"][3] / child["in_band_loss"][0]
    assert child["ratio_after_3"] == pytest.approx(ratio)
    assert child["warned"] == (ratio > 1.05) == ("lost ground" in proc.stderr)


def test_probe_step0_is_the_parents_in_band_loss(tree: tuple[Path, Any], digits_root: Path) -> None:
    """Recomputed here from the parent's weights file with edm_loss and the documented draws:
    σ by E1_1.sample_sigma from one generator seeded seed·1000003 + 999983, noise of batch b
    from a generator seeded seed·1000003 + b·1009 + 7919 (seed 0 here)."""
    tmp, _ = tree
    register_nodes()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={digits_root}", "expert=E1_1", *SMALL])
    data = instantiate(cfg.data)
    (batch,) = data.val_batches(1, 16)
    model, _, meta = load_weights(tmp / "R" / "E0_0" / "weights.safetensors")
    assert meta["step"] == ROOT_STEPS
    denoiser = EDMPrecond(instantiate(cfg.model))
    denoiser.load_state_dict(model)
    denoiser.eval()
    x = batch["image"].float()
    sigma = parse_node("E1_1").sample_sigma(16, torch.Generator().manual_seed(999_983))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7919))
    from ediff_train.core.conditioning import Conditioning

    with torch.no_grad():
        want = float(
            edm_loss(
                denoiser,
                x,
                sigma.float(),
                Conditioning.from_batch(batch).to("cpu", torch.float32),
                noise=noise,
            ).mean()
        )
    got = read_probe(tmp / "R" / "E1_1")
    assert got is not None and got["in_band_loss"][0] == pytest.approx(want, rel=1e-5)
    assert sigma.min() >= parse_node("E1_1").sigma_interval[0]  # drawn inside the band


def test_probe_leaves_training_untouched(digits_root: Path, tmp_path: Path) -> None:
    """A measurement consumes no global RNG, changes no weight and restores train mode."""
    register_nodes()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={digits_root}", *SMALL])
    data = instantiate(cfg.data)
    module = SimpleNamespace(denoiser=EDMPrecond(instantiate(cfg.model)).train(), device="cpu")
    before = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    probe = HandoffProbe(
        parse_node("E1_0"),
        lambda: data.val_batches(1, 8),
        probe_steps(4),
        tmp_path / PROBE_JSON,
        handoff=True,
    )
    rng = torch.random.get_rng_state()
    _drive(probe, [1, 1, 2], module=module)  # step 0 on train start, then 1 (twice) and 2
    assert torch.equal(rng, torch.random.get_rng_state()) and module.denoiser.training
    assert all(torch.equal(before[k], v) for k, v in module.denoiser.state_dict().items())
    got = read_probe(tmp_path)
    assert got is not None and got["steps"] == [0, 1, 2] and got["handoff"] is True
    assert len(set(got["in_band_loss"])) == 1  # same weights, same draws: the same loss
