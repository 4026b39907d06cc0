"""Assemble and run the training of one node from a resolved Hydra config.

Order matters for 'nothing is lost': every check that can fail (node, parent weights, shard
manifest vs model, strategy) runs before the first step, a node's hand-off files are written only
after its training reached its step count, and the same command resumes an interrupted run from
its newest valid checkpoint (resume.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from ediff_train.core.experts import Node, node_from_config
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.core.sr import NoiseAugment, SRConditioner
from ediff_train.errors import EdiffError
from ediff_train.io.lock import launch_rank_is_zero, training_lock
from ediff_train.metrics.handoff_probe import PROBE_JSON, HandoffProbe, probe_steps
from ediff_train.metrics.loss_by_sigma import SigmaLossMonitor, monitor_steps, sigma_grid
from ediff_train.nn.codec import PixelCodec
from ediff_train.nn.encoder_models import TINY_NAMES
from ediff_train.run.layout import CKPT_DIR, CONFIG, node_dir, parent_weights
from ediff_train.run.optim_state import OPTIMIZER
from ediff_train.run.pretrained import apply_init_from
from ediff_train.training.auto_settings import resolve_auto
from ediff_train.training.continuation import continuation_target, place_continuation
from ediff_train.training.guard import (
    WritesNothingOnRefusal,
    check_nothing_to_do,
    check_resume_fits,
    refuse_restart,
)
from ediff_train.training.guidance_distill import (
    check_guidance_distill,
    distill_on,
    init_guidance_student,
)
from ediff_train.training.handoff import BranchPoints, HandOff, branch_dir
from ediff_train.training.interrupt import Interrupt, Interrupted, report_immediate, stop_signals
from ediff_train.training.latent import check_parent_codec, prepare_codec
from ediff_train.training.lineage import check_own_param, check_parent_param
from ediff_train.training.lora import check_lora, init_lora, lora_on
from ediff_train.training.module import ExpertModule, stream_seed
from ediff_train.training.posthoc import from_train_config
from ediff_train.training.quiet import quiet_logging
from ediff_train.training.resume import (
    AtomicCheckpointIO,
    PeriodicCheckpoint,
    Requeue,
    persistent_run_id,
    resume_checkpoint,
)
from ediff_train.training.settings import validate_train_config
from ediff_train.training.sizing import check_init, init_weights, settle_optimizer
from ediff_train.training.strategies import (
    build_strategy,
    cluster_plugins,
    share_cpu_threads,
    trainer_config,
)


def manifest_expectations(cfg: DictConfig) -> dict[str, Any]:
    """What the shards must hold for this model: the encoder dims the network was built for,
    and the encoder names the `encoders` config stands for (tiny: the tiny encoders; pretrained:
    the open_clip model name, and T5's folder name when `t5_path` is set). None = unchecked."""
    enc = cfg.encoders
    dims = enc.dims
    if enc.get("kind") == "tiny":
        t5_name, clip_name = TINY_NAMES["t5"], TINY_NAMES["clip"]
    else:
        t5_path, clip_name = enc.get("t5_path"), enc.get("clip_model")
        t5_name = Path(str(t5_path)).name if t5_path else None
    return {
        "t5_dim": int(dims.t5),
        "clip_txt_dim": int(dims.clip_txt),
        "clip_pool_dim": int(dims.clip_pool),
        "clip_img_dim": int(dims.clip_img),
        "t5_name": t5_name,
        "clip_name": clip_name,
    }


def build_module(cfg: DictConfig, node: Node, ndir: Path) -> tuple[ExpertModule, Path | None]:
    """The module, initialised from the parent unless this node resumes its own checkpoint (or
    continues another node's: then that node's final checkpoint is its resume point)."""
    m = cfg.module
    net = instantiate(cfg.model)
    cont = cfg.get("continue_from")
    module = ExpertModule(
        net=net,
        node=node,
        lr=m.lr,
        weight_decay=m.weight_decay,
        betas=tuple(m.betas),
        ema_decay=m.ema_decay,
        ema_warmup=m.ema_warmup,
        drop=OmegaConf.to_container(m.drop),
        seed=cfg.seed,
        sr=sr_conditioner(cfg, net),
        compile=m.get("compile", False),
        channels_last=bool(m.get("channels_last", False)),
        finite_check_every=m.get("finite_check_every"),
        lr_schedule=OmegaConf.to_container(m.lr_schedule) if m.get("lr_schedule") else None,
        ema_halflife_images=m.get("ema_halflife_images"),
        ema_rampup_ratio=m.get("ema_rampup_ratio"),
        param=param_from_config(cfg.get("param")),
    )
    if str(cfg.get("sigma_from") or "node") not in ("node", "root"):
        raise EdiffError(f"sigma_from must be node or root, got {cfg.sigma_from!r}")
    if cfg.get("sigma_from") == "root":  # the fair test's control: a child on the full range
        module.sample_node = node_from_config({"name": "E0_0"}, law=node.law)
    if cont:  # the same run going on: its streams, optimiser, EMA and data position
        module.seed = place_continuation(cfg, ndir)
        module.handoff_record["continues"] = str(cont)
        return module, resume_checkpoint(ndir)
    module.seed = stream_seed(int(cfg.seed), node.name)
    resume = resume_checkpoint(ndir)
    if distill_on(cfg):  # a guidance-distilled student of a finished node (guidance_distill.py)
        init_guidance_student(module, cfg, node)
    elif node.parent is not None and lora_on(cfg):  # an adapter over a frozen base (lora.py)
        init_lora(module, cfg, node)
    elif node.parent is not None:
        branch = cfg.get("branch_step")
        pdir = (
            branch_dir(cfg.run_dir, node.parent, cfg.parent_dir, branch)
            if branch is not None
            else cfg.parent_dir
        )
        path = parent_weights(cfg.run_dir, node.parent, pdir)
        plan = check_init(cfg, node, lora=False)  # copy, slice, distill, scratch (sizing.py)
        meta = init_weights(module, cfg, plan, path)  # a resumed run's checkpoint overwrites them
        module.step_offset = int(meta.get("step", 0))
        module.images_offset = int(
            meta.get("images", module.step_offset * int(cfg.data.batch_size))
        )
        module.is_handoff = True
        mode = str((cfg.get("handoff") or {}).get("optimizer", "keep"))
        if mode not in ("keep", "reset"):
            raise EdiffError(f"handoff.optimizer must be keep or reset, got {mode!r}")
        module.handoff_record["from"] = str(path.parent)
        if mode == "keep":
            module.handoff_optimizer = str(path.parent / OPTIMIZER)
        settle_optimizer(module, cfg, plan, int(cfg.steps))
    return module, resume


def sr_conditioner(cfg: DictConfig, net: Any) -> SRConditioner | None:
    """How an SR stage's low-res input is made (sr.py); None for a base stage. A model and data
    that disagree about being super-resolution are refused before any work."""
    low = cfg.data.get("lowres_size")
    if not getattr(net, "is_super_resolution", False):
        if low:
            raise EdiffError(
                f"data.lowres_size={low} is set but model {cfg.model._target_} is "
                "not a super-resolution model (use an SR model, e.g. model=sr_tiny)"
            )
        return None
    if not low:
        raise EdiffError(
            "a super-resolution model needs data.lowres_size (the low-res input's "
            "size), e.g. data.lowres_size=64 for SR256"
        )
    sr = cfg.get("sr") or {}
    degrade = cfg.get("degrade")
    chain = instantiate(degrade) if degrade and "_target_" in degrade else None
    return SRConditioner(
        NoiseAugment(**(sr.get("augment") or {})), chain, int(cfg.data.image_size) // int(low)
    )


def build_logger(cfg: DictConfig, ndir: Path) -> Any:
    """The configured logger; a W&B run keeps one id per node folder across requeues."""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    if str(cfg.logger._target_).endswith("WandbLogger"):
        return instantiate(cfg.logger, id=persistent_run_id(ndir), resume="allow")
    return instantiate(cfg.logger)


def build_distributed(cfg: DictConfig) -> tuple[dict[str, Any], Any]:
    """Trainer kwargs (SLURM layout filled in) and the strategy, checked against each other."""
    kw = trainer_config(cfg)
    strategy = build_strategy(cfg.get("strategy"))
    if getattr(strategy, "requires_cuda", False) and kw.get("accelerator") == "cpu":
        raise EdiffError(
            f"strategy {type(strategy).__name__} runs on GPUs only: use trainer=gpu "
            f"(got trainer.accelerator=cpu)"
        )
    return kw, strategy


def build_trainer(
    cfg: DictConfig,
    ndir: Path,
    callbacks: list[Callback],
    logger: Any,
    distributed: tuple[dict[str, Any], Any],
    max_steps: int | None = None,
) -> L.Trainer:
    """Trainer from the `trainer` and `strategy` groups, the SLURM layout and resume plugins."""
    kw, strategy = distributed
    share_cpu_threads(kw)
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    return L.Trainer(
        **kw,
        strategy=strategy,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        max_steps=int(cfg.steps) if max_steps is None else max_steps,
        logger=logger,
        callbacks=[*callbacks, *extra],
        default_root_dir=str(ndir),
        enable_model_summary=False,
        use_distributed_sampler=False,  # the shard loader splits data by rank itself
    )


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK")


@contextlib.contextmanager
def isolated_job() -> Iterator[None]:
    """One node's fit, leaving nothing behind for the next job of a Hydra sweep.

    Lightning starts the other local ranks by re-running sys.argv; in a sweep that is the whole
    sweep (`-m expert=below,above ...`), so it becomes this job's own overrides. The process group
    and the rendezvous variables of this job are torn down at the end: the next job's ranks are
    new processes (and a gloo group left open may abort the interpreter at exit)."""
    import torch.distributed as dist

    hc = _hydra_config()
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in _DIST_ENV}
    if hc is not None and str(hc.mode) == "RunMode.MULTIRUN":
        sys.argv = [saved_argv[0], *hc.overrides.task]
    try:
        yield
    finally:
        sys.argv = saved_argv
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _hydra_config() -> Any:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


