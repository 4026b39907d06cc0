"""Each expert's backbone as the model its component folder holds.

A diffusers backbone (MMDiT, SDUNet) exports its own diffusers model, a LoRA adapter merged in.
Our own backbones (TextUNet, TextDiT) are no diffusers classes, so they export as
export/models.py's TextUNetModel / TextDiTModel (same parameter names, same operations),
which the folder carries as `ediff_models.py` for diffusers' remote-code loader; the weights
are copied over and the two are compared on one input before anything is written, so a drift
between nn/ and the template is an export error, not a silently different image. A
guidance-distilled student's w embedding goes with its model: `guidance_features` and
`guidance_range` (the w it was distilled for) in its config, `guidance_emb.*` in its weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.experts import Node
from ediff_train.errors import EdiffError
from ediff_train.nn.dit import TextDiT
from ediff_train.nn.unet import TextUNet

DIFFUSERS = {"SD3Transformer2DModel": "transformer", "UNet2DConditionModel": "unet"}
OWN = {TextUNet: ("unet", "TextUNetModel"), TextDiT: ("transformer", "TextDiTModel")}
EXPORTABLE_MODELS = (
    "model=tiny or base64 (TextUNet), dit_tiny (TextDiT), mmdit_tiny (MMDiT), "
    "sd_unet_tiny (SDUNet), or init_from="
)
# template modules (no ediff_train import) → their file name in a component folder
MODULE_FILES = {
    "ediff_train.export.models": "ediff_models",
    "ediff_train.export.clip_text": "ediff_clip",
}


@dataclass
class Component:
    """An expert's model on its way into the folder: its slot family (transformer or unet),
    the class model_index.json names, and the model to save."""

    kind: str
    cls: str
    model: nn.Module
    packing: dict[str, Any] | None  # a diffusers backbone's token packing (export/ediff_text.py)
    w_range: tuple[float, float] | None = None  # a guidance-distilled student's trained w


def own_class(backbone: nn.Module) -> tuple[str, str] | None:
    return OWN.get(type(backbone))  # exact: a subclass may compute something else


def exportable(name: str, backbone: nn.Module) -> str:
    """The class an expert's backbone exports as; one line when it cannot be exported."""
    own = own_class(backbone)
    if own is not None:
        return own[1]
    model = getattr(backbone, "diffusers_model", None)
    cls = type(model).__name__ if model is not None else None
    if cls not in DIFFUSERS:
        raise EdiffError(
            f"expert {name}'s backbone {type(backbone).__module__}.{type(backbone).__name__} "
            f"does not export: TextUNet, TextDiT, SD3Transformer2DModel and "
            f"UNet2DConditionModel backbones do ({EXPORTABLE_MODELS})"
        )
    if getattr(backbone, "token_proj", None) is not None:
        raise EdiffError(
            f"expert {name} projects its text tokens with its own layers (context_proj=linear), "
            "which a diffusers model does not hold: only context_proj=pad experts export"
        )
    return cls


def component(
    name: str, backbone: nn.Module, cfg: Any, w_range: tuple[float, float] | None = None
) -> Component:
    """The model to save for one expert (LoRA merged), checked against its training module;
    `w_range`: a guidance-distilled student's (its w input goes with it)."""
    cls = exportable(name, backbone)
    own = own_class(backbone)
    if own is None and w_range is not None:  # nn/guidance_embed.attach refuses these in training
        raise EdiffError(f"expert {name} is guidance-distilled, but {cls} has no w input")
    if own is None:
        packing = {
            "context_dim": int(backbone.context_dim),
            "pooled_dim": backbone.pooled_dim,
            "t5_tokens": backbone.t5_tokens,
            "clip_tokens": backbone.clip_tokens,
        }
        return Component(DIFFUSERS[cls], cls, merged(backbone.diffusers_model), packing)
    from ediff_train.export import models

    template = getattr(models, cls)
    kw = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(kw, dict)
    kw.pop("_target_", None)
    kw.pop("grad_checkpointing", None)
    if w_range is not None:
        kw["guidance_features"] = 2 * int(backbone.guidance_emb.half)
        kw["guidance_range"] = [float(w_range[0]), float(w_range[1])]
    known = set(inspect.signature(template.__init__).parameters)
    extra = sorted(set(kw) - known)
    if extra:
        raise EdiffError(f"expert {name}'s model has settings {extra} that export does not know")
    model = template(**kw)
    state = merged_state(backbone)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EdiffError(
            f"expert {name}: the exported {cls} does not hold its weights "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    check_same(name, backbone, model.eval(), None if w_range is None else w_range[1])
    return Component(own[0], cls, model, None, w_range)


def check_same(name: str, backbone: nn.Module, model: nn.Module, w: float | None = None) -> None:
    """The exported model and the training module give the same F on one random input (a
    student's at guidance scale `w`: its w embedding too)."""
    g = torch.Generator().manual_seed(0)
    dims = backbone.cond.dims
    mask = torch.tensor([[True] * 3 + [False] * 2])
    streams = {
        "t5": torch.randn(1, 5, dims["t5"], generator=g) * mask[..., None],
        "t5_mask": mask,
        "clip_txt": torch.randn(1, 77, dims["clip_txt"], generator=g),
        "clip_pool": torch.randn(1, dims["clip_pool"], generator=g),
        "clip_img": torch.randn(1, dims["clip_img"], generator=g),
    }
    size = int(backbone.image_size)
    x = torch.randn(1, int(backbone.in_channels), size, size, generator=g)
    c_noise = torch.tensor([0.3])
    kw = {} if w is None else {"guidance": torch.tensor([w])}
    with torch.no_grad():
        want = backbone(x, c_noise, Conditioning(**streams), **kw).float()
        got = model(x, c_noise, **kw, **streams).float()
    diff = float((want - got).abs().max())
    if not diff <= 1e-5 * max(1.0, float(want.abs().max())):
        raise EdiffError(
            f"expert {name}: the exported {type(model).__name__} differs from its training "
            f"module by {diff:.3g} on a test input (export/models.py has drifted from nn/)"
        )


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with any peft LoRA layers merged into plain weights (the live model's
    layers are merged in place: export only reads it afterwards)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.merge()
    return {
        k.replace(".base_layer.", "."): v
        for k, v in model.state_dict().items()
        if ".lora_" not in k and "lora_magnitude" not in k
    }


def merged(model: nn.Module) -> nn.Module:
    """A diffusers model with any peft LoRA layers merged into plain weights (a fresh model
    of the same config): a LoRA expert exports as base + adapter merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return model
    fresh = type(model).from_config(model.config)
    fresh.load_state_dict(merged_state(model))
    return fresh


@dataclass
class Expert:
    """One node on its way out: its node, training config, backbone and the component
    that holds it in the folder."""

    node: Node
    cfg: Any
    backbone: Any
    guidance: float
    comp: Component
