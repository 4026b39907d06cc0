"""A node keeps one parameterisation for life: its parent's, and its own earlier run's.

A child's weights start from its parent's, which predict the parent's target under the parent's
noise law (the tree's quantiles are of that law); a resumed or finished node's checkpoint holds
weights trained under the parameterisation its config.yaml records. Asking for another one is
refused in one line before anything is written (a resumed run rewrites config.yaml, so letting
it through would leave EDM weights filed as flow matching)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ediff_train.core.experts import Node
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.core.parameterisation import spec as param_spec
from ediff_train.errors import EdiffError
from ediff_train.run.adapters import has_handoff
from ediff_train.run.layout import CKPT_DIR, CONFIG, node_dir
from ediff_train.run.weights import load_train_config


def _stored_spec(ndir: Path) -> dict[str, Any]:
    return param_spec(param_from_config(load_train_config(ndir).get("param")))


def check_parent_param(cfg: DictConfig, node: Node, param: Any) -> None:
    """A child trains under its parent's parameterisation (a missing parent is named later)."""
    if node.parent is None:
        return
    pdir = (
        Path(str(cfg.parent_dir)) if cfg.get("parent_dir") else node_dir(cfg.run_dir, node.parent)
    )
    if not (pdir / CONFIG).is_file():
        return  # parent_weights() names a missing parent
    theirs = _stored_spec(pdir)
    if theirs != param_spec(param):
        raise EdiffError(
            f"param: parent {node.parent} was trained as {theirs}, this node asks for "
            f"{param_spec(param)}; a child keeps its parent's parameterisation (train a new root "
            "with the other one)"
        )


def has_trained(ndir: Path) -> bool:
    """The node holds weights from an earlier run: a checkpoint to resume or its hand-off."""
    ckpts = ndir / CKPT_DIR
    return has_handoff(ndir) or (ckpts.is_dir() and any(ckpts.glob("*.ckpt")))


def check_own_param(cfg: DictConfig, node: Node, param: Any) -> None:
    """A node resumed (or relaunched after it finished) keeps the parameterisation it trained
    under; a folder with only a config from a start that wrote no weights is not checked."""
    ndir = node_dir(cfg.run_dir, node.name)
    if not ((ndir / CONFIG).is_file() and has_trained(ndir)):
        return
    theirs = _stored_spec(ndir)
    if theirs != param_spec(param):
        raise EdiffError(
            f"param: {node.name} in {cfg.run_dir} was trained as {theirs}, this run asks for "
            f"{param_spec(param)}; resume it with the same param, or train the other one in "
            "another run_dir"
        )
