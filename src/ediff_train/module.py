"""The LightningModule that trains one expert node.

It draws σ only from its node, keeps an EMA copy of the denoiser, starts from its parent's
hand-off weights, and at the end writes the node's own hand-off (weights.safetensors +
node.json). Steps are counted from the parent's: `step_offset` is the parent's global step.

The EMA and the σ bounds are deliberately *not* registered as submodule/buffer: a strategy
(DeepSpeed) would cast them to bf16, partition or broadcast them. They travel in the checkpoint
through `on_save_checkpoint`/`on_load_checkpoint` instead, as full fp32 tensors (ema.py).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ediff_train.checkpoints import load_weights, save_weights, write_json
from ediff_train.conditioning import DEFAULT_DROP, Conditioning, drop_embeddings
from ediff_train.edm import EDMPrecond, edm_loss
from ediff_train.ema import EMA, full_fp32_state, restore_fp32
from ediff_train.errors import EdiffError
from ediff_train.experts import Node
from ediff_train.sr import SRConditioner


class ExpertModule(L.LightningModule):
    """One node of the expert tree: EDM loss with σ ~ p(σ | node), AdamW, EMA."""

    def __init__(
        self,
        net: nn.Module,
        node: Node,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        drop: dict[str, float] | None = None,
        step_offset: int = 0,
        seed: int = 0,
        sr: SRConditioner | None = None,
    ) -> None:
        super().__init__()
        self.denoiser = EDMPrecond(net)
        self.ema_state = EMA(self.denoiser)  # a plain attribute: see the module docstring
        self.node = node
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.ema_decay, self.ema_warmup = ema_decay, ema_warmup
        self.drop = dict(DEFAULT_DROP if drop is None else drop)
        self.step_offset = step_offset
        self.seed = seed
        self.sr = sr  # super-resolution stages: makes the low-res conditioning (sr.py)
        # [min, max] of σ drawn in this node's run (kept in the checkpoint, on CPU, float64).
        self.sigma_seen = torch.tensor([math.inf, -math.inf], dtype=torch.float64)
        self._gen: torch.Generator | None = None
        self._ema_step = -1  # global step of the last EMA update (once per optimiser step)
        self._fp32_init: dict[str, Tensor] | None = None

    @property
    def ema(self) -> nn.Module:
        """The EMA denoiser as a module (full weights: before training, or after `export`)."""
        return self.ema_state.module

    # ---- parent hand-off -------------------------------------------------------------------
    def init_from(self, weights_path: str) -> dict[str, Any]:
        """Copy model and EMA weights from a parent's weights.safetensors; returns its metadata."""
        model, ema, meta = load_weights(weights_path)
        for target, sd, what in ((self.denoiser, model, "model"), (self.ema_state, ema, "EMA")):
            try:
                target.load_state_dict(sd)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else "mismatch"
                raise EdiffError(
                    f"{weights_path}: {what} weights do not fit this model config ({first})"
                ) from None
        return meta

    @property
    def total_step(self) -> int:
        """Global step counted from the root: the parent's steps plus this run's."""
        return self.step_offset + self.global_step

    # ---- training --------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.denoiser.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )

    def setup(self, stage: str) -> None:
        # DeepSpeed's bf16/fp16 mode casts the model, then builds its fp32 master weights from
        # the cast copy: a parent's (or the init's) weights would lose 16 mantissa bits at the
        # hand-off. Keep the fp32 values until on_train_start writes them into the master copy.
        from lightning.pytorch.strategies import DeepSpeedStrategy

        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        if deepspeed and str(self.trainer.precision).startswith(("bf16", "16")):
            self._fp32_init = {
                n: p.detach().float().clone() for n, p in self.denoiser.named_parameters()
            }

    def on_train_start(self) -> None:
        init = self._fp32_init
        if init is not None and self.trainer.ckpt_path is None:  # resumed runs have their own
            restore_fp32(self.denoiser, init)
        self._fp32_init = None
        self.ema_state.attach(self.denoiser)  # after the strategy has set the model up
        self._ema_step = self.global_step
        # A per-rank stream for σ, offset by the step so a resumed run does not replay σ draws.
        self._gen = torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.global_rank * 7919 + self.total_step
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = batch["image"]
        cond = drop_embeddings(Conditioning.from_batch(batch), self.drop, self._gen)
        if self.sr is not None:
            cond = self.sr.condition(cond, x, batch.get("lowres"), self._gen)
        sigma64 = self.node.sample_sigma(x.shape[0], self._gen)
        self.sigma_seen[0] = torch.minimum(self.sigma_seen[0], sigma64.min())
        self.sigma_seen[1] = torch.maximum(self.sigma_seen[1], sigma64.max())
        sigma = sigma64.to(device=x.device, dtype=torch.float32)
        per_sample = edm_loss(self.denoiser, x, sigma, cond)
        loss = per_sample.mean()
        if not torch.isfinite(loss):
            raise EdiffError(
                f"loss is {loss.item()} at step {self.total_step} of {self.node.name} "
                f"(σ in [{sigma.min().item():.4g}, {sigma.max().item():.4g}]); stopped before "
                "updating weights: the last checkpoint is intact (lower the lr or check the data)"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("train/total_step", float(self.total_step), batch_size=x.shape[0])
        skipped = batch.get("skipped")
        if isinstance(skipped, dict):
            for reason, count in skipped.items():
                self.log(f"data/skipped_{reason}", float(count), reduce_fx="sum", batch_size=1)
        return loss

    def ema_decay_at(self, n: int) -> float:
        """Decay after this node's n-th optimiser step (with warmup: min(decay, (1+n)/(10+n)))."""
        return min(self.ema_decay, (1 + n) / (10 + n)) if self.ema_warmup else self.ema_decay

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimiser step right here, not in on_train_batch_end: callbacks
        # (ModelCheckpoint, Requeue) run their batch-end hooks before the module's, and would
        # save an EMA one step behind the weights.
        super().optimizer_step(*args, **kwargs)
        n = self.global_step + 1  # Lightning counts this step once the hook has returned
        if n != self._ema_step:  # once per optimiser step, whatever calls the hook
            self._ema_step = n
            self.ema_state.update(self.ema_decay_at(n))

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called on every rank: assembling a sharded EMA is a collective.
        checkpoint["ema"] = self.ema_state.state_dict()
        checkpoint["sigma_seen"] = self.sigma_seen.clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" not in checkpoint:
            raise EdiffError("checkpoint has no EMA weights (written by an older ediff-train?)")
        self.ema_state.load_state_dict(checkpoint["ema"])
        self.sigma_seen = checkpoint["sigma_seen"].to("cpu", torch.float64).clone()

    # ---- export ----------------------------------------------------------------------------
    def gathered_sigma_seen(self) -> list[float]:
        """[min, max] of σ drawn on all ranks (a collective: every rank must call it)."""
        seen = self.sigma_seen.clone()
        if self.trainer.world_size > 1:
            both = self.all_gather(seen.to(self.device)).cpu()
            seen = torch.stack([both[..., 0].min(), both[..., 1].max()])
        return [float(seen[0]), float(seen[1])]

    def export(
        self, node_path: Any, info: dict[str, Any], sigma_seen: list[float], write: bool = True
    ) -> None:
        """Write the hand-off files for children and the sampler: full fp32 model and EMA weights,
        however the strategy partitioned them. Call on every rank (assembling them may be a
        collective); only a rank with `write` writes."""
        model = full_fp32_state(self.denoiser, self.ema_state.shapes)
        self.ema_state.release()
        ema = self.ema_state.state_dict()
        if not write:
            return
        node = self.node
        lo, hi = node.sigma_interval
        record = {
            "node": node.name,
            "kind": node.kind,
            "parent": node.parent,
            "step": self.total_step,
            "steps_this_run": self.global_step,
            "quantile_interval": list(node.quantile_interval),
            "quantile_pieces": [list(p) for p in node.pieces],
            "sigma_interval": [lo, hi if math.isfinite(hi) else "inf"],
            "sigma_seen": sigma_seen,
            **info,
        }
        meta = {"node": node.name, "step": self.total_step}
        save_weights(
            node_path / "weights.safetensors",
            model,
            ema,
            meta,
        )
        write_json(node_path / "node.json", record)
