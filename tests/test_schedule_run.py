"""The local schedule runner's logic (order, skip, resume, failures, dying with the runner) with
a stand-in trainer, and the toy experiment schedules as data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from ediff_train.core.experts import Router
from ediff_train.errors import EdiffError
from ediff_train.experiments.experiment import experiment_spec
from ediff_train.experiments.runner import run_main, run_schedule
from ediff_train.experiments.schedule import load_schedule, schedule_from_config

# Stands in for `python train.py ...`: records its call, then writes node.json at the stage's
# target step (parent's step + steps), or fails / hangs when the environment says so.
FAKE = r"""#!{python}
import json, os, sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[2:])
name = args.get("expert.name") or args["expert"]
level, index = map(int, name[1:].split("_")) if "expert.parent" not in args else (0, 0)
parent = args.get("expert.parent") or (f"E{{level - 1}}_{{index // 2}}" if level else None)
run = Path(args["run_dir"])
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps({{"name": name, "pid": os.getpid(), "args": sys.argv[2:]}}) + "\n")
if name == os.environ.get("FAKE_HANG"):
    time.sleep(600)
if name == os.environ.get("FAKE_FAIL"):
    print("error: parent weights are corrupt")
    sys.exit(2)
start = json.loads((run / parent / "node.json").read_text())["step"] if parent else 0
(run / name).mkdir(parents=True, exist_ok=True)
(run / name / "node.json").write_text(json.dumps({{"step": start + int(args["steps"])}}))
"""

TOY = {
    "name": "toy",
    "overrides": ["logger=csv"],
    "stages": [
        {"node": "E0_0", "steps": 5, "source": "t"},
        {"node": "E1_1", "steps": 2, "source": "t"},
        {"node": "E1_0", "steps": 2, "source": "t"},
        {"node": "E2_0", "steps": 1, "source": "t"},
        {"name": "E0_0_cont", "node": "E0_0", "parent": "E0_0", "steps": 4, "source": "t"},
    ],
}


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "fake_python"
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    return exe


def calls(tmp_path: Path) -> list[dict]:
    log = tmp_path / "calls.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []


def test_stages_run_in_dependency_order_with_overrides(tmp_path: Path, fake: Path) -> None:
    said: list[str] = []
    out = run_schedule(
        schedule_from_config(TOY), tmp_path / "R", ["seed=3"], python=str(fake), say=said.append
    )
    assert [o.status for o in out] == ["trained"] * 5
    names = [c["name"] for c in calls(tmp_path)]
    assert names == ["E0_0", "E1_1", "E1_0", "E2_0", "E0_0_cont"]  # parents first, else file order
    cont = calls(tmp_path)[-1]["args"]
    assert (
        "expert.parent=E0_0" in cont and "steps=4" in cont and cont[-2:] == ["logger=csv", "seed=3"]
    )
    steps = {o.stage: o.step for o in out}
    assert steps == {"E0_0": 5, "E1_1": 7, "E1_0": 7, "E2_0": 8, "E0_0_cont": 9}
    assert said[0].startswith("schedule toy: 5 stages") and "[4/5] E2_0: done" in said[-3]


def test_finished_stages_are_skipped_and_a_partial_one_resumes(tmp_path: Path, fake: Path) -> None:
    sched = schedule_from_config(TOY)
    run_schedule(sched, tmp_path / "R", python=str(fake), say=lambda s: None)
    # E2_0 "interrupted": node.json not at its target, a checkpoint left behind
    (tmp_path / "R" / "E2_0" / "node.json").unlink()
    (tmp_path / "R" / "E2_0" / "checkpoints").mkdir()
    (tmp_path / "R" / "E2_0" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "calls.jsonl").unlink()
    said: list[str] = []
    out = run_schedule(sched, tmp_path / "R", python=str(fake), say=said.append)
    assert [c["name"] for c in calls(tmp_path)] == ["E2_0"]
    assert [o.status for o in out] == ["skipped"] * 3 + ["trained", "skipped"]
    assert any("E2_0: training +1 steps (global 7 → 8), resuming its checkpoint" in s for s in said)


def test_a_failed_stage_blocks_its_descendants_only(
    tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "E1_0")
    said: list[str] = []
    out = {
        o.stage: o.status
        for o in run_schedule(
            schedule_from_config(TOY), tmp_path / "R", python=str(fake), say=said.append
        )
    }
    assert out == {
        "E0_0": "trained",
        "E1_1": "trained",
        "E1_0": "failed",
        "E2_0": "blocked",
        "E0_0_cont": "trained",
    }
    assert "E2_0" not in [c["name"] for c in calls(tmp_path)]
    assert any("E1_0: FAILED" in s and "error: parent weights are corrupt" in s for s in said)
    # the failure's output is kept in the stage's log
    assert "corrupt" in (tmp_path / "R" / "E1_0" / "train.log").read_text()


def test_run_main_exit_codes_and_bad_arguments(
    tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text(json.dumps(TOY))  # JSON is YAML
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setenv("FAKE_FAIL", "E2_0")
    assert run_main(str(path), [f"run_dir={tmp_path / 'R'}", "scale=2"]) == 1
    err = capsys.readouterr().err
    assert "1 stages did not finish (E2_0)" in err
    assert json.loads((tmp_path / "R" / "E1_1" / "node.json").read_text())["step"] == 14
    with pytest.raises(EdiffError, match="expected key=value"):
        run_main(str(path), ["seed"])
    with pytest.raises(EdiffError, match="scale must be a number"):
        run_main(str(path), ["scale=big"])
    with pytest.raises(EdiffError, match="unknown schedule"):
        run_main("no_such_schedule", [])


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ediff_train.experiments.schedule_cli", "run", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown schedule 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_runner_stops_the_stage_it_runs(tmp_path: Path, fake: Path) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text(json.dumps(TOY))
    code = (
        "import sys; from ediff_train.experiments.runner import run_main; "
        f"sys.executable = {str(fake)!r}; "
        f"sys.exit(run_main({str(path)!r}, ['run_dir={tmp_path / 'R'}']))"
    )
    env = {**os.environ, "FAKE_HANG": "E1_1"}
    runner = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(c["name"] == "E1_1" for c in calls(tmp_path)):
        time.sleep(0.2)
    child = next(c["pid"] for c in calls(tmp_path) if c["name"] == "E1_1")
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the stage kept running after its runner was killed")


@pytest.mark.parametrize("name", ["fig7_toy", "configs_toy"])
def test_toy_experiments_are_scaled_and_their_ensembles_tile(name: str) -> None:
    s = load_schedule(name)
    spec = experiment_spec(name)
    extra = {}
    for label, names in spec["ensembles"].items():
        Router([s[n].node for n in names])  # each ensemble covers all σ once
        extra[label] = max(s.targets()[n] for n in names)
    base = spec["baseline"]
    # equal samples: the baseline's extra steps over the root equal the claim's experts'
    root = s.targets()["E0_0"]
    claim_steps = {st.name: st for st in s.stages}
    if name == "fig7_toy":
        tree = sum(st.steps for st in s.stages if st.name not in ("E0_0", "E0_0_cont"))
        assert s.targets()["E0_0_cont"] - root == tree == 300
        assert all("/ 1000" in st.source for st in s.stages)
        assert [st.steps * 1000 for st in s.stages] == [
            st.steps for st in load_schedule("fig7").stages
        ]
    else:
        for label in ("config_c", "config_d"):
            spent = sum(claim_steps[n].steps for n in spec["ensembles"][label])
            assert spent == s.targets()[spec["ensembles"][base][0]] - root == 300
    assert (ROOT / "conf" / "schedule" / f"{name}.yaml").is_file()
