"""`ediff-schedule`: show, check, submit or run a training schedule."""

from __future__ import annotations

import argparse
import sys

from ediff_train.errors import EdiffError, run_reporting
from ediff_train.experiments.runner import run_main
from ediff_train.experiments.schedule import available, load_schedule


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        return _run(argv[1:])
    p = argparse.ArgumentParser(
        description="Print a training schedule as a tree (or `run NAME ...` to train it here)."
    )
    p.add_argument("name", help=f"one of {', '.join(available())}, or a YAML path")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
    p.add_argument("--no-notes", action="store_true", help="leave out where counts come from")
    args = p.parse_args(argv)
    try:
        schedule = load_schedule(args.name)
        if args.scale != 1.0:
            schedule = schedule.scaled(args.scale)
    except EdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(schedule.tree(notes=not args.no_notes))
    return 0


def _run(argv: list[str]) -> int:

    p = argparse.ArgumentParser(
        prog="ediff-schedule run",
        description="Train every stage of a schedule on this machine, in dependency order; "
        "finished stages are skipped, an interrupted one resumes.",
    )
    p.add_argument("name", help=f"one of {', '.join(available())}, or a YAML path")
    p.add_argument(
        "args",
        nargs="*",
        help="scale=S, run_dir=D, and train.py overrides for every stage (e.g. seed=1 trainer=cpu)",
    )
    p.add_argument("--verbose", action="store_true", help="show each stage's training output")
    args = p.parse_args(argv)
    return run_reporting(lambda: run_main(args.name, args.args, verbose=args.verbose))


if __name__ == "__main__":
    sys.exit(main())
