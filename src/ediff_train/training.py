"""Assemble and run the training of one node from a resolved Hydra config.

Order matters for 'nothing is lost': every check that can fail (node, parent weights, shard
manifest vs model, strategy) runs before the first step, a node's hand-off files are written only
after its training reached its step count, and the same command resumes an interrupted run from
its newest valid checkpoint (resume.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from ediff_train.checkpoints import CONFIG, load_encoders, node_dir, parent_weights
from ediff_train.errors import EdiffError
from ediff_train.experts import Node, node_from_config
from ediff_train.module import ExpertModule
from ediff_train.resume import (
    CKPT_DIR,
    AtomicCheckpointIO,
    Requeue,
    persistent_run_id,
    resume_checkpoint,
)
from ediff_train.sampling import embed_prompts, generate, make_grid
from ediff_train.strategies import build_strategy, cluster_plugins, trainer_config

# The EMA copy is kept in eval mode on purpose; Lightning would warn about it at every start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def manifest_expectations(cfg: DictConfig) -> dict[str, Any]:
    """What the shards must hold for this model: the encoder dims the network was built for."""
    dims = cfg.encoders.dims
    return {
        "t5_dim": int(dims.t5),
        "clip_txt_dim": int(dims.clip_txt),
        "clip_pool_dim": int(dims.clip_pool),
        "clip_img_dim": int(dims.clip_img),
    }


class HandOff(Callback):
    """At the end of fit: gather σ bounds and shard usage from all ranks, export on rank 0.

    Only a run that reached its step count hands off; a preempted one leaves its checkpoint."""

    def __init__(self, ndir: Path, info: dict[str, Any]) -> None:
        self.ndir, self.info = ndir, info
        self.shards: Counter[str] = Counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.shards.update(batch.get("shard", []))

    def on_train_end(self, trainer: L.Trainer, module: ExpertModule) -> None:
        if trainer.global_step < (trainer.max_steps or 0):
            return  # stopped early (requeue): not finished, nothing to hand off
        seen = module.gathered_sigma_seen()
        usage = self.ndir / "data"
        usage.mkdir(parents=True, exist_ok=True)
        (usage / f"rank{trainer.global_rank}.json").write_text(json.dumps(dict(self.shards)))
        module.export(self.ndir, self.info, seen, write=trainer.is_global_zero)


def build_module(cfg: DictConfig, node: Node, ndir: Path) -> tuple[ExpertModule, Path | None]:
    """The module, initialised from the parent unless this node resumes its own checkpoint."""
    m = cfg.module
    module = ExpertModule(
        net=instantiate(cfg.model),
        node=node,
        lr=m.lr,
        weight_decay=m.weight_decay,
        betas=tuple(m.betas),
        ema_decay=m.ema_decay,
        ema_warmup=m.ema_warmup,
        drop=OmegaConf.to_container(m.drop),
        seed=cfg.seed,
    )
    resume = resume_checkpoint(ndir)
    if node.parent is not None:
        path = parent_weights(cfg.run_dir, node.parent, cfg.parent_dir)
        meta = module.init_from(str(path))  # on resume the checkpoint overwrites these weights
        module.step_offset = int(meta.get("step", 0))
    return module, resume


def build_logger(cfg: DictConfig, ndir: Path) -> Any:
    """The configured logger; a W&B run keeps one id per node folder across requeues."""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    if str(cfg.logger._target_).endswith("WandbLogger"):
        return instantiate(cfg.logger, id=persistent_run_id(ndir), resume="allow")
    return instantiate(cfg.logger)


def build_trainer(cfg: DictConfig, ndir: Path, callbacks: list[Callback], logger: Any) -> L.Trainer:
    """Trainer from the `trainer` and `strategy` groups, the SLURM layout and resume plugins."""
    kw = trainer_config(cfg)
    strategy = build_strategy(cfg.get("strategy"))
    if getattr(strategy, "requires_cuda", False) and kw.get("accelerator") == "cpu":
        raise EdiffError(
            f"strategy {type(strategy).__name__} runs on GPUs only: use trainer=gpu "
            f"(got trainer.accelerator=cpu)"
        )
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    return L.Trainer(
        **kw,
        strategy=strategy,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        max_steps=int(cfg.steps),
        logger=logger,
        callbacks=[*callbacks, *extra],
        default_root_dir=str(ndir),
        enable_model_summary=False,
        use_distributed_sampler=False,  # the shard loader splits data by rank itself
    )


@contextlib.contextmanager
def single_run_argv() -> Iterator[None]:
    """Inside a Hydra multirun, make sys.argv this job's own command line.

    Lightning starts the other local ranks by re-running sys.argv; in a sweep that would be the
    whole sweep (`-m expert=below,above ...`), so each rank would train the wrong nodes."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get() if HydraConfig.initialized() else None
    except ImportError:
        hc = None
    if hc is None or hc.mode != RunMode.MULTIRUN:
        yield
        return
    saved = sys.argv
    sys.argv = [saved[0], *hc.overrides.task]
    try:
        yield
    finally:
        sys.argv = saved


