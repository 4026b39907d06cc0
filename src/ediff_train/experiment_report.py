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

from ediff_train.checkpoints import write_json
from ediff_train.metrics.plots import _pyplot, _save
from ediff_train.schedule import Schedule


def _keys(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """(quality key ↓, alignment key ↑, their labels): digits analogues or FID/CLIP."""
    if "digits_fid" in row:
        return "digits_fid", "prompt_accuracy", "digits-FID ↓", "prompt accuracy ↑"
    return "fid", "clip_score", "FID ↓", "CLIP score ↑"


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def image_table(spec: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """ensemble → guidance → {quality, alignment: stats over seeds}; plus the paired deltas."""
    names = list(spec["ensembles"])
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
        table[name] = {f"{g:g}": {k: _stats(v) for k, v in cell.items()}
                       for g, cell in sorted(per_g.items())}
    claim, base = spec["claim"], spec["baseline"]
    deltas = {}
    for g, cell in table[claim].items():
        dq = [c - b for c, b in zip(cell[q]["values"], table[base][g][q]["values"])]
        da = [c - b for c, b in zip(cell[a]["values"], table[base][g][a]["values"])]
        better = (statistics.fmean(dq) < 0 and statistics.fmean(da) >= 0
                  and all(d < 0 for d in dq))
        worse = (statistics.fmean(dq) > 0 and statistics.fmean(da) <= 0
                 and all(d > 0 for d in dq))
        deltas[g] = {q: _stats(dq), a: _stats(da), "claim_better": better,
                     "baseline_better": worse,
                     "seeds_claim_lower_" + q: sum(d < 0 for d in dq)}
    return {"quality_key": q, "alignment_key": a, "quality_label": q_label,
            "alignment_label": a_label, "table": table, "claim_minus_baseline": deltas}


def loss_table(spec: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Loss by σ per ensemble over seeds, the claim/baseline ratio per σ, and band means."""
    names = list(spec["ensembles"])
    sigmas = per_seed[0]["loss_by_sigma"]["runs"][0]["sigmas"]
    curves = {name: [s["loss_by_sigma"]["runs"][i]["loss"] for s in per_seed]
              for i, name in enumerate(names)}
    claim, base = spec["claim"], spec["baseline"]
    ratios = [[c / b for c, b in zip(cl, bl)] for cl, bl in zip(curves[claim], curves[base])]
    labels = {name: per_seed[0]["loss_by_sigma"]["runs"][i]["label"]
              for i, name in enumerate(names)}
    bands = {}
    claim_bands = [b["node"] for b in per_seed[0]["loss_by_sigma"]["runs"][names.index(claim)]
                   ["bands"]]
    for node in claim_bands:
        c = [s["loss_by_sigma"]["band_means"][node][labels[claim]] for s in per_seed]
        b = [s["loss_by_sigma"]["band_means"][node][labels[base]] for s in per_seed]
        if None in c or None in b:
            continue
        bands[node] = {claim: _stats(c), base: _stats(b),
                       "seeds_claim_lower": sum(x < y for x, y in zip(c, b))}
    edges = sorted({b[k] for b in per_seed[0]["loss_by_sigma"]["runs"][names.index(claim)]
                    ["bands"] for k in ("sigma_lo", "sigma_hi")} - {0.0, float("inf")})
    return {"sigmas": sigmas, "curves": curves, "ratio_claim_over_baseline": ratios,
            "bands": bands, "claim_band_edges": edges}


def verdict(spec: dict[str, Any], images: dict[str, Any], n_seeds: int) -> str:
    """One plain sentence from the numbers: where the claim held, at this scale and seeds."""
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
    return (f"{head}: {claim} beat {base} at {len(better)} of {n} guidance scales "
            f"({', '.join(better) or 'none'}) and lost at {len(worse)} "
            f"({', '.join(worse) or 'none'}), over {n_seeds} paired seeds; 'beat' = lower "
            f"{images['quality_key']} in every seed and no lower {images['alignment_key']} in "
            "the mean.")


def curve_plot(images: dict[str, Any], per_seed: list[dict[str, Any]], names: list[str],
               path: Path) -> Path:
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
        ax.errorbar(xs, ys, xerr=[cells[g][q]["std"] for g in gs],
                    yerr=[cells[g][a]["std"] for g in gs], color=color, marker="o", capsize=3,
                    label=name)
        for g, x, y in zip(gs, xs, ys):
            ax.annotate(f"g={g}", (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
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
        top.fill_between(sig, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)],
                         color=f"C{i}", alpha=0.2)
    top.set_xscale("log")
    top.set_ylabel("held-out EDM loss")
    top.legend(fontsize=8)
    ratios = loss["ratio_claim_over_baseline"]
    bottom.plot(sig, [statistics.fmean(v) for v in zip(*ratios)], color="C0")
    bottom.fill_between(sig, [min(v) for v in zip(*ratios)], [max(v) for v in zip(*ratios)],
                        color="C0", alpha=0.25, label="seed range")
    bottom.axhline(1.0, color="k", lw=0.8)
    for edge in loss.get("claim_band_edges", []):  # where the claim hands over between experts
        for ax in (top, bottom):
            ax.axvline(edge, color="grey", ls=":", lw=0.8)
    bottom.set_ylabel(f"{spec['claim']} / {spec['baseline']}")
    bottom.set_xlabel("σ")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.set_title("loss by σ, mean over seeds (shaded: seed range; dotted: expert bands)",
                  fontsize=9)
    return _save(plt, fig, path)


def _fmt(s: dict[str, Any], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(name: str, schedule: Schedule, spec: dict[str, Any], images: dict[str, Any],
             loss: dict[str, Any], text: str, n_seeds: int) -> str:
    q, a = images["quality_key"], images["alignment_key"]
    lines = [f"# Experiment {name}: {spec['claim']} vs {spec['baseline']}", "", f"**{text}**", "",
             "```", schedule.tree(), "```", "",
             f"## Images ({n_seeds} seeds, mean ± std)", "",
             f"| ensemble | guidance | {a} | {q} |", "|---|---|---|---|"]
    for ens, cells in images["table"].items():
        for g, cell in cells.items():
            lines.append(f"| {ens} | {g} | {_fmt(cell[a])} | {_fmt(cell[q])} |")
    lines += ["", f"Paired differences, {spec['claim']} − {spec['baseline']} (same seed):", "",
              f"| guidance | Δ {a} | Δ {q} | seeds with lower {q} | verdict |",
              "|---|---|---|---|---|"]
    for g, d in images["claim_minus_baseline"].items():
        word = ("claim better" if d["claim_better"] else
                "baseline better" if d["baseline_better"] else "within spread")
        lines.append(f"| {g} | {_fmt(d[a])} | {_fmt(d[q])} | "
                     f"{d['seeds_claim_lower_' + q]}/{n_seeds} | {word} |")
    lines += ["", "## Loss by σ inside each of the claim's bands (mean ± std)", "",
              f"| band | {spec['claim']} | {spec['baseline']} | seeds where the claim is lower |",
              "|---|---|---|---|"]
    for node, b in loss["bands"].items():
        lines.append(f"| {node} | {_fmt(b[spec['claim']], 4)} | {_fmt(b[spec['baseline']], 4)} "
                     f"| {b['seeds_claim_lower']}/{n_seeds} |")
    lines += ["", "![curve](curve.png) ![loss by sigma](loss_by_sigma.png)", "",
              "Per-seed reports (images, eval.json, loss_by_sigma.json) are under seed<k>/."]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, name: str, schedule: Schedule, spec: dict[str, Any],
                  per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    names = list(spec["ensembles"])
    images = image_table(spec, per_seed)
    loss = loss_table(spec, per_seed)
    text = verdict(spec, images, len(per_seed))
    summary = {"experiment": name, "schedule": schedule.name, "scale": schedule.scale,
               "seeds": [s["seed"] for s in per_seed], "claim": spec["claim"],
               "baseline": spec["baseline"], "ensembles": spec["ensembles"],
               "evaluate": spec["evaluate"], "verdict": text, "images": images,
               "loss_by_sigma": loss,
               "per_seed_reports": [{"seed": s["seed"], "run_dir": s["run_dir"]}
                                    for s in per_seed]}
    write_json(out / "summary.json", summary)
    q, a = images["quality_key"], images["alignment_key"]
    with (out / "summary.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ensemble", "guidance", f"{a}_mean", f"{a}_std", f"{q}_mean", f"{q}_std",
                    "seeds"])
        for ens, cells in images["table"].items():
            for g, cell in cells.items():
                w.writerow([ens, g, cell[a]["mean"], cell[a]["std"], cell[q]["mean"],
                            cell[q]["std"], len(cell[q]["values"])])
    curve_plot(images, per_seed, names, out / "curve.png")
    loss_plot(loss, spec, out / "loss_by_sigma.png")
    (out / "report.md").write_text(markdown(name, schedule, spec, images, loss, text,
                                            len(per_seed)))
    print(text)
    print(f"wrote {out}/report.md, summary.json, summary.csv, curve.png, loss_by_sigma.png")
    return summary
