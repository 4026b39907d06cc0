"""A true two-node job: a SLURM cluster whose two nodes are two slurmd daemons on their own
loopback addresses (tests/slurm_cluster.py), one rank per node, DDP over gloo between them,
submitted by slurm/submit.py as a user would. Checks that SLURM's ranks reach Lightning, that
the nodes read disjoint shards, that one set of hand-off weights is written, and that a SIGUSR1
requeue of the two-node job resumes on both nodes from the same checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_CACHE
from slurm_cluster import SlurmCluster, missing
from test_slurm import FAST, job_ids, submit, wait_done, wait_for

from ediff_train.run.optim_state import read_state
from ediff_train.run.weights import load_weights

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

STEPS = 30


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    c = SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def starts(records: Path) -> list[list[dict]]:
    """Each start of the job: its ranks' records, ordered by global rank."""
    runs: dict[str, list[dict]] = {}
    for f in records.glob("rank*.json"):
        r = json.loads(f.read_text())
        runs.setdefault(r["env"]["SLURM_RESTART_COUNT"] or "0", []).append(r)
    return [sorted(runs[k], key=lambda r: r["global_rank"]) for k in sorted(runs)]


def test_two_node_job_splits_data_hands_off_once_and_requeues_on_both(
    cluster2: SlurmCluster, tmp_path: Path, digits_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf" / "schedule"
    conf.mkdir(parents=True)
    (conf / "one.yaml").write_text(
        f"name: one\nstages:\n  - {{node: E0_0, steps: {STEPS}, source: t}}\n"
    )
    records = tmp_path / "ranks"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    )
    train = [
        *FAST,
        "+callbacks.ranks._target_=record_ranks.RecordRanks",
        f"+callbacks.ranks.path={records}",
    ]
    submit(
        cluster2,
        tmp_path,
        SHARED_CACHE,
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "schedule=one",
        "slurm.nodes=2",
        train=train,
    )  # digits_root: the data is built
    jid = job_ids(tmp_path)["E0_0"]
    ndir = tmp_path / "R" / "E0_0"
    log = ndir / f"slurm-{jid}.out"
    wait_for(lambda: any((ndir / "checkpoints").glob("*.ckpt")), 180, "a checkpoint", cluster2)
    cluster2.run("scancel", "--signal=USR1", jid)
    wait_for(lambda: int(cluster2.job(jid).get("Restarts", 0)) >= 1, 90, "a requeue", cluster2)
    info = wait_done(cluster2, [jid], 240)[jid]
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert info["NodeList"] == "ediffn[0-1]" and int(info["Restarts"]) == 1, info

    first, second = starts(records)
    for run in (first, second):  # SLURM's ranks are Lightning's, one per node
        assert [r["global_rank"] for r in run] == [0, 1]
        for r in run:
            assert r["world_size"] == 2 and r["num_nodes"] == 2 and r["local_rank"] == 0
            assert (
                r["node_rank"]
                == r["global_rank"]
                == int(r["env"]["SLURM_NODEID"])
                == int(r["env"]["SLURM_PROCID"])
            )
            assert r["env"]["MASTER_ADDR"] == "127.0.0.2"  # ediffn0's NodeAddr, from the sbatch
        assert [r["env"]["SLURMD_NODENAME"] for r in run] == ["ediffn0", "ediffn1"]

    # the nodes read disjoint shards (all within the first epoch at this size)
    for run in (first, second):
        a, b = (set(r["shards"]) for r in run)
        assert a and b and not a & b, (a, b)
        assert not set(run[0]["keys"]) & set(run[1]["keys"])

    # the requeued job resumed on both nodes from the same checkpoint, not from step 0
    assert [r["start_step"] for r in first] == [0, 0]
    resumed = {r["start_step"] for r in second}
    assert len(resumed) == 1 and 0 < resumed.pop() < STEPS, [r["start_step"] for r in second]
    assert {r["end_step"] for r in second} == {STEPS}

    # one hand-off (weights and the optimiser state a child starts from), from the finished run
    weights = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.safetensors"))
    assert weights == [Path("R/E0_0/optimizer.safetensors"), Path("R/E0_0/weights.safetensors")], (
        weights
    )
    _, _, meta = load_weights(ndir / "weights.safetensors")
    assert meta["step"] == STEPS
    assert read_state(ndir / "optimizer.safetensors")[1] == STEPS
    assert json.loads((ndir / "node.json").read_text())["step"] == STEPS
    assert "restart 1" in log.read_text()
