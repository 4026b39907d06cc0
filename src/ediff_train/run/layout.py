"""The run directory's layout, named in one place: one folder per node holding
weights, node.json, the resolved config and Lightning checkpoints (docs/design.md §5)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ediff_train.errors import EdiffError

WEIGHTS = "weights.safetensors"  # the hand-off file: EMA and raw weights, with metadata
NODE_JSON = "node.json"  # what the node is and how it was trained
CONFIG = "config.yaml"  # the resolved training config
CKPT_DIR = "checkpoints"  # Lightning checkpoints (training/resume.py)
LAST = "last.ckpt"


def node_dir(run_dir: str | os.PathLike, node: str) -> Path:
    """A node's folder: run_dir/E{level}_{index} (or the baseline's name)."""
    return Path(run_dir) / node


def read_node_json(ndir: str | os.PathLike) -> dict[str, Any]:
    """node.json of a finished node; a missing one is an error naming the path."""
    path = Path(ndir) / NODE_JSON
    if not path.is_file():
        raise EdiffError(f"node info not found: {path} does not exist")
    return json.loads(path.read_text())


def parent_weights(run_dir: str | os.PathLike, parent: str, parent_dir: str | None = None) -> Path:
    """The parent's hand-off file; a missing one is an error naming the path."""
    ndir = Path(parent_dir) if parent_dir else node_dir(run_dir, parent)
    path = ndir / WEIGHTS
    if not path.is_file():
        raise EdiffError(
            f"parent {parent} has not finished training: {path} does not exist "
            f"(train it first: python train.py expert={parent} run_dir={run_dir})"
        )
    return path
