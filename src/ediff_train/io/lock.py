"""One training run per node at a time: an exclusive `flock` on `<run_dir>/<node>/.lock`.

Two runs of one node would interleave checkpoints and race on the hand-off files. The lock is a
kernel lock on an open file, not a pid file: the kernel drops it when the holder exits or dies
(`kill -9`, OOM), so a crash never leaves a node locked. The file's text only says who holds it
(host, pid, SLURM job, start time), for the refusal message. Only the launch's global rank 0
locks; the other ranks of a DDP run belong to the same run. On NFS, flock works where the client
maps it to byte-range locks (Linux NFSv4 does); where a file system has no flock at all, training
goes ahead with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ediff_train.errors import EdiffError

LOCK = ".lock"
_RANK_VARS = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")


def launch_rank_is_zero(env: dict[str, str] | None = None) -> bool:
    """Whether this process is global rank 0, decided before Lightning sets ranks up: torchrun
    sets RANK, srun SLURM_PROCID, Lightning's own spawned ranks LOCAL_RANK and NODE_RANK."""
    env = os.environ if env is None else env
    return all(env.get(k, "0") in ("", "0") for k in _RANK_VARS)


def holder_info() -> dict[str, Any]:
    """What the lock file records about this process."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def describe_holder(path: Path) -> str:
    """`pid 123 on host h (SLURM job 42), since ...` from a lock file; vague if unreadable."""
    try:
        info = json.loads(path.read_text())
        who = f"pid {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"
    if info.get("slurm_job_id"):
        who += f" (SLURM job {info['slurm_job_id']})"
    return f"{who}, running since {info.get('started', '?')}"


def _try_flock(fd: int, path: Path) -> bool:
    """Lock `fd` without waiting: True if locked, False (a warning) where the file system has no
    flock, EdiffError naming the holder if another run has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            ndir = path.parent
            raise EdiffError(
                f"node {ndir.name} is already being trained in {ndir.parent} by "
                f"{describe_holder(path)}; wait for that run to end or stop it "
                f"(lock: {path})"
            ) from None
        # no flock here (Lustre without -o flock: ENOSYS; old NFS: ENOLCK): train unguarded
        # rather than not at all
        warnings.warn(
            f"cannot lock {path} ({e.strerror or e}): a second run of "
            f"{path.parent.name} would not be refused",
            stacklevel=4,
        )
        return False


@contextlib.contextmanager
def node_lock(ndir: str | os.PathLike) -> Iterator[Path]:
    """Hold `ndir/.lock` for the duration; refuse at once (EdiffError) if another run holds it.

    Creates `ndir`; a run_dir that cannot be created or written is an EdiffError too."""
    ndir = Path(ndir)
    path = ndir / LOCK
    try:
        ndir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise EdiffError(
            f"cannot create or write the node folder {ndir}: "
            f"{e.strerror or e} (choose a writable run_dir)"
        ) from None
    try:
        if _try_flock(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder_info()) + "\n").encode())
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


@contextlib.contextmanager
def training_lock(ndir: str | os.PathLike) -> Iterator[Path | None]:
    """node_lock on global rank 0; the other ranks of the same launch take none."""
    if not launch_rank_is_zero():
        yield None
        return
    with node_lock(ndir) as path:
        yield path
