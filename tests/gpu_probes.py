"""Test-only callback for GPU runs (`+callbacks.setup._target_=gpu_probes.RecordSetup`): what the
run really used, written as JSON after its first step (compilation has run by then), read back by
tests/test_gpu.py independently of the switches' own bookkeeping where it can."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ediff_train.core.perf import is_fused


class RecordSetup(Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.done = False

    def on_train_batch_end(
        self, trainer: Trainer, module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.done or not trainer.is_global_zero:
            return
        self.done = True
        convs = [p for p in module.denoiser.parameters() if p.dim() == 4]
        loader = trainer.train_dataloader
        compiled = getattr(module, "_compiled", None)
        info = {
            "device": str(next(module.denoiser.parameters()).device),
            "precision": str(trainer.precision),
            "fused": is_fused(trainer.optimizers[0]) if trainer.optimizers else None,
            "channels_last": bool(convs)
            and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs),
            "compiled": bool(compiled is not None and compiled.compiled),
            "pin_memory": bool(getattr(loader, "pin_memory", False)),
            "image_dtype": str(batch["image"].dtype),
            "image_device": str(batch["image"].device),
        }
        self.path.write_text(json.dumps(info))