def train_node(cfg: DictConfig) -> Path:
    """Train the configured node; returns its directory. Values are checked before anything is
    written (a refusal leaves the folder as it was: guard.py), and the node's lock is held for
    the whole run (one run per node at a time)."""
    name = str(OmegaConf.select(cfg, "expert.name", default="") or "")
    with WritesNothingOnRefusal(node_dir(cfg.run_dir, name)) as guard:
        return _train_node(cfg, guard)
    return node_dir(cfg.run_dir, name)  # nothing to do (said by the guard)


def _train_node(cfg: DictConfig, guard: WritesNothingOnRefusal) -> Path:
    quiet_logging()  # each Lightning line once; no warnings a user cannot act on
    validate_train_config(cfg)
    resolve_auto(cfg)  # logger and grid size `auto`: decided now, recorded in config.yaml
    param = param_from_config(cfg.get("param"))
    node = node_from_config(cfg.expert, law=param.law)
    check_parent_param(cfg, node, param)
    check_own_param(cfg, node, param)
    apply_init_from(cfg, node)  # a root from a pretrained diffusers folder (run/pretrained.py)
    check_lora(cfg, node)
    check_guidance_distill(cfg, node)  # a student's teacher, model and w range
    check_init(cfg, node, lora=lora_on(cfg))  # a child's net against its parent's (sizing.py)
    codec = prepare_codec(cfg)  # a VAE run: refused here, before the node's folder exists
    check_parent_codec(cfg, node.parent, codec)
    ndir = node_dir(cfg.run_dir, node.name)
    distributed = build_distributed(cfg)
    with training_lock(ndir):
        stops = Interrupt(ndir / CKPT_DIR, stop_signals())  # Ctrl-C, SIGTERM: saved stops
        try:
            return _train_locked(cfg, node, ndir, distributed, codec, guard, stops)
        except Interrupted as e:
            report_immediate(e, ndir / CKPT_DIR, launch_rank_is_zero())
            raise  # not reached: report_immediate exits
        finally:
            stops.restore()


