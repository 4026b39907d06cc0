"""Train one expert node: `python train.py expert=E9_511 run_dir=runs/base steps=50000`."""

import hydra
from omegaconf import DictConfig

from ediff_train.cli import entry_point, reporting_errors


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    from ediff_train.training import train_node  # heavy imports only when training

    train_node(cfg)


if __name__ == "__main__":
    entry_point(main)()
