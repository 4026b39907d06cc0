"""Test-only glue to run DeepSpeed ZeRO on CPU processes with gloo (docs/design.md §7).

Lightning refuses DeepSpeed on a CPU accelerator; this subclass skips that check, gives the root
device an index (DeepSpeed reads `device_rank` from it) and uses gloo. `RecordWeights` writes the
full fp32 weights after every optimiser step through DeepSpeed's own `safe_get_full_fp32_param`
(independent of ediff_train.core.ema), so a test can recompute the EMA without ZeRO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy

from ediff_train.training.strategies import DeepSpeed


class CPUDeepSpeed(DeepSpeed):
    requires_cuda = False

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # everything but the CUDA check

    def setup_distributed(self) -> None:
        # indexed CPU devices: Lightning checks them against local ranks, DeepSpeed reads one
        assert self.parallel_devices is not None
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        _no_cpu_ops()
        super().setup_distributed()

    def _get_process_group_backend(self) -> str:
        return "gloo"


def _no_cpu_ops() -> None:
    """Tell DeepSpeed no native CPU op is compatible, before it probes.

    Its probe runs compilers (~10 s a process) and it then JIT-builds a shared-memory allreduce
    kernel for CPU ranks (minutes on 2 cores; a build killed midway leaves a torch-extensions lock
    that hangs every later run). Gloo does the same reduction, and GPU runs never use that kernel.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}  # read with .get(name, False) by DeepSpeed's builders


def full_weights(module: LightningModule) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the denoiser as DeepSpeed assembles them (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.denoiser.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p.detach() if full is None else full).float().cpu().clone()
    return out


class RecordWeights(Callback):
    """Rank 0 saves {step: full fp32 weights} before the first step and after every step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.steps: dict[int, dict[str, torch.Tensor]] = {}
        self.started = False

    def _record(self, trainer: Trainer, module: LightningModule) -> None:
        weights = full_weights(module)
        if trainer.is_global_zero:
            self.steps[trainer.global_step] = weights
            torch.save(self.steps, self.path)

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, *args: Any) -> None:
        # the weights before the first step (after the module's own on_train_start ran)
        if self.started:  # every rank must take the same branch: collectives follow
            return
        self.started = True
        self._record(trainer, module)
        if trainer.is_global_zero:  # the EMA the run starts from (a parent's, or the init)
            torch.save(module.ema_state.state_dict(), self.path.with_suffix(".ema0"))
        else:
            module.ema_state.state_dict()  # the collective needs every rank

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args: Any) -> None:
        self._record(trainer, module)
