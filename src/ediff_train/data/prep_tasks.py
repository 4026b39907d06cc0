"""The embedding job's tasks and reports (data/prep.py): which share of the units a process
takes, what it did, and the small helpers the job uses to compare settings and pin threads."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ediff_train.errors import EdiffError

log = logging.getLogger("ediff_train.data.prep")


@dataclass
class TaskReport:
    task_id: int
    num_tasks: int
    units_total: int
    units_mine: int
    done_before: int = 0
    embedded: int = 0
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    units_complete: int = 0
    manifest: Path | str | None = None

    def summary(self) -> str:
        skips = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()) if n) or "none"
        lines = [
            f"task {self.task_id}/{self.num_tasks}: {self.embedded} of my "
            f"{self.units_mine} units embedded now, {self.done_before} were done before; "
            f"{self.written} samples written, skipped: {skips}"
        ]
        if self.manifest is not None:
            lines.append(f"all {self.units_total} units done: {self.manifest}")
        else:
            lines.append(
                f"{self.units_complete} of {self.units_total} units done; manifest.json "
                "is written when all are (re-run any task to finish)"
            )
        return "\n".join(lines)


def resolve_task(
    task_id: int | None, num_tasks: int | None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """Explicit values win, then SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, then 0 / 1."""
    env = os.environ if env is None else env
    if task_id is None:
        task_id = int(env.get("SLURM_ARRAY_TASK_ID", 0))
    if num_tasks is None:
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise EdiffError(
            f"task_id {task_id} is not in [0, num_tasks={num_tasks}); SLURM arrays "
            "must be numbered from 0 (--array=0-N), else set task_id and num_tasks"
        )
    return task_id, num_tasks


class _Skips(Counter):
    """Skip counts; the first few of each reason are logged with their key."""

    def __call__(self, reason: str, key: str, detail: str = "") -> None:
        self[reason] += 1
        if self[reason] <= 3:
            log.warning("skipped %s: %s%s", key, reason, f" ({detail})" if detail else "")


def _diff(want: Any, have: Any, prefix: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(have, dict):
        return [
            d
            for k in sorted(want.keys() | have.keys())
            for d in _diff(want.get(k), have.get(k), f"{prefix}{k}.")
        ]
    return [] if want == have else [prefix.rstrip(".")]


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
