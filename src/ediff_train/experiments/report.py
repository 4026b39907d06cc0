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
import statistics
from pathlib import Path
from typing import Any

from ediff_train.experiments.schedule import Schedule
from ediff_train.experiments.tables import (
    attribute_table,
    band_shares,
    gate_table,
    image_table,
    loss_table,
    verdict,
)
from ediff_train.io.files import write_json
from ediff_train.metrics.plots import _pyplot, _save, attribute_plot


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


def _attr_names(images: dict[str, Any]) -> set[str]:
    return {a for cells in images["attributes"].values() for c in cells.values() for a in c}


def mean_rows(images: dict[str, Any]) -> list[dict[str, Any]]:
    """Per ensemble, its guidance rows with seed-mean accuracies (attribute_plot's input)."""
    a = images["alignment_key"]
    return [
        {
            "label": ens,
            "rows": [
                {
                    "guidance": float(g),
                    "caption_accuracy": images["table"][ens][g][a]["mean"],
                    "attribute_accuracy": {k: v["mean"] for k, v in cell.items()},
                }
                for g, cell in cells.items()
            ],
        }
        for ens, cells in images["attributes"].items()
    ]


def attribute_lines(attrs: dict[str, Any]) -> list[str]:
    """The per-attribute accuracy table (metric=shapes), mean ± std over seeds."""
    if not attrs:
        return []
    names = sorted({a for cells in attrs.values() for c in cells.values() for a in c})
    lines = [
        "",
        "## Accuracy per attribute (exact scorer, mean ± std over seeds)",
        "",
        "| ensemble | guidance | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for ens, cells in attrs.items():
        for g, cell in cells.items():
            vals = [_fmt(cell[n], 2) if n in cell else "–" for n in names]
            lines.append(f"| {ens} | {g} | " + " | ".join(vals) + " |")
    return lines


def markdown(
    name: str,
    schedule: Schedule,
    spec: dict[str, Any],
    images: dict[str, Any],
    loss: dict[str, Any],
    text: str,
    n_seeds: int,
    gate: dict[str, Any] | None = None,
    law: Any = None,
) -> str:
    q, a = images["quality_key"], images["alignment_key"]
    lines = [
        f"# Experiment {name}: {spec['claim']} vs {spec['baseline']}",
        "",
        f"**{text}**",
        "",
        "```",
        schedule.tree(law=law),
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
    lines += attribute_lines(images.get("attributes") or {})
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
    out: Path,
    name: str,
    schedule: Schedule,
    spec: dict[str, Any],
    per_seed: list[dict[str, Any]],
    law: Any = None,
) -> dict[str, Any]:
    """The report's files; `law`: the noise law the runs trained under (default EDM's), for the
    gate's held-out loss and the tree's σ bands."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(spec["ensembles"])
    images = image_table(spec, per_seed)
    images["attributes"] = attribute_table(spec, per_seed)
    loss = loss_table(spec, per_seed)
    gate = gate_table(spec, loss, law)
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
    if images["attributes"]:
        attribute_plot(mean_rows(images), sorted(_attr_names(images)), out / "attributes.png")
    (out / "report.md").write_text(
        markdown(name, schedule, spec, images, loss, text, len(per_seed), gate, law)
    )
    print(text)
    print(f"wrote {out}/report.md, summary.json, summary.csv, curve.png, loss_by_sigma.png")
    return summary
