"""The two pictures evaluation draws: the FID-vs-CLIP trade-off curve over guidance scales (the
paper's Fig. 7 axes) and loss by σ with each expert's band shaded. Several runs share a plot."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def fid_clip_plot(
    runs: Sequence[dict[str, Any]],
    x_key: str,
    y_key: str,
    x_label: str,
    y_label: str,
    path: str | os.PathLike,
) -> Path:
    """One curve per run through its guidance scales, each point labelled with its scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    for run in runs:
        rows = sorted(run["rows"], key=lambda r: r["guidance"])
        xs, ys = [r[x_key] for r in rows], [r[y_key] for r in rows]
        ax.plot(xs, ys, marker="o", label=run["label"])
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(
                f"{r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("guidance sweep (numbers: guidance scale)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def loss_by_sigma_plot(runs: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Held-out loss against σ (log-log); every expert band of every ensemble shaded and named."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lo_all = min(min(r["sigmas"]) for r in runs)
    hi_all = max(max(r["sigmas"]) for r in runs)
    for k, run in enumerate(runs):
        c = colours[k % len(colours)]
        ax.plot(run["sigmas"], run["loss"], marker=".", color=c, label=run["label"])
        bands = run["bands"]
        if len(bands) < 2:
            continue
        for j, band in enumerate(bands):
            lo, hi = max(band["sigma_lo"], lo_all), min(band["sigma_hi"], hi_all)
            ax.axvspan(lo, hi, color=c, alpha=0.06 + 0.06 * (j % 2), lw=0)
            ax.text(
                (lo * hi) ** 0.5,
                1.0 - 0.05 * (k + 1),
                band["node"],
                color=c,
                fontsize=7,
                ha="center",
                transform=ax.get_xaxis_transform(),
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("σ")
    ax.set_ylabel("held-out EDM loss λ(σ)·‖D − x‖²")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    return _save(plt, fig, path)


def attention_plot(records: Sequence[dict[str, Any]], label: str, path: str | os.PathLike) -> Path:
    """Cross-attention share per token group against σ (log x, σ falling to the right, as the
    sampler runs); the expert answering each σ named along the top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0), dpi=100)
    names = {
        "t5": "T5 tokens",
        "clip_txt": "CLIP text tokens",
        "clip_img": "CLIP image token",
        "null": "null token",
    }
    xs = [r["sigma"] for r in records]
    for key, name in names.items():
        ax.plot(xs, [r[key] for r in records], marker=".", label=name)
    experts = [r.get("expert") for r in records]
    for k, e in enumerate(experts):
        if e and (k == 0 or experts[k - 1] != e):
            ax.axvline(xs[k], color="grey", lw=0.6, ls="--")
            ax.text(xs[k], 1.01, e, fontsize=7, rotation=0, transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_ylim(0, 1)
    ax.set_xlabel("σ (sampling runs left to right)")
    ax.set_ylabel("share of cross-attention")
    ax.set_title(f"where cross-attention looks: {label}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def switch_plot(rows: Sequence[dict[str, Any]], label: str, path: str | os.PathLike) -> Path:
    """Prompt switching: share of samples reading as prompt A / prompt B against the fraction
    of the schedule sampled with A (eDiff-I Fig. 4 as a curve)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=100)
    xs = [r["fraction_with_A"] for r in rows]
    ax.plot(xs, [r["reads_as_A"] for r in rows], marker="o", label="reads as A (first prompt)")
    ax.plot(xs, [r["reads_as_B"] for r in rows], marker="o", label="reads as B (second prompt)")
    ax.set_xlabel("fraction of solver steps sampled with prompt A (then B)")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1)
    ax.set_title(f"prompt switching: {label}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def switch_attribute_plot(
    rows: Sequence[dict[str, Any]], attrs: Sequence[str], label: str, path: str | os.PathLike
) -> Path:
    """Prompt switching per attribute: for each, the share of samples taking prompt A's value
    (solid) and B's (dashed) against the fraction of the schedule sampled with A."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.8, 4.2), dpi=100)
    xs = [r["fraction_with_A"] for r in rows]
    for i, k in enumerate(attrs):
        ax.plot(xs, [r[f"{k}_A"] for r in rows], f"C{i}-o", label=f"{k}: A's")
        ax.plot(xs, [r[f"{k}_B"] for r in rows], f"C{i}--", label=f"{k}: B's")
    ax.set_xlabel("fraction of solver steps sampled with prompt A (then B)")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1)
    ax.set_title(f"prompt switching by attribute: {label}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def attribute_plot(
    runs: Sequence[dict[str, Any]], attributes: Sequence[str], path: str | os.PathLike
) -> Path:
    """Accuracy per attribute (one line each, plus the whole caption, thick) against guidance,
    one panel per run: which part of a caption a model gets right, and how guidance moves it."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(runs), figsize=(4.2 * len(runs), 3.6), dpi=100, squeeze=False, sharey=True
    )
    for ax, run in zip(axes[0], runs):
        rows = sorted(run["rows"], key=lambda r: r["guidance"])
        gs = [r["guidance"] for r in rows]
        for a in attributes:
            ys = [r["attribute_accuracy"].get(a) for r in rows]
            if all(y is not None for y in ys):
                ax.plot(gs, ys, marker=".", label=a)
        ax.plot(gs, [r["caption_accuracy"] for r in rows], "k-o", lw=2, label="whole caption")
        ax.set_title(run["label"], fontsize=9)
        ax.set_xlabel("guidance scale")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (exact scorer)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)
