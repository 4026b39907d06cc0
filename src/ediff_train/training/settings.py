"""train.py's settings groups (module, monitor, probe, sr, sample, handoff) with their types,
defaults and valid ranges, in one place (registered as Hydra config groups by
`ediff_train.cli`), plus the few top-level keys; `validate_train_config` checks a composed
config against them before anything is written.

A bad value otherwise surfaces late and obscurely: a negative lr trains away from the data, a
`betas` of 1 divides by zero in Adam's bias correction, a seed outside [0, 2³²) is silently
replaced by a random one (Lightning), `checkpoint_every=0` divides by zero mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.core.settings import boolean, check, count, nested, one_of, optional, real, setting

WHOLE_1 = "a whole number ≥ 1"
POSITIVE = "a finite number > 0"


def _betas(value: Any) -> bool:
    items = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else None
    return (
        items is not None and len(items) == 2 and all(real(lambda x: 0 <= x < 1)(b) for b in items)
    )


def _compile(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and bool(value.strip()))


@dataclass
class LRSchedule:
    """lr × warmup ramp × decay, per optimiser step (core/lr_schedule.py)."""

    # constant | cosine (over the run, to min_factor) | inv_sqrt (EDM2, the tree's steps)
    decay: str = setting(
        "constant", "constant, cosine or inv_sqrt", one_of("constant", "cosine", "inv_sqrt")
    )
    # warmup_* and ref in optimiser steps or in images (global batch)
    unit: str = setting("steps", "steps or images", one_of("steps", "images"))
    warmup_root: float = setting(0, "a number ≥ 0", real(lambda x: x >= 0))  # ramp at a root
    # ramp after every hand-off (with handoff.optimizer=keep the child continues the parent's
    # AdamW; with reset a ramp is what recipes use)
    warmup_handoff: float = setting(0, "a number ≥ 0", real(lambda x: x >= 0))
    min_factor: float = setting(0.0, "a number in [0, 1]", real(lambda x: 0 <= x <= 1))  # cosine
    # inv_sqrt: lr / sqrt(max(t / ref, 1)), t the tree's step (0 = no decay)
    ref: float = setting(0, "a number ≥ 0 (0 = no decay)", real(lambda x: x >= 0))


@dataclass
class Module:
    """ExpertModule (training/module.py); paper values unless noted."""

    lr: float = setting(1e-4, POSITIVE, real(lambda x: x > 0))
    weight_decay: float = setting(0.01, "a finite number ≥ 0", real(lambda x: x >= 0))
    betas: list = setting([0.9, 0.999], "two numbers, each in [0, 1)", _betas)
    lr_schedule: LRSchedule = nested(LRSchedule)
    # EMA half-life in images (EDM's rule); null: per-step ema_decay
    ema_halflife_images: Any = setting(
        500000,
        "null (per-step ema_decay) or a number of images > 0",
        optional(real(lambda x: x > 0)),
    )
    # the half-life ramps as min(halflife, images the tree saw × ratio)
    ema_rampup_ratio: Any = setting(
        0.05, "null (no ramp) or a number > 0", optional(real(lambda x: x > 0))
    )
    # only when ema_halflife_images is null: per-step decay, with warmup
    # min(decay, (1+n)/(10+n)) over this node's own steps
    ema_decay: float = setting(0.9999, "a number in [0, 1]", real(lambda x: 0 <= x <= 1))
    ema_warmup: bool = setting(True, "true or false", boolean)
    drop: dict = setting({"clip_txt": 0.2, "t5": 0.25, "clip_img": 0.9})
    # speed (training/module.py, core/perf.py); none changes what a step computes.
    # torch.compile the denoiser: true (= inductor) or a backend name; a failed compile prints
    # one warning line and the run trains eagerly
    compile: Any = setting(False, "true, false or a torch.compile backend name", _compile)
    # GPU only: NHWC weights and batches for the convolutions; CPU ignores it
    channels_last: bool = setting(False, "true or false", boolean)
    # steps between NaN/Inf checks of the loss; null: every step on CPU (stops before the bad
    # update), trainer.log_every_n_steps on GPU (a check waits for the GPU); checkpoints and
    # hand-offs are always checked first
    finite_check_every: Any = setting(None, "null or a whole number ≥ 1", optional(count(1)))


@dataclass
class SRAugment:
    """Noise-conditioning augmentation of the low-res input: ln σ_aug ~ N(p_mean, p_std²),
    clipped to [sigma_min, sigma_max]."""

    p_mean: float = setting(-3.0, "a finite number", real())  # median σ_aug 0.05 in [-1, 1]
    p_std: float = setting(2.0, POSITIVE, real(lambda x: x > 0))
    sigma_min: float = setting(0.002, POSITIVE, real(lambda x: x > 0))  # ~5 % of draws here
    # ~3 % here: the low-res is mostly noise, the text must carry the image
    sigma_max: float = setting(2.0, POSITIVE, real(lambda x: x > 0))


@dataclass
class SR:
    """Super-resolution stages only (model=sr_*; core/sr.py): the low-res input."""

    augment: SRAugment = nested(SRAugment)
    sample_sigma_aug: float = setting(0.002, "a number ≥ 0", real(lambda x: x >= 0))


@dataclass
class Monitor:
    """Held-out loss at a coarse σ grid, logged and written to <node>/loss_by_sigma.csv."""

    # auto: step 0 (the hand-off weights) and the last, one point per 50 steps between (≤ 10),
    # and 1, 2, 3, 5, 10 from 500 steps on (metrics/loss_by_sigma.py); n: every n steps;
    # 0 = off. Needs held-out data
    every: Any = setting(
        "auto", "auto or a whole number ≥ 0 (0 = off)", lambda v: v == "auto" or count(0)(v)
    )
    sigmas: int = setting(8, WHOLE_1, count(1))  # log-spaced over [sigma_min, sigma_max]
    sigma_min: float = setting(0.002, POSITIVE, real(lambda x: x > 0))
    sigma_max: float = setting(80.0, POSITIVE, real(lambda x: x > 0))
    batches: int = setting(2, WHOLE_1, count(1))  # fixed held-out batches, same every time
    batch_size: int = setting(64, WHOLE_1, count(1))


@dataclass
class Probe:
    """Hand-off probe (metrics/handoff_probe.py): in-band held-out loss of the raw weights at
    step 0, 1, 2, 3, 5, 10, 20, 50, 100, ... and the end, written to <node>/handoff_probe.json;
    a child whose loss after `after` steps exceeds warn_ratio × its value at the hand-off is
    warned about (one stderr line)."""

    enabled: bool = setting(True, "true or false", boolean)
    after: int = setting(3, WHOLE_1, count(1))
    warn_ratio: float = setting(1.05, POSITIVE, real(lambda x: x > 0))
    batches: int = setting(2, WHOLE_1, count(1))  # needs held-out data, like the monitor
    batch_size: int = setting(64, WHOLE_1, count(1))


DIGIT_PROMPTS = [f"the number {i}" for i in range(10)]


@dataclass
class SampleGrid:
    """The grid written (and logged) at the end of training, from EMA weights."""

    prompts: list = setting(DIGIT_PROMPTS)
    # auto: 4 from 200 steps on, else 1 (training/auto_settings.py); 0 = no grid
    per_prompt: Any = setting(
        "auto", "auto or a whole number ≥ 0", lambda v: v == "auto" or count(0)(v)
    )
    steps: int = setting(24, WHOLE_1, count(1))
    guidance: float = setting(2.0, "a finite number", real())


@dataclass
class Handoff:
    """What a child takes from its parent besides the weights and the EMA."""

    # keep: AdamW's moments and step (optimizer.safetensors); reset: a fresh AdamW
    optimizer: str = setting("keep", "keep or reset", one_of("keep", "reset"))


INIT_MODES = ("copy", "slice", "distill", "scratch")


@dataclass
class Init:
    """Where a child's weights start (training/sizing.py; docs/handoff.md, "Sized experts"):
    copy its parent's (same shapes), slice them (a narrower or shallower net of the same class),
    distill the parent's output into any net, or start from scratch. `init=slice` etc. pick one."""

    mode: str = setting("copy", "copy, slice, distill or scratch", one_of(*INIT_MODES))
    # distill: the first steps of the run fit the parent's denoiser output, the rest the data
    distill_steps: int = setting(100, WHOLE_1, count(1))
    # a child whose AdamW starts fresh (distill, scratch, or moments of another shape): the lr
    # ramps over this many steps, unless module.lr_schedule.warmup_handoff sets its own
    warmup: float = setting(20, "a number ≥ 0", real(lambda x: x >= 0))


