"""`ediff-submit` (= `python slurm/submit.py`): submit a schedule as a chain of SLURM jobs,
`ediff-submit schedule=fig7`.

One sbatch job per stage, rendered from slurm/train.sbatch; a child's job waits for its
parent's with `--dependency=afterok`, so it starts only once the parent's weights exist. A
parent that fails leaves its descendants pending with reason DependencyNeverSatisfied (the
template sets --kill-on-invalid-dep=no) until you fix the parent and submit again. Stages whose
node.json already reaches their target step are skipped; stages already queued or running for
the same run directory are reused, not submitted twice. `dry_run=true` prints the chain and each
job's command without calling SLURM. Job ids go to run_dir/slurm_jobs.json.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ediff_train import CONF_DIR, REPO
from ediff_train.cli import reporting_errors
from ediff_train.errors import EdiffError
from ediff_train.experiments.schedule import Schedule, Stage, schedule_from_config
from ediff_train.io.files import write_json
from ediff_train.run.layout import NODE_JSON, node_dir

TEMPLATE = REPO / "slurm" / "train.sbatch"
JOBS_JSON = "slurm_jobs.json"
NEVER = "DependencyNeverSatisfied"
_FIELD = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class Job:
    """What happens to one stage: skipped (finished), reused (queued already), or submitted."""

    stage: Stage
    target: int
    done_step: int | None  # step in node.json, if the node has one
    script: str = ""
    command: str = ""  # what the job runs: srun ... python train.py ...
    job_id: str | None = None
    action: str = "submit"  # submit | skip | reuse
    replaces: str | None = None  # a stuck job (parent failed) this one replaces

    @property
    def finished(self) -> bool:
        return self.done_step is not None and self.done_step >= self.target


def render(template: str, fields: dict[str, Any]) -> str:
    """Fill {{field}}s; a `#SBATCH` line (or a line that is only a field) whose value is unset is
    dropped, so optional options need no conditionals in the template."""
    out = []
    for line in template.splitlines():
        names = _FIELD.findall(line)
        for name in names:
            if name not in fields:
                raise EdiffError(f"sbatch template: unknown field {{{{{name}}}}}")
        unset = [n for n in names if fields[n] is None or fields[n] == ""]
        if unset and (line.startswith("#SBATCH") or line.strip() == f"{{{{{unset[0]}}}}}"):
            continue
        out.append(_FIELD.sub(lambda m: str(fields[m.group(1)]), line))
    return "\n".join(out) + "\n"


def _plain(value: Any, what: str) -> str:
    text = str(value)
    if any(c.isspace() for c in text):
        raise EdiffError(
            f"{what} must not contain whitespace (it goes into an #SBATCH line): {text!r}"
        )
    return text


def train_command(cfg: DictConfig, schedule: Schedule, stage: Stage, run_dir: Path) -> list[str]:
    """`python train.py ...` for one stage: node, run_dir, steps, the trainer layout matching the
    sbatch request, then the schedule's overrides, the stage's, and train.args (last wins)."""
    s = cfg.slurm
    python = cfg.train.python or sys.executable
    extra = cfg.train.args
    extra = shlex.split(extra) if isinstance(extra, str) else [str(a) for a in extra or []]
    return [
        str(python),
        str(REPO / "train.py"),
        *stage.expert_args(),
        f"run_dir={run_dir}",
        f"steps={stage.steps}",
        f"experiment={cfg.experiment}",
        f"trainer={cfg.train.trainer}",
        f"trainer.num_nodes={int(s.nodes)}",
        f"trainer.devices={tasks_per_node(cfg)}",
        *schedule.overrides,
        *schedule.stage_overrides(stage),
        *stage.overrides,
        *extra,
    ]


def tasks_per_node(cfg: DictConfig) -> int:
    s = cfg.slurm
    if s.tasks_per_node is not None:
        return int(s.tasks_per_node)
    return int(s.gpus_per_node or 0) or 1


def script_for(cfg: DictConfig, schedule: Schedule, stage: Stage, run_dir: Path) -> tuple[str, str]:
    """(rendered sbatch script, the srun command line in it) for one stage."""
    s = cfg.slurm
    ndir = node_dir(run_dir, stage.name)
    command = train_command(cfg, schedule, stage, run_dir)
    fields = {
        "job_name": f"{schedule.name}:{stage.name}",
        "comment": _plain(comment(ndir), "run_dir"),
        "stage": stage.name,
        "nodes": int(s.nodes),
        "tasks_per_node": tasks_per_node(cfg),
        "gpus_per_node": int(s.gpus_per_node) if s.gpus_per_node else None,
        "cpus_per_task": s.cpus_per_task,
        "mem": s.mem,
        "time": s.time,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "workdir": _plain(REPO, "the repository path"),
        "output": _plain(ndir / "slurm-%j.out", "run_dir"),
        "requeue": "requeue" if s.requeue else "no-requeue",
        "signal": f"USR1@{int(s.signal_seconds)}" if s.signal_seconds else None,
        "extra": "\n".join(f"#SBATCH {_plain(o, 'slurm.extra')}" for o in s.extra or []),
        "setup": "\n".join(str(x) for x in cfg.train.setup or []),
        "command": shlex.join([*map(str, s.srun_args or []), *command]),
    }
    srun = f"srun {fields['command']}"
    template = Path(s.template) if s.template else TEMPLATE
    if not template.is_file():
        raise EdiffError(f"sbatch template not found: {template}")
    return render(template.read_text(), fields), srun


def comment(ndir: Path) -> str:
    """The job's identity (its node directory), so a second submit finds it in the queue."""
    return f"ediff:{ndir}"


