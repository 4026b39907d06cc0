"""A child node trained as a peft LoRA adapter over a frozen base (`lora=default`; docs/lora.md).

The rule: every LoRA expert of a tree is an adapter over one base, the EMA weights of its nearest
full-weight ancestor, so the sampler keeps that base on the device once and switches adapters by
σ without copying a weight. A LoRA child of a full parent adapts the parent; a LoRA child of a
LoRA parent adapts the same base, its adapter starting from the parent's (raw and EMA). Only the
adapter's parameters train: AdamW and the EMA see the base as constants (the EMA of a constant
stays bit-identical), and the hand-off writes peft's files (run/adapters.py), not full weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ediff_train.core.ema import EMA
from ediff_train.core.experts import Node
from ediff_train.core.settings import boolean, check, count, real, setting
from ediff_train.errors import EdiffError
from ediff_train.run.adapters import (
    ADAPTER,
    RAW,
    base_dir,
    file_sha256,
    inject,
    is_adapter_param,
    is_lora_node,
    load_into,
    lora_config,
    lora_record,
    read_adapter,
    resolve_targets,
    save_adapter,
    to_peft,
)
from ediff_train.run.layout import WEIGHTS, node_dir, parent_weights, read_node_json
from ediff_train.run.weights import load_weights


def _targets(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    items = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return isinstance(items, list) and bool(items) and all(isinstance(t, str) for t in items)


@dataclass
class LoraSettings:
    """conf/lora/*.yaml: the adapter of a child node (peft's LoraConfig)."""

    enabled: bool = setting(False, "true or false", boolean)
    rank: int = setting(8, "a whole number ≥ 1", count(1))
    alpha: float = setting(8.0, "a finite number > 0", real(lambda x: x > 0))
    dropout: float = setting(0.0, "a number in [0, 1)", real(lambda x: 0 <= x < 1))
    # auto (the backbone's attention projections), a list of module names/suffixes, or a regex
    target_modules: Any = setting(
        "auto", "auto, a non-empty list of module names, or a regex string", _targets
    )


def lora_on(cfg: DictConfig) -> bool:
    lora = cfg.get("lora")
    return bool(lora) and bool(lora.get("enabled", False))


def check_lora(cfg: DictConfig, node: Node) -> None:
    """One line before anything is written: bad settings, or what LoRA does not do (yet)."""
    check(cfg.get("lora"), LoraSettings, "lora")
    if not lora_on(cfg):
        pdir = _parent_dir(cfg, node)
        if pdir is not None and is_lora_node(pdir):
            raise EdiffError(
                f"parent {node.parent} is a LoRA adapter ({pdir}): train its children with "
                "lora=default too (a full-weight child of a LoRA node is not supported)"
            )
        return
    if node.parent is None:
        raise EdiffError(
            f"lora: {node.name} has no parent to adapt; a LoRA expert is an adapter over its "
            "parent (train the root without lora, then e.g. expert=E1_1 lora=default)"
        )
    for key, why in (
        ("continue_from", "continuing a LoRA node"),
        ("branch_step", "a LoRA child at a branch point"),
    ):
        if cfg.get(key) is not None:
            raise EdiffError(f"{key}={cfg.get(key)}: {why} is not supported with lora yet")
    if (cfg.get("posthoc_ema") or {}).get("enabled"):
        raise EdiffError(
            "posthoc_ema.enabled=true: post-hoc EMA of a LoRA adapter is not supported yet "
            "(use lora=none or posthoc_ema.enabled=false)"
        )


def _parent_dir(cfg: DictConfig, node: Node) -> Path | None:
    if node.parent is None:
        return None
    return (
        Path(str(cfg.parent_dir)) if cfg.get("parent_dir") else node_dir(cfg.run_dir, node.parent)
    )


class LoraExpert:
    """The adapter a module trains: its peft config, its base, and how its hand-off is written."""

    def __init__(self, name: str, config: Any, base: dict[str, Any]) -> None:
        self.name, self.config, self.base = name, config, base

    def save(
        self, ndir: Path, model: dict[str, Any], ema: dict[str, Any], meta: dict[str, Any]
    ) -> dict[str, Any]:
        """peft's files for the EMA adapter (ndir) and the raw one (ndir/raw); returns node.json's
        `lora` record. Keys of `model`/`ema` are the denoiser's (`backbone.` first)."""
        raw = to_peft(model, self.name, "backbone.")
        avg = to_peft(ema, self.name, "backbone.")
        save_adapter(ndir / RAW, self.config, raw, meta)
        save_adapter(ndir, self.config, avg, meta)
        n = sum(v.numel() for v in avg.values())
        return {
            **self.base,
            "adapter": self.name,
            "files": [ADAPTER, f"{RAW}/{ADAPTER}"],
            "rank": int(self.config.r),
            "alpha": float(self.config.lora_alpha),
            "target_modules": _plain(self.config.target_modules),
            "adapter_params": n,
            "optimizer": "fresh AdamW over the adapter's parameters",
        }


def _plain(targets: Any) -> Any:
    return sorted(targets) if isinstance(targets, set) else targets


def init_lora(module: Any, cfg: DictConfig, node: Node) -> None:
    """Make `module` (fresh from build_module) a LoRA child: base weights loaded, adapter
    injected (from the parent's when the parent is LoRA), all else frozen, the EMA rebuilt over
    the adapted model, the tree's step and images counted on from the parent's. On resume the
    checkpoint then overwrites the adapter and its EMA."""
    pdir = _parent_dir(cfg, node)
    assert pdir is not None
    backbone = module.denoiser.backbone
    if is_lora_node(pdir):  # the same base as the parent; its adapter as this one's start
        record = lora_record(pdir)
        bdir = base_dir(pdir, record, f"parent {node.parent}")
        parent = read_node_json(pdir)
        meta = {"step": parent["step"], "images": parent["images"]}
        base = {k: record[k] for k in ("base", "base_dir", "base_sha256")}
    else:
        bdir = parent_weights(cfg.run_dir, node.parent, cfg.get("parent_dir")).parent
        base = {"base": bdir.name, "base_dir": str(bdir.resolve()), "base_sha256": ""}
        meta = {}
    _, ema, wmeta = load_weights(bdir / WEIGHTS)
    meta = meta or wmeta
    base["base_sha256"] = base["base_sha256"] or file_sha256(bdir / WEIGHTS)
    try:  # the base is the EMA: the weights the sampler holds
        module.denoiser.load_state_dict(ema)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise EdiffError(
            f"{bdir / WEIGHTS}: base weights do not fit this model ({first})"
        ) from None
    lo = cfg.lora
    config = lora_config(
        lo.rank, lo.alpha, lo.dropout, resolve_targets(backbone, lo.target_modules)
    )
    if is_lora_node(pdir):  # the parent's adapter shape decides: it is continued, not resized
        config, _ = read_adapter(pdir)
    inject(backbone, config, node.name)
    module.ema_state = EMA(module.denoiser)
    if is_lora_node(pdir):
        for target, folder in ((backbone, pdir / RAW), (module.ema_state.module.backbone, pdir)):
            _, tensors = read_adapter(folder)
            load_into(target, tensors, node.name, str(folder / ADAPTER))
    for name, p in module.denoiser.named_parameters():
        p.requires_grad_(is_adapter_param(name))
    module.lora = LoraExpert(node.name, config, base)
    module.step_offset = int(meta.get("step", 0))
    module.images_offset = int(meta.get("images", module.step_offset * int(cfg.data.batch_size)))
    module.is_handoff = True
    module.handoff_record.update(
        {"from": str(pdir), "lora_base": base["base"], "optimizer": "fresh (a LoRA adapter)"}
    )
