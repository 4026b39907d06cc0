"""Embed images + captions into a shard set: `python data_prep/embed.py input=DIR output=OUT`
(the same as `ediff-embed ...`; the code is in ediff_train/cli/embed.py)."""

from ediff_train.cli.embed import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
