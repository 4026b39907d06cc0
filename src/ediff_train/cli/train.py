"""`ediff-train` (= `python train.py`): train one expert node,
e.g. `ediff-train expert=E9_511 run_dir=runs/base steps=50000`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ediff_train import CONF_DIR
from ediff_train.cli import entry_point, reporting_errors


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    """The Hydra task; tests call it with a composed config."""
    from ediff_train.training.loop import train_node  # Lightning loads only once argv is valid

    train_node(cfg)


def run() -> None:
    """The console script: check `expert=` and register the tree's nodes, then Hydra."""
    from ediff_train.cli.keys import check_train_keys

    entry_point(main, check_keys=check_train_keys)()
