"""Test-only callback: the full fp32 weights before and after each optimiser step and the full
gradient that step used, on any strategy (DeepSpeed's own accessors under ZeRO, the tensors
themselves otherwise), so a test can recompute an AdamW step outside the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _full(p: torch.nn.Parameter, what: str) -> torch.Tensor:
    if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        value = safe_get_full_fp32_param(p) if what == "weight" else safe_get_full_grad(p)
    else:
        value = p.detach() if what == "weight" else p.grad
    return value.detach().float().cpu().clone()


class RecordSteps(Callback):
    """Rank 0 saves {step: {"before", "grad", "after"}} (every rank takes part: collectives)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.steps: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._grad: dict[str, torch.Tensor] = {}

    def _all(self, module: LightningModule, what: str) -> dict[str, torch.Tensor]:
        return {n: _full(p, what) for n, p in module.denoiser.named_parameters()}

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, *args: Any) -> None:
        self._before = self._all(module, "weight")

    def on_before_optimizer_step(
        self, trainer: Trainer, module: LightningModule, optimizer: Any
    ) -> None:
        self._grad = self._all(module, "grad")

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args: Any) -> None:
        after = self._all(module, "weight")
        if trainer.is_global_zero:
            self.steps[trainer.global_step] = {
                "before": self._before,
                "grad": self._grad,
                "after": after,
            }
            torch.save(self.steps, self.path)
