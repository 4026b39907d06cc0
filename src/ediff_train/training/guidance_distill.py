"""`distill_guidance.enabled=true`: a guidance-distilled student of a finished node.

CFG costs two forwards per solver step (D_c and D_u). The student learns the guided output
D̂_w = D_u + w·(D_c − D_u) of its teacher (the finished node of the same name in
`distill_guidance.teacher`, its EMA weights, frozen) for w ~ uniform[lo, hi], with w fed through
its σ embedding (nn/guidance_embed.py), so sampling asks it once per step. Loss:
λ(σ)·mean‖D_s(y; c, σ, w) − D̂_w(y; c, σ)‖², y = x + σn, σ from the node's band, x and c (with
training's embedding dropout) from the data. The student starts as a full copy of the teacher's
EMA weights plus a zero-output guidance embedding: its first forward is the teacher's
conditional model, bit for bit (docs/guidance_distillation.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ediff_train.core.ema import EMA
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.core.parameterisation import spec as param_spec
from ediff_train.errors import EdiffError
from ediff_train.nn.cost import meta_denoiser
from ediff_train.nn.guidance_embed import ATTR, GuidedStudent, takes_guidance
from ediff_train.run.adapters import is_lora_node
from ediff_train.run.layout import CONFIG, NODE_JSON, WEIGHTS, node_dir
from ediff_train.run.weights import denoiser_of, load_train_config, load_weights, node_of
from ediff_train.training.distill import noised, sample_error


def distill_on(cfg: DictConfig) -> bool:
    spec = cfg.get("distill_guidance")
    return bool(spec) and bool(spec.get("enabled", False))


def w_range(cfg: DictConfig) -> tuple[float, float]:
    lo, hi = (float(v) for v in cfg.distill_guidance.w)
    return lo, hi


def teacher_dir(cfg: DictConfig, name: str) -> Path:
    return node_dir(str(cfg.distill_guidance.teacher), name)


def check_guidance_distill(cfg: DictConfig, node: Any) -> None:
    """One line, before anything is written, when the student cannot be trained as asked."""
    if not distill_on(cfg):
        return
    lora = cfg.get("lora")
    if lora and lora.get("enabled", False):
        raise EdiffError(
            "distill_guidance: LoRA students are not supported yet; train a full copy (lora=none)"
        )
    for key, why in (("continue_from", "a continuation"), ("branch_step", "a branch point")):
        if cfg.get(key) is not None:
            raise EdiffError(f"distill_guidance: {key}= ({why}) is not supported for a student")
    if str((cfg.get("init") or {}).get("mode", "copy")) != "copy":
        raise EdiffError("distill_guidance: a student is a full copy of its teacher (init=copy)")
    if not cfg.distill_guidance.get("teacher"):
        raise EdiffError(
            "distill_guidance.teacher must name the teacher's run directory "
            f"(the teacher is <teacher>/{node.name}, a finished node)"
        )
    tdir = teacher_dir(cfg, node.name)
    if not (tdir / WEIGHTS).is_file() or not (tdir / NODE_JSON).is_file():
        what = "a LoRA node" if is_lora_node(tdir) else f"{tdir / WEIGHTS} does not exist"
        raise EdiffError(f"teacher {node.name} is not a finished full-weight node: {what}")
    if tdir.resolve() == node_dir(cfg.run_dir, node.name).resolve():
        raise EdiffError(
            f"distill_guidance: the student would be written over its teacher {tdir}; "
            "use another run_dir"
        )
    tcfg = load_train_config(tdir)
    if distill_on(tcfg):
        raise EdiffError(f"teacher {tdir} is itself a guidance-distilled student")
    law = param_from_config(cfg.get("param"))
    theirs = param_from_config(tcfg.get("param"))
    if param_spec(law) != param_spec(theirs):
        raise EdiffError(f"teacher {tdir} was trained under another parameterisation (param=)")
    if node_of(tcfg).pieces != node.pieces:
        raise EdiffError(f"teacher {tdir} owns another noise band than the student {node.name}")
    mine, parent = meta_denoiser(cfg.model), meta_denoiser(tcfg.model)
    if not takes_guidance(mine.backbone):
        raise EdiffError(
            f"guidance distillation needs a TextUNet or TextDiT student (model=tiny, base64, "
            f"dit_tiny); {type(mine.backbone).__name__} has no guidance input yet"
        )
    shapes = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    if type(mine.backbone) is not type(parent.backbone) or shapes != {
        k: tuple(v.shape) for k, v in parent.state_dict().items()
    }:
        raise EdiffError(
            f"distill_guidance: the student is a full copy of its teacher: use the teacher's "
            f"model (see {tdir / CONFIG})"
        )


def init_guidance_student(module: Any, cfg: DictConfig, node: Any) -> None:
    """Make `module` the student: its teacher's EMA weights plus a zero-output w embedding, a
    fresh AdamW with the init warmup, a fresh EMA, and the frozen teacher as its target."""
    tdir = teacher_dir(cfg, node.name)
    _, ema, meta = load_weights(tdir / WEIGHTS)
    lo, hi = w_range(cfg)
    spec = cfg.distill_guidance
    student = GuidedStudent(
        module.denoiser.backbone, (lo, hi), int(spec.features), module.denoiser.param
    )
    missing, unexpected = student.load_state_dict(ema, strict=False)
    new = f"backbone.{ATTR}."
    if unexpected or any(not k.startswith(new) for k in missing):
        first = (unexpected or [k for k in missing if not k.startswith(new)])[0]
        raise EdiffError(f"teacher {tdir} weights do not fit the student's model ({first})")
    module.denoiser = student
    module.ema_state = EMA(student)  # its parameters now include the w embedding
    teacher = denoiser_of(load_train_config(tdir))
    teacher.load_state_dict(ema)
    module.distiller = GuidanceDistiller(teacher.eval().requires_grad_(False), (lo, hi), tdir)
    module.step_offset = int(meta.get("step", 0))
    module.images_offset = 0  # a new objective: the EMA ramps afresh, as init=distill's does
    module.is_handoff = True
    module.handoff_record["from"] = str(tdir)
    warmup = float((cfg.get("init") or {}).get("warmup", 20))
    sched = module.lr_schedule
    record: dict[str, Any] = {"mode": "distill_guidance", "optimizer": "fresh"}
    if not sched.get("warmup_handoff") and warmup > 0:
        per = 1 if str(sched.get("unit", "steps")) == "steps" else int(cfg.data.batch_size)
        sched["warmup_handoff"] = warmup * per
        record["warmup_steps"] = warmup
    start = module.step_offset
    record["schedule"] = {"distill_guidance": [start, start + int(cfg.steps)]}
    record["ema"] = "restarted: a new objective"
    module.init_record = record


class GuidanceDistiller:
    """The frozen teacher and the w law; the module calls `loss` every step (`active` is always
    true). Not a submodule: the strategy must neither train, shard nor checkpoint it."""

    def __init__(self, teacher: nn.Module, w: tuple[float, float], source: Path) -> None:
        self.teacher, self.w, self.source = teacher, w, source
        self.losses: list[Tensor] = []  # mean unweighted error per step, on device

    def active(self, step: int) -> bool:
        return True

    def to(self, device: torch.device) -> GuidanceDistiller:
        self.teacher.to(device)
        return self

    def draw_w(self, sigma: Tensor) -> Tensor:
        """w ~ uniform[lo, hi] per sample, seeded by the step's σ draw (itself seeded by the
        stream and the tree step), so a resumed run draws what an uninterrupted one would."""
        seed = zlib.crc32(sigma.detach().cpu().numpy().tobytes())
        u = torch.rand(sigma.shape[0], generator=torch.Generator().manual_seed(seed))
        lo, hi = self.w
        return (lo + (hi - lo) * u).to(sigma.device)

    def target(self, y: Tensor, sigma: Tensor, cond: Any, w: Tensor) -> Tensor:
        """The teacher's guided output D_u + w·(D_c − D_u), both branches in one batch."""
        b = (-1,) + (1,) * (y.ndim - 1)
        with torch.no_grad():
            both = cond.cat(cond.null())
            d_c, d_u = self.teacher(torch.cat([y, y]), torch.cat([sigma, sigma]), both).chunk(2)
            d_c, d_u = d_c.float(), d_u.float()
        return d_u + w.view(b) * (d_c - d_u)

    def loss(
        self,
        student: Callable[..., Tensor],
        x: Tensor,
        sigma: Tensor,
        cond: Any,
        noise: Tensor,
        weight: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Per-sample λ(σ)·mean‖D_s(y; w) − D̂_w(y)‖², y = x + σn, shape [B]."""
        y, sigma = noised(x, sigma, noise)
        w = self.draw_w(sigma)
        target = self.target(y, sigma, cond, w)
        err = sample_error(student(y, sigma, cond, guidance=w), target)
        self.losses.append(err.detach().mean())
        return weight(sigma) * err

    def record(self) -> dict[str, Any]:
        """node.json's `init.distill`: teacher, w range and the error at the first/last steps."""
        values = [float(v) for v in self.losses]
        return {
            "teacher": str(self.source),
            "w": list(self.w),
            "loss": "λ(σ)·mean‖D_student(w) − (D_u + w·(D_c − D_u))_teacher‖², w ~ U[lo, hi]",
            "error_first": values[0] if values else None,
            "error_last": values[-1] if values else None,
            "steps_logged": len(values),
        }
