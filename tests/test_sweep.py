"""Noise-split sweeps with Hydra multirun, the strategy/launcher configs, and one-line errors for
distributed settings that cannot work."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir

from ediff_train.cli import register_nodes
from ediff_train.errors import EdiffError
from ediff_train.training.strategies import slurm_layout

FAST = [
    "logger=csv",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=8",
    "run_dir=R",
    "steps=2",
    "monitor.every=0",
    "probe.batches=1",
    "probe.batch_size=8",
]


def train(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *flags, *FAST, *overrides],
        cwd=tmp,
        env=env or run_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_local_sweep_trains_one_node_per_point(tmp_path: Path) -> None:
    ok(train(tmp_path))  # the root both sides start from
    # `++`: a single value is applied to the base config too, whose default expert has no split
    ok(train(tmp_path, "-m", "expert=below,above", "++expert.split_sigma=1"))
    below = json.loads((tmp_path / "R" / "below_s1" / "node.json").read_text())
    above = json.loads((tmp_path / "R" / "above_s1" / "node.json").read_text())
    split_u = 0.5 * (1 + math.erf(1.2 / 1.2 / math.sqrt(2)))  # σ = 1 under ln σ ~ N(−1.2, 1.2²)
    assert below["quantile_interval"] == pytest.approx([0.0, split_u])
    assert above["quantile_interval"] == pytest.approx([split_u, 1.0])
    assert below["sigma_interval"][1] == pytest.approx(1.0) == above["sigma_interval"][0]
    assert below["sigma_seen"][1] < 1.0 < above["sigma_seen"][0]
    assert below["parent"] == above["parent"] == "E0_0" and below["step"] == above["step"] == 4


def compose_train(*overrides: str):  # noqa: ANN201
    register_nodes()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_strategy_and_launcher_configs_compose() -> None:
    cfg = compose_train("strategy=deepspeed_stage_3", "trainer=gpu")
    assert cfg.strategy.stage == 3 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.gradient_clip_val == 1.0 and "strategy" not in cfg.trainer
    cfg = compose_train("strategy=deepspeed_stage_2", "trainer.precision=32-true")
    assert cfg.strategy.stage == 2 and cfg.trainer.precision == "32-true"  # user wins
    assert compose_train().strategy.name == "auto"
    cfg = compose_train("hydra/launcher=slurm", "expert=below", "expert.split_sigma=0.5")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.max_num_timeout > 0  # requeued runs resume, so allow requeues


def test_slurm_layout() -> None:
    trainer = {"accelerator": "gpu", "devices": "auto", "num_nodes": "auto"}
    assert slurm_layout(trainer, {}) == {"num_nodes": 1, "devices": "auto"}
    srun = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert slurm_layout(trainer, srun) == {"num_nodes": 2, "devices": 4}
    one_task = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "8"}
    assert slurm_layout(trainer, one_task) == {"num_nodes": 1, "devices": 8}
    with pytest.raises(EdiffError, match="4 task"):
        slurm_layout({**trainer, "devices": 2}, srun)
    with pytest.raises(EdiffError, match="2 node"):
        slurm_layout({**trainer, "num_nodes": 1}, srun)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["strategy=deepspeed_stage_2"], "needs DeepSpeed"),
        (["strategy=deepspeed_stage_3", "trainer=cpu"], "GPUs only"),
    ],
)
def test_bad_strategy_is_one_line_error(tmp_path: Path, args: list[str], needle: str) -> None:
    env = run_env(tmp_path)
    if needle == "needs DeepSpeed":  # make `import deepspeed` fail, as if it were not installed
        fake = tmp_path / "fake" / "deepspeed"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('No module named deepspeed')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env.get("PYTHONPATH", "")])
    elif pytest.importorskip("deepspeed") is None:
        return
    proc = train(tmp_path, *args, env=env)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(err) == 1 and needle in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_cpu_ranks_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CPU ranks on this machine take half its CPU budget (cores, capped by the cgroup quota)
    each; one rank is capped at the budget; an explicit OMP_NUM_THREADS or a GPU run keep
    torch's own setting."""
    import torch

    from ediff_train.training.strategies import cpu_budget, share_cpu_threads

    before = torch.get_num_threads()
    cores = cpu_budget({})
    try:
        torch.set_num_threads(7)
        assert share_cpu_threads({"accelerator": "gpu", "devices": 8}, {}) == 7
        assert share_cpu_threads({"accelerator": "cpu", "devices": 1}, {}) == min(7, cores)
        torch.set_num_threads(7)
        assert (
            share_cpu_threads({"accelerator": "cpu", "devices": 2}, {"OMP_NUM_THREADS": "3"}) == 7
        )
        assert share_cpu_threads({"accelerator": "cpu", "devices": 2}, {}) == max(1, cores // 2)
        assert torch.get_num_threads() == max(1, cores // 2)
        assert share_cpu_threads({"accelerator": "cpu", "devices": 4 * cores}, {}) == 1
    finally:
        torch.set_num_threads(before)