def plan(cfg: DictConfig, schedule: Schedule, run_dir: Path) -> list[Job]:
    targets = schedule.targets()
    jobs = []
    for stage in schedule.stages:
        info = node_dir(run_dir, stage.name) / NODE_JSON
        done = json.loads(info.read_text()).get("step") if info.is_file() else None
        job = Job(stage, targets[stage.name], done)
        job.script, job.command = script_for(cfg, schedule, stage, run_dir)
        if job.finished:
            job.action = "skip"
        jobs.append(job)
    return jobs


def _slurm(*args: str) -> str:
    tool = shutil.which(args[0])
    if tool is None:
        raise EdiffError(f"{args[0]} not found: run on a SLURM login node, or use dry_run=true")
    proc = subprocess.run([tool, *args[1:]], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise EdiffError(f"{' '.join(args[:2])} failed: {msg[-1] if msg else proc.returncode}")
    return proc.stdout


def queued_jobs() -> dict[str, tuple[str, str, str]]:
    """comment → (job id, state, reason) of this user's jobs still in the queue."""
    out = _slurm("squeue", "--me", "--noheader", "--format=%i|%k|%T|%r")
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[1].startswith("ediff:"):
            jobs[parts[1]] = (parts[0], parts[2], parts[3])
    return jobs


def submit(jobs: list[Job], run_dir: Path) -> None:
    """sbatch each stage in order, chaining children to their parent's job. What was submitted
    is recorded in run_dir/slurm_jobs.json even when a later sbatch fails."""
    queued = queued_jobs()
    ids: dict[str, str] = {}
    try:
        for job in jobs:
            if job.action != "skip":
                _submit_one(job, run_dir, queued, ids)
                ids[job.stage.name] = str(job.job_id)
    finally:
        record = {
            j.stage.name: {
                "job_id": j.job_id,
                "action": j.action,
                "target_step": j.target,
                "after": ids.get(j.stage.parent or ""),
            }
            for j in jobs
        }
        if ids:
            write_json(
                run_dir / JOBS_JSON,
                {"submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": record},
            )


def _submit_one(
    job: Job, run_dir: Path, queued: dict[str, tuple[str, str, str]], ids: dict[str, str]
) -> None:
    ndir = node_dir(run_dir, job.stage.name)
    found = queued.get(comment(ndir))
    if found and found[2] != NEVER:
        job.action, job.job_id = "reuse", found[0]
        return
    if found:  # held because its parent failed earlier: the new chain replaces it
        _slurm("scancel", found[0])
        job.replaces = found[0]
    ndir.mkdir(parents=True, exist_ok=True)
    script = ndir / "job.sbatch"
    script.write_text(job.script)
    parent = ids.get(job.stage.parent or "")
    dep = [f"--dependency=afterok:{parent}"] if parent else []
    job.job_id = _slurm("sbatch", "--parsable", *dep, str(script)).strip().split(";")[0]


def report(schedule: Schedule, jobs: list[Job], run_dir: Path, dry_run: bool) -> str:
    scale = "" if schedule.scale == 1 else f" at scale {schedule.scale:g}"
    head = (
        f"schedule {schedule.name}{scale}: {len(jobs)} stages in dependency order, "
        f"run_dir {run_dir}" + (" (dry run: nothing submitted)" if dry_run else "")
    )
    lines = [head]
    sbatch = [ln for ln in jobs[0].script.splitlines() if ln.startswith("#SBATCH")] if jobs else []
    lines += ["sbatch options (first job): " + " ".join(ln[8:] for ln in sbatch), ""]
    width = max(len(j.stage.name) for j in jobs)
    by_name = {j.stage.name: j for j in jobs}
    for i, job in enumerate(jobs, 1):
        st = job.stage
        parent = by_name.get(st.parent or "")
        if parent is None:
            after = "no dependency"
        elif parent.action == "skip":
            after = f"parent {st.parent} finished: no dependency"
        else:
            jid = f":{parent.job_id}" if parent.job_id else ""
            after = f"after {st.parent} (afterok{jid})"
        title = f"{i:>2}. {st.name:<{width}}  +{st.steps:,} → step {job.target:,}  {after}"
        if job.action == "skip":
            lines.append(f"{title}  SKIP: finished (node.json at step {job.done_step:,})")
            continue
        if job.action == "reuse":
            lines.append(f"{title}  already queued as job {job.job_id}")
            continue
        jid = f"  job {job.job_id}" if job.job_id else ""
        note = f" (replaces stuck job {job.replaces})" if job.replaces else ""
        lines.append(f"{title}{jid}{note}")
        lines.append(f"    {job.command}")
    return "\n".join(lines)


@hydra.main(config_path=str(CONF_DIR), config_name="submit", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    schedule = schedule_from_config(OmegaConf.to_container(cfg.schedule, resolve=True))
    if float(cfg.scale) != 1.0:
        schedule = schedule.scaled(float(cfg.scale))
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    jobs = plan(cfg, schedule, run_dir)
    if not cfg.dry_run:
        submit(jobs, run_dir)
    print(report(schedule, jobs, run_dir, bool(cfg.dry_run)))


def run() -> None:
    """The console script."""
    main()
