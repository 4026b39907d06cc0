"""Submit a schedule as dependent SLURM jobs: `python slurm/submit.py schedule=fig7`
(the same as `ediff-submit ...`; the code is in ediff_train/cli/submit.py)."""

from ediff_train.cli.submit import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
