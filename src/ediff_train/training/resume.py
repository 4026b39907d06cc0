"""Surviving preemption, walltime and kill -9: the same command always picks up where it stopped.

- Checkpoints are written to a temp name and renamed into place (`AtomicCheckpointIO`, and
  strategies.DeepSpeed for checkpoint folders), so `last.ckpt` is the previous good one or the
  new good one, never half of each; a full disk removes the temp and stops with one line.
- The last two are kept: `last.ckpt` and the one before it, `previous.ckpt` (keep_previous).
- On start, `resume_checkpoint` takes the newest *valid* checkpoint of the node among
  `checkpoints/last.ckpt`, `previous.ckpt` and `hpc_ckpt_N.ckpt`; temp leftovers are deleted,
  unreadable ones renamed `*.corrupt` with a one-line warning naming them, never loaded.
- Under SLURM, `Requeue` turns the signal sent before the time limit (SIGUSR1) into: at the next
  step boundary, on all ranks together, save `hpc_ckpt_N.ckpt`, `scontrol requeue`, stop without
  hand-off. Lightning's own handler saves inside the signal handler, mid-step, which with several
  ranks can pair the checkpoint's collectives with a different one on another rank.
- The W&B run id is stored in the node folder on first start, so a requeued run continues it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ediff_train.io.files import atomic_write
from ediff_train.run.layout import CKPT_DIR, LAST
from ediff_train.training.strategies import MARKER

_HPC = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
PREVIOUS = "previous.ckpt"  # the checkpoint before last.ckpt (keep_previous)
WANDB_ID = "wandb_id"


class _KeepOSError:
    """The file object torch.save writes through: torch's C++ writer turns a failed write into a
    bare RuntimeError ('unexpected pos ...'); this keeps the OSError (ENOSPC) it came from."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoints, streamed to a temp file in the checkpoint folder,
    synced, then renamed (Lightning's own save buffers the whole checkpoint in memory and goes
    through $TMPDIR). A failed write removes the temp; a full disk is one DiskFull line."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        if path.name == LAST and path.is_file():
            keep_previous(path, int(checkpoint.get("global_step", -1)))
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            out = _KeepOSError(f)
            try:
                torch.save(checkpoint, out)
            except Exception:
                if out.error is not None:
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)


