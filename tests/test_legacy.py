"""Stored runs and old import paths after the move to layered subpackages (0.2): a run dir
written by the flat layout samples and evaluates with the old code's answers; old module paths
and `_target_`s name their new home in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_env
from PIL import Image

from ediff_train.legacy import MODULES, NAMES, new_path, rewrite_targets

FIXTURE = ROOT / "tests" / "fixtures" / "run_v0_1"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Path:
    """The fixture run, its stored paths pointed at this session's digits build."""
    tmp = tmp_path_factory.mktemp("oldrun")
    run = tmp / "run"
    shutil.copytree(FIXTURE / "E0_0", run / "E0_0")
    for name in ("config.yaml", "node.json"):
        path = run / "E0_0" / name
        text = path.read_text().replace("/tmp/oldrun/cache/digits16", str(digits_root))
        path.write_text(text.replace("/tmp/oldrun/run", str(run)))
    return tmp


def _run(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=run_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_old_run_samples_as_before(old_run: Path) -> None:
    proc = _run(
        old_run,
        "sample.py",
        f"run_dir={old_run / 'run'}",
        "expert=E0_0",
        'prompt="the number 3"',
        "n=2",
        "steps=4",
        "progress=false",
        "device=cpu",
        f"out={old_run / 'sample'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("sample_0000.png", "sample_0001.png"):
        new = np.asarray(Image.open(old_run / "sample" / name), dtype=np.int16)
        old = np.asarray(Image.open(FIXTURE / "expected" / name), dtype=np.int16)
        assert new.shape == old.shape
        assert np.abs(new - old).max() <= 1, name  # one grey level: float noise across CPUs


def test_old_run_evaluates_as_before(old_run: Path) -> None:
    proc = _run(
        old_run,
        "evaluate.py",
        f"run_dir={old_run / 'run'}",
        "expert=E0_0",
        "metric=loss_by_sigma",
        "loss_by_sigma.sigmas=4",
        "loss_by_sigma.images=16",
        "loss_by_sigma.batch_size=16",
        f"out={old_run / 'lbs'}",
        "device=cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = json.loads((old_run / "lbs" / "loss_by_sigma.json").read_text())["runs"][0]
    old = json.loads((FIXTURE / "expected" / "loss_by_sigma.json").read_text())["runs"][0]
    assert new["sigmas"] == pytest.approx(old["sigmas"], rel=1e-6)
    assert new["loss"] == pytest.approx(old["loss"], rel=1e-4)


def test_old_targets_are_rewritten() -> None:
    cfg = {
        "strategy": {"_target_": "ediff_train.strategies.DeepSpeed", "stage": 2},
        "model": {"_target_": "ediff_train.nn.unet.TextUNet"},
        "list": [{"_target_": "ediff_train.checkpoints.load_expert"}],
    }
    assert rewrite_targets(cfg) == 2
    assert cfg["strategy"]["_target_"] == "ediff_train.training.strategies.DeepSpeed"
    assert cfg["model"]["_target_"] == "ediff_train.nn.unet.TextUNet"  # did not move
    assert cfg["list"][0]["_target_"] == "ediff_train.run.weights.load_expert"


def test_every_listed_new_path_imports() -> None:
    """The tables point at modules and names that exist today."""
    import importlib

    for new in MODULES.values():
        importlib.import_module(f"ediff_train.{new}")
    for old, new in NAMES.items():
        module, name = f"ediff_train.{new}".rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), (old, new)
    assert new_path("ediff_train.schedule.load_schedule") == (
        "ediff_train.experiments.schedule.load_schedule"
    )


@pytest.mark.parametrize(
    "code, line",
    [
        (
            "import ediff_train.checkpoints",
            "ediff_train.checkpoints was split into ediff_train.io.files, ediff_train.run.layout, "
            "ediff_train.run.weights",
        ),
        (
            "from ediff_train.resume import LAST",
            "ediff_train.resume moved to ediff_train.training.resume",
        ),
        (
            "from ediff_train.sampling import generate",
            "ediff_train.sampling.generate moved to ediff_train.sampling.generation.generate",
        ),
        (
            "from ediff_train.training import train_node",
            "ediff_train.training.train_node moved to ediff_train.training.loop.train_node",
        ),
    ],
)
def test_old_import_is_one_line_naming_the_new(code: str, line: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=run_env(tmp_path),
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith(line), proc.stderr


def test_old_python_m_names_the_new(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ediff_train.experiment", "fig7_toy"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=run_env(tmp_path),
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"{sys.executable}: Error while finding module specification for "
        "'ediff_train.experiment' (ModuleNotFoundError: ediff_train.experiment moved to "
        "ediff_train.experiments.experiment)"
    )


def test_todays_composition_is_the_stored_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings groups now come from dataclasses (training/settings.py), not train.yaml:
    composing the fixture's command today gives exactly the config the old layout stored, plus
    the groups added since, each at a default that does what the old run did."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ediff_train.cli import register_nodes

    monkeypatch.setenv("EDIFF_CACHE", "/tmp/oldrun/cache")
    register_nodes(["E0_0"])
    args = [
        "run_dir=/tmp/oldrun/run",
        "expert=E0_0",
        "steps=2",
        "logger=none",
        "data.num_workers=0",
        "sample.per_prompt=0",
        "monitor.every=0",
        "data.batch_size=8",
        "model.model_channels=8",
        "model.head_channels=8",
        "probe.batches=1",
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=args)
    today = OmegaConf.to_container(cfg, resolve=True)
    stored = OmegaConf.to_container(OmegaConf.load(FIXTURE / "E0_0" / "config.yaml"))
    # the keys added since, each defaulting to what the old run did: the parameterisation (EDM),
    # the codec (pixels), the shard reader, no pretrained start, no LoRA, no recorded guidance
    assert today.pop("param") == {"name": "edm", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2}
    assert today.pop("codec") == {
        "_target_": "ediff_train.nn.codec.PixelCodec",
        "channels": 3,
        "downsample": 1,
    }
    assert today["data"].pop("reader") == "fast"
    assert today["data"]["builder"].pop("vae_steps") == 300  # read only under codec=vae
    # one default changed: the encoders' alignment runs to convergence (docs/data.md); the old
    # run keeps its own 300 in its config.yaml, which is what loading it reads
    assert today["data"]["builder"]["align_steps"] == 600
    assert stored["data"]["builder"].pop("align_steps") == 300
    del today["data"]["builder"]["align_steps"]
    assert today.pop("init_from") is None and today.pop("expert_guidance") is None
    assert today.pop("lora") == {"enabled": False}
    # a child's own model (docs/sized_experts.md) and guidance distillation: off, as before
    assert today.pop("init")["mode"] == "copy"
    assert today.pop("distill_guidance")["enabled"] is False
    # the digits moved into data/toys/ with the other toy sets; the old path is rewritten on
    # loading (legacy.rewrite_targets), so the stored run still builds its data
    assert today["data"]["builder"]["_target_"] == "ediff_train.data.toys.digits.build_digits"
    assert stored["data"]["builder"]["_target_"] == "ediff_train.data.digits.build_digits"
    assert new_path(stored["data"]["builder"].pop("_target_")) == today["data"]["builder"].pop(
        "_target_"
    )
    assert today == stored
