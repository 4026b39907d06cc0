"""Assemble and run the training of one node from a resolved Hydra config.

Order matters for 'nothing is lost': every check that can fail (node, parent weights, shard
manifest vs model) runs before the first step, and a node's hand-off files are written only
after its training finished.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from ediff_train.checkpoints import CONFIG, last_checkpoint, load_encoders, node_dir, parent_weights
from ediff_train.errors import EdiffError
from ediff_train.experts import Node, node_from_config
from ediff_train.module import ExpertModule
from ediff_train.sampling import embed_prompts, generate, make_grid

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
    """At the end of fit: gather σ bounds and shard usage from all ranks, export on rank 0."""

    def __init__(self, ndir: Path, info: dict[str, Any]) -> None:
        self.ndir, self.info = ndir, info
        self.shards: Counter[str] = Counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.shards.update(batch.get("shard", []))

    def on_train_end(self, trainer: L.Trainer, module: ExpertModule) -> None:
        seen = module.gathered_sigma_seen()
        usage = self.ndir / "data"
        usage.mkdir(parents=True, exist_ok=True)
        (usage / f"rank{trainer.global_rank}.json").write_text(json.dumps(dict(self.shards)))
        if trainer.is_global_zero:
            module.export(self.ndir, self.info, seen)


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
    resume = last_checkpoint(ndir)
    if node.parent is not None:
        path = parent_weights(cfg.run_dir, node.parent, cfg.parent_dir)
        meta = module.init_from(str(path))  # on resume the checkpoint overwrites these weights
        module.step_offset = int(meta.get("step", 0))
    return module, resume


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
        dirpath=ndir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=int(cfg.checkpoint_every),
        save_on_train_epoch_end=False,
    )
    logger = instantiate(cfg.logger) if cfg.get("logger") and "_target_" in cfg.logger else False
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer),
        max_steps=int(cfg.steps),
        logger=logger,
        callbacks=[ckpt, HandOff(ndir, info), TQDMProgressBar(refresh_rate=10)],
        default_root_dir=str(ndir),
        enable_model_summary=False,
        use_distributed_sampler=False,  # the shard loader splits data by rank itself
    )
    ckpt_path = str(resume) if resume else None
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero and cfg.sample.per_prompt > 0:
        grid = sample_grid(cfg, module)
        if logger:
            log_image = getattr(logger, "log_image", None)
            if log_image is not None:
                log_image(key="samples", images=[str(grid)], step=trainer.global_step)
    return ndir


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
