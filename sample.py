"""Sample from trained experts: `python sample.py run_dir=R expert=E0_0 prompt="the number 3"`
(the same as `ediff-sample ...`; the code is in ediff_train/cli/sample.py)."""

from ediff_train.cli.sample import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
