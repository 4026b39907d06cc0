"""Schedules as data (ordering, validation, scale, the shipped files) and the submitter's
dry run and sbatch rendering, without a cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir

from ediff_train.cli import register_nodes
from ediff_train.core.experts import Router, node_from_config, parse_node
from ediff_train.errors import EdiffError
from ediff_train.experiments.schedule import available, load_schedule, schedule_from_config

FIG7 = {
    "E0_0": 500_000,
    "E1_0": 550_000,
    "E1_1": 550_000,
    "E2_0": 600_000,
    "E2_1": 600_000,
    "E2_2": 600_000,
    "E2_3": 600_000,
    "E0_0_cont": 800_000,
}
SHIPPED = [
    "config_b_sr256",
    "config_c_base",
    "config_d_base",
    "configs_fair",
    "configs_toy",
    "digits_sr32",
    "fig7",
    "fig7_fair",
    "fig7_long",
    "fig7_lora",
    "fig7_paper_sized",
    "fig7_plateau",
    "fig7_shapes",
    "fig7_sized",
    "fig7_toy",
    "table5_base",
    "table6_sr256",
    "wan22_i2v",
    "wan22_t2v",
]


def stage(node: str, steps: object = 10, **kw: object) -> dict:
    return {"node": node, "steps": steps, "source": "test", **kw}


def sched(*stages: dict) -> object:
    return schedule_from_config({"name": "t", "stages": list(stages)})


def load_submit():  # noqa: ANN201
    from ediff_train.cli import submit

    return submit


def test_fig7_is_the_papers_text() -> None:
    s = load_schedule("fig7")
    assert s.targets() == FIG7
    parents = {st.name: st.parent for st in s.stages}
    assert parents == {
        "E0_0": None,
        "E1_0": "E0_0",
        "E1_1": "E0_0",
        "E2_0": "E1_0",
        "E2_1": "E1_0",
        "E2_2": "E1_1",
        "E2_3": "E1_1",
        "E0_0_cont": "E0_0",
    }
    # the baseline sees as many samples as the whole tree
    tree_steps = sum(st.steps for st in s.stages if st.name != "E0_0_cont")
    assert tree_steps == FIG7["E0_0_cont"]
    assert s["E0_0_cont"].node.pieces == parse_node("E0_0").pieces
    assert all("paper text" in st.source for st in s.stages)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_schedules_valid_and_ordered(name: str) -> None:
    s = load_schedule(name)
    seen: set[str] = set()
    for st in s.stages:
        assert st.parent is None or st.parent in seen, f"{st.name} before its parent"
        assert st.steps >= 1 and st.source.strip()
        seen.add(st.name)
    if name.startswith(("digits", "wan22")):  # counts are ours (Wan2.2's are unpublished)
        assert all(st.source.startswith("ours") for st in s.stages)
    elif name not in ("fig7", "fig7_paper_sized") and not name.endswith(
        ("_toy", "_fair", "_plateau", "_long", "_lora", "_sized", "_shapes")
    ):
        # (the *_toy schedules are scaled from the paper's: tests/test_schedule_run.py)
        text = (ROOT / "conf" / "schedule" / f"{name}.yaml").read_text()
        assert "not recoverable" in text
        assert all("reconstruction" in st.source for st in s.stages)


@pytest.mark.parametrize(
    ("name", "experts"),
    [
        ("config_b_sr256", ["E1_0", "E1_1"]),
        ("config_c_base", ["E9_511", "not_E9_511"]),
        ("config_d_base", ["E9_511", "E3_0", "not_E9_511_E3_0"]),
        ("table5_base", ["E9_511", "E3_0", "not_E9_511_E3_0"]),
    ],
)
def test_config_ensembles_trained_and_tile(name: str, experts: list[str]) -> None:
    s = load_schedule(name)
    Router([s[e].node for e in experts])  # raises on gap or overlap
    chain, cur = [], "E9_511" if "E9_511" in experts else experts[-1]
    while cur is not None:
        chain.append(cur)
        cur = s[cur].parent
    assert chain[-1] == "E0_0"
    if "E9_511" in experts:  # the whole rightmost ancestor chain is in the schedule
        assert chain == [f"E{lv}_{2**lv - 1}" for lv in range(9, -1, -1)]


def test_file_order_kept_and_parents_moved_first() -> None:
    s = sched(stage("E0_0"), stage("E1_1"), stage("E1_0"), stage("E2_3"))
    assert [st.name for st in s.stages] == ["E0_0", "E1_1", "E1_0", "E2_3"]
    s = sched(stage("E2_0"), stage("E1_0"), stage("E0_0"))
    assert [st.name for st in s.stages] == ["E0_0", "E1_0", "E2_0"]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([stage("E0_0"), stage("E0_0")], "two stages are named 'E0_0'"),
        ([stage("E1_0")], "parent 'E0_0' is not a stage"),
        ([stage("E0_0"), stage("E1_0", parent="E7_7")], "parent 'E7_7' is not a stage"),
        ([stage("E0_0"), stage("E1_0", parent=None)], "only the root E0_0 trains from scratch"),
        ([stage("E0_0"), stage("E9_600")], "level 9 has indices 0–511"),
        ([stage("E0_0", steps=0)], "steps must be a whole number ≥ 1"),
        ([stage("E0_0", steps=2.5)], "steps must be a whole number ≥ 1"),
        ([stage("E0_0", steps="many")], "steps must be a whole number ≥ 1"),
        ([{"node": "E0_0", "steps": 5}], "say where its step count comes from"),
        ([stage("E0_0"), stage("E0_0", name="E1_1", parent="E0_0")], "named like another node"),
        ([stage("E0_0"), stage("not_E3_2", name="mid", parent="E0_0")], "single-interval node"),
        ([stage("E0_0", name="a", parent="b"), stage("E0_0", name="b", parent="a")], "cycle"),
        ([stage("E0_0", when="now")], "unknown keys ['when']"),
        ([stage("E0_0", name="has space")], "plain directory name"),
    ],
)
def test_validation_errors_are_one_line(stages: list[dict], message: str) -> None:
    with pytest.raises(EdiffError) as e:
        sched(*stages)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("schedule t")


def test_scale_rounds_and_keeps_at_least_one_step() -> None:
    s = load_schedule("fig7").scaled(0.0001)
    assert {st.name: st.steps for st in s.stages}["E0_0_cont"] == 30
    assert s.targets() == {k: v // 10_000 for k, v in FIG7.items()}
    assert s.scale == pytest.approx(0.0001)
    tiny = load_schedule("fig7").scaled(1e-9)
    assert {st.steps for st in tiny.stages} == {1}
    half = sched(stage("E0_0", steps=5), stage("E1_0", steps=3)).scaled(0.5)
    assert [st.steps for st in half.stages] == [3, 2]  # 2.5 → 3, 1.5 → 2
    for bad in (0, -1, float("nan")):
        with pytest.raises(EdiffError, match="scale must be a positive number"):
            load_schedule("fig7").scaled(bad)


def test_stage_train_args_compose_into_the_right_node(tmp_path: Path) -> None:
    s = sched(
        stage("E0_0"),
        stage("E0_0", name="E0_0_cont", parent="E0_0"),
        stage("E1_1", parent="E0_0_cont"),
        stage("not_E9_511", parent="E0_0"),
    )
    register_nodes()  # levels 0-3; complements have their own files
    want = {
        "E0_0": ("E0_0", None, ((0.0, 1.0),)),
        "E0_0_cont": ("E0_0_cont", "E0_0", ((0.0, 1.0),)),
        "E1_1": ("E1_1", "E0_0_cont", ((0.5, 1.0),)),
        "not_E9_511": ("not_E9_511", "E0_0", parse_node("not_E9_511").pieces),
    }
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for st in s.stages:
            args = st.train_args(tmp_path)
            assert f"steps={st.steps}" in args and f"run_dir={tmp_path}" in args
            cfg = compose("train", overrides=args)
            node = node_from_config(cfg.expert)
            assert (node.name, node.parent, node.pieces) == want[st.name]
    assert s["not_E9_511"].expert_args() == ["expert=not_E9_511"]  # root is its default parent


def test_tree_printout() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ediff_train.experiments.schedule_cli", "fig7", "--scale", "0.0001"],
        capture_output=True,
        text=True,
        env=run_env(Path("/tmp")),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "schedule fig7 at scale 0.0001: 8 stages"
    rows = [ln for ln in lines[2:] if "paper text" in ln]
    names = [re.search(r"E\d+_\d+(_cont)?", ln).group(0) for ln in rows]
    assert names == ["E0_0", "E1_0", "E2_0", "E2_1", "E1_1", "E2_2", "E2_3", "E0_0_cont"]
    row = dict(zip(names, rows))
    assert row["E0_0"].startswith("E0_0 ") and "[0, ∞)" in row["E0_0"]
    assert row["E0_0_cont"].startswith("└── E0_0_cont (E0_0 continued)")
    assert row["E2_3"].startswith("│   └── E2_3") and "[0.6766, ∞)" in row["E2_3"]
    assert "[0.3012, ∞)" in row["E1_1"] and "[0, 0.1341)" in row["E2_0"]
    assert re.search(r"\s5\s+60\s", row["E2_3"]) and re.search(r"\s30\s+80\s", row["E0_0_cont"])
    bad = subprocess.run(
        [sys.executable, "-m", "ediff_train.experiments.schedule_cli", "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "unknown schedule 'nope'" in bad.stderr and "fig7" in bad.stderr


def test_every_shipped_schedule_is_listed() -> None:
    assert available() == SHIPPED


def dry_run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "slurm" / "submit.py"), "dry_run=true", "run_dir=R", *args]
    return subprocess.run(
        cmd, cwd=tmp, env=run_env(tmp), capture_output=True, text=True, timeout=120
    )


def test_submit_dry_run_lists_chain_and_skips_finished(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, "schedule=fig7", "scale=0.0001", "train.trainer=cpu")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "(dry run: nothing submitted)" in out and not (tmp_path / "R").exists()
    titles = [ln.split()[1] for ln in out.splitlines() if ln[:4].strip().rstrip(".").isdigit()]
    assert sorted(titles) == sorted(FIG7)
    pos = {n: i for i, n in enumerate(titles)}
    s = load_schedule("fig7")
    for st in s.stages:  # dependency order
        assert st.parent is None or pos[st.parent] < pos[st.name]
    cmds = [ln.strip() for ln in out.splitlines() if "train.py" in ln]
    assert len(cmds) == 8 and all(c.startswith("srun ") for c in cmds)
    assert f"expert=E0_0 run_dir={tmp_path / 'R'} steps=50 " in cmds[0]
    assert "trainer=cpu" in cmds[0] and "trainer.devices=8" in cmds[0]
    assert "after E0_0 (afterok)" in out

    done = tmp_path / "R" / "E0_0"
    done.mkdir(parents=True)
    (done / "node.json").write_text(json.dumps({"step": 50}))
    (tmp_path / "R" / "E1_0").mkdir()
    (tmp_path / "R" / "E1_0" / "node.json").write_text(json.dumps({"step": 54}))  # short
    out = dry_run(tmp_path, "schedule=fig7", "scale=0.0001").stdout
    line = {ln.split()[1]: ln for ln in out.splitlines() if ln[:4].strip().rstrip(".").isdigit()}
    assert "SKIP: finished (node.json at step 50)" in line["E0_0"]
    assert "parent E0_0 finished: no dependency" in line["E1_0"]
    assert "SKIP" not in line["E1_0"] and "after E1_0 (afterok)" in line["E2_0"]
    assert sum("train.py" in ln for ln in out.splitlines()) == 7


def test_sr_schedules_train_the_sr_model(tmp_path: Path) -> None:
    for name, model in (
        ("config_b_sr256", "model=sr256"),
        ("table6_sr256", "model=sr256"),
        ("digits_sr32", "preset=digits_sr32"),
    ):
        proc = dry_run(tmp_path, f"schedule={name}", "scale=0.001")
        assert proc.returncode == 0, proc.stderr
        cmds = [ln for ln in proc.stdout.splitlines() if "train.py" in ln]
        assert cmds and all(model in c for c in cmds), (name, cmds[:1])
        if model == "model=sr256":
            assert all("data.lowres_size=64" in c for c in cmds)


def test_submit_errors_are_one_line(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, "schedule=fig7", "scale=-1")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: scale must be a positive number, got -1.0"
    )


def test_sbatch_script_from_config(tmp_path: Path) -> None:
    submit = load_submit()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "submit",
            overrides=[
                "schedule=config_b_sr256",
                "slurm.nodes=2",
                "slurm.gpus_per_node=4",
                "slurm.partition=big",
                "slurm.account=lab",
                "slurm.time=02:00:00",
                'train.setup=["module load cuda"]',
                "slurm.extra=[--exclusive]",
            ],
        )
    s = schedule_from_config(cfg.schedule)
    jobs = submit.plan(cfg, s, tmp_path)
    script = jobs[1].script
    sbatch = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    for opt in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=big",
        "--account=lab",
        "--time=02:00:00",
        "--requeue",
        "--signal=USR1@90",
        f"--output={tmp_path}/E1_0/slurm-%j.out",
        "--kill-on-invalid-dep=no",
        "--exclusive",
        "--job-name=config_b_sr256:E1_0",
    ):
        assert f"#SBATCH {opt}" in sbatch, opt
    assert not any(o.split("=")[0] in ("#SBATCH --mem", "#SBATCH --qos") for o in sbatch)
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert "trainer.num_nodes=2 trainer.devices=4" in srun and " -n " not in srun
    assert "expert=E1_0" in srun and "module load cuda" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    with pytest.raises(EdiffError, match=r"unknown field \{\{nope\}\}"):
        submit.render("#SBATCH --x={{nope}}", {})
    assert (
        submit.render("#SBATCH --a={{a}}\n{{b}}\necho {{c}}\n", {"a": None, "b": "", "c": 1})
        == "echo 1\n"
    )


def test_continue_and_branch_step_become_train_arguments() -> None:
    """`continue: true` passes the continued stage's folder; `branch_step: N` makes the parent
    write a hand-off at N and the child start there (its target counted from N)."""
    s = schedule_from_config(
        {
            "name": "b",
            "stages": [
                stage("E0_0", 10),
                stage("E1_0", 4, branch_step=6),
                stage("E1_1", 4),
                {
                    "name": "E0_0_cont",
                    "node": "E0_0",
                    "parent": "E0_0",
                    "continue": True,
                    "steps": 5,
                    "source": "t",
                },
            ],
        }
    )
    assert "continue_from=${run_dir}/E0_0" in s["E0_0_cont"].expert_args()
    assert "branch_step=6" in s["E1_0"].expert_args()
    assert s.stage_overrides(s["E0_0"]) == ["handoff_at=[6]"]
    assert s.stage_overrides(s["E1_1"]) == []
    assert s.targets() == {"E0_0": 10, "E1_0": 10, "E1_1": 14, "E0_0_cont": 15}
    assert "E0_0_cont (E0_0 continued)" in s.tree()


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            [stage("E0_0", 10), stage("E1_0", 4, branch_step=10)],
            "branch_step 10 must lie inside its parent E0_0's run (0, 10) exclusive",
        ),
        (
            [stage("E0_0", 10), stage("E1_0", 4, branch_step="x")],
            "branch_step must be a whole number",
        ),
        (
            [
                stage("E0_0", 10),
                {
                    "name": "E1_0_c",
                    "node": "E1_0",
                    "parent": "E0_0",
                    "continue": True,
                    "steps": 3,
                    "source": "t",
                },
            ],
            "continue: true goes on with its parent stage's run",
        ),
    ],
)
def test_continue_and_branch_errors_are_one_line(stages: list[dict], message: str) -> None:
    with pytest.raises(EdiffError, match=re.escape(message)):
        schedule_from_config({"name": "bad", "stages": stages})
