"""The experiment's summary over seeds, from evaluate.py's own per-seed reports.

Nothing here measures: it reads the per-seed `images` and `loss_by_sigma` reports the evaluation
code returned (and wrote as eval.json / loss_by_sigma.json), and writes under `report/`:
summary.json (every per-seed figure and the statistics), summary.csv, curve.png (the Fig. 7
axes: each ensemble's mean over seeds with the spread, per-seed curves faint), loss_by_sigma.png
(mean loss by σ, and the claim over the baseline per σ with the seed range), and report.md.

Seeds are paired: seed k of every ensemble shares its root, so the claim's advantage is judged on
per-seed differences. "Better at a guidance scale" = better in the mean on both image metrics and
on the FID-like one in every seed; the verdict counts the scales where that holds.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ediff_train.core.edm import P_MEAN, P_STD
from ediff_train.core.solvers import karras_sigmas
from ediff_train.experiments.schedule import CONF_DIR, Schedule
from ediff_train.io.files import write_json
from ediff_train.metrics.plots import _pyplot, _save


def _keys(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """(quality key ↓, alignment key ↑, their labels): digits analogues or FID/CLIP."""
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


def law_weighted(sigmas: list[float], loss: list[float]) -> float:
    """Held-out loss averaged under the training law (ln σ ~ N(P_mean, P_std²)) over a grid
    log-spaced in σ: what "the loss" of a model is, one number."""

    w = [math.exp(-0.5 * ((math.log(x) - P_MEAN) / P_STD) ** 2) for x in sigmas]
    return sum(wi * li for wi, li in zip(w, loss)) / sum(w)


def gate_table(spec: dict[str, Any], loss: dict[str, Any]) -> dict[str, Any] | None:
    """Is the root at its plateau? The continued root's held-out loss gain over the root, per
    seed; the comparison means nothing where more shared steps still pay (no verdict then)."""
    gate = spec.get("gate")
    if not gate:
        return None
    sig = loss["sigmas"]
    root = [law_weighted(sig, c) for c in loss["curves"][gate["root"]]]
    cont = [law_weighted(sig, c) for c in loss["curves"][gate["continued"]]]
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


def curve_plot(
    images: dict[str, Any], per_seed: list[dict[str, Any]], names: list[str], path: Path
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    q, a = images["quality_key"], images["alignment_key"]
    for i, name in enumerate(names):
        color = f"C{i}"
        for seed in per_seed:  # each seed's own curve, faint
            rows = sorted(seed["images"]["runs"][i]["rows"], key=lambda r: r["guidance"])
            ax.plot([r[q] for r in rows], [r[a] for r in rows], color=color, alpha=0.25, lw=0.8)
        cells = images["table"][name]
        gs = list(cells)
        xs = [cells[g][q]["mean"] for g in gs]
        ys = [cells[g][a]["mean"] for g in gs]
        ax.errorbar(
            xs,
            ys,
            xerr=[cells[g][q]["std"] for g in gs],
            yerr=[cells[g][a]["std"] for g in gs],
            color=color,
            marker="o",
            capsize=3,
            label=name,
        )
        for g, x, y in zip(gs, xs, ys):
            ax.annotate(
                f"g={g}",
                (x, y),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=color,
            )
    ax.set_xlabel(images["quality_label"])
    ax.set_ylabel(images["alignment_label"])
    ax.set_title(f"mean ± std over {len(per_seed)} seeds (faint: each seed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def loss_plot(loss: dict[str, Any], spec: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), dpi=100, sharex=True)
    sig = loss["sigmas"]
    for i, (name, curves) in enumerate(loss["curves"].items()):
        mean = [statistics.fmean(v) for v in zip(*curves)]
        top.plot(sig, mean, color=f"C{i}", label=name)
        top.fill_between(
            sig,
            [min(v) for v in zip(*curves)],
            [max(v) for v in zip(*curves)],
            color=f"C{i}",
            alpha=0.2,
        )
    top.set_xscale("log")
    top.set_ylabel("held-out EDM loss")
    top.legend(fontsize=8)
    ratios = loss["ratio_claim_over_baseline"]
    bottom.plot(sig, [statistics.fmean(v) for v in zip(*ratios)], color="C0")
    bottom.fill_between(
        sig,
        [min(v) for v in zip(*ratios)],
        [max(v) for v in zip(*ratios)],
        color="C0",
        alpha=0.25,
        label="seed range",
    )
    bottom.axhline(1.0, color="k", lw=0.8)
    for edge in loss.get("claim_band_edges", []):  # where the claim hands over between experts
        for ax in (top, bottom):
            ax.axvline(edge, color="grey", ls=":", lw=0.8)
    bottom.set_ylabel(f"{spec['claim']} / {spec['baseline']}")
    bottom.set_xlabel("σ")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.set_title(
        "loss by σ, mean over seeds (shaded: seed range; dotted: expert bands)", fontsize=9
    )
    return _save(plt, fig, path)


def _fmt(s: dict[str, Any], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(
    name: str,
    schedule: Schedule,
    spec: dict[str, Any],
    images: dict[str, Any],
    loss: dict[str, Any],
    text: str,
    n_seeds: int,
    gate: dict[str, Any] | None = None,
) -> str:
    q, a = images["quality_key"], images["alignment_key"]
    lines = [
        f"# Experiment {name}: {spec['claim']} vs {spec['baseline']}",
        "",
        f"**{text}**",
        "",
        "```",
        schedule.tree(),
        "```",
        "",
        f"## Images ({n_seeds} seeds, mean ± std)",
        "",
        f"| ensemble | guidance | {a} | {q} |",
        "|---|---|---|---|",
    ]
    for ens, cells in images["table"].items():
        for g, cell in cells.items():
            lines.append(f"| {ens} | {g} | {_fmt(cell[a])} | {_fmt(cell[q])} |")
    lines += [
        "",
        f"Paired differences, {spec['claim']} − {spec['baseline']} (same seed):",
        "",
        f"| guidance | Δ {a} | Δ {q} | seeds with lower {q} | verdict |",
        "|---|---|---|---|---|",
    ]
    for g, d in images["claim_minus_baseline"].items():
        word = (
            "claim better"
            if d["claim_better"]
            else "baseline better"
            if d["baseline_better"]
            else "within spread"
        )
        lines.append(
            f"| {g} | {_fmt(d[a])} | {_fmt(d[q])} | "
            f"{d['seeds_claim_lower_' + q]}/{n_seeds} | {word} |"
        )
    for g, d in images.get("control_minus_baseline", {}).items():
        if g == next(iter(images["control_minus_baseline"])):
            lines += [
                "",
                f"Control: {spec['control']} − {spec['baseline']} (same seed):",
                "",
                f"| guidance | Δ {a} | Δ {q} | verdict |",
                "|---|---|---|---|",
            ]
        word = (
            "control better"
            if d["claim_better"]
            else "baseline better"
            if d["baseline_better"]
            else "within spread"
        )
        lines.append(f"| {g} | {_fmt(d[a])} | {_fmt(d[q])} | {word} |")
    for g, d in images.get("claim_minus_control", {}).items():
        if g == next(iter(images["claim_minus_control"])):
            lines += [
                "",
                f"Specialisation: {spec['claim']} − {spec['control']} (same seed):",
                "",
                f"| guidance | Δ {a} | Δ {q} | seeds with lower {q} | verdict |",
                "|---|---|---|---|---|",
            ]
        word = (
            "claim better"
            if d["claim_better"]
            else "control better"
            if d["baseline_better"]
            else "within spread"
        )
        lines.append(
            f"| {g} | {_fmt(d[a])} | {_fmt(d[q])} | "
            f"{d['seeds_claim_lower_' + q]}/{n_seeds} | {word} |"
        )
    if gate is not None:
        lines += [
            "",
            "## Gate: is the root at its plateau?",
            "",
            f"Held-out loss under the training law: {gate['root']} "
            f"{_fmt(gate['root_loss'], 4)}, {gate['continued']} "
            f"{_fmt(gate['continued_loss'], 4)}; gain {100 * gate['gain']['mean']:.2f} % "
            f"(seeds: {', '.join(f'{100 * x:.2f} %' for x in gate['gain']['values'])}), "
            f"limit {100 * gate['max_gain']:.0f} %: "
            f"**{'passed' if gate['passed'] else 'failed (no verdict)'}**.",
        ]
    shares = loss.get("band_share_of_sampler_grid", {})
    lines += [
        "",
        "## Loss by σ inside each of the claim's bands (mean ± std)",
        "",
        f"| band | share of the sampler's σ grid | {spec['claim']} | {spec['baseline']} "
        "| seeds where the claim is lower |",
        "|---|---|---|---|---|",
    ]
    for node, b in loss["bands"].items():
        share = f"{shares[node]:.2f}" if node in shares else "–"
        lines.append(
            f"| {node} | {share} | {_fmt(b[spec['claim']], 4)} | "
            f"{_fmt(b[spec['baseline']], 4)} | {b['seeds_claim_lower']}/{n_seeds} |"
        )
    lines += [
        "",
        "![curve](curve.png) ![loss by sigma](loss_by_sigma.png)",
        "",
        "Per-seed reports (images, eval.json, loss_by_sigma.json) are under seed<k>/.",
    ]
    return "\n".join(lines) + "\n"


def write_summary(
    out: Path, name: str, schedule: Schedule, spec: dict[str, Any], per_seed: list[dict[str, Any]]
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    names = list(spec["ensembles"])
    images = image_table(spec, per_seed)
    loss = loss_table(spec, per_seed)
    gate = gate_table(spec, loss)
    claim_runs = per_seed[0]["loss_by_sigma"]["runs"][names.index(spec["claim"])]
    loss["band_share_of_sampler_grid"] = band_shares(spec, claim_runs["bands"])
    text = verdict(spec, images, len(per_seed), gate)
    summary = {
        "experiment": name,
        "schedule": schedule.name,
        "scale": schedule.scale,
        "seeds": [s["seed"] for s in per_seed],
        "claim": spec["claim"],
        "baseline": spec["baseline"],
        "ensembles": spec["ensembles"],
        "evaluate": spec["evaluate"],
        "verdict": text,
        "gate": gate,
        "images": images,
        "loss_by_sigma": loss,
        "per_seed_reports": [{"seed": s["seed"], "run_dir": s["run_dir"]} for s in per_seed],
    }
    write_json(out / "summary.json", summary)
    q, a = images["quality_key"], images["alignment_key"]
    with (out / "summary.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["ensemble", "guidance", f"{a}_mean", f"{a}_std", f"{q}_mean", f"{q}_std", "seeds"]
        )
        for ens, cells in images["table"].items():
            for g, cell in cells.items():
                w.writerow(
                    [
                        ens,
                        g,
                        cell[a]["mean"],
                        cell[a]["std"],
                        cell[q]["mean"],
                        cell[q]["std"],
                        len(cell[q]["values"]),
                    ]
                )
    curve_plot(images, per_seed, list(images["table"]), out / "curve.png")
    loss_plot(loss, spec, out / "loss_by_sigma.png")
    (out / "report.md").write_text(
        markdown(name, schedule, spec, images, loss, text, len(per_seed), gate)
    )
    print(text)
    print(f"wrote {out}/report.md, summary.json, summary.csv, curve.png, loss_by_sigma.png")
    return summary
