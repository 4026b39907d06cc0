"""LoRA experts in an ensemble: one base on the device, the adapter switched by σ.

Every LoRA expert over the same base (run/adapters.py: same base file hash) becomes an adapter of
one shared denoiser; the ensemble's expert k is a thin `AdapterExpert` that makes adapter k the
active one (peft's `set_adapter` on each LoRA layer: a pointer change, no weight is copied) and
calls the shared denoiser. N experts cost one base plus N adapters of memory. Full-weight experts
in the same ensemble are loaded as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ediff_train.run.adapters import (
    add_adapter,
    base_dir,
    file_sha256,
    is_lora_node,
    lora_record,
    tuner_layers,
)
from ediff_train.run.layout import WEIGHTS
from ediff_train.run.weights import load_expert, load_train_config, node_of
from ediff_train.sampling.ensemble import Ensemble


class AdapterSwitch:
    """Which adapter of a shared denoiser is active; changed only when another one is asked for."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = tuner_layers(model)
        self.active: str | None = None
        self.switches = 0  # how often the adapter actually changed (for benches and tests)

    def use(self, name: str) -> None:
        if name == self.active:
            return
        for layer in self.layers:
            layer.set_adapter(name)
        self.active = name
        self.switches += 1


class AdapterExpert(nn.Module):
    """Expert `name` of an ensemble: the shared base with adapter `name` active."""

    shares_base = True  # Ensemble.offload refuses these: the base is not one expert's to move

    def __init__(self, base: nn.Module, name: str, switch: AdapterSwitch) -> None:
        super().__init__()
        self.base, self.name, self.switch = base, name, switch

    def forward(self, x: Tensor, sigma: Tensor, cond: Any, **kw: Any) -> Tensor:
        self.switch.use(self.name)
        return self.base(x, sigma, cond, **kw)


def adapter_experts(base: nn.Module, ndirs: Sequence[Path], which: str) -> list[AdapterExpert]:
    """Inject the adapters of `ndirs` (all over `base`'s weights) and one expert per node."""
    names = [add_adapter(base.backbone, d, which) for d in ndirs]
    base.eval().requires_grad_(False)
    switch = AdapterSwitch(base)
    return [AdapterExpert(base, n, switch) for n in names]


def load_lora_ensemble(run_dir: str | Path, names: Sequence[str], which: str = "ema") -> Ensemble:
    """Experts in run_dir, LoRA ones grouped by base (one base each, hash-checked), full ones
    rebuilt from their weights; in the order given."""
    adapter = "ema" if which == "ema" else "raw"
    nodes: list[Any] = []
    experts: list[nn.Module | None] = []
    groups: dict[str, tuple[Path, list[int]]] = {}  # base hash -> (base dir, positions)
    for i, name in enumerate(names):
        ndir = Path(run_dir) / name
        if is_lora_node(ndir):
            bdir = base_dir(ndir, lora_record(ndir))
            groups.setdefault(file_sha256(bdir / WEIGHTS), (bdir, []))[1].append(i)
            nodes.append(node_of(load_train_config(ndir)))
            experts.append(None)
        else:
            node, denoiser = load_expert(ndir, which)
            nodes.append(node)
            experts.append(denoiser)
    for bdir, positions in groups.values():
        _, base = load_expert(bdir, "ema")
        made = adapter_experts(base, [Path(run_dir) / names[i] for i in positions], adapter)
        for i, e in zip(positions, made):
            experts[i] = e
    return Ensemble(nodes, [e for e in experts if e is not None])
