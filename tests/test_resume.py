"""Resume after kill -9, SLURM's requeue signal and corrupt checkpoints: the same command always
finishes the node, and no unreadable checkpoint is ever loaded or left as *.ckpt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env

from ediff_train.training.resume import (
    AtomicCheckpointIO,
    checkpoint_step,
    persistent_run_id,
    resume_checkpoint,
)
from ediff_train.training.strategies import MARKER

FAST = [
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=8",
    "run_dir=R",
    "monitor.every=0",
    "probe.batches=1",
    "probe.batch_size=8",
]  # instruments: cheap here


def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *FAST, *args]


def start(tmp: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command(*args),
        cwd=tmp,
        env=env or run_env(tmp),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{err[-4000:]}")
    return err


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited before {path} appeared:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def all_checkpoints_load(ckpt_dir: Path) -> list[int]:
    names = [p.name for p in ckpt_dir.iterdir()]
    assert not [n for n in names if n.startswith(".")], names  # no temp leftovers
    steps = []
    for path in sorted(ckpt_dir.glob("*.ckpt")):
        steps.append(int(torch.load(path, map_location="cpu", weights_only=True)["global_step"]))
    return steps


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume")  # one digits cache for every run here


def test_sigkill_after_a_checkpoint_then_same_command_resumes_from_it(tmp: Path) -> None:
    """kill -9 (the whole process group) as soon as the first checkpoint exists; the same
    command then resumes from the newest checkpoint on disk, step k > 0, not from step 0: its
    first optimiser step is k and it trains exactly the 12 − k steps left (a Probe records it)."""
    dump = tmp / "K_probe.pt"
    args = [
        "steps=12",
        "checkpoint_every=3",
        "logger=wandb",
        "run_dir=K",
        "+callbacks.probe._target_=train_probes.Probe",
        "+callbacks.probe.key=k",
        f"+callbacks.probe.dump={dump}",
    ]
    env = run_env(tmp)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])]
    )
    ndir = tmp / "K" / "E0_0"
    proc = start(tmp, args, env)
    wait_for(ndir / "checkpoints" / "last.ckpt", proc)  # renamed into place: complete
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (ndir / "weights.safetensors").exists() and not dump.exists()  # killed mid-run
    run_id = (ndir / "wandb_id").read_text().strip()
    steps = [
        int(torch.load(c, map_location="cpu", weights_only=True)["global_step"])
        for c in (ndir / "checkpoints").glob("*.ckpt")
    ]  # a .tmp of a later save: not one
    k = max(steps)
    assert 3 <= k < 12 and k % 3 == 0, steps

    finish(start(tmp, args, env))
    rec = torch.load(dump, weights_only=True)
    assert rec["optimizer_steps"] == list(range(k, 12))  # from the checkpoint, to the target
    assert json.loads((ndir / "node.json").read_text())["step"] == 12
    assert all_checkpoints_load(ndir / "checkpoints") == [12, 9]  # last, and previous kept
    assert (ndir / "wandb_id").read_text().strip() == run_id
    runs = list((ndir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run resumed


def fake_slurm(tmp: Path) -> tuple[dict[str, str], Path]:
    """A SLURM job environment and an `scontrol` that records its arguments."""
    bin_dir, log = tmp / "bin", tmp / "scontrol.log"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    script.chmod(0o755)
    env = run_env(tmp)
    env.update(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="ediff",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NNODES="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NODELIST="127.0.0.1",
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    )
    return env, log


def test_sigusr1_under_slurm_requeues_then_resume_skips_corrupt(tmp: Path) -> None:
    env, log = fake_slurm(tmp)
    args = ["steps=400", "checkpoint_every=3", "logger=csv", "run_dir=S"]
    ndir = tmp / "S" / "E0_0"
    ckpt = ndir / "checkpoints"
    proc = start(tmp, args, env)
    wait_for(ckpt / "last.ckpt", proc)  # handlers are installed by now
    os.kill(proc.pid, signal.SIGUSR1)
    finish(proc, timeout=60)  # stops by itself at the next step boundary
    assert log.read_text().split() == ["requeue", "4242"]
    saved = checkpoint_step(ckpt / "hpc_ckpt_1.ckpt")
    assert saved is not None and 3 <= saved < 400
    assert not (ndir / "weights.safetensors").exists()  # not finished: no hand-off

    (ckpt / "hpc_ckpt_2.ckpt").write_bytes(b"PK\x03\x04 cut short")  # newest name, unreadable
    err = finish(start(tmp, ["steps=" + str(saved + 2), *args[1:]], env))
    assert "skipping unreadable checkpoint" in err and "Traceback" not in err
    assert "hpc_ckpt_1.ckpt" in err  # resumed from the requeue checkpoint, not last.ckpt
    assert json.loads((ndir / "node.json").read_text())["step"] == saved + 2
    assert (ckpt / "hpc_ckpt_2.ckpt.corrupt").is_file()
    # hpc_ckpt_1, the new last, and the one before it (previous.ckpt: the last periodic one)
    assert all_checkpoints_load(ckpt) == [saved, saved + 2, (saved + 1) // 3 * 3]


def test_resume_choice_and_cleanup(tmp_path: Path) -> None:
    ndir = tmp_path / "N"
    ck = ndir / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 10}, ck / "last.ckpt")
    io.save_checkpoint({"global_step": 12}, ck / "hpc_ckpt_1.ckpt")
    io.save_checkpoint({"global_step": 14}, ck / "hpc_ckpt_2.ckpt")
    data = (ck / "hpc_ckpt_2.ckpt").read_bytes()
    (ck / "hpc_ckpt_2.ckpt").write_bytes(data[: len(data) // 2])  # cut mid-write (no atomicity)
    (ck / ".last.ckpt.tmp999").write_bytes(data[:10])  # what kill -9 mid-save leaves
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert resume_checkpoint(ndir) == ck / "hpc_ckpt_1.ckpt"
    assert sorted(p.name for p in ck.iterdir()) == [
        "hpc_ckpt_1.ckpt",
        "hpc_ckpt_2.ckpt.corrupt",
        "last.ckpt",
    ]

    (ck / "hpc_ckpt_3.ckpt").mkdir()  # a DeepSpeed folder without its completion marker
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert resume_checkpoint(ndir) == ck / "hpc_ckpt_1.ckpt"
    assert (ck / "hpc_ckpt_3.ckpt.corrupt").is_dir()
    ds = ck / "hpc_ckpt_4.ckpt"
    ds.mkdir()
    (ds / MARKER).write_text(json.dumps({"global_step": 20}))
    assert resume_checkpoint(ndir) == ds
    assert not (ck / "hpc_ckpt_1.ckpt").exists()  # superseded hpc checkpoints go

    os.rename(ds, ck / ".hpc_ckpt_4.ckpt.old")  # a folder swap cut between its two renames
    assert resume_checkpoint(ndir) == ds


def test_run_id_is_created_once(tmp_path: Path) -> None:
    first = persistent_run_id(tmp_path)
    assert len(first) == 8 and persistent_run_id(tmp_path) == first
