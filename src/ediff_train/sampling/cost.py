"""What an ensemble costs per image on a solver's σ grid, as a ratio to its root.

Every network evaluation the solver makes (Heun: two per step but the last, …) is routed to the
expert that owns its σ, and costs that expert's FLOPs per forward (nn/cost.py; two rows when
the guidance scale is not 1). The ensemble's FLOPs per image are their sum; the root's are the
same number of evaluations of the root's network, so the ratio is
Σ_evaluations F(owner) / (evaluations × F(root)). Wall time is measured the same way: each
expert's forward is timed on this machine (median of a few runs, weights random or trained,
which costs the same) and summed over the evaluations it owns.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from ediff_train.core import solvers
from ediff_train.core.edm import EDMPrecond
from ediff_train.core.experts import Node, Router
from ediff_train.nn.cost import DEFAULT_T5_LEN, evaluation_flops, parameters, random_cond
from ediff_train.run.layout import CONFIG
from ediff_train.run.weights import load_train_config, node_of


def evaluation_sigmas(solver: str, sigmas: torch.Tensor, order: int = 3) -> list[float]:
    """The σ of every network evaluation `solver` makes on the grid `sigmas`, in order (the
    solver is run on a one-pixel image with a recording stand-in for the network)."""
    seen: list[float] = []

    def record(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(float(sigma.reshape(-1)[0]))
        return torch.zeros_like(x)

    solvers.solve(solver, record, torch.zeros(1, 1, 1, 1), sigmas, order)
    return seen


@dataclass
class ExpertCost:
    """One expert: its size, its FLOPs and time per evaluation, and the evaluations it owns."""

    name: str
    parameters: int
    flops: int  # per evaluation of one image (CFG's two rows included)
    evaluations: int = 0
    seconds: float | None = None  # measured, per evaluation of one image


@dataclass
class EnsembleCost:
    """FLOPs and time per image of an ensemble on one grid, beside its root's."""

    experts: list[ExpertCost]
    root: ExpertCost
    evaluations: int
    solver: str
    guidance: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return sum(e.flops * e.evaluations for e in self.experts)

    @property
    def flops_ratio(self) -> float:
        return self.flops / (self.evaluations * self.root.flops)

    @property
    def seconds(self) -> float | None:
        if any(e.seconds is None for e in self.experts):
            return None
        return sum(float(e.seconds or 0.0) * e.evaluations for e in self.experts)

    @property
    def seconds_ratio(self) -> float | None:
        s = self.seconds
        if s is None or not self.root.seconds:
            return None
        return s / (self.evaluations * self.root.seconds)

    def record(self) -> dict[str, Any]:
        """For reports (eval.json): totals per image and the parts."""
        return {
            "solver": self.solver,
            "guidance": self.guidance,
            "evaluations": self.evaluations,
            "gflop_per_image": self.flops / 1e9,
            "flops_ratio_to_root": self.flops_ratio,
            "seconds_per_image": self.seconds,
            "time_ratio_to_root": self.seconds_ratio,
            "experts": [vars(e) for e in self.experts],
            "root": vars(self.root),
            **self.settings,
        }

    def table(self) -> str:
        """The cost as printed by `ediff-experts --cost` and evaluate.py."""
        lines = [f"{'expert':<12}{'params':>11}{'GFLOP/eval':>12}{'ms/eval':>10}{'evals':>7}"]
        for e in [*self.experts, self.root]:
            ms = f"{e.seconds * 1e3:.2f}" if e.seconds is not None else "-"
            evals = str(e.evaluations) if e is not self.root else f"({self.evaluations})"
            name = e.name if e is not self.root else f"{e.name} root"
            lines.append(f"{name:<12}{e.parameters:>11,}{e.flops / 1e9:>12.4f}{ms:>10}{evals:>7}")
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: FLOPs and time per image, each as a ratio to the root's."""
        time_part = ""
        if self.seconds is not None and self.seconds_ratio is not None:
            time_part = f", {self.seconds * 1e3:.1f} ms/image ({self.seconds_ratio:.3f}× root)"
        return (
            f"per image ({self.solver}, {self.evaluations} evaluations, guidance "
            f"{self.guidance:g}): {self.flops / 1e9:.3f} GFLOP ({self.flops_ratio:.3f}× root)"
            + time_part
        )


def time_forward(cfg: Mapping[str, Any], guidance: float, repeats: int = 3) -> float:
    """Seconds of one evaluation for one image (CFG: a batch of two), median of `repeats`
    after one warm-up, with the config's network at random weights on the CPU."""
    den = EDMPrecond(instantiate(cfg, grad_checkpointing=False)).eval()
    net = den.backbone
    batch = 1 if float(guidance) == 1.0 else 2
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size)
    sigma = torch.ones(batch)
    cond = random_cond(cfg, batch, DEFAULT_T5_LEN, torch.device("cpu"))
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            den(x, sigma, cond)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def ensemble_cost(
    nodes: Sequence[Node],
    models: Sequence[Mapping[str, Any]],
    root_model: Mapping[str, Any],
    steps: int = 24,
    solver: str = "heun",
    guidance: float = 1.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    measure: bool = True,
    t5_len: int = DEFAULT_T5_LEN,
    distilled: Sequence[bool] = (),
) -> EnsembleCost:
    """The cost per image of the experts `nodes` (model configs `models`, in order) on the
    solver's grid, beside one network of `root_model` doing the same evaluations. Experts that
    do not tile (0, 1) are one line (Router). A `distilled` expert (guidance-distilled) is one
    row per evaluation whatever the guidance."""
    router = Router(nodes)
    grid = solvers.karras_sigmas(int(steps), sigma_min, sigma_max, rho)
    at = evaluation_sigmas(solver, grid)
    owners = router.index(torch.tensor(at, dtype=torch.float64)).tolist()
    one = [bool(d) for d in distilled] + [False] * (len(nodes) - len(distilled))
    scales = [1.0 if d else guidance for d in one]
    experts = [
        ExpertCost(n.name, parameters(m), evaluation_flops(m, g, t5_len))
        for n, m, g in zip(nodes, models, scales)
    ]
    for i in owners:
        experts[i].evaluations += 1
    root = ExpertCost(
        "E0_0", parameters(root_model), evaluation_flops(root_model, guidance, t5_len)
    )
    if measure:
        for e, m, g in zip(experts, models, scales):
            e.seconds = time_forward(m, g) if e.evaluations else 0.0
        root.seconds = time_forward(root_model, guidance)
    settings = {"steps": int(steps), "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho}
    return EnsembleCost(experts, root, len(at), solver, float(guidance), settings)


def root_dir_of(ndir: Path) -> Path:
    """The folder of the root a trained node descends from (parents are sibling folders named
    by `expert.parent`); the node itself when an ancestor is not there."""
    here = Path(ndir)
    for _ in range(64):  # a tree is at most 11 levels, schedules add continuations
        parent = node_of(load_train_config(here)).parent
        if parent is None or not (here.parent / parent / CONFIG).is_file():
            return here
        here = here.parent / parent
    return here


def trained_cost(dirs: Sequence[Path], **kw: Any) -> EnsembleCost:
    """`ensemble_cost` of trained nodes, each with the model config it was trained with; the
    reference is the root its first expert descends from."""
    cfgs = [load_train_config(d) for d in dirs]
    root = load_train_config(root_dir_of(dirs[0]))
    distilled = [bool((c.get("distill_guidance") or {}).get("enabled", False)) for c in cfgs]
    return ensemble_cost(
        [node_of(c) for c in cfgs], [c.model for c in cfgs], root.model, distilled=distilled, **kw
    )
