"""Candidate splits of a node, each band's predicted gain, and the recommendation.

Per band B of a candidate (a run of bins):
- within: mean gradient affinity between distinct bins of B (how much B is one task);
- across: mean gradient affinity of B's bins with the node's other bins (the transfer a split
  gives up: near 1, the shared model already serves B; low or negative, B fights the rest);
- similarity: mean optimal-denoiser similarity of B with the other bins (the data's view);
- headroom: mean relative loss a wider net saves in B's bins (probe.py); absent without a probe.
Predicted gain of B = headroom_B × (1 − max(across_B, 0)): capacity B could use, scaled by how much
of it the shared weights spend on conflicting bands. A heuristic, not a law: `--validate`
measures the gap it predicts and reports the rank correlation, whatever it is.
A candidate's gain is the bins-weighted mean over its bands (bins are equal-probability, so this
is the mean over the node's training σ law). Below `threshold`: "don't split".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ediff_train.advise.bins import Bins
from ediff_train.advise.intervals import best_partition


@dataclass
class Candidate:
    """One split of the node into contiguous bands of bins."""

    name: str
    starts: list[int]
    bands: list[dict[str, Any]] = field(default_factory=list)
    gain: float | None = None


def _mean(a: np.ndarray) -> float | None:
    return float(a.mean()) if a.size else None


def band_stats(
    lo: int,
    hi: int,
    affinity: np.ndarray,
    similarity: np.ndarray | None,
    headroom: Sequence[float] | None,
) -> dict[str, Any]:
    """The band [lo, hi)'s within/across affinity, data similarity across, headroom, gain."""
    k = affinity.shape[0]
    inside = np.zeros(k, dtype=bool)
    inside[lo:hi] = True
    block = affinity[np.ix_(inside, inside)]
    off = block[~np.eye(hi - lo, dtype=bool)]
    across = _mean(affinity[np.ix_(inside, ~inside)])
    out: dict[str, Any] = {
        "bins": [lo, hi],
        "within": _mean(off) if off.size else 1.0,
        "across": across,
        "similarity": None if similarity is None else _mean(similarity[np.ix_(inside, ~inside)]),
        "headroom": None if headroom is None else float(np.mean(headroom[lo:hi])),
    }
    conflict = 1.0 - max(across if across is not None else 1.0, 0.0)
    out["gain"] = None if headroom is None else max(out["headroom"], 0.0) * conflict
    out["conflict"] = conflict
    return out


def tree_starts(count: int, parts: int) -> list[int] | None:
    """The tree's own split into `parts` equal bands (None when the bins do not divide)."""
    if count % parts:
        return None
    return [count // parts * j for j in range(1, parts)]


def candidates(
    affinity: np.ndarray,
    similarity: np.ndarray | None,
    headroom: Sequence[float] | None,
    max_bands: int,
    level: int | None,
) -> list[Candidate]:
    """The tree's next levels, and the best k-band partitions by affinity and by data similarity
    (k = 2 … max_bands); identical band sets are listed once under all their names."""
    count = affinity.shape[0]
    found: dict[tuple[int, ...], list[str]] = {}
    parts, depth = 2, 1
    while parts <= max_bands:
        starts = tree_starts(count, parts)
        if starts is not None:
            label = f"tree E{level + depth}" if level is not None else f"{parts} equal bands"
            found.setdefault(tuple(starts), []).append(label)
        parts, depth = parts * 2, depth + 1
    for k in range(2, max_bands + 1):
        found.setdefault(tuple(best_partition(affinity, k)[0]), []).append(f"affinity DP k={k}")
        if similarity is not None:
            starts = best_partition(similarity, k)[0]
            found.setdefault(tuple(starts), []).append(f"denoiser DP k={k}")
    out = []
    for starts, names in found.items():
        edges = [0, *starts, count]
        bands = [
            band_stats(lo, hi, affinity, similarity, headroom)
            for lo, hi in zip(edges[:-1], edges[1:])
        ]
        gain = None
        if headroom is not None:
            gain = sum(b["gain"] * (b["bins"][1] - b["bins"][0]) for b in bands) / count
        out.append(Candidate(" / ".join(names), list(starts), bands, gain))
    return out


def recommend(cands: Sequence[Candidate], threshold: float) -> tuple[Candidate | None, str]:
    """(the best candidate or None, one sentence): split where the predicted gain is largest,
    unless no candidate reaches `threshold`."""
    scored = [c for c in cands if c.gain is not None]
    if not scored:
        best = min(cands, key=lambda c: np.mean([b["across"] for b in c.bands]))
        return None, (
            f"no headroom probe: cannot predict a gain; the most conflicting split is "
            f"{best.name} (run with --probe-steps > 0)"
        )
    best = max(scored, key=lambda c: c.gain or 0.0)
    if (best.gain or 0.0) < threshold:
        return None, (
            f"don't split: the best candidate ({best.name}) predicts {best.gain:.1%} lower "
            f"in-band loss, below the {threshold:.1%} threshold"
        )
    return best, f"split as {best.name}: predicted {best.gain:.1%} lower loss over the node's σ law"


def band_command(bins: Bins, lo: int, hi: int, node: Any) -> str:
    """train.py overrides that train band [lo, hi) of bins as a child of `node`: a tree node
    when the band is one of the node's dyadic descendants, else an interval node."""
    n, size = bins.count, hi - lo
    whole = (bins.edges[0], bins.edges[-1]) == node.quantile_interval
    parts = n // size if n % size == 0 and lo % size == 0 else 0
    if node.kind == "tree" and whole and parts and parts & (parts - 1) == 0:
        level, index = (int(v) for v in node.name[1:].split("_"))
        depth = parts.bit_length() - 1
        return f"expert=E{level + depth}_{index * parts + lo // size}"
    u_lo, u_hi = bins.edges[lo], bins.edges[hi]
    return (
        f"expert=interval expert.u_lo={u_lo:.6g} expert.u_hi={u_hi:.6g} expert.parent={node.name}"
    )


def table(bins: Bins, cands: Sequence[Candidate]) -> str:
    """The candidates as text: one block per candidate, one line per band."""
    edges = bins.sigma_edges

    def f(v: float | None, fmt: str = "{:+.3f}") -> str:
        return "    –" if v is None else fmt.format(v)

    lines = []
    for c in sorted(cands, key=lambda c: -(c.gain if c.gain is not None else -1.0)):
        gain = "–" if c.gain is None else f"{c.gain:.2%}"
        lines.append(f"{c.name}: predicted gain {gain}")
        lines.append("   σ band              within  across  data-sim  headroom  gain")
        for b in c.bands:
            lo, hi = b["bins"]
            band = f"[{edges[lo]:.3g}, {edges[hi]:.3g})"
            lines.append(
                f"   {band:<19} {f(b['within'])}  {f(b['across'])}  {f(b['similarity'])}   "
                f"{f(b['headroom'], '{:+.1%}'):>7}  {f(b['gain'], '{:.1%}'):>5}"
            )
    return "\n".join(lines)
