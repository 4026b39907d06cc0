"""Nothing lost, nothing silently reset: the rules train.py keeps around a node's folder.

- A refused command writes nothing: every check (values, parent, LoRA or not against the
  checkpoint, the data's manifest, Lightning's set-up) runs before config.yaml is written, which
  happens when the first step is about to run (`WriteConfig`); on a refusal the command's own
  Hydra record is removed, and so is a node folder that held nothing before it.
- A node that has trained (a hand-off, node.json, checkpoints now unreadable) is never started
  again from step 0: with no readable checkpoint left the command is refused.
- A finished node asked for no more steps than it trained is left as it is: "nothing to do",
  exit 0, nothing rewritten (a corrupt last.ckpt then costs nothing either).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ediff_train.errors import EdiffError
from ediff_train.io.files import write_text
from ediff_train.io.lock import launch_rank_is_zero
from ediff_train.run.adapters import has_handoff
from ediff_train.run.layout import CKPT_DIR, CONFIG, NODE_JSON

HYDRA_DIR = "hydra"  # conf/train.yaml's hydra.run.dir: <run_dir>/<node>/hydra/<time>


class NothingToDo(Exception):
    """The node already holds what the command asks for; its message says so (exit 0)."""


def hydra_output() -> Path | None:
    """This command's Hydra output folder, when Hydra runs it."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    out = HydraConfig.get().runtime.get("output_dir")
    return Path(str(out)) if out else None


def _is_fresh(ndir: Path, hydra_out: Path | None) -> bool:
    """The folder holds nothing but this command's own Hydra record (a lock file means another
    command was here, perhaps still is: never fresh)."""
    if not ndir.is_dir():
        return True
    for entry in ndir.iterdir():
        if entry.name == HYDRA_DIR and hydra_out is not None:
            mine = hydra_out.resolve()
            if all(p.resolve() == mine for p in entry.iterdir()):
                continue
        return False
    return True


class WritesNothingOnRefusal:
    """Around one node's command: on a refusal (EdiffError) or nothing to do before the first
    step, remove what the command itself made (its Hydra record; the whole node folder when it
    held nothing before). Rank 0 only: the other ranks write nothing of their own."""

    def __init__(self, ndir: Path) -> None:
        self.ndir = ndir
        self.hydra_out = hydra_output()
        self.fresh = _is_fresh(ndir, self.hydra_out)
        self.started = False  # config.yaml written: the first step is running

    def __enter__(self) -> WritesNothingOnRefusal:
        return self

    def __exit__(
        self, kind: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if isinstance(exc, NothingToDo):
            print(str(exc), flush=True)
            self.discard()
            return True  # exit 0: the node is as asked
        if isinstance(exc, EdiffError) and not self.started:
            self.discard()
        return False

    def discard(self) -> None:
        if not launch_rank_is_zero():
            return
        if self.fresh:
            shutil.rmtree(self.ndir, ignore_errors=True)
            return
        out = self.hydra_out
        if out is not None and self.ndir.resolve() in out.resolve().parents:
            shutil.rmtree(out, ignore_errors=True)
            hydra = self.ndir / HYDRA_DIR
            if hydra.is_dir() and not any(hydra.iterdir()):
                hydra.rmdir()

    def config_writer(self, text: str) -> Callback:
        return WriteConfig(self, self.ndir / CONFIG, text)


class WriteConfig(Callback):
    """config.yaml, written when the first step is about to run: Lightning's set-up (the data's
    manifest check, the checkpoint's restore) and the other callbacks' start checks are past."""

    def __init__(self, guard: WritesNothingOnRefusal, path: Path, text: str) -> None:
        self.guard, self.path, self.text = guard, path, text

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            write_text(self.path, self.text)
        self.guard.started = True


def done_steps(ndir: Path) -> int | None:
    """Steps the node's hand-off records (node.json's steps_this_run); None without a hand-off.
    An unreadable node.json is refused in one line saying what to do."""
    path = ndir / NODE_JSON
    if not (has_handoff(ndir) and path.is_file()):
        return None
    try:
        record = json.loads(path.read_text())
        steps = record.get("steps_this_run")
    except (OSError, ValueError, AttributeError) as e:
        raise EdiffError(
            f"{path} is unreadable ({type(e).__name__}): the node's hand-off record is damaged; "
            f"copy {NODE_JSON} again from where the node was trained, or move {ndir} aside "
            "and train the node again"
        ) from None
    return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None


def check_nothing_to_do(ndir: Path, name: str, target: int) -> None:
    """NothingToDo when the node's hand-off is at or past this run's target step."""
    done = done_steps(ndir)
    if done is not None and done >= target:
        raise NothingToDo(
            f"node {name} already at step {done} ≥ steps={target}: nothing to do "
            f"({ndir} is left as it is)"
        )


def refuse_restart(ndir: Path, name: str) -> None:
    """No readable checkpoint to resume: refused when the node has trained before."""
    ckpts = ndir / CKPT_DIR
    unreadable = sorted(p.name for p in ckpts.glob("*.corrupt")) if ckpts.is_dir() else []
    evidence = [n for n in ("weights.safetensors", NODE_JSON) if (ndir / n).is_file()]
    evidence += [f"{CKPT_DIR}/{n}" for n in unreadable]
    if has_handoff(ndir) and not evidence:
        evidence.append("its hand-off")
    if not evidence:
        return
    raise EdiffError(
        f"node {name} has trained ({', '.join(evidence)} in {ndir}) but no readable "
        "checkpoint is left to resume from: refusing to start it again from step 0 over it; "
        f"copy its {CKPT_DIR}/ back from a backup, or move {ndir} aside to train it anew"
    )


def _shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def check_resume_fits(module: torch.nn.Module, resume: Path | None, name: str) -> None:
    """The checkpoint's weights fit the module this command built (Lightning would otherwise
    stop with a 50-line `Missing key(s) in state_dict`); one line naming the difference."""
    if resume is None or resume.is_dir():  # a DeepSpeed folder: its engine checks itself
        return
    try:
        ckpt = torch.load(resume, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # chosen as readable a moment ago; Lightning's load reports it
        return
    theirs, ours = _shapes(ckpt.get("state_dict", {})), _shapes(module.state_dict())
    if theirs == ours:
        return
    config = resume.parent.parent / CONFIG
    lora_theirs, lora_ours = (any("lora_" in k for k in d) for d in (theirs, ours))
    if lora_theirs != lora_ours:
        kind = {True: "a LoRA adapter (lora=default)", False: "full weights (lora=none)"}
        raise EdiffError(
            f"{resume} holds {name} trained as {kind[lora_theirs]}, this command asks for "
            f"{kind[lora_ours]}: resume it with the lora it was trained with ({config}), "
            "or train the other kind in another run_dir"
        )
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    shape = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    example = (missing or extra or shape)[0]
    raise EdiffError(
        f"{resume} does not fit the model this command builds ({len(missing)} weights missing, "
        f"{len(extra)} unexpected, {len(shape)} of another shape, e.g. {example}): resume "
        f"{name} with the settings it was trained with ({config}), or use another run_dir"
    )
