"""Schedules through a real single-node SLURM cluster (slurmctld + slurmd + munge on localhost):
the Fig. 7 chain end to end, a failed parent holding its descendants, and a job signalled
mid-run that requeues and resumes. Skips where the SLURM binaries are absent."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_CACHE, run_env
from slurm_cluster import SlurmCluster, missing

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

FAST = [
    "logger=csv",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=8",
    "checkpoint_every=10",
    "trainer.log_every_n_steps=1",
    "monitor.every=0",
    "probe.enabled=false",
]
DONE = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
NEVER = "DependencyNeverSatisfied"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One digits cache for every job: the first root builds it, the others reuse it."""
    return tmp_path_factory.mktemp("slurm_cache")


@pytest.fixture(autouse=True)
def empty_queue(cluster: SlurmCluster) -> Iterator[None]:
    yield
    jobs = cluster.queue()
    if jobs:
        cluster.run("scancel", *jobs, check=False)
        wait_for(lambda: not cluster.queue(), 30, "cancelled jobs to leave the queue", cluster)


def wait_for(ready: Callable[[], object], timeout: float, what: str, cluster: SlurmCluster) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > end:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs(10)}"
            )
        time.sleep(0.2)


def submit(
    cluster: SlurmCluster, tmp: Path, cache: Path, *args: str, train: list[str] = FAST
) -> subprocess.CompletedProcess:
    env = cluster.env(run_env(tmp))
    env["EDIFF_CACHE"] = str(cache)
    cmd = [
        sys.executable,
        str(ROOT / "slurm" / "submit.py"),
        "run_dir=R",
        "train.trainer=cpu",
        "slurm.gpus_per_node=0",
        "slurm.cpus_per_task=1",
        "slurm.time=00:10:00",
        f"train.args={json.dumps(train)}",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def job_ids(tmp: Path) -> dict[str, str]:
    stages = json.loads((tmp / "R" / "slurm_jobs.json").read_text())["stages"]
    return {name: s["job_id"] for name, s in stages.items() if s["job_id"]}


def wait_done(cluster: SlurmCluster, ids: list[str], timeout: float) -> dict[str, dict]:
    info: dict[str, dict] = {}

    def done() -> bool:
        info.update({i: cluster.job(i) for i in ids})
        return all(info[i].get("JobState") in DONE for i in ids)

    wait_for(done, timeout, f"jobs {ids} to finish", cluster)
    return info


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_fig7_chain_end_to_end(cluster: SlurmCluster, tmp_path: Path, cache: Path) -> None:
    out = submit(cluster, tmp_path, cache, "schedule=fig7", "scale=0.0001").stdout
    ids = job_ids(tmp_path)
    parents = {
        "E1_0": "E0_0",
        "E1_1": "E0_0",
        "E0_0_cont": "E0_0",
        "E2_0": "E1_0",
        "E2_1": "E1_0",
        "E2_2": "E1_1",
        "E2_3": "E1_1",
    }
    assert sorted(ids) == sorted([*parents, "E0_0"]), out
    for child, parent in parents.items():  # queued behind their parents, not running
        info = cluster.job(ids[child])
        assert info["JobState"] == "PENDING" and info["Reason"] == "Dependency", info
        assert info["Dependency"].startswith(f"afterok:{ids[parent]}"), info

    jobs = wait_done(cluster, list(ids.values()), 600)
    run = tmp_path / "R"
    for name, jid in ids.items():
        assert jobs[jid]["JobState"] == "COMPLETED", (
            name,
            (run / name / f"slurm-{jid}.out").read_text()[-3000:],
        )
    steps = {n: json.loads((run / n / "node.json").read_text())["step"] for n in ids}
    assert steps == {
        "E0_0": 50,
        "E1_0": 55,
        "E1_1": 55,
        "E0_0_cont": 80,
        "E2_0": 60,
        "E2_1": 60,
        "E2_2": 60,
        "E2_3": 60,
    }
    assert json.loads((run / "E0_0_cont" / "node.json").read_text())["parent"] == "E0_0"
    for child, parent in parents.items():  # each child started after its parent finished
        assert when(jobs[ids[child]]["StartTime"]) >= when(jobs[ids[parent]]["EndTime"])
        handed = (run / parent / "weights.safetensors").stat().st_mtime_ns
        assert (run / child / "config.yaml").stat().st_mtime_ns > handed, child

    again = submit(cluster, tmp_path, cache, "schedule=fig7", "scale=0.0001").stdout
    assert again.count("SKIP: finished") == 8 and "train.py" not in again
    assert not cluster.queue()


def test_toy_sr_chain_trains_sr_experts(cluster: SlurmCluster, tmp_path: Path, cache: Path) -> None:
    """Config-B's shape at toy scale: an SR root, then two SR experts from it, as SLURM jobs."""
    sr = [
        *FAST,
        f"data.root={SHARED_CACHE}/digits32_stroke_a0",
        "data.builder.align_steps=0",
        "monitor.every=0",
    ]
    submit(cluster, tmp_path, cache, "schedule=digits_sr32", "scale=0.005", train=sr)
    ids = job_ids(tmp_path)
    assert sorted(ids) == ["E0_0", "E1_0", "E1_1"]
    jobs = wait_done(cluster, list(ids.values()), 600)
    run = tmp_path / "R"
    for name, jid in ids.items():
        assert jobs[jid]["JobState"] == "COMPLETED", (run / name / f"slurm-{jid}.out").read_text()[
            -3000:
        ]
        cfg = (run / name / "config.yaml").read_text()
        assert "EfficientUNet" in cfg and "lowres_size: 16" in cfg, name
    steps = {n: json.loads((run / n / "node.json").read_text())["step"] for n in ids}
    assert steps == {"E0_0": 3, "E1_0": 4, "E1_1": 4}


def test_failed_parent_holds_descendants(
    cluster: SlurmCluster, tmp_path: Path, cache: Path
) -> None:
    broken = [*FAST, "no_such_key=1"]  # train.py stops at once: Hydra cannot apply it
    submit(cluster, tmp_path, cache, "schedule=config_b_sr256", "scale=1e-6", train=broken)
    ids = job_ids(tmp_path)
    root = wait_done(cluster, [ids["E0_0"]], 60)[ids["E0_0"]]
    assert root["JobState"] == "FAILED"

    def held() -> bool:
        return all(cluster.job(ids[c]).get("Reason") == NEVER for c in ("E1_0", "E1_1"))

    wait_for(held, 30, "children to be held with DependencyNeverSatisfied", cluster)
    for child in ("E1_0", "E1_1"):
        assert cluster.job(ids[child])["JobState"] == "PENDING"
        assert not (tmp_path / "R" / child / "config.yaml").exists()  # never ran

    out = submit(
        cluster, tmp_path, cache, "schedule=config_b_sr256", "scale=1e-6", train=broken
    ).stdout
    new = job_ids(tmp_path)
    for child in ("E1_0", "E1_1"):
        assert f"(replaces stuck job {ids[child]})" in out
        assert new[child] != ids[child] and cluster.job(ids[child])["JobState"] == "CANCELLED"
        assert cluster.job(new[child])["Dependency"].startswith(f"afterok:{new['E0_0']}")


def submit_here(
    cluster: SlurmCluster,
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
) -> str:
    """slurm/submit.py's main in this process (its SLURM calls are still real); its stdout."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("SLURM_CONF", cluster.env()["SLURM_CONF"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "submit",
            overrides=[
                f"run_dir={tmp / 'R'}",
                "train.trainer=cpu",
                "slurm.gpus_per_node=0",
                "slurm.cpus_per_task=1",
                "slurm.time=00:10:00",
                f"train.args={json.dumps(FAST)}",
                *args,
            ],
        )
    spec = importlib.util.spec_from_file_location("_script_submit", ROOT / "slurm" / "submit.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look themselves up
    spec.loader.exec_module(script)
    capsys.readouterr()
    script.main(cfg)
    return capsys.readouterr().out


def test_second_submit_reuses_queued_jobs(
    cluster: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Submitting the same schedule again while its jobs wait in the queue submits nothing: every
    stage is found by its comment (the node folder) and reused. Held jobs never start, so the
    queue cannot change under the test."""
    args = ["schedule=config_b_sr256", "scale=1e-6", 'slurm.extra=["--hold"]']
    submit_here(cluster, tmp_path, monkeypatch, capsys, *args)
    ids = job_ids(tmp_path)
    assert sorted(ids) == ["E0_0", "E1_0", "E1_1"]
    queued = sorted(cluster.queue())
    assert queued == sorted(ids.values())
    assert cluster.job(ids["E0_0"])["Reason"] == "JobHeldUser"

    again = submit_here(cluster, tmp_path, monkeypatch, capsys, *args)
    assert sorted(cluster.queue()) == queued  # no second copy of any stage
    stages = json.loads((tmp_path / "R" / "slurm_jobs.json").read_text())["stages"]
    assert {n: (s["action"], s["job_id"]) for n, s in stages.items()} == {
        n: ("reuse", jid) for n, jid in ids.items()
    }
    for jid in ids.values():
        assert f"already queued as job {jid}" in again, again
    assert "train.py" not in again  # no job command printed: nothing was submitted
    for child in ("E1_0", "E1_1"):  # the chain is the original one, untouched
        assert cluster.job(ids[child])["Dependency"].startswith(f"afterok:{ids['E0_0']}")


def logged_steps(ndir: Path) -> list[int]:
    """Every training step logged by every run of the node (CSV logger, one row per step)."""
    steps = []
    for path in sorted(ndir.glob("logs/**/metrics.csv")):
        with path.open() as f:
            steps += [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return steps


def test_signalled_job_requeues_and_resumes(
    cluster: SlurmCluster, tmp_path: Path, cache: Path
) -> None:
    conf = tmp_path / "conf" / "schedule"
    conf.mkdir(parents=True)
    (conf / "one.yaml").write_text(
        "name: one\nstages:\n  - {node: E0_0, steps: 60, source: t}\n"
        "  - {node: E1_1, steps: 2, source: t}\n"
    )
    submit(
        cluster, tmp_path, cache, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "schedule=one"
    )
    ids = job_ids(tmp_path)
    jid = ids["E0_0"]
    ndir = tmp_path / "R" / "E0_0"
    # training is under way once the first checkpoint (step 10) exists
    wait_for(lambda: any((ndir / "checkpoints").glob("*.ckpt")), 120, "a checkpoint", cluster)
    cluster.run("scancel", "--signal=USR1", jid)
    wait_for(lambda: int(cluster.job(jid).get("Restarts", 0)) >= 1, 60, "a requeue", cluster)
    child = cluster.job(ids["E1_1"])  # the requeue did not release or break the chain
    assert child["JobState"] == "PENDING" and child["Reason"] == "Dependency", child

    info = wait_done(cluster, [jid, ids["E1_1"]], 180)
    log = (ndir / f"slurm-{jid}.out").read_text()
    assert info[jid]["JobState"] == "COMPLETED", log[-3000:]
    assert int(info[jid]["Restarts"]) == 1 and "restart 1" in log, log[-3000:]
    assert json.loads((ndir / "node.json").read_text())["step"] == 60
    steps = logged_steps(ndir)
    counts = Counter(steps)
    assert counts[0] == 1, "the requeued run started from scratch"
    assert set(steps) == set(range(60)), sorted(counts)
    redone = len(steps) - len(counts)
    assert redone <= 10, f"{redone} steps trained twice (> checkpoint_every=10)"
    assert info[ids["E1_1"]]["JobState"] == "COMPLETED"
    assert json.loads((tmp_path / "R" / "E1_1" / "node.json").read_text())["step"] == 62
