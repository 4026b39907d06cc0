"""An experiment end to end on tiny stages (schedule trained per seed by the local runner, then
evaluated by evaluate.py's code) and the summary's arithmetic and verdict."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env

from ediff_train.experiments.tables import image_table, verdict

FAST = [
    "logger=csv",
    "data.num_workers=0",
    "sample.per_prompt=1",
    "sample.steps=2",
    "data.batch_size=16",
    "monitor.every=0",
    "probe.batches=1",
    "probe.batch_size=16",
]
TINY = {
    "name": "tiny_exp",
    "overrides": FAST,
    "stages": [
        {"node": "E0_0", "steps": 3, "source": "test"},
        {"name": "more", "node": "E0_0", "parent": "E0_0", "steps": 1, "source": "test"},
    ],
    "experiment": {
        "seeds": 2,
        "claim": "more",
        "baseline": "root",
        "ensembles": {"more": ["more"], "root": ["E0_0"]},
        "evaluate": {
            "guidance": [1, 3],
            "steps": 2,
            "captions": {"per_caption": 1, "templates": "plain"},
            "loss_by_sigma": {"images": 32, "sigmas": 5, "batch_size": 32},
        },
    },
}


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=run_env(tmp),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("experiment")
    (tmp / "t.yaml").write_text(json.dumps(TINY))
    return tmp, run(
        tmp, "ediff_train.experiments.experiment", str(tmp / "t.yaml"), f"run_dir={tmp / 'R'}"
    ).stdout


def test_every_seed_trains_the_schedule_in_order_with_its_seed(done: tuple[Path, str]) -> None:
    tmp, out = done
    for seed in (0, 1):
        steps = {
            n: json.loads((tmp / "R" / f"seed{seed}" / n / "node.json").read_text())["step"]
            for n in ("E0_0", "more")
        }
        assert steps == {"E0_0": 3, "more": 4}
        cfg = (tmp / "R" / f"seed{seed}" / "E0_0" / "config.yaml").read_text()
        assert f"seed: {seed}" in cfg
    assert out.index("[1/2] E0_0: done") < out.index("[2/2] more: done")
    w0 = (tmp / "R" / "seed0" / "E0_0" / "weights.safetensors").read_bytes()
    assert w0 != (tmp / "R" / "seed1" / "E0_0" / "weights.safetensors").read_bytes()


def test_summary_is_the_evaluations_numbers(done: tuple[Path, str]) -> None:
    tmp, _ = done
    rep = tmp / "R" / "report"
    summary = json.loads((rep / "summary.json").read_text())
    evals = [json.loads((rep / f"seed{k}" / "eval.json").read_text()) for k in (0, 1)]
    losses = [json.loads((rep / f"seed{k}" / "loss_by_sigma.json").read_text()) for k in (0, 1)]
    for i, name in enumerate(["more", "root"]):
        for g in ("1", "3"):
            cell = summary["images"]["table"][name][g]
            acc = [
                next(r for r in e["runs"][i]["rows"] if f"{r['guidance']:g}" == g)[
                    "prompt_accuracy"
                ]
                for e in evals
            ]
            assert cell["prompt_accuracy"]["values"] == acc
            assert cell["prompt_accuracy"]["mean"] == pytest.approx(statistics.fmean(acc))
        assert summary["loss_by_sigma"]["curves"][name] == [x["runs"][i]["loss"] for x in losses]
    assert set(summary["loss_by_sigma"]["bands"]) == {"more"}  # the claim's experts' bands
    md = (rep / "report.md").read_text()
    assert summary["verdict"] in md and "| more | 3 |" in md
    assert len((rep / "summary.csv").read_text().splitlines()) == 1 + 2 * 2
    for png in ("curve.png", "loss_by_sigma.png"):
        assert (rep / png).read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_finished_stages(done: tuple[Path, str]) -> None:
    tmp, _ = done
    weights = tmp / "R" / "seed1" / "more" / "weights.safetensors"
    before = weights.stat().st_mtime_ns
    out = run(
        tmp,
        "ediff_train.experiments.schedule_cli",
        "run",
        str(tmp / "t.yaml"),
        f"run_dir={tmp / 'R' / 'seed1'}",
        "seed=1",
    ).stdout
    assert out.count("skipped") == 2 and "training +" not in out
    assert "all 2 stages finished (0 trained now, 2 already done)" in out
    assert weights.stat().st_mtime_ns == before


def _seed(rows: dict[str, list[tuple[float, float, float]]]) -> dict:
    """A per-seed result with images runs built from {ensemble: [(g, acc, fid), ...]}."""
    runs = [
        {"rows": [{"guidance": g, "prompt_accuracy": a, "digits_fid": f} for g, a, f in r]}
        for r in rows.values()
    ]
    return {"images": {"runs": runs}}


def test_verdict_follows_the_paired_differences() -> None:
    spec = {"ensembles": {"c": [], "b": []}, "claim": "c", "baseline": "b"}
    better = [
        _seed({"c": [(1, 0.9, 1.0), (2, 0.95, 2.0)], "b": [(1, 0.9, 1.5), (2, 0.9, 2.5)]}),
        _seed({"c": [(1, 0.8, 3.0), (2, 0.95, 2.0)], "b": [(1, 0.8, 3.2), (2, 0.95, 2.1)]}),
    ]
    t = image_table(spec, better)
    assert t["claim_minus_baseline"]["1"]["digits_fid"]["values"] == [-0.5, pytest.approx(-0.2)]
    assert verdict(spec, t, 2).startswith("REPRODUCED: c beat b at 2 of 2")
    # one seed disagrees at guidance 2: only guidance 1 holds
    mixed = [
        better[0],
        _seed({"c": [(1, 0.8, 3.0), (2, 0.95, 2.5)], "b": [(1, 0.8, 3.2), (2, 0.95, 2.1)]}),
    ]
    assert verdict(spec, image_table(spec, mixed), 2).startswith(
        "PARTLY REPRODUCED: c beat b at 1 of 2 guidance scales (1)"
    )
    swapped = {"ensembles": {"c": [], "b": []}, "claim": "b", "baseline": "c"}
    assert verdict(swapped, image_table(swapped, [better[0]]), 1).startswith(
        "NOT REPRODUCED (the baseline is better at 2 of 2)"
    )


def test_arguments_split_between_experiment_evaluation_and_training() -> None:
    from ediff_train.errors import EdiffError
    from ediff_train.experiments.experiment import parse_args

    opts = parse_args(
        [
            "seeds=2",
            "run_dir=R",
            "report_dir=R/rep",
            "eval.guidance=[1,2]",
            "trainer=cpu",
            "module.lr=1e-3",
            "report_only=true",
        ]
    )
    assert (opts["seeds"], opts["run_dir"], opts["report_dir"]) == (2, "R", "R/rep")
    assert opts["eval"] == ["guidance=[1,2]"] and opts["report_only"] is True
    assert opts["train"] == ["trainer=cpu", "module.lr=1e-3"]
    for bad, message in (
        ["seeds=0", "seeds must be"],
        ["scale=x", "scale must be"],
        ["report_only=maybe", "report_only must be"],
        ["seeds", "key=value"],
    ):
        with pytest.raises(EdiffError, match=message):
            parse_args([bad])


def test_gate_and_control_decide_the_verdict() -> None:
    """The gate is the training-law-weighted loss gain of the continued root over the root (a
    known answer on a two-point grid); a failed gate means no verdict, a control that loses is
    named."""
    from ediff_train.core.edm import P_MEAN, P_STD
    from ediff_train.experiments.tables import gate_table, law_weighted

    sig = [math.exp(P_MEAN), math.exp(P_MEAN + P_STD)]  # weights 1 and e^-1/2
    w = math.exp(-0.5)
    assert law_weighted(sig, [1.0, 2.0]) == pytest.approx((1.0 + 2.0 * w) / (1.0 + w))
    spec = {
        "ensembles": {"c": [], "b": [], "k": [], "r": []},
        "claim": "c",
        "baseline": "b",
        "control": "k",
        "images": ["c", "b", "k"],
        "gate": {"root": "r", "continued": "b", "max_gain": 0.03},
    }
    loss = {"sigmas": sig, "curves": {"r": [[1.0, 1.0]], "b": [[0.9, 0.9]]}}
    gate = gate_table(spec, loss)
    assert gate["gain"]["values"] == [pytest.approx(0.1)] and not gate["passed"]
    seeds = [_seed({"c": [(1, 0.9, 1.0)], "b": [(1, 0.9, 1.5)], "k": [(1, 0.8, 2.0)]})]
    t = image_table(spec, seeds)
    text = verdict(spec, t, 1, gate)
    assert text.startswith(
        "NO VERDICT: the root is not at its plateau (continuing it lowers "
        "held-out loss by 10.0 % > 3 %)"
    )
    assert "lost to the baseline at 1, so the pipeline is still unfair" in text
    loss["curves"]["b"] = [[0.99, 0.99]]
    passed = gate_table(spec, loss)
    assert passed["passed"] and verdict(spec, t, 1, passed).startswith("REPRODUCED")
    assert "not specialisation's" not in verdict(spec, t, 1, passed)  # c beat k by 1.0 too
    # the control beats the baseline as much as the claim: the win is not specialisation's
    tie = image_table(
        spec, [_seed({"c": [(1, 0.9, 1.0)], "b": [(1, 0.9, 1.5)], "k": [(1, 0.9, 1.0)]})]
    )
    assert tie["claim_minus_control"]["1"]["digits_fid"]["values"] == [0.0]
    assert verdict(spec, tie, 1, passed).endswith(
        "At 1 the claim did not beat the control (the same tree trained without specialising), "
        "so that win is not specialisation's."
    )


def test_shapes_rows_give_caption_accuracy_and_a_table_per_attribute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """metric=shapes rows: shapes-FID and whole-caption accuracy are the pair the verdict
    compares, and each attribute's accuracy is averaged over seeds (unclaimed ones left out)."""
    from ediff_train.experiments import experiment
    from ediff_train.experiments.report import attribute_lines
    from ediff_train.experiments.tables import attribute_table

    def seed(acc: float, colour: float) -> dict:
        row = {
            "guidance": 3.0,
            "caption_accuracy": acc,
            "shapes_fid": 100.0 - 100 * acc,
            "attribute_accuracy": {"colour": colour, "count": None},
        }
        return {"images": {"runs": [{"rows": [row]}, {"rows": [dict(row)]}]}}

    spec = {"ensembles": {"c": [], "b": []}, "claim": "c", "baseline": "b"}
    seeds = [seed(0.2, 0.5), seed(0.4, 0.7)]
    t = image_table(spec, seeds)
    assert (t["quality_key"], t["alignment_key"]) == ("shapes_fid", "caption_accuracy")
    assert t["table"]["c"]["3"]["caption_accuracy"]["mean"] == pytest.approx(0.3)
    attrs = attribute_table(spec, seeds)
    assert set(attrs["b"]["3"]) == {"colour"}
    assert attrs["b"]["3"]["colour"]["mean"] == pytest.approx(0.6)
    assert attrs["b"]["3"]["colour"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert "| c | 3 | 0.60 ± 0.14 |" in attribute_lines(attrs)
    # the experiment scores shapes runs with the exact reader, other runs with evaluate_images
    called = []
    monkeypatch.setattr(experiment, "evaluate_loss_by_sigma", lambda cfg: {})
    monkeypatch.setattr(experiment, "evaluate_shapes", lambda cfg: called.append("shapes") or {})
    monkeypatch.setattr(experiment, "evaluate_images", lambda cfg: called.append("images") or {})
    ens = {"ensembles": {"c": ["E0_0"]}, "images": ["c"]}
    experiment.evaluate_seed({**ens, "evaluate": {"metric": "shapes"}}, tmp_path, tmp_path, [])
    experiment.evaluate_seed({**ens, "evaluate": {}}, tmp_path, tmp_path, [])
    assert called == ["shapes", "images"]
