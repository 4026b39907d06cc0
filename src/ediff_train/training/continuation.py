"""A node continued to a higher step target: the same run going on, in a folder of its own.

Fig. 7's baseline is "the root continued to 800K". Trained as a child it would be a restart
(fresh AdamW, fresh EMA ramp, the root's first batches replayed). A continuation instead takes
the continued node's final full checkpoint (weights, AdamW, lr position, EMA, data position) as
its own resume point, keeps that node's σ/noise/data streams and counts the same global step:
E0_0 trained to 500 and continued to 800 is the same run as E0_0 trained to 800 at once. The
continued node's folder is only read, so it still hands off at 500 to its children.

`continue_from=<node dir>` (a schedule stage with `continue: true` sets it); `steps` are trained
beyond the continued node's step, as for a child. Its hyperparameters must be the continued
run's: a changed one is refused, since the result would be neither run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ediff_train.errors import EdiffError
from ediff_train.legacy import rewrite_targets
from ediff_train.run.layout import CKPT_DIR, CONFIG, LAST, NODE_JSON, read_node_json
from ediff_train.training.resume import checkpoint_step

# settings that define the run being continued (anything else may differ: logging, cadence)
SAME = (
    "module",
    "model",
    "encoders",
    "seed",
    "data.batch_size",
    "data.image_size",
    "data.root",
    "data.lowres_size",
    "data.crop_size",
    "handoff",
    "sr",
)


def _source(cfg: DictConfig) -> Path:
    src = Path(str(cfg.continue_from)).expanduser()
    if not (src / NODE_JSON).is_file():
        raise EdiffError(
            f"continue_from={src}: that node has not finished training (no "
            f"{NODE_JSON}); train it first"
        )
    return src


def continuation_target(cfg: DictConfig) -> int:
    """The global step the continuation ends at: the continued node's step + `steps`."""
    return int(read_node_json(_source(cfg))["step"]) + int(cfg.steps)


def _select(cfg: Any, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_same_run(cfg: DictConfig, src: Path) -> None:
    """One line naming the first setting that differs from the continued run's config.yaml."""
    path = src / CONFIG
    if not path.is_file():
        raise EdiffError(f"continue_from={src}: no {CONFIG} to check the settings against")
    old = OmegaConf.load(path)
    rewrite_targets(old)
    for key in SAME:
        a, b = _select(old, key), _select(cfg, key)
        if a != b:
            diff = _first_difference(key, a, b)
            raise EdiffError(
                f"continue_from={src}: {diff}; a continuation keeps the continued "
                "run's settings (train a child instead to change them)"
            )


def _first_difference(key: str, a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(f"{key}.{k}", a.get(k), b.get(k))
    return f"{key} was {a!r} there, is {b!r} here"


def place_continuation(cfg: DictConfig, ndir: Path) -> int:
    """Make the continued node's final checkpoint this run's resume point (unless this run has
    one of its own already: then it resumes itself). Returns the continued run's stream seed."""
    src = _source(cfg)
    check_same_run(cfg, src)
    info = read_node_json(src)
    last = src / CKPT_DIR / LAST
    if checkpoint_step(last) != int(info["step"]):
        raise EdiffError(
            f"continue_from={src}: {last} is not its final checkpoint (step "
            f"{checkpoint_step(last)}, node.json says {info['step']}); rerun that "
            "node's training to finish it"
        )
    mine = ndir / CKPT_DIR
    if not (mine / LAST).exists() and not any(mine.glob("hpc_ckpt_*")):
        mine.mkdir(parents=True, exist_ok=True)
        tmp = mine / f".{LAST}.tmp{os.getpid()}"
        if last.is_dir():  # a DeepSpeed checkpoint folder
            shutil.copytree(last, tmp)
        else:
            shutil.copy2(last, tmp)
        os.replace(tmp, mine / LAST)
    return int(info.get("stream_seed", cfg.seed))