def _train_locked(
    cfg: DictConfig,
    node: Node,
    ndir: Path,
    distributed: tuple[dict[str, Any], Any],
    codec: dict[str, Any] | None,
    guard: WritesNothingOnRefusal,
    stops: Interrupt,
) -> Path:
    """The run itself, under the node's lock."""
    # In a SLURM job we requeue on SIGUSR1; under submitit, submitit owns preemption (SIGUSR2).
    slurm_job = "SLURM_JOB_ID" in os.environ and "SUBMITIT_EXECUTOR" not in os.environ
    requeue = Requeue(ndir / CKPT_DIR) if slurm_job else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module, resume = build_module(cfg, node, ndir)
    check_resume_fits(module, resume, node.name)  # e.g. lora=default over a full-weight node
    max_steps = continuation_target(cfg) if cfg.get("continue_from") else int(cfg.steps)
    check_nothing_to_do(ndir, node.name, max_steps)  # a finished node asked for no more steps
    if resume is None:
        refuse_restart(ndir, node.name)  # never from step 0 over a node that trained
    # the node's own data order (a continuation: the stream it continues)
    # a VAE run's data was built (if it builds itself) with its codec by prepare_codec
    built = {"builder": None} if codec is not None else {}
    data = instantiate(
        cfg.data, expect=manifest_expectations(cfg), seed=module.seed, codec=codec, **built
    )

    ndir.mkdir(parents=True, exist_ok=True)
    info = {"run_dir": str(cfg.run_dir), "data_root": str(cfg.data.root), "config": CONFIG}
    info["codec"] = codec or PixelCodec().spec()
    ckpt = PeriodicCheckpoint(ndir / CKPT_DIR, int(cfg.checkpoint_every))
    callbacks: list[Callback] = [ckpt, HandOff(ndir, info), TQDMProgressBar(refresh_rate=10)]
    posthoc = posthoc_ema_callback(cfg, node, ndir)  # first: the checkpoints save its update
    callbacks[:0] = [posthoc] if posthoc is not None else []
    start = max_steps - int(cfg.steps)  # the global step this run begins at (a continuation's > 0)
    callbacks += [sigma_monitor(cfg, data, ndir, start)] if cfg.get("monitor") else []
    callbacks += [handoff_probe(cfg, data, node, ndir, start)] if probe_on(cfg) else []
    callbacks += [requeue] if requeue else []
    at = sorted(int(x) for x in cfg.get("handoff_at") or ())
    callbacks += [BranchPoints(ndir, at, info)] if at else []
    callbacks += [stops, guard.config_writer(OmegaConf.to_yaml(cfg, resolve=True))]  # last
    logger = build_logger(cfg, ndir)
    trainer = build_trainer(cfg, ndir, callbacks, logger, distributed, max_steps)
    ckpt_path = str(resume) if resume else None
    try:
        with isolated_job():
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        stops.report(trainer.is_global_zero)  # a signal stopped it: one line, exit 128 + signal
        finished = trainer.global_step >= max_steps
        if finished and trainer.is_global_zero and cfg.sample.per_prompt > 0:
            from ediff_train.training.preview import sample_grid  # only a node that makes one

            grid = sample_grid(cfg, module, data)
            log_image = getattr(logger, "log_image", None) if logger else None
            if log_image is not None:
                log_image(key="samples", images=[str(grid)], step=trainer.global_step)
    finally:
        finish_wandb(logger)
    return ndir


