"""What the real Trainer does on the plain (single CPU process) path, checked in-process through
train.py's own main with a recording callback (train_probes.Probe): a resumed run continues the
step count of its checkpoint, the EMA equals one recomputed from the weights after each step, and
a NaN loss in the middle of a run stops before the optimiser touches the weights."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from train_probes import RECORDS

from ediff_train.cli import register_nodes
from ediff_train.run.weights import load_weights

FAST = [
    "logger=none",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=4",
    "monitor.every=0",
    "module.lr=3e-3",  # lr: EMA and raw weights visibly apart in 4 steps
    "module.ema_halflife_images=null",  # the per-step EMA rule (images: test_handoff.py)
    "probe.enabled=false",
]
DECAY = 0.9999  # conf/train.yaml module.ema_decay, with warmup min(decay, (1+n)/(10+n))


def _train_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_script_train_loop", ROOT / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(run_dir: Path, data_root: Path, key: str, *overrides: str) -> None:
    """train.py's main on a composed config, in this process, with a Probe recording as `key`."""
    register_nodes(["E0_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *FAST,
                f"run_dir={run_dir}",
                f"data.root={data_root}",
                "+callbacks.probe._target_=train_probes.Probe",
                f"+callbacks.probe.key={key}",
                *overrides,
            ],
        )
    _train_script().main(cfg)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 0.0) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= tol, worst
    return worst


def reference_ema(
    ema0: dict[str, torch.Tensor], weights: dict[int, dict[str, torch.Tensor]], last: int
) -> dict[str, torch.Tensor]:
    """ema_n = d_n·ema_(n−1) + (1 − d_n)·w_n, d_n = min(DECAY, (1+n)/(10+n)), in float64."""
    ema = {k: v.double() for k, v in ema0.items()}
    for n in range(1, last + 1):
        d = min(DECAY, (1 + n) / (10 + n))
        for k, w in weights[n].items():
            ema[k] = d * ema[k] + (1.0 - d) * w.double()
    return ema


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def resumed(
    tmp_path_factory: pytest.TempPathFactory, digits_root: Path
) -> Iterator[tuple[Path, tuple]]:
    """A root trained 2 steps (its hand-off leaves last.ckpt at step 2), then the same node asked
    for 4: the second run must resume there. Yields the run dir and the first hand-off."""
    run = tmp_path_factory.mktemp("loop") / "R"
    train(run, digits_root, "loop_first", "steps=2", "checkpoint_every=100")
    first = load_weights(run / "E0_0" / "weights.safetensors")
    train(run, digits_root, "loop_second", "steps=4", "checkpoint_every=100")
    yield run, first
    RECORDS.pop("loop_first", None)
    RECORDS.pop("loop_second", None)


def test_resume_trains_only_the_remaining_steps(resumed: tuple[Path, tuple]) -> None:
    run, _ = resumed
    first, second = RECORDS["loop_first"], RECORDS["loop_second"]
    assert first["optimizer_steps"] == [0, 1]
    assert second["optimizer_steps"] == [2, 3]  # 4 − 2 steps, counted on from the checkpoint
    assert sorted(second["weights"]) == [2, 3, 4]
    same(second["weights"][2], first["weights"][2])  # the checkpoint's weights, not a new init
    ckpt_dir = run / "E0_0" / "checkpoints"
    # nothing set aside but the checkpoint before the last (guard against a corrupt last)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "previous.ckpt"]
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    adam = last["optimizer_states"][0]["state"]
    assert adam and all(int(s["step"]) == 4 for s in adam.values())  # AdamW's state went on too
    assert json.loads((run / "E0_0" / "node.json").read_text())["step"] == 4


def test_plain_path_ema_equals_recomputed_average(resumed: tuple[Path, tuple]) -> None:
    run, (model2, ema2, meta2) = resumed
    first, second = RECORDS["loop_first"], RECORDS["loop_second"]
    weights = {**first["weights"], **second["weights"]}
    same(first["ema0"], first["weights"][0])  # a root's EMA starts at its initial weights
    assert meta2["step"] == 2
    same(model2, first["weights"][2])
    same(ema2, reference_ema(first["ema0"], weights, 2), 1e-6)  # hand-off after 2 steps
    same(second["ema0"], ema2)  # the resumed run starts from the checkpoint's EMA
    model4, ema4, meta4 = load_weights(run / "E0_0" / "weights.safetensors")
    assert meta4["step"] == 4
    same(model4, weights[4])
    same(ema4, reference_ema(first["ema0"], weights, 4), 1e-6)
    assert same(ema4, model4, 1.0) > 1e-3  # the EMA lags the raw weights


def test_nan_loss_mid_run_stops_before_the_optimiser_step(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "R"
    with pytest.raises(SystemExit) as e:
        train(
            run,
            digits_root,
            "loop_nan",
            "steps=4",
            "checkpoint_every=2",
            "+callbacks.probe.nan_at=2",
        )  # the third step's batch is NaN
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "loss is nan at step 2 of E0_0" in lines[0], err[-2000:]
    assert "Traceback" not in err
    rec = RECORDS.pop("loop_nan")
    assert rec["optimizer_steps"] == [0, 1]  # the NaN step never reached the optimiser
    same(rec["at_exception"], rec["weights"][2])  # weights as they were before the NaN step
    assert all(torch.isfinite(v).all() for v in rec["at_exception"].values())
    ckpt = torch.load(
        run / "E0_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["global_step"] == 2
    saved = {k.removeprefix("denoiser."): v for k, v in ckpt["state_dict"].items()}
    same(saved, rec["weights"][2])
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())
    assert not (run / "E0_0" / "weights.safetensors").exists()  # unfinished: no hand-off
