"""evaluate.py through the real entry point on a tiny trained tree (root + two children):
image metrics with a guidance sweep, loss-by-σ of an ensemble against its parent, and the
one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env

FAST = [
    "logger=csv",
    "data.num_workers=0",
    "sample.per_prompt=1",
    "sample.steps=3",
    "checkpoint_every=50",
    "data.batch_size=16",
    "monitor.every=5",
    "monitor.batches=1",
    "monitor.batch_size=16",
    "probe.batches=1",
    "probe.batch_size=16",
]
EVAL = [
    "captions.per_caption=1",
    "captions.templates=plain",
    "steps=3",
    "batch_size=7",
    "device=cpu",
]


def _run(tmp: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=tmp,
        env=run_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("evaltree")
    for args in (["steps=12"], ["expert=E1_0", "steps=6"], ["expert=E1_1", "steps=6"]):
        proc = _run(tmp, "train.py", *FAST, "run_dir=R", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_training_logs_heldout_loss_by_sigma(tree: Path) -> None:
    rows = list(csv.reader((tree / "R" / "E0_0" / "loss_by_sigma.csv").open()))
    assert rows[0][0] == "step" and len(rows[0]) == 9  # 8 σ values
    assert [int(r[0]) for r in rows[1:]] == [5, 10]
    child = list(csv.reader((tree / "R" / "E1_1" / "loss_by_sigma.csv").open()))
    assert [int(r[0]) for r in child[1:]] == [17]  # its global step: parent's 12 + 5
    assert all(float(v) > 0 for r in rows[1:] + child[1:] for v in r[1:])


def test_images_metrics_and_guidance_sweep(tree: Path) -> None:
    proc = _run(tree, "evaluate.py", "run_dir=R", "expert=E0_0", "guidance=[1,3]", "out=ev", *EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prompt_accuracy" in proc.stdout and "digits_fid" in proc.stdout
    report = json.loads((tree / "ev" / "eval.json").read_text())
    assert report["classifier"]["heldout_accuracy"] >= 0.95
    (run,) = report["runs"]
    assert run["label"] == "E0_0" and run["node_steps"] == {"E0_0": 12}
    assert [r["guidance"] for r in run["rows"]] == [1.0, 3.0]
    for row in run["rows"]:
        assert 0.0 <= row["prompt_accuracy"] <= 1.0 and row["digits_fid"] > 0
        assert row["images"] == 10 and row["generation"]["generated"] == 10
        assert set(row["prompt_accuracy_per_wording"]) == {"the number N"}
    assert report["settings"]["steps"] == 3 and report["settings"]["seed"] == 0
    sweep = list(csv.reader((tree / "ev" / "sweep.csv").open()))
    assert sweep[0][:2] == ["run", "guidance"] and len(sweep) == 3
    assert (tree / "ev" / "fid_clip.png").stat().st_size > 1000
    assert len(list((tree / "ev" / "E0_0" / "guidance_3").glob("*.png"))) == 10
    # a rerun finds every image and generates none
    again = _run(tree, "evaluate.py", "run_dir=R", "expert=E0_0", "guidance=[1,3]", "out=ev", *EVAL)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = json.loads((tree / "ev" / "eval.json").read_text())["runs"][0]["rows"]
    assert all(r["generation"]["generated"] == 0 for r in rows)
    assert [r["prompt_accuracy"] for r in rows] == [r["prompt_accuracy"] for r in run["rows"]]
    # other settings into the same folders would mix old and new images: refused
    four = [a for a in EVAL if not a.startswith("steps=")] + ["steps=4"]
    other = _run(tree, "evaluate.py", "run_dir=R", "expert=E0_0", "guidance=[1,3]", "out=ev", *four)
    assert other.returncode == 2 and "made with other settings (steps)" in other.stderr


def test_ensemble_vs_parent_loss_by_sigma(tree: Path) -> None:
    proc = _run(
        tree,
        "evaluate.py",
        "run_dir=R",
        "experts=[E1_0,E1_1]",
        "compare=[[E0_0]]",
        "metric=loss_by_sigma",
        "loss_by_sigma.sigmas=10",
        "loss_by_sigma.images=32",
        "loss_by_sigma.batch_size=16",
        "out=lbs",
        "device=cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "band E1_1" in proc.stdout
    report = json.loads((tree / "lbs" / "loss_by_sigma.json").read_text())
    ens, base = report["runs"]
    assert ens["label"] == "E1_0+E1_1" and base["label"] == "E0_0"
    split = 0.30119
    assert all(o == ("E1_0" if s < split else "E1_1") for s, o in zip(ens["sigmas"], ens["owner"]))
    assert set(base["owner"]) == {"E0_0"} and report["images"] == 32
    both = report["band_means"]["E1_1"]
    assert set(both) == {"E1_0+E1_1", "E0_0"} and all(v > 0 for v in both.values())
    assert ens["loss"] != base["loss"]
    assert (tree / "lbs" / "loss_by_sigma.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, needle",
    [
        (["expert=E9_999"], "level 9 has indices"),
        (["expert=E2_0"], "no trained node"),
        (["experts=[E1_0]"], "gap"),
        (["experts=[E0_0,E1_1]"], "overlap"),
        (["captions.source=bad.jsonl"], "bad.jsonl:2:"),
        (["metrics.backend=real", "metrics.reference=empty"], "holds no images"),
        (["metrics.backend=real", "metrics.reference=refs"], "metrics.inception_weights"),
    ],
)
def test_bad_input_is_one_line_and_writes_no_report(
    tree: Path, args: list[str], needle: str
) -> None:
    (tree / "bad.jsonl").write_text('{"caption": "the number 3"}\n{"caption": 3}\n')
    (tree / "empty").mkdir(exist_ok=True)
    (tree / "refs").mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tree / "refs" / "a.png")
    out = tree / "badout"
    proc = _run(tree, "evaluate.py", "run_dir=R", *args, f"out={out}", *EVAL)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "eval.json").exists() and not (out / "loss_by_sigma.json").exists()


def test_two_ranks_share_the_images_and_rank0_scores(tree: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        "run_dir=R",
        "expert=E0_0",
        "guidance=2",
        "out=ranks",
        "wait_timeout=300",
        *EVAL,
    ]
    procs = []
    for rank in (1, 0):  # rank 1 first: rank 0 must wait for its share
        env = {**run_env(tree), "RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(
            subprocess.Popen(
                cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "prompt_accuracy" in outs[1][0] and "prompt_accuracy" not in outs[0][0]
    report = json.loads((tree / "ranks" / "eval.json").read_text())
    row = report["runs"][0]["rows"][0]
    assert report["settings"]["ranks"] == 2 and row["images"] == 10
    assert row["generation"]["generated"] == 5  # rank 0's share; rank 1 made the other 5
    assert len(list((tree / "ranks" / "E0_0" / "guidance_2").glob("*.png"))) == 10


def test_sample_cli_two_experts_each_serve_their_own_sigmas(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sample.py experts=[E1_0,E1_1]` (its main, in this process, on the trained tree): the
    images are written, and each expert is asked exactly for the σ it owns (split e^−1.2)."""
    import importlib.util

    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir
    from PIL import Image

    import ediff_train.sampling.pipeline as pipeline
    from ediff_train.run.weights import load_weights

    asked: dict[str, list[float]] = {}
    real = pipeline.load_ensemble

    def recording(run_dir, names, which="ema"):  # noqa: ANN001, ANN202
        ens = real(run_dir, names, which)
        for node, expert in zip(ens.router.nodes, ens.experts):
            _, ema, _ = load_weights(Path(run_dir) / node.name / "weights.safetensors")
            assert all(torch.equal(v, ema[k]) for k, v in expert.state_dict().items())
            asked[node.name] = []
            expert.register_forward_pre_hook(
                lambda _m, args, n=node.name: asked[n].extend(args[1].reshape(-1).tolist())
            )
        return ens

    monkeypatch.setattr(pipeline, "load_ensemble", recording)
    out = tmp_path / "two"
    with initialize_config_dir(str(ROOT / "conf" / "sampling"), version_base="1.3"):
        overrides = [
            f"run_dir={tree / 'R'}",
            "experts=[E1_0,E1_1]",
            'prompts=["the number 3","the number 7"]',
            "n=2",
            "steps=3",
            "progress=false",
            "device=cpu",
        ]
        cfg = compose("config", overrides=[*overrides, f"out={out}"])
    spec = importlib.util.spec_from_file_location("_script_sample_two", ROOT / "sample.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(cfg)

    names = [f"sample_{i:04d}.png" for i in range(4)]  # 2 prompts × n=2
    assert sorted(p.name for p in out.glob("sample_*.png")) == names
    assert all(Image.open(out / n).size == (16, 16) for n in names)
    assert (out / "grid.png").is_file()
    assert json.loads((out / "settings.json").read_text())["experts"] == ["E1_0", "E1_1"]
    split = 0.301194  # e^−1.2: u = 1/2
    low, high = asked["E1_0"], asked["E1_1"]
    assert low and high, asked
    assert all(s < split for s in low) and all(s >= split for s in high), asked
    assert min(low) == pytest.approx(0.002) and max(high) == pytest.approx(80.0)
    printed = capsys.readouterr().out
    calls = dict(kv.split(": ") for kv in printed.split("expert calls: ")[1].strip().split(", "))
    assert calls == {"E1_0": "2", "E1_1": "3"}  # Heun, 3 steps: σ 80, 2.5, 2.5 | 0.002, 0.002

    # offload=true: the same images, each expert resident only while it (or its successor) runs
    with initialize_config_dir(str(ROOT / "conf" / "sampling"), version_base="1.3"):
        cfg_off = compose(
            "config", overrides=[*overrides, f"out={tmp_path / 'off'}", "offload=true"]
        )
    script.main(cfg_off)
    for n in names:
        assert np.array_equal(
            np.asarray(Image.open(out / n)), np.asarray(Image.open(tmp_path / "off" / n))
        ), n


def test_metric_attention_records_every_solver_call(tree: Path) -> None:
    """metric=attention end to end: one record per network call of Heun at the σ it ran, owned
    by the expert whose band holds it, with the token groups' shares summing to one."""
    from ediff_train.core.solvers import karras_sigmas

    proc = _run(
        tree,
        "evaluate.py",
        "run_dir=R",
        "experts=[E1_0,E1_1]",
        "metric=attention",
        "steps=3",
        "out=att",
        "device=cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tree / "att" / "attention.json").read_text())
    s = [float(x) for x in karras_sigmas(3)]  # σ0 > σ1 > σ2 > 0
    want = [s[0], s[1], s[1], s[2], s[2]]  # Heun: 2 calls a step, the last step Euler
    calls = report["calls"]
    assert [c["sigma"] for c in calls] == pytest.approx(want, rel=1e-6)
    assert [c["expert"] for c in calls] == [
        "E1_1" if c["sigma"] >= 0.30119 else "E1_0" for c in calls
    ]
    for c in calls:
        assert sum(c[g] for g in report["groups"]) == pytest.approx(1.0, abs=1e-5)
    assert (tree / "att" / "attention.csv").read_text().count("\n") == len(want) + 1


def test_metric_all_is_loss_by_sigma_then_images(tree: Path) -> None:
    """metric=all runs both metrics with the same settings: its loss-by-σ report is the one
    metric=loss_by_sigma writes alone, and the image report is written beside it."""
    common = [
        "run_dir=R",
        "expert=E0_0",
        "loss_by_sigma.sigmas=4",
        "loss_by_sigma.images=16",
        "loss_by_sigma.batch_size=16",
        *EVAL,
        "guidance=[2]",
    ]
    alone = _run(tree, "evaluate.py", *common, "metric=loss_by_sigma", "out=lbs_alone")
    both = _run(tree, "evaluate.py", *common, "metric=all", "out=all")
    assert alone.returncode == 0 and both.returncode == 0, both.stderr[-3000:]
    a = json.loads((tree / "lbs_alone" / "loss_by_sigma.json").read_text())
    b = json.loads((tree / "all" / "loss_by_sigma.json").read_text())
    assert b["runs"][0]["loss"] == a["runs"][0]["loss"]
    assert b["runs"][0]["sigmas"] == a["runs"][0]["sigmas"]
    images = json.loads((tree / "all" / "eval.json").read_text())
    assert [row["guidance"] for row in images["runs"][0]["rows"]] == [2.0]


def test_metric_switch_switches_where_it_says(tree: Path) -> None:
    """metric=switch end to end: each fraction f switches prompts at the σ after round(f·N)
    solver steps (never for f = 0, at the end for f = 1); the switched denoiser answers with
    prompt A exactly while σ ≥ that σ."""
    import torch

    from ediff_train.core.solvers import karras_sigmas
    from ediff_train.sampling.switching import switched

    proc = _run(
        tree,
        "evaluate.py",
        "run_dir=R",
        "experts=[E1_0,E1_1]",
        "metric=switch",
        "steps=4",
        "switch.pairs=2",
        "switch.per_pair=2",
        "switch.fractions=[0.0,0.25,0.5,1.0]",
        "out=sw",
        "device=cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tree / "sw" / "switch.json").read_text())["rows"]
    s = [float(x) for x in karras_sigmas(4)]
    assert [r["switch_sigma"] for r in rows] == pytest.approx([float("inf"), s[1], s[2], 0.0])
    for r in rows:  # 2 pairs × 2 samples: each share is a count out of 4
        assert 4 * r["reads_as_A"] == round(4 * r["reads_as_A"])
        assert r["reads_as_A"] + r["reads_as_B"] <= 1.0  # a ≠ b: one digit per sample
    a, b = (lambda x, sig: torch.full_like(x, 1.0)), (lambda x, sig: torch.full_like(x, 2.0))
    den = switched(a, b, s[2])
    x = torch.zeros(1)
    got = [float(den(x, torch.tensor(v, dtype=torch.float64))[0]) for v in s[:4]]
    assert got == [1.0, 1.0, 1.0, 2.0]