def keep_previous(last: Path, step: int) -> None:
    """`last.ckpt` becomes `previous.ckpt` (a hard link renamed into place, so both names always
    hold a whole checkpoint) before a new `last.ckpt` at another step replaces it: a last
    checkpoint corrupted later (a disk, a copy cut short) still leaves one to resume from."""
    if checkpoint_step(last) == step:
        return  # the same step again (an interrupt's save beside the periodic one)
    prev = last.with_name(PREVIOUS)
    if prev.exists() and os.path.samefile(prev, last):
        return  # kept already (a save that failed after it, now retried)
    tmp = last.with_name(f".{PREVIOUS}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:  # no hard links here: a copy
        shutil.copyfile(last, tmp)
    os.replace(tmp, prev)
    tmp.unlink(missing_ok=True)  # rename() between two links of one file leaves both


class PeriodicCheckpoint(ModelCheckpoint):
    """`last.ckpt` every n steps, except at the final step: that one is written by the hand-off
    after weights.safetensors, so a checkpoint at the target step implies a finished hand-off
    (a run resumed at its target does no step, and would never export otherwise).

    Always the name `last.ckpt` (no version counter): resumed from a checkpoint this callback
    did not write (hand-off, requeue), Lightning would otherwise switch to `last-v1.ckpt`,
    which resume_checkpoint never reads."""

    def __init__(self, ckpt_dir: Path, every_n_steps: int) -> None:
        super().__init__(
            dirpath=ckpt_dir,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_steps,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step < (trainer.max_steps or 0) or trainer.max_steps < 0:
            super().on_train_batch_end(trainer, pl_module, *args)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _env_rank() -> int:
    """This process's global rank before the Trainer exists (0 when not distributed)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):  # Lightning sets LOCAL_RANK in its children
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint holds, or None if it is incomplete or unreadable."""
    try:
        if path.is_dir():  # DeepSpeed folder: complete once its marker was written
            return int(json.loads((path / MARKER).read_text())["global_step"])
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception:  # any unreadable file is skipped, whatever the reason
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _candidates(ckpt_dir: Path) -> list[Path]:
    return [p for p in ckpt_dir.iterdir() if p.name in (LAST, PREVIOUS) or _HPC.match(p.name)]


def clean_leftovers(ckpt_dir: Path) -> None:
    """Undo what a kill mid-save can leave: a folder swap cut in half, temp files."""
    for old in ckpt_dir.glob(".*.old"):
        final = ckpt_dir / old.name[1 : -len(".old")]
        if not final.exists():
            os.rename(old, final)  # the swap was cut between its two renames
        else:
            _remove(old)
    for tmp in ckpt_dir.glob(".*.tmp*"):
        _remove(tmp)


def resume_checkpoint(ndir: str | os.PathLike, cleanup: bool | None = None) -> Path | None:
    """The newest valid checkpoint of a node (by global step, then time), or None.

    Rank 0 (`cleanup`, default: this process is rank 0) also tidies the folder: temp leftovers
    go, unreadable checkpoints become `*.corrupt`, hpc checkpoints older than the choice go.
    """
    ckpt_dir = Path(ndir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return None
    cleanup = _env_rank() == 0 if cleanup is None else cleanup
    if cleanup:
        clean_leftovers(ckpt_dir)
    found: list[tuple[int, float, Path]] = []
    for path in _candidates(ckpt_dir):
        step = checkpoint_step(path)
        if step is None:
            warnings.warn(
                f"skipping unreadable checkpoint {path}"
                + (f" (kept as {path.name}.corrupt)" if cleanup else ""),
                stacklevel=2,
            )
            if cleanup:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            continue
        try:
            found.append((step, path.stat().st_mtime, path))
        except OSError:  # removed meanwhile by rank 0's tidying: it was not the newest
            continue
    if not found:
        return None
    found.sort(key=lambda t: (t[0], t[1]))
    best = found[-1][2]
    if cleanup:
        for _, _, path in found[:-1]:
            if _HPC.match(path.name):
                _remove(path)  # superseded by a newer one
    return best


def next_hpc_path(ckpt_dir: Path) -> Path:
    taken = [int(m.group(1)) for p in ckpt_dir.glob("hpc_ckpt_*") if (m := _HPC.match(p.name))]
    return ckpt_dir / f"hpc_ckpt_{max(taken, default=0) + 1}.ckpt"


class Requeue(Callback):
    """SLURM's early-warning signal → checkpoint at a step boundary → requeue → stop."""

    def __init__(self, ckpt_dir: str | os.PathLike, signum: int = signal.SIGUSR1) -> None:
        self.ckpt_dir, self.signum = Path(ckpt_dir), signum
        self.signalled = False
        self.requeued = False
        # Installed at once, not at fit start: a signal during the set-up (data, parent weights)
        # would otherwise kill the process with SIGUSR1's default action.
        try:
            self._previous: Any = signal.signal(self.signum, self._handler)
        except ValueError:  # not the main thread: nothing to install
            self._previous = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.signalled = True  # acted on at the next step boundary, never inside the handler

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        signalled = self.signalled  # one process: a host flag, the GPU is never waited for
        if trainer.world_size > 1:  # several: they agree (a collective, so every rank asks)
            flag = torch.tensor(1.0 if signalled else 0.0, device=pl_module.device)
            signalled = trainer.strategy.reduce(flag, reduce_op="max").item() >= 0.5
        if not signalled or self.requeued or trainer.global_step >= (trainer.max_steps or 0):
            return
        path = next_hpc_path(self.ckpt_dir) if trainer.is_global_zero else None
        path = trainer.strategy.broadcast(path)
        trainer.save_checkpoint(path, weights_only=False)  # a full resume point, optimiser too
        ok = trainer.strategy.broadcast(self._requeue() if trainer.is_global_zero else False)
        if ok:
            self.requeued = True
            trainer.should_stop = True
        else:
            self.signalled = False  # no requeue: go on training until the limit, ckpt is saved

    def _requeue(self) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not job:
            return False
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        except OSError as e:
            warnings.warn(f"cannot requeue SLURM job {job}: {e}", stacklevel=2)
            return False
        if proc.returncode != 0:
            warnings.warn(f"scontrol requeue {job} failed: {proc.stderr.strip()}", stacklevel=2)
            return False
        print(f"requeued SLURM job {job} after saving a checkpoint", flush=True)
        return True


def persistent_run_id(ndir: str | os.PathLike, name: str = WANDB_ID) -> str:
    """A run id created once per node folder and reused by every later start (atomic create)."""
    path = Path(ndir) / name
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp{os.getpid()}")
    tmp.write_text(secrets.token_hex(4) + "\n")
    try:
        os.link(tmp, path)  # fails if another rank or run created it first: use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
