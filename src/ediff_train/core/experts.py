"""The expert tree: which band of noise levels each expert owns, and who owns a given σ.

A node owns a set of quantiles u of the training σ law (edm.LogNormalSigma). Tree node
E{l}_{i} owns [i/2^l, (i+1)/2^l): every node of a level sees the same probability mass, index 0
has the least noise. Complements ("not_E9_511_E3_0") own what the named nodes leave over;
custom intervals own an explicit range given in σ or in u. σ is drawn inside a node by exact
inverse-CDF sampling, never by rejection, so a node at the far tail costs no more than the root.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ediff_train.core import boundaries
from ediff_train.core.edm import LogNormalSigma
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.errors import EdiffError

MAX_LEVEL = 10
ROOT = "E0_0"
_EPS = 1e-12
_LAW = LogNormalSigma()
_TREE = re.compile(r"^E(\d+)_(\d+)$")

Piece = tuple[float, float]


@dataclass(frozen=True)
class Node:
    """A set of σ-law quantiles, as sorted disjoint half-open pieces [lo, hi) of (0, 1)."""

    name: str
    pieces: tuple[Piece, ...]
    parent: str | None
    kind: str = "tree"  # "tree" | "complement" | "interval"
    law: Any = LogNormalSigma()  # the training noise law (core/parameterisation.py)

    @property
    def mass(self) -> float:
        """Probability of this node under the root's σ law."""
        return sum(hi - lo for lo, hi in self.pieces)

    @property
    def quantile_interval(self) -> Piece:
        return (self.pieces[0][0], self.pieces[-1][1])

    @property
    def sigma_interval(self) -> tuple[float, float]:
        lo, hi = self.quantile_interval
        return (self.law.icdf(lo), self.law.icdf(hi))

    @property
    def sigma_pieces(self) -> tuple[tuple[float, float], ...]:
        return tuple((self.law.icdf(lo), self.law.icdf(hi)) for lo, hi in self.pieces)

    def contains(self, sigma: float) -> bool:
        u = self.law.cdf(sigma)
        return any(lo <= u < hi for lo, hi in self.pieces) or (u == 1.0 == self.pieces[-1][1])

    def sample_u(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform quantiles on the node's pieces, each piece chosen in proportion to its length."""
        lengths = torch.tensor([hi - lo for lo, hi in self.pieces], dtype=torch.float64)
        starts = torch.tensor([lo for lo, _ in self.pieces], dtype=torch.float64)
        r = torch.rand(n, generator=generator, dtype=torch.float64) * lengths.sum()
        ends = lengths.cumsum(0)
        which = torch.searchsorted(ends, r, right=True).clamp(max=len(self.pieces) - 1)
        offset = r - (ends[which] - lengths[which])
        u = starts[which] + offset.clamp(min=0.0)
        lo = torch.tensor([p[0] for p in self.pieces], dtype=torch.float64)[which]
        hi = torch.tensor([p[1] for p in self.pieces], dtype=torch.float64)[which]
        # keep u strictly inside (0, 1) and inside its piece despite rounding
        return torch.minimum(torch.maximum(u, lo), hi - _EPS * (hi - lo)).clamp(1e-15, 1 - 1e-15)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact draws from the σ law truncated to this node (float64)."""
        return self.law.icdf_t(self.sample_u(n, generator))

    def describe(self) -> str:
        q = " ∪ ".join(f"[{lo:.6g}, {hi:.6g})" for lo, hi in self.pieces)
        s = " ∪ ".join(f"[{_fmt(lo)}, {_fmt(hi)})" for lo, hi in self.sigma_pieces)
        return f"{self.name:<20} u ∈ {q:<40} σ ∈ {s:<36} parent {self.parent or '-'}"


def _fmt(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.4g}"


def tree_node(level: int, index: int) -> Node:
    if not 0 <= level <= MAX_LEVEL:
        raise EdiffError(f"node E{level}_{index} does not exist: levels are 0–{MAX_LEVEL}")
    n = 2**level
    if not 0 <= index < n:
        raise EdiffError(
            f"node E{level}_{index} does not exist: level {level} has indices 0–{n - 1}"
        )
    parent = None if level == 0 else f"E{level - 1}_{index // 2}"
    return Node(f"E{level}_{index}", ((index / n, (index + 1) / n),), parent, "tree")


def _merge(pieces: Iterable[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for lo, hi in sorted(pieces):
        if out and lo <= out[-1][1] + _EPS:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def complement_node(excluded: Sequence[str], parent: str | None = None) -> Node:
    """All quantiles not owned by `excluded` tree nodes (the paper's −(9,511) / M^C)."""
    if not excluded:
        raise EdiffError("a complement node must name at least one node to leave out")
    taken = _merge(p for name in excluded for p in parse_node(name).pieces)
    rest, cur = [], 0.0
    for lo, hi in taken:
        if lo > cur + _EPS:
            rest.append((cur, lo))
        cur = hi
    if cur < 1.0 - _EPS:
        rest.append((cur, 1.0))
    name = "not_" + "_".join(excluded)
    if not rest:
        raise EdiffError(f"node {name} is empty: its excluded nodes cover all noise levels")
    return Node(name, tuple(rest), parent or ROOT, "complement")


def interval_node(
    sigma_lo: float | None = None,
    sigma_hi: float | None = None,
    u_lo: float | None = None,
    u_hi: float | None = None,
    name: str | None = None,
    parent: str | None = None,
    law: Any = _LAW,
) -> Node:
    """A custom band, given in σ or in quantiles (not both for the same end)."""
    if sigma_lo is not None and u_lo is not None or sigma_hi is not None and u_hi is not None:
        raise EdiffError("give each end of an interval in σ or in u, not both")
    lo = law.cdf(float(sigma_lo)) if sigma_lo is not None else float(u_lo or 0.0)
    hi = law.cdf(float(sigma_hi)) if sigma_hi is not None else float(1.0 if u_hi is None else u_hi)
    if not 0.0 <= lo < hi <= 1.0:
        raise EdiffError(
            f"empty or invalid interval: u ∈ [{lo:.6g}, {hi:.6g}) "
            f"(σ {sigma_lo}–{sigma_hi}, u {u_lo}–{u_hi}); need 0 ≤ lo < hi ≤ 1"
        )
    if name is None:
        name = f"interval_u{lo:.6g}-{hi:.6g}"
    return Node(name, ((lo, hi),), parent or ROOT, "interval", law)


def parse_node(name: str, parent: str | None = None) -> Node:
    """A tree node `E{l}_{i}` or a complement `not_E{l}_{i}[_E{l}_{i}...]` by name."""
    m = _TREE.match(name)
    if m:
        node = tree_node(int(m.group(1)), int(m.group(2)))
        return node if parent is None else Node(node.name, node.pieces, parent, node.kind)
    if name.startswith("not_"):
        parts = name[4:].split("_")
        if len(parts) % 2 or not parts:
            raise EdiffError(f"cannot read node {name!r}: expected not_E<level>_<index>[_E...]")
        excluded = ["_".join(parts[i : i + 2]) for i in range(0, len(parts), 2)]
        return complement_node(excluded, parent)
    raise EdiffError(
        f"unknown node {name!r}: use E<level>_<index> (level 0–{MAX_LEVEL}, index 0–2^level−1), "
        "not_<nodes>, or interval"
    )


def node_from_config(cfg: Mapping[str, Any], law: Any = None) -> Node:
    """Build the node an `expert:` config group describes (see conf/expert/), its quantiles
    taken of `law` (the parameterisation's training noise law; default EDM's)."""
    node = _node_from_config(cfg, law or _LAW)
    return node if law is None else replace(node, law=law)


def _node_from_config(cfg: Mapping[str, Any], law: Any) -> Node:
    kind = cfg.get("kind", "tree")
    parent = cfg.get("parent")
    if kind == "interval":
        split = cfg.get("split_sigma")
        lo, hi = cfg.get("sigma_lo"), cfg.get("sigma_hi")
        if split is not None:  # below/above a split point (noise-split sweeps)
            lo, hi = (None, split) if cfg.get("side") == "below" else (split, None)
        node = interval_node(lo, hi, cfg.get("u_lo"), cfg.get("u_hi"), parent=parent, law=law)
        base = cfg.get("name") or "interval"
        name = node.name if base == "interval" else str(base)
        return Node(name, node.pieces, node.parent, "interval", law)
    return parse_node(str(cfg["name"]), parent)


class Router:
    """Maps σ to the node that owns it; the nodes must tile (0, 1) with no overlap or gap."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        if not nodes:
            raise EdiffError("an ensemble needs at least one expert")
        pieces = sorted((lo, hi, i) for i, n in enumerate(nodes) for lo, hi in n.pieces)
        cur, prev = 0.0, None
        for lo, hi, i in pieces:
            if lo < cur - _EPS:
                raise EdiffError(
                    f"experts overlap: {nodes[prev].name} and {nodes[i].name} both own u ≈ {lo:.6g}"
                )
            if lo > cur + _EPS:
                raise EdiffError(
                    f"experts leave a gap: no node owns u ∈ [{cur:.6g}, {lo:.6g}) "
                    f"(σ {_fmt(nodes[0].law.icdf(cur))}–{_fmt(nodes[0].law.icdf(lo))})"
                )
            cur, prev = hi, i
        if cur < 1.0 - _EPS:
            raise EdiffError(f"experts leave a gap: no node owns u ∈ [{cur:.6g}, 1)")
        if any(n.law != nodes[0].law for n in nodes):
            raise EdiffError(
                "experts were trained under different noise laws (param): an ensemble routes "
                "one law's quantiles, so its experts must share it"
            )
        self.nodes = list(nodes)
        self._bounds = torch.tensor([p[1] for p in pieces[:-1]], dtype=torch.float64)
        self._owner = torch.tensor([p[2] for p in pieces], dtype=torch.long)
        self.law = nodes[0].law

    def index(self, sigma: Tensor | float) -> Tensor:
        """Index into `nodes` of the owner of each σ."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        u = self.law.cdf_t(s.clamp(min=1e-300))
        return self._owner[torch.searchsorted(self._bounds, u, right=True)]

    def __call__(self, sigma: float) -> Node:
        return self.nodes[int(self.index(sigma).reshape(-1)[0])]


def main(argv: list[str] | None = None) -> int:
    """`ediff-experts E9_511 E3_0 not_E9_511_E3_0 [--param flow --shift 3] [--conventions]
    [--sample-shift 12]`: intervals and parents under a parameterisation's training law, and
    each interval in every boundary convention (core/boundaries.py)."""
    p = argparse.ArgumentParser(prog="ediff-experts", description=main.__doc__)
    p.add_argument("names", nargs="*", default=[ROOT, "E1_0", "E1_1"])
    p.add_argument("--param", default="edm", help="edm, flow, vp (the training noise law)")
    p.add_argument("--shift", type=float, default=None, help="flow matching's training shift")
    p.add_argument("--conventions", action="store_true", help="σ, log-SNR, t, … of each end")
    p.add_argument("--sample-shift", type=float, default=1.0, help="the sampler's shift")
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    try:
        spec = {"name": args.param} | ({"shift": args.shift} if args.shift is not None else {})
        law = param_from_config(spec).law
        for name in args.names:
            node = replace(parse_node(name), law=law)
            print(node.describe())
            if args.conventions:
                print(boundaries.table(list(node.sigma_pieces), args.sample_shift))
    except EdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
