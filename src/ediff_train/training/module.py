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
import sys
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ediff_train.core import boundaries
from ediff_train.core.conditioning import DEFAULT_DROP, Conditioning, drop_embeddings
from ediff_train.core.edm import EDMPrecond, edm_loss
from ediff_train.core.ema import EMA, full_fp32_state, restore_fp32
from ediff_train.core.experts import Node
from ediff_train.core.lr_schedule import LRSchedule, to_steps
from ediff_train.core.parameterisation import EDM
from ediff_train.core.parameterisation import spec as param_spec
from ediff_train.core.perf import CompiledDenoiser, adamw, clip_gradients, is_fused, to_device
from ediff_train.core.sr import SRConditioner
from ediff_train.errors import EdiffError
from ediff_train.io.files import write_json
from ediff_train.run.layout import NODE_JSON, WEIGHTS
from ediff_train.run.optim_state import OPTIMIZER, gather_state, hand_on, save_state
from ediff_train.run.weights import load_weights, save_weights
from ediff_train.training.sizing import init_summary


def _json_safe(value: Any) -> Any:
    """±∞ as the strings "inf"/"-inf" (node.json is strict JSON)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def stream_seed(seed: int, node: str) -> int:
    """The seed of a node's own σ, noise and data streams: children never replay their parent's
    batches, and siblings never share σ or dropout draws. The root keeps the plain seed."""
    return int(seed) if node == "E0_0" else int(seed) * 1_000_003 + zlib.crc32(node.encode())


class ExpertModule(L.LightningModule):
    """One node of the expert tree: the parameterisation's loss with σ ~ p(σ | node), AdamW, EMA."""

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
        compile: bool | str = False,
        channels_last: bool = False,
        finite_check_every: int | None = None,
        lr_schedule: dict[str, Any] | None = None,
        ema_halflife_images: float | None = None,
        ema_rampup_ratio: float | None = 0.05,
        handoff_optimizer: str | None = None,
        param: Any = None,
    ) -> None:
        super().__init__()
        self.denoiser = EDMPrecond(net, param=param)  # param: EDM, flow matching, VP (None: EDM)
        self.ema_state = EMA(self.denoiser)  # a plain attribute: see the module docstring
        self.node = node
        self.sample_node = node  # whose σ law the run draws from (sigma_from=root: the control)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.ema_decay, self.ema_warmup = ema_decay, ema_warmup
        self.drop = dict(DEFAULT_DROP if drop is None else drop)
        self.step_offset = step_offset
        self.images_offset = 0  # images the tree had seen when this run started (the parent's)
        self.seed = seed  # the node's stream seed (stream_seed): σ, noise and dropout draws
        self.is_handoff = False  # a child's run (warmup_handoff), not a root's or a continuation's
        self.lr_schedule = dict(lr_schedule or {})
        self.ema_halflife_images = ema_halflife_images
        self.ema_rampup_ratio = ema_rampup_ratio
        self.handoff_optimizer = handoff_optimizer  # parent's optimizer.safetensors to start from
        self.handoff_record: dict[str, Any] = {}
        # sized experts (training/sizing.py): node.json's `init`, the slice of the parent's AdamW
        # moments, and the distillation phase of init=distill
        self.init_record: dict[str, Any] = {}
        self.optimizer_transform: Any = None
        self.distiller: Any = None
        self.lora: Any = None  # training/lora.py: this node is an adapter over a frozen base
        self.images_per_step = 1  # global batch: set in setup from the data and the strategy
        self.sr = sr  # super-resolution stages: makes the low-res conditioning (sr.py)
        # [min, max] of σ drawn in this node's run (kept in the checkpoint, on CPU, float64).
        self.sigma_seen = torch.tensor([math.inf, -math.inf], dtype=torch.float64)
        self._gen: torch.Generator | None = None
        self._noise_gen: torch.Generator | None = None
        self._ema_step = -1  # global step of the last EMA update (once per optimiser step)
        self._fp32_init: dict[str, Tensor] | None = None
        # speed switches (perf.py): compile backend (True = inductor), NHWC on CUDA
        self.compile_backend: str | None = "inductor" if compile is True else (compile or None)
        self.channels_last = bool(channels_last)
        self._compiled: CompiledDenoiser | None = None
        self._nhwc = False  # channels_last and the run is on CUDA (decided in setup)
        self.finite_check_every = finite_check_every
        # deferred NaN/Inf check (see _check_finite): device flag, first and last step it covers
        self._pending: tuple[Tensor, int, int] | None = None

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

    @property
    def images_seen(self) -> int:
        """Training images the tree has seen up to this run's current step (all ranks)."""
        return self.images_offset + self.global_step * self.images_per_step

    def schedule(self) -> LRSchedule:
        """This run's lr schedule: warmup of a root or of a hand-off, then the decay."""
        c = self.lr_schedule
        unit = str(c.get("unit", "steps"))
        warm = c.get("warmup_handoff") if self.is_handoff else c.get("warmup_root")
        total = int(self.trainer.max_steps) if self._trainer is not None else 1
        return LRSchedule(
            decay=str(c.get("decay", "constant")),
            warmup=to_steps(warm, unit, self.images_per_step),
            total=max(total, 1),
            offset=self.step_offset,
            min_factor=float(c.get("min_factor", 0.0)),
            ref=to_steps(c.get("ref", 0), unit, self.images_per_step),
        )

    # ---- training --------------------------------------------------------------------------
    def _deepspeed(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def configure_optimizers(self) -> dict[str, Any]:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        opt = adamw(
            [p for p in self.denoiser.parameters() if p.requires_grad],  # a LoRA base is frozen
            self.lr,
            self.betas,
            self.weight_decay,
            fusable=not self._deepspeed() and scaler is None,
        )
        if is_fused(opt):
            # Lightning refuses to clip for a fused optimiser (perf.clip_gradients): the hook is
            # replaced on this instance only, as a class override would make DeepSpeed warn.
            self.configure_gradient_clipping = self.clip_fused  # type: ignore[method-assign]
        schedule = self.schedule()
        # a closure, not the schedule object: LambdaLR would store an object's fields in the
        # checkpoint and a resumed run would keep them; only the step position is stored
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: schedule.factor(n))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def clip_fused(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's configure_gradient_clipping for a fused AdamW (no GradScaler)."""
        if gradient_clip_val:
            params = (p for g in optimizer.param_groups for p in g["params"])
            clip_gradients(params, float(gradient_clip_val), gradient_clip_algorithm or "norm")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.images_per_step = (
            int(getattr(dm, "batch_size", 1) or 1)
            * self.trainer.world_size
            * int(self.trainer.accumulate_grad_batches or 1)
        )
        # channels_last before the strategy moves the model (`.to(device)` keeps the layout);
        # on CPU it is left off: the CPU path stays as it was.
        self._nhwc = self.channels_last and self.trainer.strategy.root_device.type == "cuda"
        if self._nhwc:
            self.denoiser.to(memory_format=torch.channels_last)
        # DeepSpeed's bf16/fp16 mode casts the model, then builds its fp32 master weights from
        # the cast copy: a parent's (or the init's) weights would lose 16 mantissa bits at the
        # hand-off. Keep the fp32 values until on_train_start writes them into the master copy.
        deepspeed = self._deepspeed()
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
        # σ/dropout draws on the host, noise on the model's device; both re-seeded every step
        # from (stream, rank, tree step), so a resumed or continued run draws what an
        # uninterrupted one would, and no generator state needs saving per rank
        if self.trainer.ckpt_path is None and self.handoff_optimizer is not None:
            path = Path(self.handoff_optimizer)
            self.handoff_record["optimizer"] = hand_on(self, path, self.optimizer_transform)
        elif self.trainer.ckpt_path is None and self.step_offset and self.lora is None:
            self.handoff_record["optimizer"] = "reset (handoff.optimizer=reset)"
        self._compiled = self._compile()
        if self.distiller is not None:
            self.distiller.to(self.device)

    def _seed_step(self, device: torch.device) -> None:
        if self._gen is None:
            self._gen = torch.Generator()
        if self._noise_gen is None or self._noise_gen.device != device:
            self._noise_gen = torch.Generator(device=device)
        base = self.seed * 1_000_003 + self.global_rank * 7919 + self.total_step * 104_729
        self._gen.manual_seed(base % (2**62))
        self._noise_gen.manual_seed((base + 1) % (2**62))

    def _compile(self) -> CompiledDenoiser | None:
        """The compiled denoiser when asked for, after the strategy set the model up."""
        if self.compile_backend is None:
            return None
        if getattr(self.trainer.strategy, "zero_stage_3", False):
            print(
                "warning: module.compile is not used under DeepSpeed ZeRO-3 (its parameters are "
                "gathered by hooks inside the forward): training eagerly",
                file=sys.stderr,
            )
            return None
        return CompiledDenoiser(self.denoiser, self.compile_backend)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = batch["image"]
        if self._nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        self._seed_step(x.device)
        cond = drop_embeddings(Conditioning.from_batch(batch), self.drop, self._gen)
        if self.sr is not None:
            cond = self.sr.condition(cond, x, batch.get("lowres"), self._gen)
        # σ is drawn and bookkept on the host (reproducible, and no GPU value is ever read)
        sigma64 = self.sample_node.sample_sigma(x.shape[0], self._gen)
        self.sigma_seen[0] = torch.minimum(self.sigma_seen[0], sigma64.min())
        self.sigma_seen[1] = torch.maximum(self.sigma_seen[1], sigma64.max())
        sigma = to_device(sigma64.to(torch.float32), x.device)
        noise = torch.randn(x.shape, generator=self._noise_gen, device=x.device, dtype=x.dtype)
        student = self._compiled or self.denoiser
        if self.distiller is not None and self.distiller.active(self.global_step):
            per_sample = self.distiller.loss(
                student, x, sigma, cond, noise, self.denoiser.loss_weight
            )  # init=distill: the parent's output is the target first (training/distill.py)
        else:
            per_sample = edm_loss(
                student, x, sigma, cond, noise=noise, weight=self.denoiser.loss_weight
            )
        loss = per_sample.mean()
        self._check_finite(loss, sigma64)
        n = x.shape[0]
        # host numbers are logged as host tensors: a Python float would be copied to the GPU
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/total_step", torch.tensor(float(self.total_step)), batch_size=n)
        if self._trainer is not None and self.trainer.optimizers:  # the effective lr, logged
            lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            self.log("train/lr", torch.tensor(lr), batch_size=n)
        skipped = batch.get("skipped")
        if isinstance(skipped, dict):
            for reason, count in skipped.items():
                self.log(
                    f"data/skipped_{reason}",
                    torch.tensor(float(count)),
                    reduce_fx="sum",
                    batch_size=1,
                )
        return loss

    # ---- NaN/Inf -----------------------------------------------------------------------------
    def _check_every(self, loss: Tensor) -> int:
        if self.finite_check_every is not None:
            return int(self.finite_check_every)
        if loss.device.type == "cpu":
            return 1
        return int(getattr(self._trainer, "log_every_n_steps", 50) or 50)

    def _check_finite(self, loss: Tensor, sigma64: Tensor) -> None:
        """Stop on a NaN/Inf loss. Checked every step (the CPU default) it stops before this
        step's update, the previous weights kept. Reading a GPU loss makes the host wait for the
        forward, so on a GPU the flag stays on the device and is read every `finite_check_every`
        steps (default: the trainer's log_every_n_steps) and before any checkpoint or hand-off
        is written: nothing saved ever holds weights trained on a bad loss."""
        every = self._check_every(loss)
        if every <= 1:
            if not torch.isfinite(loss):
                raise EdiffError(
                    f"loss is {loss.item()} at step {self.total_step} of {self.node.name} (σ in "
                    f"[{float(sigma64.min()):.4g}, {float(sigma64.max()):.4g}]); stopped before "
                    "updating weights: the last checkpoint is intact (lower the lr or check the "
                    "data)"
                )
            return
        bad = ~torch.isfinite(loss.detach())
        if self._pending is None:
            self._pending = (bad, self.total_step, self.total_step)
        else:
            self._pending = (self._pending[0] | bad, self._pending[1], self.total_step)
        if (self.global_step + 1) % every == 0:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        """Read the deferred NaN/Inf flag (waits for the GPU; a collective on several ranks, so
        every rank calls it at the same point) and stop if any rank saw a bad loss."""
        if self._pending is None:
            return
        bad, first, last = self._pending
        flag = bad.float()
        if self._trainer is not None and self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="max")
        self._pending = None
        if bool(flag):
            where = f"step {first}" if first == last else f"a step in {first}–{last}"
            raise EdiffError(
                f"loss was not finite at {where} of {self.node.name} (checked every "
                f"{self._check_every(bad)} steps: module.finite_check_every); stopped before "
                "writing a checkpoint: the last one is intact (lower the lr or check the data)"
            )

    def ema_decay_at(self, n: int) -> float:
        """Decay after this node's n-th optimiser step.

        With a half-life in images (EDM's rule, the default): the tree has seen `images` after
        this step; the half-life ramps up as min(halflife, images·rampup_ratio) and the decay is
        0.5^(batch / half-life), so a short child continues its parent's window instead of
        restarting it. Otherwise the per-step decay, with the warmup min(decay, (1+n)/(10+n))
        over this node's own steps."""
        if self.ema_halflife_images is not None:
            images = self.images_offset + n * self.images_per_step
            half = float(self.ema_halflife_images)
            if self.ema_rampup_ratio is not None:
                half = min(half, images * float(self.ema_rampup_ratio))
            return 0.5 ** (self.images_per_step / max(half, 1e-8))
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
        # Called on every rank: assembling a sharded EMA is a collective, and so is the check.
        self.raise_if_nonfinite()  # a deferred NaN/Inf check never lets bad weights be saved
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
        self.raise_if_nonfinite()
        model = full_fp32_state(self.denoiser, self.ema_state.shapes)
        optim = (
            gather_state(self.denoiser, self.trainer.optimizers[0])
            if self.trainer.optimizers
            else None
        )  # a collective under ZeRO, so before `write` is looked at
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
            "images": self.images_seen,
            "stream_seed": self.seed,
            "lr_schedule": self.schedule().record(self.lr),
            "ema": self.ema_record(),
            "handoff": dict(self.handoff_record),
            **({"init": init_summary(self)} if self.init_record else {}),
            "quantile_interval": list(node.quantile_interval),
            "quantile_pieces": [list(p) for p in node.pieces],
            "sigma_interval": [lo, hi if math.isfinite(hi) else "inf"],
            "param": param_spec(self.param),
            "boundaries": _json_safe(
                boundaries.interval(lo, hi, getattr(self.param, "shift", 1.0))
            ),
            "sigma_seen": sigma_seen,
            **info,
        }
        meta = {"node": node.name, "step": self.total_step, "images": self.images_seen}
        if optim is not None:
            save_state(node_path / OPTIMIZER, optim, self.trainer.world_size)
        if self.lora is not None:  # peft's adapter files instead of full weights (lora.py)
            record["lora"] = self.lora.save(node_path, model, ema, meta)
        else:
            save_weights(node_path / WEIGHTS, model, ema, meta)
        write_json(node_path / NODE_JSON, record)

    @property
    def param(self) -> Any:
        """The parameterisation this node trains under (EDM when none was given)."""
        return self.denoiser.param or EDM()

    @property
    def param_shift(self) -> float:
        return float(getattr(self.param, "shift", 1.0))

    def ema_record(self) -> dict[str, Any]:
        """The EMA this run used, in numbers: its rule and its half-life (in images and in this
        run's steps) at the run's last step."""
        n = self.global_step
        beta = self.ema_decay_at(n) if n else None
        half_steps = (math.log(0.5) / math.log(beta)) if beta and 0 < beta < 1 else None
        rule = "halflife_images" if self.ema_halflife_images is not None else "per_step_decay"
        return {
            "rule": rule,
            "halflife_images": self.ema_halflife_images,
            "rampup_ratio": self.ema_rampup_ratio,
            "decay": self.ema_decay,
            "beta_at_end": beta,
            "halflife_steps_at_end": half_steps,
            "halflife_images_at_end": None
            if half_steps is None
            else half_steps * self.images_per_step,
        }
