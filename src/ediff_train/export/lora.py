"""LoRA experts as diffusers LoRA files (`ediff-export … lora=true`, docs/export.md).

Beside the merged export, `lora/<node>/pytorch_lora_weights.safetensors` per LoRA expert, written
by diffusers' own `save_lora_weights` (SD3's for a transformer, SD's for a U-Net): PEFT keys
(`lora_A`/`lora_B`) relative to the diffusers model, under `transformer.` or `unet.`, and the
LoraConfig as diffusers' `lora_adapter_metadata`. alpha/rank is folded into `lora_B` (the file
says lora_alpha = r), so loaders that ignore the metadata (alpha = rank) still scale it right.
`lora/lora.json` names the base (the node whose EMA weights every adapter was trained over)
and each expert's σ band and guidance; the base's own export (`experts=<base>`) is the model
the files load onto (`pipe.load_lora_experts`, export/ediff_lora.py).

Why only diffusers backbones: diffusers loads LoRA into its own models (`load_lora_adapter`);
ediff-train's TextUNet/TextDiT export as custom classes it does not know, so those are refused
in one line pointing at the merged export, before anything is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ediff_train.errors import EdiffError
from ediff_train.export.components import DIFFUSERS, Expert, own_class
from ediff_train.export.ediff_lora import LORA_FORMAT, LORA_JSON
from ediff_train.run.adapters import (
    PEFT_PREFIX,
    RAW,
    base_dir,
    is_lora_node,
    lora_record,
    read_adapter,
)
from ediff_train.run.layout import node_dir
from ediff_train.run.weights import load_train_config, node_of

LORA_DIR = "lora"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default: load_lora_weights(dir)
MERGED = "export them merged instead (drop lora=true)"


@dataclass
class LoraFile:
    """One expert's adapter on its way out: the slot family its keys start with, its tensors
    in diffusers' keys and the LoraConfig that goes into the file's metadata."""

    node: str
    kind: str
    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    rank: int
    alpha: float


def inner_prefix(backbone: nn.Module) -> str:
    """Where the diffusers model sits in our wrapper (`model.`): peft's paths start there."""
    inner = backbone.diffusers_model
    name = next(n for n, m in backbone.named_modules() if m is inner)
    return f"{name}." if name else ""


def lora_file(name: str, ndir: Path, backbone: nn.Module, kind: str, which: str) -> LoraFile:
    """A LoRA node's adapter (EMA, or raw for weights=model) in diffusers' keys, alpha/rank
    folded into lora_B."""
    config, tensors = read_adapter(ndir if which == "ema" else ndir / RAW)
    if config.rank_pattern or config.alpha_pattern or config.use_dora:
        raise EdiffError(
            f"expert {name}: a LoRA with per-module ranks or DoRA does not export; {MERGED}"
        )
    scale = float(config.lora_alpha) / (
        math.sqrt(config.r) if config.use_rslora else float(config.r)
    )
    prefix = PEFT_PREFIX + inner_prefix(backbone)
    out: dict[str, Tensor] = {}
    for key, value in sorted(tensors.items()):
        if not key.startswith(prefix):
            raise EdiffError(
                f"expert {name}'s adapter changes {key[len(PEFT_PREFIX) :]}, outside the "
                f"diffusers model; {MERGED}"
            )
        value = value.to(torch.float32)
        out[key[len(prefix) :]] = value * scale if ".lora_B." in key and scale != 1.0 else value
    paths = sorted({k.split(".lora_")[0] for k in out})
    metadata = {
        "r": int(config.r),
        "lora_alpha": int(config.r),  # alpha/rank is in lora_B
        "target_modules": paths,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    return LoraFile(name, kind, out, metadata, int(config.r), float(config.lora_alpha))


def lora_files(
    run_dir: Any, experts: list[Expert], which: str
) -> tuple[dict[str, Any], list[LoraFile]]:
    """(the base's record, one LoraFile per expert, most noise first), or one line saying why
    these experts do not export as LoRA files: full weights among them, our own backbones,
    adapters over different bases, or a base that is not a root (it must export alone)."""
    full = [e.node.name for e in experts if not is_lora_node(node_dir(run_dir, e.node.name))]
    if full:
        raise EdiffError(
            f"lora=true: {', '.join(full)} {'has' if len(full) == 1 else 'have'} full weights, "
            f"not a LoRA adapter; only LoRA experts export as LoRA files: {MERGED}"
        )
    own = own_class(experts[0].backbone)
    if own is not None:
        raise EdiffError(
            f"lora=true: the experts' backbone is ediff-train's own {own[1]}, which diffusers "
            "does not load LoRA files into (its SD3Transformer2DModel and UNet2DConditionModel "
            f"do); {MERGED}"
        )
    bases: dict[str, Path] = {}
    for e in experts:
        ndir = node_dir(run_dir, e.node.name)
        rec = lora_record(ndir)
        bases.setdefault(str(rec["base_sha256"]), base_dir(ndir, rec, e.node.name))
    if len(bases) > 1:
        raise EdiffError(
            f"lora=true: the experts adapt {len(bases)} different bases; LoRA files load onto "
            f"one base: {MERGED}"
        )
    ((sha, bdir),) = bases.items()
    if node_of(load_train_config(bdir)).parent is not None:
        raise EdiffError(
            f"lora=true: the experts adapt {bdir.name}, which is not a root and so does not "
            f"export alone as the model to load them onto; {MERGED}"
        )
    kind = DIFFUSERS[experts[0].comp.cls]
    files = [
        lora_file(e.node.name, node_dir(run_dir, e.node.name), e.backbone, kind, which)
        for e in experts
    ]
    base = {"node": bdir.name, "run_dir": str(bdir.parent), "weights_sha256": sha}
    return {**base, "component": kind, "class": experts[0].comp.cls}, files


def write_lora(
    folder: Path, base: dict[str, Any], files: list[LoraFile], rows: list[dict[str, Any]]
) -> None:
    """`folder`/<node>/pytorch_lora_weights.safetensors through diffusers' savers, and
    lora.json; `rows` are experts.json's entries in the same order as `files`."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    for f in files:
        where = folder / f.node
        if f.kind == "transformer":
            StableDiffusion3Pipeline.save_lora_weights(
                where,
                transformer_lora_layers=f.tensors,
                transformer_lora_adapter_metadata=f.metadata,
            )
        else:
            StableDiffusionPipeline.save_lora_weights(
                where, unet_lora_layers=f.tensors, unet_lora_adapter_metadata=f.metadata
            )
    experts = [
        {
            "node": f.node,
            "file": f"{f.node}/{WEIGHT_NAME}",
            "sigma": r["sigma"],
            "guidance_scale": r["guidance_scale"],
            "boundaries": r["boundaries"],
            "rank": f.rank,
            "alpha": f.alpha,
            "target_modules": f.metadata["target_modules"],
        }
        for f, r in zip(files, rows)
    ]
    record = {
        "format": LORA_FORMAT,
        "base": base,
        "boundary_ratio": rows[0]["boundaries"]["boundary_ratio"][0] if len(rows) == 2 else None,
        "experts": experts,
        "load": (
            f"DiffusionPipeline.from_pretrained(<export of {base['node']}>, "
            "trust_remote_code=True).load_lora_experts(<this folder>)"
        ),
    }
    (folder / LORA_JSON).write_text(json.dumps(record, indent=2) + "\n")
