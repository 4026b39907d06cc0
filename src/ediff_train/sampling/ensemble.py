"""The ensemble of experts as one denoiser: each call routed to the expert owning σ."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.experts import Node, Router
from ediff_train.errors import EdiffError
from ediff_train.run.weights import load_expert
from ediff_train.sampling.offload import Offloader


class Ensemble(nn.Module):
    """Experts that tile the noise axis, called like a single denoiser D(x, σ, cond)."""

    def __init__(self, nodes: Sequence[Node], denoisers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.router = Router(nodes)
        self.experts = nn.ModuleList(denoisers)
        self.calls = [0] * len(denoisers)  # how often each expert was asked (for reports/tests)
        self.offloader: Offloader | None = None

    def offload(self, device: str | torch.device) -> Ensemble:
        """Keep the experts in host memory; each sits on `device` only while it runs, and the
        next one is copied over meanwhile (offload.Offloader). Returns self."""
        if any(getattr(e, "shares_base", False) for e in self.experts):
            raise EdiffError(
                "offload: LoRA experts share one base on the device and differ only by small "
                "adapters (sampling/lora.py); load them without offloading"
            )
        self.offloader = Offloader(list(self.experts), device)
        return self

    def plan(self, sigmas: Tensor) -> None:
        """The σ the sampler will visit, so offloading knows which expert comes next."""
        if self.offloader is not None:
            owners = self.router.index(sigmas[sigmas > 0].detach().cpu()).tolist()
            self.offloader.plan(owners)

    def _run(self, i: int, *args: Any, **kw: Any) -> Tensor:
        self.calls[i] += 1
        if self.offloader is not None:
            self.offloader.activate(i)
        return self.experts[i](*args, **kw)

    def forward(self, x: Tensor, sigma: Tensor, cond: Conditioning, **kw: Any) -> Tensor:
        """`kw` (e.g. cross_attn_bias) goes to the expert; only for batches of one σ."""
        s = sigma.reshape(-1)
        owners = self.router.index(s.detach().cpu())
        if bool((owners == owners[0]).all()):
            return self._run(int(owners[0]), x, sigma, cond, **kw)
        if kw:
            raise EdiffError("per-call options need one σ for the whole batch")
        out = torch.empty_like(x)  # mixed σ in one batch: ask each owner for its rows
        for i in owners.unique().tolist():
            rows = (owners == i).nonzero().squeeze(1).to(x.device)
            sub = cond.rows(rows)
            sig = sigma.reshape(-1).expand(x.shape[0])[rows]
            out[rows] = self._run(i, x[rows], sig, sub)
        return out


def load_ensemble(run_dir: str | Path, names: Sequence[str], which: str = "ema") -> Ensemble:
    """Experts trained in run_dir, each rebuilt from its saved config and weights; LoRA experts
    share one base, their adapters switched by σ (sampling/lora.py)."""
    from ediff_train.run.adapters import is_lora_node

    if any(is_lora_node(Path(run_dir) / n) for n in names):
        from ediff_train.sampling.lora import load_lora_ensemble

        return load_lora_ensemble(run_dir, names, which)
    nodes, denoisers = [], []
    for name in names:
        node, denoiser = load_expert(Path(run_dir) / name, which)
        nodes.append(node)
        denoisers.append(denoiser)
    return Ensemble(nodes, denoisers)
