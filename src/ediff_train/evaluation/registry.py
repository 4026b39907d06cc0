"""evaluate.py's metrics, one table: `metric=NAME` runs the functions listed for NAME, in order.

Each entry names its module and function; a metric's module (and its heavy imports) loads
only when that metric runs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from ediff_train.errors import EdiffError

METRICS: dict[str, tuple[str, ...]] = {
    "images": ("evaluation.images:evaluate_images",),
    "loss_by_sigma": ("evaluation.loss:evaluate_loss_by_sigma",),
    "all": ("evaluation.loss:evaluate_loss_by_sigma", "evaluation.images:evaluate_images"),
    "sr": ("evaluation.sr:evaluate_sr",),
    "cascade": ("evaluation.sr:evaluate_cascade",),
    "attention": ("evaluation.attention:evaluate_attention",),
    "paint": ("evaluation.paint:evaluate_paint",),
    "switch": ("evaluation.switch:evaluate_switch",),
    "ema_sweep": ("evaluation.ema_sweep:evaluate_ema_sweep",),
    "shapes": ("evaluation.shapes:evaluate_shapes",),
}


def resolve(entry: str) -> Callable[[DictConfig], Any]:
    """`module:function` (relative to ediff_train) → the function."""
    module, name = entry.split(":")
    return getattr(importlib.import_module(f"ediff_train.{module}"), name)


def evaluate(cfg: DictConfig) -> None:
    """Run `cfg.metric`; an unknown name is one line listing the known ones."""
    metric = str(cfg.metric)
    if metric not in METRICS:
        raise EdiffError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    for entry in METRICS[metric]:
        resolve(entry)(cfg)
