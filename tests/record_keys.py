"""Test-only Lightning callbacks: every rank appends the sample keys of each batch it trains on
to `<folder>/rank<r>.jsonl` (one line per step), so a test can compare the data seen by an
interrupted run with an uninterrupted one; and a kill at a given step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class RecordKeys(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(
        self, trainer: Trainer, module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": batch["key"]}
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


class KillAt(Callback):
    """SIGKILL this process (and so the run, mid-epoch) when a step is about to start: the
    deterministic stand-in for a node lost or a job preempted without warning."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: Trainer, module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            # with its DataLoader workers when it leads its own process group (a test's
            # start_new_session), else alone; never anyone else's group
            if os.getpgid(0) == os.getpid():
                os.killpg(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
