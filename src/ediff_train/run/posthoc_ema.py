"""EDM2's post-hoc EMA (Karras et al. 2024): pick the EMA length after training, per expert.

Why: the best EMA length depends on the node, the run length and the data, and finding it by
retraining costs a run per guess. Instead two power-function EMAs (σ_rel 0.05 and 0.10 by
default) are tracked during training and stored as periodic snapshots; since each snapshot
weights the training trajectory by a known profile p_i(τ) = (γ_i+1) τ^γ_i / t_i^(γ_i+1) on
[0, t_i], the EMA of any other σ_rel at any stored time is, to the accuracy of a least-squares fit
of profiles, a linear combination of the snapshots.

Time is the tree's optimiser step (ExpertModule.total_step): a child's trackers start from its
parent's final tracker state (`posthoc/state.safetensors`), so its snapshots profile the whole
root → child trajectory and the parent's snapshots up to the child's start belong to its lineage.

Files, under `<node>/posthoc/`: `<σ_rel>_<step:09d>.safetensors` (one snapshot, fp32 by default,
`posthoc_ema.dtype=float16` halves the disk), `state.safetensors` (both trackers in fp32 at the
node's end) and `ema_<σ_rel>.safetensors` (a reconstruction, in weights.safetensors' format).
`ediff-posthoc-ema run_dir=D node=E1_0 sigma_rel=0.08 [step=N] [out=PATH]`.
The trackers that write the snapshots during training: training.posthoc.PostHocEMA.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from ediff_train.errors import EdiffError, run_reporting
from ediff_train.run.layout import NODE_JSON, WEIGHTS, node_dir, read_node_json
from ediff_train.run.weights import load_weights, save_weights

POSTHOC = "posthoc"
STATE = "state.safetensors"
SIGMA_REL_MAX = ((1 + math.sqrt(5)) / 2) ** -2.5  # ≈ 0.3003, the widest a power profile gets
SNAPSHOT_NAME = re.compile(r"^(\d[0-9.e+-]*)_(\d{9})\.safetensors$")


# ---- the profiles ------------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative width (std / length) of the profile τ^γ on [0, t]; γ > −1 to be integrable."""
    if not gamma > -1:
        raise EdiffError(f"power-EMA exponent γ must be > -1, got {gamma}")
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The γ with gamma_to_sigma_rel(γ) = σ_rel: the largest real root of the cubic
    γ³ + 7γ² + (16 − s)γ + (12 − s) = 0, s = σ_rel⁻² (the other root, on the rising side of
    the width curve, weights early steps most: not an EMA)."""
    s = float(sigma_rel)
    if not 0 < s <= SIGMA_REL_MAX:
        raise EdiffError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel}")
    inv = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    real = roots[np.abs(roots.imag) <= 1e-7 * np.maximum(1.0, np.abs(roots))].real
    g = float(real.max())
    for _ in range(3):  # Newton polish of the root np.roots found (eigenvalues: ~1e-12 off)
        f = ((g + 7) * g + 16 - inv) * g + 12 - inv
        g -= f / ((3 * g + 14) * g + 16 - inv)
    return g


def beta(t: int, gamma: float) -> float:
    """Decay of the power EMA after optimiser step t ≥ 1: (1 − 1/t)^(γ+1) (0 at t = 1)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_dot(ta: Any, ga: Any, tb: Any, gb: Any) -> np.ndarray:
    """∫₀^min(ta,tb) p_a p_b dτ in closed form (broadcasting), written with ratios ≤ 1 so that
    t^(γ+1) never overflows at long runs and high γ."""
    ta, ga, tb, gb = (np.asarray(v, dtype=np.float64) for v in (ta, ga, tb, gb))
    m = np.minimum(ta, tb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (m / ta) ** (ga + 1) * (m / tb) ** (gb + 1) / m


def solve_coefficients(
    times: Sequence[float], gammas: Sequence[float], target_time: float, target_gamma: float
) -> tuple[np.ndarray, float]:
    """Least-squares x with Σ x_i p_i ≈ p_target (float64) under Σ x_i = 1, and the fit's
    relative L2 error ‖Σ x_i p_i − p_target‖ / ‖p_target‖.

    Why the constraint: every profile has mass 1, and weights are mostly their constant part,
    so a fit whose mass is off scales the whole network (unconstrained, a 6-step run came out
    2.1 % too large; with Σ x_i = 1 a constant trajectory is reproduced exactly)."""
    t = np.asarray(times, dtype=np.float64) / float(target_time)  # scale-free: only ratios count
    g = np.asarray(gammas, dtype=np.float64)
    n = len(t)
    gram = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = profile_dot(t, g, 1.0, target_gamma)
    kkt = np.block([[gram, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    x = np.linalg.lstsq(kkt, np.append(rhs, 1.0), rcond=None)[0][:n]  # Lagrange multiplier last
    norm = float(profile_dot(1.0, target_gamma, 1.0, target_gamma))
    err2 = float(x @ gram @ x - 2 * x @ rhs + norm)
    return x, math.sqrt(max(err2, 0.0) / norm)


# ---- snapshots on disk -------------------------------------------------------------------------
def tag(sigma_rel: float) -> str:
    """σ_rel as written in file names: 0.05, 0.1, 0.075."""
    return f"{float(sigma_rel):.6g}"


def snapshot_path(ndir: Path, sigma_rel: float, step: int) -> Path:
    return Path(ndir) / POSTHOC / f"{tag(sigma_rel)}_{int(step):09d}.safetensors"


@dataclass(frozen=True)
class Snapshot:
    """One stored power-EMA: its file, profile width, exponent, tree step and origin."""

    path: Path
    sigma_rel: float
    gamma: float
    step: int
    origin: str  # root | parent (continued from the parent's state) | fresh (from weights)


def read_metadata(path: Path) -> dict[str, Any]:

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except (OSError, SafetensorError, ValueError) as e:
        raise EdiffError(f"post-hoc EMA file {path} is unreadable ({e}): delete it") from None


def node_snapshots(ndir: Path) -> list[Snapshot]:
    """The snapshots a node's own run wrote, oldest first."""
    found = []
    for p in sorted((Path(ndir) / POSTHOC).glob("*.safetensors")):
        if SNAPSHOT_NAME.match(p.name):
            m = read_metadata(p)
            found.append(
                Snapshot(
                    p,
                    float(m["sigma_rel"]),
                    float(m["gamma"]),
                    int(m["step"]),
                    str(m.get("origin", "fresh")),
                )
            )
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def _parent_dir(ndir: Path, info: dict[str, Any]) -> Path:
    """The parent's folder: beside this node (a run dir moves as a whole), else in node.json's
    run_dir."""
    for cand in (ndir.parent / info["parent"], node_dir(info.get("run_dir", ""), info["parent"])):
        if (cand / POSTHOC).is_dir():
            return cand
    raise EdiffError(
        f"{ndir.name}'s post-hoc EMA continues its parent {info['parent']}'s, whose "
        f"snapshots are not at {ndir.parent / info['parent'] / POSTHOC}: copy the "
        "parent's folder beside it"
    )


def lineage_snapshots(ndir: Path) -> list[Snapshot]:
    """The node's snapshots plus those of the runs its trackers continued (its parent's up to
    the child's start step, a continued node's up to its end), oldest first."""
    out, cur, limit = [], Path(ndir), math.inf
    for _ in range(64):  # tree depth ≤ 11, plus continuations
        own = [s for s in node_snapshots(cur) if s.step <= limit]
        out += own
        if not own or own[-1].origin == "fresh":
            break  # trackers restarted from weights: what came before is not their history
        if own[-1].origin == "root" and not (cur / NODE_JSON).is_file():
            break  # a root still training: nothing before it
        info = read_node_json(cur)  # a child's start and parent are only recorded there
        cont = (info.get("handoff") or {}).get("continues")
        if cont:  # a continuation resumed the continued node's trackers from its checkpoint
            nxt = Path(cont)
            start = int(read_node_json(nxt)["step"])
        elif own[-1].origin == "parent" and info.get("parent"):
            nxt = _parent_dir(cur, info)
            start = int(info["step"]) - int(info["steps_this_run"])
        else:
            break
        cur, limit = nxt, min(limit, start)
    return sorted(out, key=lambda s: (s.step, s.sigma_rel))


@dataclass(frozen=True)
class Plan:
    """Which snapshots, with which coefficients, make the EMA of `sigma_rel` at `step`."""

    sigma_rel: float
    step: int
    snapshots: list[Snapshot]
    coefficients: np.ndarray
    fit_error: float  # relative L2 error of the profile fit

    def record(self) -> dict[str, Any]:
        return {
            "sigma_rel": self.sigma_rel,
            "gamma": sigma_rel_to_gamma(self.sigma_rel),
            "step": self.step,
            "snapshots": len(self.snapshots),
            "profile_fit_error": self.fit_error,
            "coefficient_abs_sum": float(np.abs(self.coefficients).sum()),
        }


def plan(
    snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None, where: str = ""
) -> Plan:
    """Coefficients for σ_rel at `step` (default: the last snapshot's), refused outside the
    stored widths or beyond the last snapshot: a fit there extrapolates."""
    where = f" of {where}" if where else ""
    if not snapshots:
        raise EdiffError(
            f"no post-hoc EMA snapshots{where}: train it with posthoc_ema.enabled=true"
        )
    last = max(s.step for s in snapshots)
    step = last if step is None else int(step)
    if step > last or step < 1:
        raise EdiffError(
            f"step={step} is outside the post-hoc EMA snapshots{where} (steps "
            f"{min(s.step for s in snapshots)}–{last}): pick a step in that range"
        )
    used = [s for s in snapshots if s.step <= step]
    if not used:
        raise EdiffError(
            f"step={step}: no post-hoc EMA snapshot{where} at or before it (the "
            f"first is at step {min(s.step for s in snapshots)})"
        )
    lo, hi = min(s.sigma_rel for s in used), max(s.sigma_rel for s in used)
    if not lo - 1e-12 <= float(sigma_rel) <= hi + 1e-12:
        raise EdiffError(
            f"sigma_rel={sigma_rel} lies outside the stored profiles' range "
            f"[{lo:g}, {hi:g}]{where}: pick one in it (or train with "
            "posthoc_ema.sigma_rels covering it)"
        )
    x, err = solve_coefficients(
        [s.step for s in used], [s.gamma for s in used], step, sigma_rel_to_gamma(float(sigma_rel))
    )
    return Plan(float(sigma_rel), step, used, x, err)


def load_tensors(path: Path) -> dict[str, Tensor]:

    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise EdiffError(f"post-hoc EMA file {path} is unreadable ({e}): delete it") from None


def combine(plans: Sequence[Plan]) -> list[dict[str, Tensor]]:
    """Σ x_i · snapshot_i for each plan, reading every snapshot file once (float64 sums, fp32
    out). Non-float tensors come from the newest snapshot used."""
    sums: list[dict[str, Tensor]] = [{} for _ in plans]
    paths = sorted({s.path for p in plans for s in p.snapshots}, key=str)
    for path in paths:
        tensors = load_tensors(path)
        for acc, p in zip(sums, plans):
            for s, x in zip(p.snapshots, p.coefficients):
                if s.path != path:
                    continue
                for k, v in tensors.items():
                    if not v.is_floating_point():
                        acc[k] = v.clone() if s is p.snapshots[-1] else acc.get(k, v.clone())
                    elif k in acc:
                        acc[k] += float(x) * v.double()
                    else:
                        acc[k] = float(x) * v.double()
    return [{k: v.float() if v.is_floating_point() else v for k, v in acc.items()} for acc in sums]


def reconstruct(node_dir: Path, sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The node's EMA weights for `sigma_rel` at tree step `step` (default: its last snapshot),
    from its snapshots and its lineage's."""
    return combine([plan(lineage_snapshots(Path(node_dir)), sigma_rel, step, Path(node_dir).name)])[
        0
    ]


def write_reconstruction(
    ndir: Path, sigma_rel: float, step: int | None = None, out: Path | None = None
) -> tuple[Path, Plan]:
    """`<node>/posthoc/ema_<σ_rel>.safetensors` in weights.safetensors' format: the node's raw
    weights as `model.`, the reconstruction as `ema.` (what the sampler loads)."""
    ndir = Path(ndir)
    p = plan(lineage_snapshots(ndir), sigma_rel, step, ndir.name)
    model, _, meta = load_weights(ndir / WEIGHTS)  # checked before the snapshots are read
    ema = combine([p])[0]
    if ema.keys() != model.keys():
        raise EdiffError(
            f"{ndir}: the snapshots' tensors are not the node's weights' (retrained "
            f"with another model?): delete {ndir / POSTHOC} and retrain"
        )
    if out is None:
        at = "" if step is None else f"_at{p.step:09d}"
        out = ndir / POSTHOC / f"ema_{tag(sigma_rel)}{at}.safetensors"
    save_weights(out, model, ema, {**meta, "posthoc_ema": p.record()})
    return Path(out), p


def main(argv: list[str] | None = None) -> int:
    """`ediff-posthoc-ema run_dir=D node=E1_0 sigma_rel=0.08 [step=N] [out=P]`."""
    args = list(sys.argv[1:] if argv is None else argv)

    def task() -> int:
        kv = dict(a.partition("=")[::2] for a in args)
        bad = [a for a in args if "=" not in a] + sorted(
            set(kv) - {"run_dir", "node", "sigma_rel", "step", "out"}
        )
        if bad or not {"run_dir", "node", "sigma_rel"} <= kv.keys():
            raise EdiffError(
                "usage: ediff-posthoc-ema run_dir=D node=E1_0 "
                f"sigma_rel=0.08 [step=N] [out=PATH] (got {' '.join(args)!r})"
            )
        try:
            sigma_rel, step = float(kv["sigma_rel"]), int(kv["step"]) if kv.get("step") else None
        except ValueError:
            raise EdiffError(f"sigma_rel must be a number and step an integer: {args}") from None
        ndir = node_dir(kv["run_dir"], kv["node"])
        path, p = write_reconstruction(
            ndir, sigma_rel, step, Path(kv["out"]) if kv.get("out") else None
        )
        print(
            f"wrote {path}: σ_rel {sigma_rel:g} at step {p.step} from {len(p.snapshots)} "
            f"snapshots (profile fit error {p.fit_error:.2e})"
        )
        return 0

    return run_reporting(task)


if __name__ == "__main__":
    sys.exit(main())
