"""The hand-off files a node leaves for its children: at the end of its run, and at branch points.

`HandOff` writes them when a run reaches its step count (weights.safetensors with model + EMA,
optimizer.safetensors with AdamW's moments and step, node.json with the probe's in-band losses),
then the final resume checkpoint. `BranchPoints` writes the same files at named tree steps into
`<node>/at/<step>/`, so a child may start from its parent's state at an earlier step
(`branch_step=` of train.py, `branch_step:` of a schedule stage) without the parent stopping there.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ediff_train.errors import EdiffError
from ediff_train.io.files import write_text
from ediff_train.metrics.handoff_probe import read_probe
from ediff_train.run.layout import CKPT_DIR, LAST, WEIGHTS, node_dir

AT = "at"  # <node>/at/<step:09d>/: the hand-off files at a branch point


def at_dir(ndir: Path, step: int) -> Path:
    return ndir / AT / f"{int(step):09d}"


def branch_dir(run_dir: str | os.PathLike, parent: str, parent_dir: str | None, step: int) -> str:
    """The folder of the parent's hand-off at tree step `step`; one line if it was never written."""
    pdir = Path(parent_dir) if parent_dir else node_dir(run_dir, parent)
    where = at_dir(pdir, int(step))
    if not (where / WEIGHTS).is_file():
        written = sorted(int(p.name) for p in (pdir / AT).glob("*") if (p / WEIGHTS).is_file())
        raise EdiffError(
            f"branch_step={step}: parent {parent} wrote no hand-off at step {step} "
            f"({where} is missing; it has {written or 'none'}): train it with "
            f"handoff_at=[{step}] (schedules add it for branch_step: stages)"
        )
    return str(where)


def _merge_probe(ndir: Path, info: dict[str, Any]) -> dict[str, Any]:

    probe = read_probe(ndir)
    return {**info, "handoff_probe": probe} if probe is not None else info


class HandOff(Callback):
    """At the end of fit: gather σ bounds and shard usage from all ranks, export on rank 0.

    Only a run that reached its step count hands off; a preempted one leaves its checkpoint."""

    def __init__(self, ndir: Path, info: dict[str, Any]) -> None:
        self.ndir, self.info = ndir, info
        self.shards: Counter[str] = Counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.shards.update(batch.get("shard", []))

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.global_step < (trainer.max_steps or 0):
            return  # stopped early (requeue): not finished, nothing to hand off
        seen = module.gathered_sigma_seen()
        write_text(
            self.ndir / "data" / f"rank{trainer.global_rank}.json", json.dumps(dict(self.shards))
        )
        module.export(
            self.ndir, _merge_probe(self.ndir, self.info), seen, write=trainer.is_global_zero
        )
        # then the final resume checkpoint (see resume.PeriodicCheckpoint for why in this order)
        trainer.save_checkpoint(self.ndir / CKPT_DIR / LAST, weights_only=False)  # + optimiser


class BranchPoints(Callback):
    """Hand-off files at the named tree steps, written once each (a resumed run skips those
    already there). A collective on every rank, like the final hand-off."""

    def __init__(self, ndir: Path, steps: list[int], info: dict[str, Any]) -> None:
        self.ndir, self.steps, self.info = ndir, sorted(set(steps)), info

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        lo, hi = module.step_offset, module.step_offset + int(trainer.max_steps)
        bad = [s for s in self.steps if not lo < s < hi]
        if bad:
            raise EdiffError(
                f"handoff_at={bad}: branch points must lie inside this run's tree "
                f"steps ({lo}, {hi}) exclusive (the end writes its own hand-off)"
            )

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        step = module.total_step
        if step not in self.steps or (at_dir(self.ndir, step) / WEIGHTS).is_file():
            return
        seen = module.gathered_sigma_seen()
        module.export(
            at_dir(self.ndir, step),
            {**self.info, "branch_point": step},
            seen,
            write=trainer.is_global_zero,
        )
        module.ema_state.attach(module.denoiser)  # export released the EMA: follow the run again
