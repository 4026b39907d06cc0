"""Settings that default to `auto`, decided once at the start of a run so that config.yaml records
what was used (issue 37: a short node should not be mostly start-up and instruments).

- `logger: auto`: W&B where this machine is set up for it, else CSV. W&B offline costs a
  10-step CPU node ~9 s (its start, its summary) and writes a run nobody will sync on a machine
  without an account; where a user has set W&B up, it is what they expect.
- `sample.per_prompt: auto`: the end-of-training grid with 4 images per prompt from 200 steps on,
  1 below (a smoke node still shows each prompt's row, at a quarter of the sampling)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict


def wandb_configured(env: dict[str, str] | None = None, home: Path | None = None) -> bool:
    """True when WANDB_MODE or WANDB_API_KEY is set, or `wandb login` stored a key."""
    env = dict(os.environ if env is None else env)
    if env.get("WANDB_MODE") or env.get("WANDB_API_KEY"):
        return True
    path = Path(env.get("NETRC") or (home or Path.home()) / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


GRID_FULL_FROM = 200  # steps from which the grid has GRID_FULL images per prompt, else 1
GRID_FULL = 4


def resolve_auto(cfg: DictConfig) -> None:
    """Every `auto` setting of a training config replaced by its value (in place)."""
    resolve_logger(cfg)
    if str(cfg.sample.get("per_prompt")) == "auto":
        with open_dict(cfg):
            cfg.sample.per_prompt = GRID_FULL if int(cfg.steps) >= GRID_FULL_FROM else 1


def resolve_logger(cfg: DictConfig, configured: bool | None = None) -> Any:
    """Replace an `auto` logger block by its W&B or CSV choice (in place); the chosen block."""
    block = cfg.get("logger")
    if not block or block.get("kind") != "auto":
        return block
    use_wandb = wandb_configured() if configured is None else configured
    with open_dict(cfg):
        cfg.logger = block.wandb if use_wandb else block.csv
    return cfg.logger
