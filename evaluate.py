"""Evaluate nodes or ensembles: `python evaluate.py run_dir=R expert=E0_0 guidance=[1,2,4,8]`
(the same as `ediff-evaluate ...`; the code is in ediff_train/cli/evaluate.py)."""

from ediff_train.cli.evaluate import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
