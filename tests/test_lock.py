"""One run per node: the flock on `<node>/.lock` refuses a second run at once, names the first,
and never outlives its holder (a SIGKILLed holder's lock is free again)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env

from ediff_train.errors import EdiffError
from ediff_train.io.lock import LOCK, launch_rank_is_zero, node_lock, training_lock

HOLD = (
    "import sys, time\n"
    "from ediff_train.io.lock import node_lock\n"
    "held = node_lock(sys.argv[1])\n"
    "held.__enter__()  # kept referenced: a collected generator would release the lock\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def hold_in_subprocess(ndir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A separate process holding the node's lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(ndir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_lock_refused_naming_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    ndir = tmp_path / "R" / "E1_1"
    with node_lock(ndir) as path:
        assert path == ndir / LOCK
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["slurm_job_id"] == "4242"
        with pytest.raises(EdiffError) as e, node_lock(ndir):
            pass
        host = info["host"]
        assert str(e.value).startswith(
            f"node E1_1 is already being trained in {tmp_path / 'R'} by pid {os.getpid()} on "
            f"host {host} (SLURM job 4242), running since {info['started']}; wait for"
        )
        assert json.loads(path.read_text()) == info  # the refused run left the record alone
    with node_lock(ndir):  # released on exit
        pass


def test_lock_under_a_file_is_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(
        EdiffError,
        match=r"cannot create or write the node folder .*file/R/E0_0: "
        r"Not a directory \(choose a writable run_dir\)$",
    ):
        with node_lock(blocker / "R" / "E0_0"):
            pass


def test_file_system_without_flock_warns_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import ediff_train.io.lock as lock_mod

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    with pytest.warns(
        UserWarning,
        match=r"cannot lock .*E0_0/\.lock \(Function not implemented\)"
        r": a second run of E0_0 would not be refused",
    ):
        with node_lock(tmp_path / "E0_0") as path:
            assert path.is_file()


@pytest.mark.parametrize(
    "env, zero",
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
        ({"RANK": "3"}, False),
        ({"SLURM_PROCID": "1"}, False),
        ({"LOCAL_RANK": "1"}, False),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
    ],
)
def test_only_global_rank_zero_locks(env: dict[str, str], zero: bool) -> None:
    assert launch_rank_is_zero(env) is zero


def test_other_ranks_take_no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with node_lock(tmp_path / "E0_0"):
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank of the run holding it
        with training_lock(tmp_path / "E0_0") as path:
            assert path is None


def test_train_refuses_while_locked_and_lock_dies_with_holder(tmp_path: Path) -> None:
    ndir = tmp_path / "R" / "E0_0"
    holder = hold_in_subprocess(ndir, run_env(tmp_path))
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "run_dir=R",
                "steps=1",
                "logger=none",
                "monitor.every=0",
                "probe.enabled=false",
                "data.num_workers=0",
                "sample.per_prompt=0",
            ],
            cwd=tmp_path,
            env=run_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.startswith(
            f"error: node E0_0 is already being trained in R by pid {holder.pid} on host "
        )
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
        assert sorted(p.name for p in ndir.iterdir()) == [LOCK]  # not even Hydra's record of it
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait(timeout=30)
    with node_lock(ndir) as path:  # the kernel released it with the process
        assert json.loads(path.read_text())["pid"] == os.getpid()
