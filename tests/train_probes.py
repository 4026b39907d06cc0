"""Test-only Lightning callback for in-process training runs (`callbacks.<name>._target_=
train_probes.Probe`): what the Trainer really did, recorded independently of ediff_train.

`Probe(key)` fills `RECORDS[key]` with
- `optimizer_steps`: the global step at each optimiser step (Lightning's on_before_optimizer_step,
  which runs after backward and before the parameters change): how many steps this run trained;
- `weights`: {global step: the denoiser's parameters}, before the first step of the run and after
  every step; `ema0`: the EMA the run starts from (a resumed run's: the checkpoint's);
- `losses`: {global step: the loss of the step taken there} (what training_step returned);
- `at_exception`: the parameters when the run stopped with an exception, and `exception`.
With `nan_at=j` the batch of the step taken at global step j becomes NaN, as corrupt data would.
With `dump=PATH` the record (all but the exception object) is also written there with torch.save
when the run ends or stops, for runs in another process (train.py started as a subprocess).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

RECORDS: dict[str, dict[str, Any]] = {}


def parameters(module: LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in module.denoiser.named_parameters()}


class Probe(Callback):
    def __init__(self, key: str, nan_at: int | None = None, dump: str | None = None) -> None:
        self.nan_at, self.dump = nan_at, dump
        self.rec: dict[str, Any] = {
            "optimizer_steps": [],
            "weights": {},
            "ema0": None,
            "losses": {},
            "at_exception": None,
            "exception": None,
        }
        RECORDS[key] = self.rec

    def on_train_batch_start(
        self, trainer: Trainer, module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.rec["ema0"] is None:  # after the module's on_train_start and any resume
            self.rec["ema0"] = module.ema_state.state_dict()
            self.rec["weights"][trainer.global_step] = parameters(module)
        if self.nan_at is not None and trainer.global_step == self.nan_at:
            batch["image"] = torch.full_like(batch["image"], float("nan"))

    def on_before_optimizer_step(
        self, trainer: Trainer, module: LightningModule, optimizer: Any
    ) -> None:
        self.rec["optimizer_steps"].append(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, module: LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.rec["weights"][trainer.global_step] = parameters(module)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # keyed by the step that computed it
            self.rec["losses"][trainer.global_step - 1] = float(loss.detach())

    def on_exception(
        self, trainer: Trainer, module: LightningModule, exception: BaseException
    ) -> None:
        self.rec["at_exception"] = parameters(module)
        self.rec["exception"] = exception
        self._dump()

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        self._dump()

    def _dump(self) -> None:
        if self.dump is not None:
            torch.save({k: v for k, v in self.rec.items() if k != "exception"}, self.dump)
