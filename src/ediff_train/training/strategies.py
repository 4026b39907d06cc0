"""How a node's training is spread over processes: the `strategy` group, the layout SLURM gives.

`conf/strategy/*.yaml` holds either a plain Lightning name (`name: auto`) or a `_target_`
instantiated here. DeepSpeed runs through `DeepSpeed`, a thin subclass whose checkpoints are
written atomically (a temp folder renamed into place), so a kill mid-save never leaves a
half-written `last.ckpt/` behind. Under SLURM, `num_nodes`/`devices` left at `auto` come from the
allocation and Lightning's own requeue handler is switched off (resume.Requeue replaces it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import DictConfig, OmegaConf

from ediff_train.errors import EdiffError

MARKER = "ediff_ckpt.json"  # written last into a DeepSpeed checkpoint folder: it is complete


def build_strategy(cfg: DictConfig | None) -> Any:
    """A Lightning strategy object, or a registered name such as 'auto'."""
    if cfg is None or "_target_" not in cfg:
        return (cfg or {}).get("name", "auto")
    target = str(cfg["_target_"])
    if "deepspeed" in target.lower() or target.endswith(".DeepSpeed"):
        _require_deepspeed(target)
    return instantiate(cfg, _convert_="all")


def _require_deepspeed(what: str) -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # ImportError, or a broken install that fails at import
        why = str(e).splitlines()[0] if str(e) else "missing"
        raise EdiffError(
            f"strategy {what} needs DeepSpeed, which cannot be imported ({type(e).__name__}: "
            f"{why}): pip install 'ediff-train[deepspeed]'"
        ) from None


def _first_count(value: str) -> int:
    """SLURM's per-node counts look like '4', '4(x2)' or '4(x2),2': the first count."""
    m = re.match(r"\s*(\d+)", value)
    if not m:
        raise EdiffError(f"cannot read a count from SLURM value {value!r}")
    return int(m.group(1))


def slurm_layout(trainer: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """`num_nodes` and `devices` for the Trainer: SLURM's allocation where the config says auto.

    Under `srun` Lightning wants one task per device (SLURM_NTASKS_PER_NODE); a single task per
    node that starts its own device processes takes the GPUs on the node (SLURM_GPUS_ON_NODE).
    An explicit value that contradicts the allocation is a one-line error, not a hang at start.
    """
    out = {"num_nodes": trainer.get("num_nodes", "auto"), "devices": trainer.get("devices", "auto")}
    if out["num_nodes"] in (None, "auto"):
        out["num_nodes"] = int(env.get("SLURM_NNODES", 1)) if "SLURM_JOB_ID" in env else 1
    if "SLURM_JOB_ID" not in env:
        return out
    if env.get("SLURM_NTASKS_PER_NODE"):
        per_node, source = _first_count(env["SLURM_NTASKS_PER_NODE"]), "--ntasks-per-node"
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        per_node, source = int(env["SLURM_NTASKS"]) // int(out["num_nodes"]), "--ntasks"
    elif env.get("SLURM_GPUS_ON_NODE") and trainer.get("accelerator") not in ("cpu",):
        per_node, source = _first_count(env["SLURM_GPUS_ON_NODE"]), "GPUs on the node"
    else:
        per_node, source = None, ""
    if out["devices"] in (None, "auto") and per_node is not None:
        out["devices"] = per_node
    elif per_node is not None and source != "GPUs on the node" and out["devices"] != per_node:
        raise EdiffError(
            f"trainer.devices={out['devices']} but SLURM runs {per_node} task(s) per node "
            f"({source}): set trainer.devices=auto or match the allocation"
        )
    nnodes = env.get("SLURM_NNODES")
    if nnodes is not None and int(out["num_nodes"]) != int(nnodes):
        raise EdiffError(
            f"trainer.num_nodes={out['num_nodes']} but the SLURM job has {nnodes} node(s): "
            "set trainer.num_nodes=auto"
        )
    return out


CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs the container's cgroup may use (v2 `cpu.max`, v1 `cpu.cfs_quota_us`); None when
    unlimited or unknown. torch counts the cores it sees, not the quota: a 2-CPU container on a
    64-core host would start 64 threads that the quota then throttles."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / sub / "cpu.cfs_quota_us").read_text())
            period_us = int((root / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def cpu_budget(env: Mapping[str, str] = os.environ, root: Path = CGROUP) -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup quota and by
    SLURM_CPUS_PER_TASK when set."""
    n = len(os.sched_getaffinity(0))
    quota = cpu_quota(root)
    if quota is not None:
        n = min(n, max(1, int(quota)))
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def share_cpu_threads(trainer: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> int:
    """Split this process's CPU budget (cpu_budget) between the CPU ranks it runs; returns this
    rank's threads.

    Each rank would otherwise start one compute thread per core: two gloo ranks on two cores
    then spin against each other and train ~4x slower than with one thread each; one rank is
    capped at the budget (never raised above torch's setting). An explicit OMP_NUM_THREADS (the
    sbatch template sets it from --cpus-per-task) wins; GPU runs keep torch's setting."""
    devices = trainer.get("devices")
    if trainer.get("accelerator") != "cpu" or env.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    budget = cpu_budget(env)
    if isinstance(devices, int) and devices >= 2:
        threads = max(1, budget // devices)
    else:
        threads = min(torch.get_num_threads(), budget)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    note_if_busy(budget)
    return threads


def note_if_busy(cores: int, load: float | None = None) -> str | None:
    """One line on stdout when the load average says the machine's cores are oversubscribed
    (steps then run slower than docs/performance.md's numbers); the line, or None."""
    try:
        load = os.getloadavg()[0] if load is None else load
    except OSError:
        return None
    total = os.cpu_count() or cores
    if load <= 1.5 * total:
        return None
    line = (
        f"note: load average {load:.1f} on {total} cores: other processes compete for them and "
        f"steps will be slower with this run's {torch.get_num_threads()} thread(s); "
        "OMP_NUM_THREADS=1 is often faster then (docs/performance.md#cpu-threads-issue-37)"
    )
    if all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID")):
        print(line, flush=True)
    return line


def cluster_plugins() -> list[Any]:
    """Under SLURM, the environment without Lightning's in-handler requeue (see resume.Requeue)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder (or file) over `final`; a crash in between leaves `.old`."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class DeepSpeed(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with atomic checkpoint folders (see module docstring)."""

    requires_cuda: ClassVar[bool] = True  # Lightning runs DeepSpeed on CUDA only

    def save_checkpoint(
        self, checkpoint: dict, filepath: Any, storage_options: Any | None = None
    ) -> None:
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(f".{final.name}.tmp")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier("ediff_ckpt_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("ediff_ckpt_written")  # every rank's shard is on disk
        if self.is_global_zero:
            marker = {
                "global_step": int(checkpoint.get("global_step", -1)),
                "world_size": self.world_size,
            }
            (tmp / MARKER).write_text(json.dumps(marker) + "\n")
            swap_into_place(tmp, final)
        self.barrier("ediff_ckpt_renamed")


def trainer_config(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer:` group as Trainer kwargs, with the SLURM layout filled in."""
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kw, dict)
    kw.update(slurm_layout(kw))
    return kw
