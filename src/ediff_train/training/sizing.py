"""Experts sized for their band: a child whose network differs from its parent's.

`init` (training/settings.py) says where the child's weights start:

- `copy`: the parent's weights and AdamW state (the shapes must match);
- `slice`: a structured selection of the parent's weights, and of its AdamW moments, for a
  narrower or shallower net of the same backbone class (nn/slicing.py);
- `distill`: any backbone; the first `init.distill_steps` steps fit the parent's denoiser output
  in the child's band (training/distill.py), the rest the data;
- `scratch`: the child's own random initialisation.

Whatever the mode, the child must take what its parent took: the same codec and
parameterisation (checked elsewhere), image size, input channels and conditioning widths. All of
it is checked on meta-device copies of both nets before anything is written. A child whose
weights are new (distill, scratch) starts a fresh AdamW with a warmup and a fresh EMA ramp;
node.json's `init` says what was done (`optimizer: carried | sliced | fresh`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ediff_train.errors import EdiffError
from ediff_train.nn.cost import meta_denoiser, parameters
from ediff_train.nn.slicing import Piece, apply_plan, slice_plan
from ediff_train.run.layout import CONFIG, node_dir
from ediff_train.run.weights import denoiser_of, load_train_config, load_weights
from ediff_train.training.distill import Distiller

# what a child's backbone must share with its parent's: attribute → what it is
INTERFACE = {"in_channels": "input channels", "image_size": "image size"}


@dataclass
class InitPlan:
    """The checked `init` of a child: its mode, the parent's config and (slice) the plan."""

    mode: str
    parent_cfg: Any
    plan: dict[str, Piece] | None = None
    distill_steps: int = 0
    warmup: float = 0.0


def init_mode(cfg: DictConfig) -> str:
    return str((cfg.get("init") or {}).get("mode", "copy"))


def _parent_node_dir(cfg: DictConfig, parent: str) -> Path:
    return Path(str(cfg.parent_dir)) if cfg.get("parent_dir") else node_dir(cfg.run_dir, parent)


def _interface(net: Any) -> dict[str, Any]:
    out = {k: getattr(net, k) for k in INTERFACE if getattr(net, k, None) is not None}
    dims = getattr(getattr(net, "cond", None), "dims", None)
    if isinstance(dims, dict):
        out.update({f"{k}_dim": v for k, v in dims.items()})
    return out


def _shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _first_difference(child: dict, parent: dict) -> str:
    for k in sorted(set(child) | set(parent)):
        if child.get(k) != parent.get(k):
            c = list(child[k]) if k in child else "absent"
            p = list(parent[k]) if k in parent else "absent"
            return f"{k} is {c} in the child, {p} in the parent"
    return ""


def check_init(cfg: DictConfig, node: Any, lora: bool = False) -> InitPlan | None:
    """The child's `init` against its parent's network, on meta-device copies: one line, before
    anything is written, when it cannot work. None for a root, a continuation, or a parent that
    is not there yet (the hand-off names a missing parent itself)."""
    mode = init_mode(cfg)
    if node.parent is None or cfg.get("continue_from"):
        if mode in ("slice", "distill"):
            what = "a root" if node.parent is None else "a continuation"
            raise EdiffError(f"init={mode} needs a parent to start from; {node.name} is {what}")
        return None
    if lora and mode != "copy":
        raise EdiffError(f"init={mode}: a LoRA child adapts its parent's own net (init=copy)")
    pdir = _parent_node_dir(cfg, node.parent)
    if not (pdir / CONFIG).is_file():
        return None
    pcfg = load_train_config(pdir)
    child, parent = meta_denoiser(cfg.model), meta_denoiser(pcfg.model)
    mine, theirs = _interface(child.backbone), _interface(parent.backbone)
    for key in sorted(set(mine) & set(theirs)):
        if mine[key] != theirs[key]:
            raise EdiffError(
                f"model: the child's backbone takes {key}={mine[key]}, its parent {node.parent}'s "
                f"{theirs[key]}; an expert of the ensemble must take its parent's codec, image "
                "size and conditioning widths"
            )
    plan = InitPlan(mode, pcfg, warmup=float(cfg.init.get("warmup", 20)))
    if mode == "copy":
        diff = _first_difference(_shapes(child), _shapes(parent))
        if diff or type(child.backbone) is not type(parent.backbone):
            raise EdiffError(
                f"init=copy needs the parent's network: {diff or 'another backbone class'}; "
                "use init=slice (a narrower or shallower net of the same class), init=distill "
                "(any net) or init=scratch"
            )
    elif mode == "slice":
        plan.plan = slice_plan(child, parent)
    elif mode == "distill":
        plan.distill_steps = int(cfg.init.distill_steps)
        if plan.distill_steps > int(cfg.steps):
            raise EdiffError(
                f"init.distill_steps={plan.distill_steps} is more than this run's "
                f"steps={int(cfg.steps)}"
            )
    return plan


