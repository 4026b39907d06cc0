"""Train one expert node: `python train.py expert=E9_511 run_dir=runs/base steps=50000`
(the same as `ediff-train ...`; the code is in ediff_train/cli/train.py)."""

from ediff_train.cli.train import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
