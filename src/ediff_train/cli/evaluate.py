"""`ediff-evaluate` (= `python evaluate.py`): evaluate nodes or ensembles,
e.g. `ediff-evaluate run_dir=R expert=E0_0 guidance=[1,2,4,8]`.

Under torchrun or srun every rank generates its share of the images; rank 0 scores them."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ediff_train import CONF_DIR
from ediff_train.cli import entry_point, reporting_errors


@hydra.main(config_path=str(CONF_DIR / "evaluate"), config_name="config", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    """The Hydra task: the metric named by `metric=` (evaluation/registry.py)."""
    from ediff_train.evaluation.registry import evaluate

    evaluate(cfg)


def run() -> None:
    """The console script."""
    entry_point(main, register=False)()
