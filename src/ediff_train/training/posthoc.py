"""The training side of EDM2's post-hoc EMA (posthoc_ema.py): the trackers and their snapshots.

Two (by default) power-function EMAs of the denoiser follow the run at the tree's step t, so a
child continues its parent's profiles; their snapshots are what posthoc_ema.reconstruct combines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ediff_train.core.ema import EMA, full_fp32_state
from ediff_train.errors import EdiffError
from ediff_train.io.files import save_safetensors
from ediff_train.run.layout import node_dir
from ediff_train.run.posthoc_ema import (
    POSTHOC,
    SNAPSHOT_NAME,
    STATE,
    beta,
    load_tensors,
    read_metadata,
    sigma_rel_to_gamma,
    snapshot_path,
    tag,
)


def _mismatch(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> str:
    """The first difference between two {name: shape} maps, in words."""
    if missing := sorted(want.keys() - have.keys()):
        return f"{len(missing)} tensors missing, e.g. {missing[0]}"
    if extra := sorted(have.keys() - want.keys()):
        return f"{len(extra)} unexpected tensors, e.g. {extra[0]}"
    k = next(k for k in want if have[k] != want[k])
    return f"{k} has shape {list(have[k])}, the model {list(want[k])}"


class PostHocEMA(Callback):
    """One power EMA per σ_rel of `pl_module.denoiser`, updated after each optimiser step at the
    tree's step t, written every `every` tree steps and at the end (rank 0 writes; assembling a
    ZeRO-sharded EMA is a collective, so every rank calls the same methods). Snapshots hold
    `dtype` values (float32 by default), `state.safetensors` always fp32.

    Put it before the checkpoint callbacks: its batch-end update must be in what they save.
    The trackers' state travels in Lightning's checkpoint (state_dict), so a resumed run goes
    on exactly; `parent_state` (the parent's state.safetensors) starts a child's trackers."""

    def __init__(
        self,
        node_dir: Path,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every: int = 1,
        parent_state: Path | None = None,
        dtype: str = "float32",
    ) -> None:
        self.node_dir = Path(node_dir)
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels or len({tag(s) for s in self.sigma_rels}) < len(self.sigma_rels):
            raise EdiffError(f"posthoc_ema.sigma_rels must be distinct values, got {sigma_rels}")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        if int(every) < 1:
            raise EdiffError(f"posthoc_ema.every must be >= 1 (0 in the config: auto), got {every}")
        self.every = int(every)
        if dtype not in ("float32", "float16", "bfloat16"):
            raise EdiffError(f"posthoc_ema.dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = getattr(torch, dtype)
        self.parent_state = Path(parent_state) if parent_state is not None else None
        if self.parent_state is not None and not self.parent_state.is_file():
            raise EdiffError(
                f"post-hoc EMA parent state {self.parent_state} does not exist: "
                "train the parent with posthoc_ema.enabled=true, or start without it"
            )
        self.trackers: list[EMA] = []
        self.origin = "root"
        self._parent: dict[str, Any] | None = None  # the parent's trackers, checked in setup
        self._resumed: dict[str, Any] | None = None  # the checkpoint's trackers
        self._last = -1  # tree step of the last update
        self._snapped = -1  # tree step of the last snapshot

    # -- start ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        # before the strategy wraps the model: a full fp32 copy (ZeRO-3 empties the parameters)
        self.trackers = [EMA(pl_module.denoiser) for _ in self.sigma_rels]
        if self.parent_state is not None:
            self._parent = self._read_parent(self.parent_state)

    def _read_parent(self, path: Path) -> dict[str, Any]:
        meta, tensors = read_metadata(path), load_tensors(path)
        have_tags = [tag(s) for s in meta.get("sigma_rels", [])]
        if missing := [tag(s) for s in self.sigma_rels if tag(s) not in have_tags]:
            raise EdiffError(
                f"{path} tracks sigma_rels {have_tags}, not {missing}: train the "
                f"child with posthoc_ema.sigma_rels=[{','.join(have_tags)}]"
            )
        want = {k: tuple(v.shape) for k, v in self.trackers[0].module.state_dict().items()}
        states = []
        for s in self.sigma_rels:
            pre = f"{tag(s)}/"
            sd = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
            have = {k: tuple(v.shape) for k, v in sd.items()}
            if have != want:
                raise EdiffError(
                    f"{path}: post-hoc EMA state does not fit this model "
                    f"({_mismatch(have, want)}): train the child with its parent's "
                    "model config"
                )
            states.append(sd)
        return {"step": int(meta["step"]), "origin": "parent", "trackers": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [tag(s) for s in state_dict["sigma_rels"]]
        if saved != [tag(s) for s in self.sigma_rels]:
            raise EdiffError(
                f"the checkpoint's post-hoc EMA tracks sigma_rels {saved}: resume "
                f"with posthoc_ema.sigma_rels=[{','.join(saved)}]"
            )
        self._resumed = state_dict

    def state_dict(self) -> dict[str, Any]:
        if not self.trackers:
            return {}
        return {
            "step": self._last,
            "origin": self.origin,
            "sigma_rels": list(self.sigma_rels),
            "trackers": [tr.state_dict() for tr in self.trackers],
        }  # collective under ZeRO

    def _warn(self, trainer: L.Trainer, why: str, step: int) -> None:
        if trainer.is_global_zero:
            print(
                f"warning: post-hoc EMA of {self.node_dir.name} starts from the current weights "
                f"at tree step {step} ({why}); reconstructions use this node's snapshots only",
                file=sys.stderr,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = int(pl_module.total_step)
        start, current = self._resumed, False
        if start is None and trainer.ckpt_path is not None:
            self._warn(trainer, "its checkpoint has no post-hoc EMA state", step)
            current = True
        elif start is None and self._parent is not None:
            if self._parent["step"] == step:
                start = self._parent
            else:
                self._warn(
                    trainer,
                    f"the parent's state is at step {self._parent['step']}, "
                    "not this run's start (branch_step)",
                    step,
                )
        elif start is None and step > 0:
            self._warn(
                trainer,
                "no parent tracker state: its parent trained without posthoc_ema.enabled",
                step,
            )
        self.origin = start["origin"] if start else ("root" if step == 0 else "fresh")
        for i, tr in enumerate(self.trackers):
            if start is not None:
                tr.load_state_dict(start["trackers"][i])
            tr.attach(pl_module.denoiser)
        if current:  # the checkpoint's weights, not the ones the trackers copied in setup
            full = full_fp32_state(pl_module.denoiser, self.trackers[0].shapes)
            for tr in self.trackers:
                tr.load_state_dict(full)
        self._parent = self._resumed = None
        self._last = step
        if trainer.is_global_zero:  # a future this run does not reach again: another trajectory
            for p in (self.node_dir / POSTHOC).glob("*.safetensors"):
                m = SNAPSHOT_NAME.match(p.name)
                if m and int(m.group(2)) > step:
                    p.unlink(missing_ok=True)

    # -- steps and files -----------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        t = int(pl_module.total_step)
        if t == self._last or not self.trackers:
            return  # no optimiser step since the last call (gradient accumulation)
        self._last = t
        for tr, g in zip(self.trackers, self.gammas):
            tr.update(beta(t, g))
        if t % self.every == 0:
            self._snapshot(trainer, t)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        t = self._last
        if t >= 1 and self._snapped != t:
            self._snapshot(trainer, t)
        if t >= 1 and trainer.global_step >= (trainer.max_steps or 0):
            tensors = {
                f"{tag(s)}/{k}": v
                for s, tr in zip(self.sigma_rels, self.trackers)
                for k, v in tr.state_dict().items()
            }
            if trainer.is_global_zero:
                meta = {"step": t, "sigma_rels": self.sigma_rels, "origin": self.origin}
                save_safetensors(
                    self.node_dir / POSTHOC / STATE,
                    tensors,
                    {k: json.dumps(v) for k, v in meta.items()},
                )

    def _snapshot(self, trainer: L.Trainer, t: int) -> None:
        for s, g, tr in zip(self.sigma_rels, self.gammas, self.trackers):
            sd = tr.state_dict()
            if trainer.is_global_zero:
                out = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in sd.items()}
                meta = {
                    "sigma_rel": s,
                    "gamma": g,
                    "step": t,
                    "origin": self.origin,
                    "node": self.node_dir.name,
                    "dtype": str(self.dtype),
                }
                save_safetensors(
                    snapshot_path(self.node_dir, s, t),
                    out,
                    {k: json.dumps(v) for k, v in meta.items()},
                )
        self._snapped = t


def from_train_config(cfg: Any, node: Any, ndir: Path) -> PostHocEMA | None:
    """The callback `posthoc_ema:` of conf/train.yaml asks for (None when disabled); a child
    starts from its parent's tracker state when the parent left one."""
    pc = cfg.get("posthoc_ema") or {}
    if not pc.get("enabled"):
        return None
    every = int(pc.get("every") or 0) or max(1, int(cfg.steps) // 10)
    parent_state = None
    if node.parent is not None and not cfg.get("continue_from"):
        pdir = Path(cfg.parent_dir) if cfg.get("parent_dir") else node_dir(cfg.run_dir, node.parent)
        parent_state = pdir / POSTHOC / STATE if (pdir / POSTHOC / STATE).is_file() else None
    return PostHocEMA(
        ndir,
        list(pc.get("sigma_rels") or (0.05, 0.10)),
        every,
        parent_state,
        str(pc.get("dtype") or "float32"),
    )
