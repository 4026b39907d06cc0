"""bench/gpu_check.sh --dry-run: every step of the one-shot GPU check runs its CPU path with tiny
sizes and lands in the one JSON and the one log, with figures checked against answers computed
here independently (the tiny nets' parameter counts built from the training config, FLOPs
linear in the batch, the LoRA bench's bytes of three full copies, the test count of
tests/test_gpu.py). The GPU run itself needs a lent GPU (docs/performance.md)."""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.slow  # one dry run of the whole check: ~55 CPU-seconds

PLAN = {
    "env": 1,
    "pytest_gpu": 2,
    "train_base64_sweep": 3,
    "train_base64_channels_last": 3,
    "train_base64_no_ckpt": 3,
    "train_mmdit_sd3": 3,
    "sample_base64": 4,
    "train_sr": 5,
    "degrade": 5,
    "train_base64_compile": 6,
}
NO_CUDA = "skipped (no CUDA)"


@pytest.fixture(scope="module")
def dry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=out,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((out / "gpu_check.json").read_text())
    return {"out": out, "data": data, "steps": data["steps"], "stdout": proc.stdout}


@functools.cache
def n_params(model: str) -> int:
    """Parameters of conf/model/<model>.yaml as training composes it (not the bench's path)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ediff_train.cli import register_nodes

    register_nodes(["E0_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    with torch.device("meta"):  # shapes only: no memory, no init
        return sum(p.numel() for p in instantiate(cfg.model).parameters())


def test_every_step_recorded_in_plan_order_and_logged(dry: dict[str, Any]) -> None:
    data, steps = dry["data"], dry["steps"]
    assert list(steps) == list(PLAN) and data["dry_run"] is True and data["finished"]
    assert data["cuda"] is False  # the dry run hides any GPU
    for name, plan in PLAN.items():
        rec = steps[name]
        assert rec["plan_step"] == plan and rec["rc"] == 0 and rec["seconds"] >= 0, rec
        assert rec["timeout_s"] > 0 and rec["command"] and "output_tail" in rec
        want = "skipped" if name == "pytest_gpu" else "ok"
        assert rec["status"] == want, (name, rec["status"], rec["reason"])
    log = (dry["out"] / "gpu_check.log").read_text()
    for name, plan in PLAN.items():
        assert f"=== step {plan} {name}:" in log and f"[{name}] exit 0" in log, name
    assert "GPU check summary" in log and "9 ok, 1 skipped" in dry["stdout"]


def test_cuda_only_parts_and_the_gpu_tests_are_skipped(dry: dict[str, Any]) -> None:
    steps = dry["steps"]
    rec = steps["pytest_gpu"]
    tree = ast.parse((ROOT / "tests" / "test_gpu.py").read_text())
    tests = [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name[:5] == "test_"]
    assert rec["reason"] == "needs a CUDA GPU"
    assert rec["summary"] == {
        "tests": len(tests),
        "passed": 0,
        "failures": 0,
        "errors": 0,
        "skipped": len(tests),
    }
    assert sorted(c["test"] for c in rec["figures"]["cases"]) == sorted(tests)
    assert (dry["out"] / "gpu_check_junit.xml").is_file()
    env = steps["env"]["figures"]
    assert env["torch"] == torch.__version__ and env["python"] == sys.version.split()[0]
    assert env["cuda_available"] is False and env["nvidia_smi"] == NO_CUDA
    assert steps["env"]["cuda_only"] == {
        "nvidia-smi": NO_CUDA,
        "CUDA device name, capability, memory": NO_CUDA,
    }
    for name in PLAN:
        if name.startswith("train_"):
            assert steps[name]["cuda_only"]["MFU"] == NO_CUDA, name
            for row in steps[name]["figures"]["rows"]:
                assert row["mfu"] is None and row["device"].startswith("cpu"), name
    sample = steps["sample_base64"]
    assert sample["summary"]["peak_mb"] is None and sample["summary"]["offload_peak_mb"] is None
    assert set(sample["cuda_only"].values()) == {NO_CUDA}
    assert steps["degrade"]["cuda_only"] == {"the CUDA row": NO_CUDA}


def test_train_step_figures_match_independent_answers(dry: dict[str, Any]) -> None:
    steps = dry["steps"]
    tiny, mmdit = n_params("tiny"), n_params("mmdit_tiny")
    sweep = steps["train_base64_sweep"]["figures"]["rows"]
    assert [(r["config"], r["batch"], r["oom"]) for r in sweep] == [
        ("tiny", 2, False),
        ("tiny", 4, False),
    ]
    for r in sweep:
        assert round(r["params_m"] * 1e6) == tiny and r["optimizer"] is True
        assert r["img_per_s"] > 0 and r["sec_per_step"] > 0 and r["peak_mem_mb"] >= 0
    assert sweep[1]["gflop_per_step"] == pytest.approx(2 * sweep[0]["gflop_per_step"])
    (cl,) = steps["train_base64_channels_last"]["figures"]["rows"]
    assert cl["channels_last"] is True and round(cl["params_m"] * 1e6) == tiny
    assert cl["gflop_per_step"] == pytest.approx(sweep[0]["gflop_per_step"])  # same batch 2
    (nc,) = steps["train_base64_no_ckpt"]["figures"]["rows"]
    assert nc["grad_checkpointing"] is False and nc["img_per_s"] > 0
    (mm,) = steps["train_mmdit_sd3"]["figures"]["rows"]
    assert mm["config"] == "mmdit_tiny" and round(mm["params_m"] * 1e6) == mmdit
    sr = steps["train_sr"]["figures"]
    assert [(r["config"], r["dtype"]) for r in sr["rows"]] == [
        ("sr_tiny", "bf16-autocast"),
        ("sr1024_tiny", "bf16-autocast"),
    ]
    assert [(r["config"], r["size"]) for r in sr["inference"]] == [
        ("sr_tiny", 32),
        ("sr1024_tiny", 32),
    ]
    assert all(r["sec_per_call"] > 0 for r in sr["inference"])


def test_compiled_row_ran_compiled(dry: dict[str, Any]) -> None:
    """Plan step 6: dynamo's counters in the compiled row show frames it compiled."""
    rec = dry["steps"]["train_base64_compile"]
    (row,) = rec["figures"]["rows"]
    assert row["compile"] is True and row["compiled"] is True and row["compile_error"] is None
    assert row["compile_s"] > 0
    d = row["dynamo"]
    assert 1 <= d["frames_ok"] <= d["frames_total"] and d["unique_graphs"] >= 1
    assert d["graph_breaks"] == sum(d["graph_break_reasons"].values())
    assert rec["summary"]["rows"][0]["dynamo"] == d
    assert "--backend eager" in rec["command"]
    assert re.search(r"dynamo frames \d+/\d+ breaks \d+", dry["stdout"])


def test_sample_and_degrade_figures(dry: dict[str, Any]) -> None:
    steps = dry["steps"]
    s = steps["sample_base64"]["summary"]
    assert s["experts"] == 3 and s["ratio"] > 0 and s["offload_ratio"] > 0
    assert s["offload_transfers"] >= 3  # every expert fetched at least once
    lora = s["lora"]
    assert lora["lora_rank"] == 2 and lora["adapter_switches"] > 0
    # three full fp32 copies of the tiny net, counted here from the training config
    assert lora["full_copies_mb"] == pytest.approx(3 * n_params("tiny") * 4 / 2**20)
    assert lora["base_plus_adapters_mb"] < lora["full_copies_mb"]
    (row,) = steps["degrade"]["summary"]["rows"]
    assert (row["device"], row["batch"], row["size"], row["out_size"]) == ("cpu", 2, 64, 16)
    assert row["samples_per_s"] > 0
    assert steps["degrade"]["figures"]["rows"][0]["batches"] == 1
