"""Hyperparameter checks for train.py, in one place and before anything is written.

A bad value otherwise surfaces late and obscurely: a negative lr trains away from the data, a
`betas` of 1 divides by zero in Adam's bias correction, a seed outside [0, 2³²) is silently
replaced by a random one (Lightning), `checkpoint_every=0` divides by zero mid-run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ediff_train.errors import EdiffError

_MISSING = object()


def _number(value: Any) -> float | None:
    """The value as a float if it is a real number (bools and strings are not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _whole(value: Any) -> int | None:
    """The value as an int if it is a whole number (1e3 counts; 2.5 does not), else None."""
    x = _number(value)
    return int(x) if x is not None and math.isfinite(x) and x.is_integer() else None


def _real(test: Callable[[float], bool]) -> Callable[[Any], bool]:
    def ok(value: Any) -> bool:
        x = _number(value)
        return x is not None and math.isfinite(x) and test(x)

    return ok


def _count(low: int, high: int | None = None) -> Callable[[Any], bool]:
    def ok(value: Any) -> bool:
        n = _whole(value)
        return n is not None and n >= low and (high is None or n <= high)

    return ok


# key -> (test, what is valid); keys absent from a config are not checked
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (_count(1), "a whole number ≥ 1"),
    "seed": (_count(0, 2**32 - 1), "a whole number in [0, 4294967295]"),
    "checkpoint_every": (_count(1), "a whole number ≥ 1"),
    "data.batch_size": (_count(1), "a whole number ≥ 1"),
    "module.lr": (_real(lambda x: x > 0), "a finite number > 0"),
    "module.weight_decay": (_real(lambda x: x >= 0), "a finite number ≥ 0"),
    "module.ema_decay": (_real(lambda x: 0 <= x <= 1), "a number in [0, 1]"),
    "sample.per_prompt": (_count(0), "a whole number ≥ 0"),
    "sample.steps": (_count(1), "a whole number ≥ 1"),
    "monitor.every": (
        lambda v: v == "auto" or _count(0)(v),
        "auto or a whole number ≥ 0 (0 = off)",
    ),
    "probe.enabled": (lambda v: isinstance(v, bool), "true or false"),
    "probe.after": (_count(1), "a whole number ≥ 1"),
    "probe.warn_ratio": (_real(lambda x: x > 0), "a finite number > 0"),
    "probe.batches": (_count(1), "a whole number ≥ 1"),
    "probe.batch_size": (_count(1), "a whole number ≥ 1"),
    "module.compile": (
        lambda v: isinstance(v, bool) or (isinstance(v, str) and bool(v.strip())),
        "true, false or a torch.compile backend name",
    ),
    "module.channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "module.finite_check_every": (
        lambda v: v is None or _count(1)(v),
        "null or a whole number ≥ 1",
    ),
    # the hand-off: optimiser, lr schedule, EMA in images
    "handoff.optimizer": (lambda v: v in ("keep", "reset"), "keep or reset"),
    "module.lr_schedule.decay": (
        lambda v: v in ("constant", "cosine", "inv_sqrt"),
        "constant, cosine or inv_sqrt",
    ),
    "module.lr_schedule.unit": (lambda v: v in ("steps", "images"), "steps or images"),
    "module.lr_schedule.warmup_root": (_real(lambda x: x >= 0), "a number ≥ 0"),
    "module.lr_schedule.warmup_handoff": (_real(lambda x: x >= 0), "a number ≥ 0"),
    "module.lr_schedule.min_factor": (_real(lambda x: 0 <= x <= 1), "a number in [0, 1]"),
    "module.lr_schedule.ref": (_real(lambda x: x >= 0), "a number ≥ 0 (0 = no decay)"),
    "module.ema_halflife_images": (
        lambda v: v is None or _real(lambda x: x > 0)(v),
        "null (per-step ema_decay) or a number of images > 0",
    ),
    "module.ema_rampup_ratio": (
        lambda v: v is None or _real(lambda x: x > 0)(v),
        "null (no ramp) or a number > 0",
    ),
}


def validate_train_config(cfg: DictConfig) -> None:
    """Refuse (EdiffError naming key, value and the valid range) the first bad training value."""
    for key, (ok, valid) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING and not ok(value):
            raise EdiffError(f"{key} must be {valid}, got {value!r}")
    betas = OmegaConf.select(cfg, "module.betas", default=_MISSING)
    if betas is _MISSING:
        return
    beta_ok = _real(lambda x: 0 <= x < 1)
    if (
        not isinstance(betas, (list, tuple, ListConfig))
        or len(betas) != 2
        or not all(beta_ok(b) for b in betas)
    ):
        shown = list(betas) if isinstance(betas, ListConfig) else betas
        raise EdiffError(f"module.betas must be two numbers, each in [0, 1), got {shown!r}")
