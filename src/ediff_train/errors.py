"""One exception type for user-facing mistakes, so entry points can print one line and exit."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path


class EdiffError(Exception):
    """A problem with the user's input or files; its message is shown as a single line."""


class DiskFull(EdiffError):
    """A write ran out of space: said in one line naming the file, since the fix (free space,
    rerun) is the user's and a traceback from deep inside torch.save would hide it."""


# Writers that do their own I/O in C++/Rust (safetensors) lose the errno but keep its text.
_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-space failure (ENOSPC, or EDQUOT: the quota is the disk)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return not isinstance(exc, EdiffError) and any(t in str(exc) for t in _FULL_TEXT)


def _free(path: Path) -> str:
    for folder in path.parents:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        return f"{free} bytes" if free < 1024**2 else f"{free / 1024**2:.1f} MiB"
    return "unknown space"


def disk_full(path: str | os.PathLike | None, exc: BaseException | None = None) -> DiskFull:
    """The one-line error for a write to `path` that found the disk full."""
    code = "EDQUOT" if isinstance(exc, OSError) and exc.errno == errno.EDQUOT else "ENOSPC"
    where = Path(path) if path else None
    left = f" ({_free(where)} free there)" if where else ""
    return DiskFull(
        f"disk full ({code}) while writing {where or 'a file'}{left}: free space and "
        "run the same command again to resume from the last complete checkpoint"
    )


def user_error(exc: BaseException) -> EdiffError | None:
    """The EdiffError behind `exc` (itself or a `raise ... from` cause: Hydra's instantiate wraps),
    or a disk-full error for an out-of-space error in that chain; None otherwise."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, EdiffError):
            return cur
        if is_disk_full(cur):
            return disk_full(getattr(cur, "filename", None), cur)
        cur = cur.__cause__
    return None


def run_reporting(task: Callable[[], int]) -> int:
    """Exit code of a plain (non-Hydra) command: EdiffError (or a full disk) is one `error:` line
    and 2, Ctrl-C says how to resume and is 130; the commands that use this all resume where
    they stopped."""
    import sys

    try:
        return task()
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