def train_node(cfg: DictConfig) -> Path:
    """Train the configured node; returns its directory."""
    node = node_from_config(cfg.expert)
    ndir = node_dir(cfg.run_dir, node.name)
    if int(cfg.steps) < 1:
        raise EdiffError(f"steps must be ≥ 1, got {cfg.steps}")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module, resume = build_module(cfg, node, ndir)
    data = instantiate(cfg.data, expect=manifest_expectations(cfg))

    ndir.mkdir(parents=True, exist_ok=True)
    (ndir / CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {"run_dir": str(cfg.run_dir), "data_root": str(cfg.data.root), "config": CONFIG}
    ckpt = ModelCheckpoint(
        dirpath=ndir / CKPT_DIR,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=int(cfg.checkpoint_every),
        save_on_train_epoch_end=False,
    )
    callbacks: list[Callback] = [ckpt, HandOff(ndir, info), TQDMProgressBar(refresh_rate=10)]
    # Under SLURM we requeue on SIGUSR1; under submitit, submitit owns preemption (SIGUSR2).
    slurm = bool(cluster_plugins()) and "SUBMITIT_EXECUTOR" not in os.environ
    requeue = Requeue(ndir / CKPT_DIR) if slurm else None
    callbacks += [requeue] if requeue else []
    logger = build_logger(cfg, ndir)
    trainer = build_trainer(cfg, ndir, callbacks, logger)
    ckpt_path = str(resume) if resume else None
    try:
        with single_run_argv():
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        finished = trainer.global_step >= int(cfg.steps)
        if finished and trainer.is_global_zero and cfg.sample.per_prompt > 0:
            grid = sample_grid(cfg, module)
            log_image = getattr(logger, "log_image", None) if logger else None
            if log_image is not None:
                log_image(key="samples", images=[str(grid)], step=trainer.global_step)
    finally:
        finish_wandb(logger)
    return ndir


def finish_wandb(logger: Any) -> None:
    """Close this node's W&B run: the next job of a sweep must not log into it."""
    if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None):
        import wandb

        wandb.finish()


def sample_grid(cfg: DictConfig, module: ExpertModule) -> Path:
    """A grid from the EMA weights for the configured prompts (rows: prompts)."""
    from PIL import Image

    encoders = load_encoders(cfg)
    prompts = [p for p in cfg.sample.prompts for _ in range(int(cfg.sample.per_prompt))]
    cond = embed_prompts(encoders, prompts)
    denoiser = module.ema.to("cpu").float()
    images = generate(
        denoiser,
        cond,
        image_size=int(cfg.data.image_size),
        steps=int(cfg.sample.steps),
        guidance=float(cfg.sample.guidance),
        seed=int(cfg.seed),
    )
    path = node_dir(cfg.run_dir, module.node.name) / "samples.png"
    Image.fromarray(make_grid(images, upscale=4)).save(path)
    return path