def init_weights(module: Any, cfg: DictConfig, plan: InitPlan | None, path: Path) -> dict:
    """The child's starting weights by its plan (copy when there is none); returns the parent
    weights' metadata (its step and images)."""
    if plan is None or plan.mode == "copy":
        return module.init_from(str(path))
    model, ema, meta = load_weights(path)
    if plan.mode == "slice" and plan.plan is not None:
        module.denoiser.load_state_dict(apply_plan(plan.plan, model))
        module.ema_state.load_state_dict(apply_plan(plan.plan, ema))
    elif plan.mode == "distill":
        teacher = denoiser_of(plan.parent_cfg)
        teacher.load_state_dict(ema)
        module.distiller = Distiller(teacher.eval().requires_grad_(False), plan.distill_steps)
    return meta


def settle_optimizer(module: Any, cfg: DictConfig, plan: InitPlan | None, steps: int) -> None:
    """What the child's AdamW starts from and what node.json says of it. Fresh weights (distill,
    scratch) take a fresh AdamW, a warmup and a fresh EMA ramp (they have seen no images)."""
    if plan is None:
        return
    record: dict[str, Any] = {
        "mode": plan.mode,
        "parent_model": _model_record(plan.parent_cfg.model),
        "model": _model_record(cfg.model),
    }
    if plan.mode == "slice" and module.handoff_optimizer is not None:
        pieces = plan.plan or {}
        module.optimizer_transform = lambda tensors: slice_moments(pieces, tensors)
        record["optimizer"] = "sliced"
    elif plan.mode in ("distill", "scratch"):
        module.handoff_optimizer = None
        module.images_offset = 0
        record["optimizer"] = "fresh"
        record["ema"] = "restarted: the weights are new"
    else:
        record["optimizer"] = "carried" if module.handoff_optimizer is not None else "fresh"
    if record["optimizer"] == "fresh" and plan.mode != "copy":
        sched = module.lr_schedule
        if not sched.get("warmup_handoff") and plan.warmup > 0:
            per = 1 if str(sched.get("unit", "steps")) == "steps" else int(cfg.data.batch_size)
            sched["warmup_handoff"] = plan.warmup * per
            record["warmup_steps"] = plan.warmup
    if plan.mode == "distill":
        start = int(module.step_offset)
        record["schedule"] = {
            "distill": [start, start + plan.distill_steps],
            "data": [start + plan.distill_steps, start + int(steps)],
        }
    module.init_record = record


def slice_moments(plan: dict[str, Piece], tensors: dict[str, Any]) -> dict[str, Any]:
    """AdamW's stored moments (`exp_avg/<name>`, …) cut by the weights' slice plan."""
    out = {}
    for key, piece in plan.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            src = f"{moment}/{piece.source}"
            if src in tensors:
                out[f"{moment}/{key}"] = piece.take(tensors[src])
    return out


def init_summary(module: Any) -> dict[str, Any]:
    """node.json's `init`: the record, with the optimiser as it was actually started (a parent
    without stored moments, or ZeRO-3, falls back to a fresh AdamW) and the distill losses."""
    record = dict(module.init_record)
    done = str(module.handoff_record.get("optimizer", ""))
    if done.startswith("reset"):
        record["optimizer"] = "fresh"
    if module.distiller is not None:
        record["distill"] = module.distiller.record()
    return record


def _model_record(model: Any) -> dict[str, Any]:
    return {"target": str(model.get("_target_")), "parameters": parameters(model)}
