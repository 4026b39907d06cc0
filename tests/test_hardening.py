"""Mistakes that used to end in a traceback or a silent bad run now stop with one line: corrupt
weights, bad hyperparameters, unwritable output folders, sample.py n/steps; and the package's
version. Most run in-process (the Hydra mains take a composed config directly)."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import ediff_train
from ediff_train.cli import register_nodes
from ediff_train.errors import EdiffError
from ediff_train.run.weights import load_weights, save_weights
from ediff_train.training.settings import validate_train_config


def script(name: str) -> ModuleType:
    """An entry-point script (train.py, sample.py) imported as a module."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def composed(config_dir: str, name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf" / config_dir), version_base="1.3"):
        return compose(name, overrides=overrides)


def run_main(main: Any, cfg: DictConfig, capsys: pytest.CaptureFixture[str]) -> str:
    """Call a Hydra main with a config; it must exit 2 with one `error:` line. The line."""
    with pytest.raises(SystemExit) as e:
        main(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def train_cfg() -> DictConfig:
    register_nodes(["E0_0"])
    return composed("", "train", [])


def corrupt(path: Path, how: str) -> Path:
    save_weights(path, {"w": torch.randn(64, 64)}, {"w": torch.randn(64, 64)}, {"step": 7})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "half" else os.urandom(len(data)))
    return path


@pytest.mark.parametrize(
    "how, reason",
    [("half", "incomplete metadata, file not fully covered"), ("random", "header too large")],
)
def test_corrupt_weights_are_one_error(tmp_path: Path, how: str, reason: str) -> None:
    path = corrupt(tmp_path / "R" / "E0_0" / "weights.safetensors", how)
    with pytest.raises(EdiffError) as e:
        load_weights(path)
    assert str(e.value) == (
        f"weights file {path} is corrupt or truncated (Error while "
        f"deserializing header: {reason}): retrain node E0_0 or copy its "
        "weights.safetensors again from where it was trained"
    )


def test_sampler_and_evaluate_loading_refuse_corrupt_weights(
    tmp_path: Path, train_cfg: DictConfig
) -> None:
    from ediff_train.sampling.ensemble import load_ensemble  # sample.py's and evaluate.py's way in

    ndir = tmp_path / "E0_0"
    corrupt(ndir / "weights.safetensors", "half")
    OmegaConf.save(train_cfg, ndir / "config.yaml", resolve=True)
    with pytest.raises(EdiffError, match="E0_0/weights.safetensors is corrupt or truncated"):
        load_ensemble(tmp_path, ["E0_0"])


def test_child_of_corrupt_parent_one_line(tmp_path: Path) -> None:
    corrupt(tmp_path / "R" / "E0_0" / "weights.safetensors", "half")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "run_dir=R",
            "expert=E1_1",
            "steps=1",
            "logger=none",
            "data.num_workers=0",
            "sample.per_prompt=0",
            "monitor.every=0",
            "probe.enabled=false",
        ],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert err == [
        "error: weights file R/E0_0/weights.safetensors is corrupt or truncated "
        "(Error while deserializing header: incomplete metadata, file not fully "
        "covered): retrain node E0_0 or copy its weights.safetensors again from "
        "where it was trained"
    ], proc.stderr[-3000:]
    child = tmp_path / "R" / "E1_1"
    assert not (child / "config.yaml").exists() and not (child / "checkpoints").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("module.lr", 0, "module.lr must be a finite number > 0, got 0"),
        ("module.lr", float("nan"), "module.lr must be a finite number > 0, got nan"),
        ("module.lr", "fast", "module.lr must be a finite number > 0, got 'fast'"),
        ("module.weight_decay", -0.1, "module.weight_decay must be a finite number ≥ 0, got -0.1"),
        (
            "module.betas",
            [0.9, 1.0],
            "module.betas must be two numbers, each in [0, 1), got [0.9, 1.0]",
        ),
        ("module.betas", [0.9], "module.betas must be two numbers, each in [0, 1), got [0.9]"),
        ("module.ema_decay", 1.5, "module.ema_decay must be a number in [0, 1], got 1.5"),
        ("steps", 0, "steps must be a whole number ≥ 1, got 0"),
        ("steps", 2.5, "steps must be a whole number ≥ 1, got 2.5"),
        ("steps", True, "steps must be a whole number ≥ 1, got True"),
        ("data.batch_size", 0, "data.batch_size must be a whole number ≥ 1, got 0"),
        ("checkpoint_every", 0, "checkpoint_every must be a whole number ≥ 1, got 0"),
        ("sample.per_prompt", -1, "sample.per_prompt must be auto or a whole number ≥ 0, got -1"),
        ("sample.steps", 0, "sample.steps must be a whole number ≥ 1, got 0"),
        ("monitor.every", -5, "monitor.every must be auto or a whole number ≥ 0 (0 = off), got -5"),
        ("seed", 1.5, "seed must be a whole number in [0, 4294967295], got 1.5"),
        ("seed", 2**32, "seed must be a whole number in [0, 4294967295], got 4294967296"),
        (
            "module.compile",
            "",
            "module.compile must be true, false or a torch.compile backend name, got ''",
        ),
        ("module.channels_last", "yes", "module.channels_last must be true or false, got 'yes'"),
        (
            "module.finite_check_every",
            0,
            "module.finite_check_every must be null or a whole number ≥ 1, got 0",
        ),
    ],
)
def test_bad_hyperparameter_named(
    train_cfg: DictConfig, key: str, value: Any, message: str
) -> None:
    cfg = copy.deepcopy(train_cfg)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(EdiffError) as e:
        validate_train_config(cfg)
    assert str(e.value) == message


