"""Exact data resume: a run interrupted mid-epoch (kill, requeue, a shorter `steps`) trains on
the same sample keys, in the same order, as an uninterrupted run with the same seed; the loader's
position (position.py) travels in the Lightning checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
from conftest import ROOT, run_env
from lightning.fabric.utilities.types import _Stateful

from ediff_train.data.datamodule import ShardDataModule, ShardLoader

BATCH, PER_EPOCH, BUFFER = 8, 3, 100  # train.py runs: 3 batches per epoch, so steps cross epochs
ARGS = [
    "logger=none",
    "monitor.every=0",
    "probe.enabled=false",
    "sample.per_prompt=0",
    "data.num_workers=2",
    f"data.batch_size={BATCH}",
    f"data.batches_per_epoch={PER_EPOCH}",
    f"data.shuffle_buffer={BUFFER}",
    "+callbacks.keys._target_=record_keys.RecordKeys",
]


def take(loader: ShardLoader, n: int, ahead: int = 0) -> list[list[str]]:
    """Keys of the next `n` batches a consumer takes, passing over epochs; it fetches `ahead`
    batches more than it consumed (as Lightning's prefetch does), and those never count."""
    loader.consume_on_yield = False
    out: list[list[str]] = []
    while len(out) < n:
        pending: deque[dict] = deque()
        for batch in loader:
            pending.append(batch)
            if len(pending) > ahead:
                first = pending.popleft()
                loader.consume(first)
                out.append(first["key"])
                if len(out) == n:
                    return out  # the prefetched batches stay unconsumed
        while pending and len(out) < n:
            first = pending.popleft()
            loader.consume(first)
            out.append(first["key"])
    return out


def digits_loader(root: Path, rank: int = 0, world: int = 1, **kw: object) -> ShardLoader:
    kw = {"batch_size": BATCH, "batches_per_epoch": PER_EPOCH, "shuffle_buffer": BUFFER, **kw}
    dm = ShardDataModule(
        str(root), image_size=16, num_workers=2, seed=0, rank=rank, world_size=world, **kw
    )
    dm.setup("fit")
    return dm.train_dataloader()


def stream_keys(root: Path, steps: int, rank: int = 0, world: int = 1) -> list[list[str]]:
    """What the train.py runs below train on, per step, read straight from the loader."""
    loader = digits_loader(root, rank, world)
    try:
        return take(loader, steps)
    finally:
        loader._stop_workers()


def test_loader_state_continues_the_stream_across_epochs(digits_root: Path) -> None:
    """2 workers, a held-out key fraction (so a worker draws more samples than it delivers),
    one batch prefetched and never consumed; stops mid-epoch (k=8: epoch 1, worker 1 next) and
    exactly at an epoch end (k=10)."""
    kw = {"batch_size": 16, "batches_per_epoch": 5, "shuffle_buffer": 64, "val_fraction": 0.2}
    ref_loader = digits_loader(digits_root, **kw)
    assert isinstance(ref_loader, _Stateful)  # Lightning saves it and stops warning
    ref = take(ref_loader, 15)
    ref_loader._stop_workers()
    assert len({k for b in ref for k in b}) > 100 and ref[:5] != ref[5:10]

    got, state = [], None
    for stop in (8, 10, 15):
        loader = digits_loader(digits_root, **kw)
        if state is not None:
            loader.load_state_dict(state)
        got += take(loader, stop - len(got), ahead=1)
        state = loader.state_dict()
        loader._stop_workers()
        if stop == 8:
            mine = state["ranks"]["0"]
            assert (mine["epoch"], mine["consumed"]) == (1, 3)
            assert any(d % 16 for d in mine["drawn"])  # skipping by batches would be wrong
            fresh = digits_loader(digits_root, **kw)
            assert take(fresh, 7) != ref[8:]  # without the state: the test can tell
            fresh._stop_workers()
    assert got == ref


def train(tmp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = run_env(tmp)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *ARGS, *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )  # KillAt takes the run's workers with it
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def recorded(folder: Path, rank: int = 0) -> list[tuple[int, list[str]]]:
    lines = (folder / f"rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


def check_resumed(proc: subprocess.CompletedProcess) -> None:
    """Resumed from a mid-epoch checkpoint, without Lightning's "not resumable" warning."""
    assert "Restoring states from the checkpoint" in proc.stderr
    assert "not resumable" not in proc.stderr and "data position not restored" not in proc.stderr


@pytest.mark.slow
def test_kill_mid_epoch_then_same_command_trains_on_the_same_keys(
    tmp_path: Path, digits_root: Path
) -> None:
    """The real entry point, killed (SIGKILL) as step 5 starts, after its checkpoint at step 4
    (epoch 1, mid-epoch, the second worker next); the same command resumes. Before the kill the
    run is an uninterrupted one: it trains on the reference stream (read from the loader, as
    the DDP test below does), and so does every step after the resume, 4 and 5 again included."""
    steps = 7
    reference = stream_keys(digits_root, steps)
    common = ["run_dir=I", f"steps={steps}", "checkpoint_every=4", "+callbacks.keys.folder=keys"]
    killed = train(
        tmp_path,
        *common,
        "+callbacks.kill._target_=record_keys.KillAt",
        "+callbacks.kill.step=5",
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [keys for _, keys in recorded(tmp_path / "keys")] == reference[:6]
    check_resumed(train(tmp_path, *common))
    seen = recorded(tmp_path / "keys")
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4, 5, 4, 5, 6]  # 4, 5 again: after the checkpoint
    assert [keys for _, keys in seen[6:]] == reference[4:]


@pytest.mark.slow
def test_ddp_two_ranks_stopped_mid_epoch_continue_their_streams(
    tmp_path: Path, digits_root: Path
) -> None:
    """2 DDP ranks x 2 workers: `steps=4` stops in epoch 1 (Lightning closes its epoch there),
    `steps=7` resumes from the hand-off's last.ckpt; each rank trains on its own reference
    stream throughout, although rank 0 alone wrote the checkpoint."""
    args = ["run_dir=D", "trainer=ddp_cpu", "+callbacks.keys.folder=D/keys"]
    train(tmp_path, *args, "steps=4")
    resumed = train(tmp_path, *args, "steps=7")
    check_resumed(resumed)
    streams = []
    for rank in range(2):
        seen = recorded(tmp_path / "D" / "keys", rank)
        assert [s for s, _ in seen] == list(range(7))
        streams.append(stream_keys(digits_root, 7, rank, 2))
        assert [keys for _, keys in seen] == streams[rank]
    for epoch in range(2):  # the ranks split each epoch's shards
        keys = [{k for b in s[3 * epoch : 3 * epoch + 3] for k in b} for s in streams]
        assert not keys[0] & keys[1]
