"""One exception type for user-facing mistakes, so entry points can print one line and exit."""

from __future__ import annotations

from collections.abc import Callable


class EdiffError(Exception):
    """A problem with the user's input or files; its message is shown as a single line."""


def run_reporting(task: Callable[[], int]) -> int:
    """Exit code of a plain (non-Hydra) command: EdiffError is one `error:` line and 2, Ctrl-C
    says how to resume and is 130; the commands that use this all resume where they stopped."""
    import sys

    try:
        return task()
    except EdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