def _w_range(value: Any) -> bool:
    items = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else None
    if items is None or len(items) != 2 or not all(real(lambda x: x >= 0)(v) for v in items):
        return False
    return float(items[0]) <= float(items[1])


@dataclass
class DistillGuidance:
    """A guidance-distilled student of a finished node (training/guidance_distill.py; docs/
    guidance_distillation.md): it learns D_u + w·(D_c − D_u) of its teacher in one forward."""

    enabled: bool = setting(False, "true or false", boolean)
    # the teacher's run directory; the teacher is <teacher>/<this node>, a finished node
    teacher: Any = setting(None, "null or a run directory", optional(lambda v: bool(str(v))))
    # w ~ uniform[lo, hi] per sample; the sampler warns for a scale outside it
    w: list = setting([1.0, 8.0], "two numbers lo ≤ hi, both ≥ 0", _w_range)
    features: int = setting(32, "an even whole number ≥ 2", lambda v: count(2)(v) and v % 2 == 0)


# config group → its settings class (ediff_train.cli registers them with Hydra)
GROUPS: dict[str, type] = {
    "module": Module,
    "sr": SR,
    "monitor": Monitor,
    "probe": Probe,
    "sample": SampleGrid,
    "handoff": Handoff,
    "init": Init,
    "distill_guidance": DistillGuidance,
}
# groups whose options are named values of one field (`init=slice`): group → (field, values)
NAMED_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {"init": ("mode", INIT_MODES)}


@dataclass
class TopLevel:
    """Top-level keys of conf/train.yaml that are checked here; their defaults live in that file
    (next to the keys a run names, such as run_dir and expert), so none is given here."""

    steps: Any = setting(None, WHOLE_1, count(1))
    seed: Any = setting(None, "a whole number in [0, 4294967295]", count(0, 2**32 - 1))
    checkpoint_every: Any = setting(None, WHOLE_1, count(1))
    expert_guidance: Any = setting(None, "null or a finite number", optional(real()))


@dataclass
class DataBatch:
    """The data group's batch size (each conf/data/*.yaml sets it)."""

    batch_size: Any = setting(None, WHOLE_1, count(1))


def validate_train_config(cfg: DictConfig) -> None:
    """Refuse (EdiffError naming key, value and the valid range) the first bad training value."""
    check(cfg, TopLevel, "")
    for group, schema in GROUPS.items():
        check(OmegaConf.select(cfg, group, default=None), schema, group)
    check(OmegaConf.select(cfg, "data", default=None), DataBatch, "data")
    param_from_config(OmegaConf.select(cfg, "param", default=None))  # shift > 0, a known name