def posthoc_ema_callback(cfg: DictConfig, node: Node, ndir: Path) -> Callback | None:
    """EDM2's post-hoc EMA trackers when `posthoc_ema.enabled` (training/posthoc.py)."""
    if not (cfg.get("posthoc_ema") or {}).get("enabled"):
        return None
    return from_train_config(cfg, node, ndir)


def sigma_monitor(cfg: DictConfig, data: Any, ndir: Path, start: int = 0) -> Callback:
    """Held-out loss at a coarse σ grid at the steps `monitor.every` names: "auto" (≥ ~10 points
    whatever the run's length, dense after the start) or every n (metrics/loss_by_sigma.py)."""

    m = cfg.monitor
    every = m.every if m.every == "auto" else int(m.every)
    return SigmaLossMonitor(
        held_out(data, int(m.batches), int(m.batch_size)),
        sigma_grid(int(m.sigmas), float(m.sigma_min), float(m.sigma_max)),
        monitor_steps(int(cfg.steps), every),
        ndir / "loss_by_sigma.csv",
        seed=int(cfg.seed),
        start=start,
    )


def probe_on(cfg: DictConfig) -> bool:
    """The hand-off probe is configured and enabled (it also needs held-out data at run time)."""
    probe = cfg.get("probe")
    return bool(probe) and bool(probe.get("enabled", True))


def handoff_probe(cfg: DictConfig, data: Any, node: Node, ndir: Path, start: int = 0) -> Callback:
    """In-band held-out loss of the raw weights from the hand-off on (metrics/handoff_probe.py);
    warns when a child lost ground. A continuation's step 0 is no hand-off: measured, no warning."""

    p = cfg.probe
    after = int(p.get("after", 3))
    return HandoffProbe(
        node,
        held_out(data, int(p.get("batches", 2)), int(p.get("batch_size", 64))),
        probe_steps(int(cfg.steps), after),
        ndir / PROBE_JSON,
        handoff=node.parent is not None and not cfg.get("continue_from"),
        after=after,
        warn_ratio=float(p.get("warn_ratio", 1.05)),
        seed=int(cfg.seed),
        start=start,
    )


def held_out(data: Any, batches: int, batch_size: int) -> Any:
    """A loader of the data's fixed held-out batches ([] when it names none), called at start."""
    load = getattr(data, "val_batches", None)
    return (lambda: load(batches, batch_size)) if load else list


def finish_wandb(logger: Any) -> None:
    """Close this node's W&B run: the next job of a sweep must not log into it."""
    if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None):
        import wandb

        wandb.finish()
