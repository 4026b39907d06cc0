"""Run a schedule on one machine: `ediff-schedule run fig7_toy`.

The local twin of `slurm/submit.py`: every stage becomes one `train.py` process, started only
after its parent's finished (afterok), in the schedule's dependency order. A stage whose
node.json already reaches its target global step is skipped; a stage that was interrupted
resumes from its own checkpoint (train.py does that by itself, as under a SLURM requeue). A
stage that fails leaves its descendants unrun, like a SLURM chain's DependencyNeverSatisfied,
while independent branches go on; the runner then exits non-zero naming the failed stages.

Each stage's output goes to `run_dir/<stage>/train.log` (appended across attempts); the runner
prints one line as a stage starts and one as it ends. Children die with the runner (Linux
PR_SET_PDEATHSIG), so a killed runner never leaves a stage training behind it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ediff_train import REPO
from ediff_train.errors import EdiffError
from ediff_train.experiments.schedule import Schedule, Stage, load_schedule
from ediff_train.run.layout import CKPT_DIR, NODE_JSON, node_dir

TRAIN_PY = REPO / "train.py"
LOG = "train.log"


def done_step(run_dir: Path, stage: Stage) -> int | None:
    """The global step a stage's node.json records (written once training has finished)."""
    info = node_dir(run_dir, stage.name) / NODE_JSON
    if not info.is_file():
        return None
    try:
        step = json.loads(info.read_text()).get("step")
    except (OSError, ValueError):
        return None
    return int(step) if isinstance(step, int) else None


def train_command(
    schedule: Schedule,
    stage: Stage,
    run_dir: Path,
    extra: Sequence[str] = (),
    python: str | None = None,
) -> list[str]:
    """`python train.py ...` for one stage: node, run_dir, steps, then the schedule's overrides,
    the stage's and the caller's (last wins), as the SLURM jobs get them."""
    return [
        python or sys.executable,
        str(TRAIN_PY),
        *stage.expert_args(),
        f"run_dir={run_dir}",
        f"steps={stage.steps}",
        f"experiment={schedule.name}",
        *schedule.overrides,
        *schedule.stage_overrides(stage),
        *stage.overrides,
        *extra,
    ]


@dataclass
class Outcome:
    stage: str
    status: str  # skipped | trained | failed | blocked
    seconds: float = 0.0
    step: int | None = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_stage(cmd: list[str], log: Path, verbose: bool) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        fh.flush()
        out = None if verbose else fh
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None, preexec_fn=preexec
        )
        try:
            return proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: stop the stage, its checkpoint stays
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def _last_error(log: Path) -> str:
    """The stage's one-line error (train.py prints `error: ...`), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


def run_schedule(
    schedule: Schedule,
    run_dir: str | Path,
    extra: Sequence[str] = (),
    python: str | None = None,
    verbose: bool = False,
    say: Callable[[str], None] = print,
) -> list[Outcome]:
    """Train every unfinished stage in order; returns what happened to each."""
    run_dir = Path(run_dir).expanduser().resolve()
    targets = schedule.targets()
    outcomes: dict[str, Outcome] = {}
    total = len(schedule.stages)
    scale = "" if schedule.scale == 1 else f" at scale {schedule.scale:g}"
    say(f"schedule {schedule.name}{scale}: {total} stages, run_dir {run_dir}")
    for i, stage in enumerate(schedule.stages, 1):
        head = f"[{i}/{total}] {stage.name}"
        target = targets[stage.name]
        step = done_step(run_dir, stage)
        if step is not None and step >= target:
            outcomes[stage.name] = Outcome(stage.name, "skipped", step=step)
            say(f"{head}: finished (step {step:,}), skipped")
            continue
        parent = outcomes.get(stage.parent or "")
        if parent is not None and parent.status in ("failed", "blocked"):
            outcomes[stage.name] = Outcome(stage.name, "blocked")
            say(f"{head}: not run, its parent {stage.parent} did not finish")
            continue
        ndir = node_dir(run_dir, stage.name)
        resuming = (ndir / CKPT_DIR).is_dir() and any((ndir / CKPT_DIR).iterdir())
        start = targets[stage.parent] if stage.parent else 0
        say(
            f"{head}: training +{stage.steps:,} steps (global {start:,} → {target:,})"
            + (", resuming its checkpoint" if resuming else "")
            + f"; log {ndir / LOG}"
        )
        t0 = time.monotonic()
        code = _run_stage(
            train_command(schedule, stage, run_dir, extra, python), ndir / LOG, verbose
        )
        seconds = time.monotonic() - t0
        step = done_step(run_dir, stage)
        if code == 0 and step is not None and step >= target:
            outcomes[stage.name] = Outcome(stage.name, "trained", seconds, step)
            say(f"{head}: done in {seconds:.0f} s (step {step:,})")
        else:
            outcomes[stage.name] = Outcome(stage.name, "failed", seconds, step)
            why = _last_error(ndir / LOG) or f"exit code {code}"
            say(f"{head}: FAILED after {seconds:.0f} s (exit {code}): {why}")
    return [outcomes[s.name] for s in schedule.stages]


def run_main(name: str, args: Sequence[str], verbose: bool = False) -> int:
    """`run NAME [scale=S] [run_dir=D] [train.py overrides...]`: exit 0 when every stage ends."""

    scale, run_dir, extra = 1.0, None, []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            raise EdiffError(f"expected key=value, got {arg!r} (e.g. scale=0.5 run_dir=runs/x)")
        if key == "scale":
            try:
                scale = float(value)
            except ValueError:
                raise EdiffError(f"scale must be a number, got {value!r}") from None
        elif key == "run_dir":
            run_dir = value
        else:
            extra.append(arg)  # for train.py
    schedule = load_schedule(name)
    if scale != 1.0:
        schedule = schedule.scaled(scale)
    run_dir = run_dir or f"runs/{schedule.name}"
    try:
        Path(run_dir).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdiffError(f"run_dir {run_dir} cannot be created: {e.strerror}") from None
    if not os.access(Path(run_dir).expanduser(), os.W_OK):
        raise EdiffError(f"run_dir {run_dir} is not writable")
    outcomes = run_schedule(schedule, run_dir, extra, verbose=verbose)
    bad = [o.stage for o in outcomes if o.status in ("failed", "blocked")]
    trained = sum(o.status == "trained" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    if bad:
        print(
            f"error: schedule {schedule.name}: {len(bad)} stages did not finish "
            f"({', '.join(bad)}); fix the first failure and run again: finished stages are "
            "skipped",
            file=sys.stderr,
        )
        return 1
    print(
        f"schedule {schedule.name}: all {len(outcomes)} stages finished "
        f"({trained} trained now, {skipped} already done)"
    )
    return 0