def test_edge_values_accepted(train_cfg: DictConfig) -> None:
    cfg = copy.deepcopy(train_cfg)
    validate_train_config(cfg)  # the defaults
    for key, value in [
        ("module.ema_decay", 1.0),
        ("module.weight_decay", 0),
        ("steps", 1e3),
        ("sample.per_prompt", 0),
        ("monitor.every", 0),
        ("seed", 0),
        ("module.betas", [0.0, 0.999]),
        ("module.compile", "aot_eager"),
        ("module.compile", True),
        ("module.channels_last", True),
        ("module.finite_check_every", 1),
    ]:
        OmegaConf.update(cfg, key, value)
    validate_train_config(cfg)


def test_train_main_refuses_bad_value_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    register_nodes(["E0_0"])
    cfg = composed("", "train", [f"run_dir={tmp_path / 'R'}", "module.lr=-1"])
    line = run_main(script("train").main, cfg, capsys)
    assert line == "error: module.lr must be a finite number > 0, got -1"
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["n=0"], "n (images per prompt) must be a whole number ≥ 1, got 0"),
        (["n=-3"], "n (images per prompt) must be a whole number ≥ 1, got -3"),
        (["n=0", "cascade=digits"], "n (images per prompt) must be a whole number ≥ 1, got 0"),
        (["steps=0"], "steps must be ≥ 1 (a whole number of solver steps), got 0"),
        (["steps=2.5"], "steps must be ≥ 1 (a whole number of solver steps), got 2.5"),
    ],
)
def test_sample_refuses_no_images_or_no_steps(
    tmp_path: Path, overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = composed(
        "sampling",
        "config",
        [*overrides, f"out={tmp_path / 'out'}", f"run_dir={tmp_path / 'none'}"],
    )
    assert run_main(script("sample").main, cfg, capsys) == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", [0, -2, 2.5])
def test_cascade_stage_steps_checked_when_read(steps: Any) -> None:
    from ediff_train.sampling.cascade import Stage

    with pytest.raises(EdiffError) as e:
        Stage.from_config({"run_dir": "r", "experts": ["E0_0"], "steps": steps}, 1)
    assert str(e.value) == f"cascade stage1: steps must be a whole number ≥ 1, got {steps!r}"


@pytest.mark.parametrize(
    "entry, key", [("train", "run_dir"), ("sample", "out"), ("evaluate", "out")]
)
def test_unwritable_output_folder_one_line(tmp_path: Path, entry: str, key: str) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, str(ROOT / f"{entry}.py"), f"{key}={blocker}/sub"],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == (
        f"error: {key}={blocker}/sub cannot be created or written (Not a "
        "directory); choose a folder you can write to\n"
    )


def test_version_from_metadata_or_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    text = (ROOT / "pyproject.toml").read_text()
    want = re.search(r'^version = "(.+)"', text, re.MULTILINE).group(1)  # type: ignore[union-attr]
    assert ediff_train.__version__ == want

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert ediff_train._version() == want  # a source tree without an install
