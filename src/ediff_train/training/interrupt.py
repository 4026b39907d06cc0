"""Ctrl-C, SIGTERM (scancel, `docker stop`, a time limit) and SIGUSR1 outside SLURM's requeue
lose no training: the run stops at the next step boundary with a resumable `last.ckpt` at that
step, says where in one line, and exits 128 + the signal (130, 143, 138), so a script or a
scheduler sees it was stopped; the same command resumes from that checkpoint exactly.

Why not Lightning's own handling: Ctrl-C inside `fit` tears down with exit 1 and no checkpoint,
and SIGTERM raises `SIGTERMException`, a SystemExit with code 0 that looks like success. The
signal only sets a flag (acted on between steps, on all ranks together, as resume.Requeue does);
a second one, or one outside the training loop (set-up, the final grid), stops at once: the
checkpoints on disk are whole either way (written to a temp name, then renamed).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ediff_train.run.layout import LAST

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138}


def stop_signals(env: dict[str, str] | os._Environ[str] = os.environ) -> list[int]:
    """The signals a run turns into a saved stop: SIGUSR1 is resume.Requeue's in a SLURM job,
    and submitit owns SIGTERM and SIGUSR1/2 (its own checkpoint-and-requeue) in its jobs."""
    if "SUBMITIT_EXECUTOR" in env:
        return [signal.SIGINT]
    if "SLURM_JOB_ID" in env:
        return [signal.SIGINT, signal.SIGTERM]
    return [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]


class Interrupted(BaseException):
    """A stop signal outside the training loop (or a second one): stop now, nothing new saved.
    A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    return EXIT_CODES.get(signal.Signals(signum), 128 + int(signum))


class Interrupt(Callback):
    """Signal → flag → checkpoint at the step boundary on every rank → stop (see module doc).

    Handlers are installed at once (a signal during set-up raises Interrupted instead of
    killing the process mid-write) and again at train start, over Lightning's SIGTERM handler;
    `restore()` puts the previous ones back."""

    def __init__(self, ckpt_dir: str | os.PathLike, signals: list[int]) -> None:
        self.ckpt_dir, self.signals = Path(ckpt_dir), list(signals)
        self.signum: int | None = None  # the signal acted on
        self.saved: Path | None = None  # the checkpoint written for it
        self.step = 0
        self.in_loop = False
        self._previous: dict[int, Any] = {}
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: nothing to install
                pass

    def _handler(self, signum: int, frame: Any) -> None:
        if self.in_loop and self.signum is None:
            self.signum = signum  # acted on at the next step boundary
            return
        raise Interrupted(signum)  # outside the loop, or asked twice: stop now

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for s in self._previous:  # Lightning's fit start installed its SIGTERM handler over ours
            signal.signal(s, self._handler)
        self.in_loop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.in_loop = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exc: Any) -> None:
        self.in_loop = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        signum = self.signum or 0
        if trainer.world_size > 1:  # every rank asks: the same step for all, one checkpoint
            flag = torch.tensor(float(signum), device=pl_module.device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not signum or self.saved is not None:
            return
        self.signum = signum
        if trainer.global_step >= (trainer.max_steps or 0):
            return  # the last step: the hand-off writes the final checkpoint itself
        path = self.ckpt_dir / LAST
        trainer.save_checkpoint(path, weights_only=False)  # with the optimiser: resumable
        self.saved, self.step = path, trainer.global_step
        self.in_loop = False  # a further signal now stops at once: the checkpoint is on disk
        trainer.should_stop = True

    def report(self, rank_zero: bool) -> None:
        """After fit: one line and exit 128 + signal when a signal stopped the run."""
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        if rank_zero:
            if self.saved is not None:
                print(
                    f"interrupted at step {self.step} ({name}): saved {self.saved}; "
                    "rerun the same command to resume",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(
                    f"interrupted ({name}) after the last step: the node's hand-off is written",
                    file=sys.stderr,
                    flush=True,
                )
        sys.exit(exit_code(self.signum))


def report_immediate(exc: Interrupted, ckpt_dir: Path, rank_zero: bool) -> None:
    """One line for a stop outside the loop (or a second signal), then exit 128 + signal."""
    if rank_zero:
        ckpts = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        where = (
            f"the checkpoints on disk are whole ({', '.join(ckpts)} in {ckpt_dir})"
            if ckpts
            else "no step of this run was saved"
        )
        print(
            f"interrupted ({exc}): stopped at once; {where}; rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
    sys.exit(exit_code(exc.signum))
