"""The experiment report's figures: per-seed tables, paired claims, the plateau gate, verdicts."""

from __future__ import annotations

import math
import statistics
from typing import Any

from omegaconf import OmegaConf

from ediff_train.core.edm import P_MEAN, P_STD
from ediff_train.core.solvers import karras_sigmas
from ediff_train.experiments.schedule import CONF_DIR


def _keys(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """(quality key ↓, alignment key ↑, their labels): digits or shapes analogues, or FID/CLIP."""
    if "shapes_fid" in row:
        return "shapes_fid", "caption_accuracy", "shapes-FID ↓", "caption accuracy ↑"
    if "digits_fid" in row:
        return "digits_fid", "prompt_accuracy", "digits-FID ↓", "prompt accuracy ↑"
    return "fid", "clip_score", "FID ↓", "CLIP score ↑"


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def image_table(spec: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """ensemble → guidance → {quality, alignment: stats over seeds}; plus the paired deltas."""
    names = list(spec.get("images") or spec["ensembles"])
    first = per_seed[0]["images"]["runs"][0]["rows"][0]
    q, a, q_label, a_label = _keys(first)
    table: dict[str, dict[str, Any]] = {}
    for name, i in zip(names, range(len(names))):
        per_g: dict[float, dict[str, list[float]]] = {}
        for seed in per_seed:
            for row in seed["images"]["runs"][i]["rows"]:
                cell = per_g.setdefault(float(row["guidance"]), {q: [], a: []})
                cell[q].append(float(row[q]))
                cell[a].append(float(row[a]))
        table[name] = {
            f"{g:g}": {k: _stats(v) for k, v in cell.items()} for g, cell in sorted(per_g.items())
        }
    out = {
        "quality_key": q,
        "alignment_key": a,
        "quality_label": q_label,
        "alignment_label": a_label,
        "table": table,
        "claim_minus_baseline": paired(table, spec["claim"], spec["baseline"], q, a),
    }
    if spec.get("control") in table:
        out["control_minus_baseline"] = paired(table, spec["control"], spec["baseline"], q, a)
        out["claim_minus_control"] = paired(table, spec["claim"], spec["control"], q, a)
    return out


def attribute_table(spec: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """ensemble → guidance → attribute → stats over seeds, where the rows carry accuracy per
    attribute (metric=shapes); {} otherwise. An attribute no caption claimed is left out."""
    names = list(spec.get("images") or spec["ensembles"])
    if "attribute_accuracy" not in per_seed[0]["images"]["runs"][0]["rows"][0]:
        return {}
    table: dict[str, Any] = {}
    for i, name in enumerate(names):
        per_g: dict[float, dict[str, list[float]]] = {}
        for seed in per_seed:
            for row in seed["images"]["runs"][i]["rows"]:
                cell = per_g.setdefault(float(row["guidance"]), {})
                for attr, v in row["attribute_accuracy"].items():
                    if v is not None:
                        cell.setdefault(attr, []).append(float(v))
        table[name] = {
            f"{g:g}": {k: _stats(v) for k, v in cell.items()} for g, cell in sorted(per_g.items())
        }
    return table


def paired(table: dict[str, Any], claim: str, base: str, q: str, a: str) -> dict[str, Any]:
    """Per guidance scale: the paired (same seed) differences claim − base and who is better."""
    deltas = {}
    for g, cell in table[claim].items():
        dq = [c - b for c, b in zip(cell[q]["values"], table[base][g][q]["values"])]
        da = [c - b for c, b in zip(cell[a]["values"], table[base][g][a]["values"])]
        better = statistics.fmean(dq) < 0 and statistics.fmean(da) >= 0 and all(d < 0 for d in dq)
        worse = statistics.fmean(dq) > 0 and statistics.fmean(da) <= 0 and all(d > 0 for d in dq)
        deltas[g] = {
            q: _stats(dq),
            a: _stats(da),
            "claim_better": better,
            "baseline_better": worse,
            "seeds_claim_lower_" + q: sum(d < 0 for d in dq),
        }
    return deltas


def loss_table(spec: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Loss by σ per ensemble over seeds, the claim/baseline ratio per σ, and band means."""
    names = list(spec["ensembles"])
    sigmas = per_seed[0]["loss_by_sigma"]["runs"][0]["sigmas"]
    curves = {
        name: [s["loss_by_sigma"]["runs"][i]["loss"] for s in per_seed]
        for i, name in enumerate(names)
    }
    claim, base = spec["claim"], spec["baseline"]
    ratios = [[c / b for c, b in zip(cl, bl)] for cl, bl in zip(curves[claim], curves[base])]
    labels = {
        name: per_seed[0]["loss_by_sigma"]["runs"][i]["label"] for i, name in enumerate(names)
    }
    bands = {}
    claim_bands = [
        b["node"] for b in per_seed[0]["loss_by_sigma"]["runs"][names.index(claim)]["bands"]
    ]
    for node in claim_bands:
        c = [s["loss_by_sigma"]["band_means"][node][labels[claim]] for s in per_seed]
        b = [s["loss_by_sigma"]["band_means"][node][labels[base]] for s in per_seed]
        if None in c or None in b:
            continue
        bands[node] = {
            claim: _stats(c),
            base: _stats(b),
            "seeds_claim_lower": sum(x < y for x, y in zip(c, b)),
        }
    edges = sorted(
        {
            b[k]
            for b in per_seed[0]["loss_by_sigma"]["runs"][names.index(claim)]["bands"]
            for k in ("sigma_lo", "sigma_hi")
        }
        - {0.0, float("inf")}
    )
    return {
        "sigmas": sigmas,
        "curves": curves,
        "ratio_claim_over_baseline": ratios,
        "bands": bands,
        "claim_band_edges": edges,
    }


def law_weighted(sigmas: list[float], loss: list[float], law: Any = None) -> float:
    """Held-out loss averaged under the training law (ln σ ~ N(p_mean, p_std²): `law`, the
    runs' own, default EDM's) over a grid log-spaced in σ: what "the loss" of a model is, one
    number. A law that is not log-normal (VP's index law) weighs each grid point by the
    probability of its cell (between the neighbours' geometric means)."""

    if law is None or hasattr(law, "p_mean"):
        m, s = (P_MEAN, P_STD) if law is None else (law.p_mean, law.p_std)
        w = [math.exp(-0.5 * ((math.log(x) - m) / s) ** 2) for x in sigmas]
    else:
        cuts = [0.0, *(math.sqrt(a * b) for a, b in zip(sigmas, sigmas[1:])), math.inf]
        w = [law.cdf(hi) - law.cdf(lo) for lo, hi in zip(cuts, cuts[1:])]
    return sum(wi * li for wi, li in zip(w, loss)) / sum(w)


def gate_table(
    spec: dict[str, Any], loss: dict[str, Any], law: Any = None
) -> dict[str, Any] | None:
    """Is the root at its plateau? The continued root's held-out loss gain over the root, per
    seed, under the runs' training `law`; the comparison means nothing where more shared steps
    still pay (no verdict then)."""
    gate = spec.get("gate")
    if not gate:
        return None
    sig = loss["sigmas"]
    root = [law_weighted(sig, c, law) for c in loss["curves"][gate["root"]]]
    cont = [law_weighted(sig, c, law) for c in loss["curves"][gate["continued"]]]
    gains = [(r - c) / r for r, c in zip(root, cont)]
    limit = float(gate["max_gain"])
    return {
        "root": gate["root"],
        "continued": gate["continued"],
        "max_gain": limit,
        "root_loss": _stats(root),
        "continued_loss": _stats(cont),
        "gain": _stats(gains),
        "passed": statistics.fmean(gains) <= limit,
    }


def band_shares(spec: dict[str, Any], bands: list[dict[str, Any]]) -> dict[str, float]:
    """Each of the claim's bands' share of the sampler's σ grid (the steps it answers)."""

    ev = OmegaConf.merge(
        OmegaConf.load(CONF_DIR / "evaluate" / "config.yaml"), spec.get("evaluate") or {}
    )
    grid = karras_sigmas(int(ev.steps), float(ev.sigma_min), float(ev.sigma_max), float(ev.rho))[
        :-1
    ].tolist()
    return {
        b["node"]: sum(b["sigma_lo"] <= x < b["sigma_hi"] for x in grid) / len(grid) for b in bands
    }


def verdict(
    spec: dict[str, Any], images: dict[str, Any], n_seeds: int, gate: dict[str, Any] | None = None
) -> str:
    """One plain sentence from the numbers: where the claim held, at this scale and seeds;
    no verdict where the gate failed, a warning where the control lost, and where the control
    beat the baseline as well, that the claim's win is not specialisation's (the control is the
    same tree without it)."""
    text = _verdict(spec, images, n_seeds)
    if "control_minus_baseline" in images:
        ctrl = images["control_minus_baseline"]
        lost = [g for g, x in ctrl.items() if x["baseline_better"]]
        how = (
            f"lost to the baseline at {', '.join(lost)}, so the pipeline is still unfair there"
            if lost
            else "did not lose to the baseline (the pipeline is fair)"
        )
        text += (
            f" Control ({spec['control']}: the same pipeline, children on the full σ range): {how}."
        )
        won = [g for g, x in images["claim_minus_baseline"].items() if x["claim_better"]]
        shared = [
            g
            for g in won
            if ctrl[g]["claim_better"] or not images["claim_minus_control"][g]["claim_better"]
        ]
        if shared:
            text += (
                f" At {', '.join(shared)} the claim did not beat the control (the same "
                "tree trained without specialising), so that win is not specialisation's."
            )
    if gate is not None and not gate["passed"]:
        text = (
            f"NO VERDICT: the root is not at its plateau (continuing it lowers held-out loss "
            f"by {100 * gate['gain']['mean']:.1f} % > {100 * gate['max_gain']:.0f} %). "
            f"For the record: {text}"
        )
    return text


def _verdict(spec: dict[str, Any], images: dict[str, Any], n_seeds: int) -> str:
    d = images["claim_minus_baseline"]
    better = [g for g, x in d.items() if x["claim_better"]]
    worse = [g for g, x in d.items() if x["baseline_better"]]
    claim, base, n = spec["claim"], spec["baseline"], len(d)
    if len(better) == n:
        head = "REPRODUCED"
    elif not better and worse:
        head = f"NOT REPRODUCED (the baseline is better at {len(worse)} of {n})"
    elif not better:
        head = "NOT REPRODUCED (no difference beyond the seed spread)"
    else:
        head = "PARTLY REPRODUCED"
    return (
        f"{head}: {claim} beat {base} at {len(better)} of {n} guidance scales "
        f"({', '.join(better) or 'none'}) and lost at {len(worse)} "
        f"({', '.join(worse) or 'none'}), over {n_seeds} paired seeds; 'beat' = lower "
        f"{images['quality_key']} in every seed and no lower {images['alignment_key']} in "
        "the mean."
    )
