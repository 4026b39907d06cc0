"""The advisor's pictures: the bins' affinity (and data similarity) matrices with the tree's
boundaries and the recommended split drawn on them, and predicted against measured gain."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ediff_train.advise.bins import Bins
from ediff_train.metrics.plots import _pyplot, _save


def matrix_picture(
    panels: Sequence[tuple[str, np.ndarray]],
    bins: Bins,
    tree: Sequence[int],
    chosen: Sequence[int] | None,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """One heat map per (title, matrix), bins in σ order on both axes (ticks: each bin's median
    σ); dashed lines at the tree's next split (`tree`, first bins of bands), solid at `chosen`.
    A signed matrix is drawn on [−1, 1]; one without negative entries on [its minimum, 1]."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 4.2), dpi=100, squeeze=False
    )
    ticks = [f"{s:.3g}" for s in bins.sigma_mid]
    for ax, (name, m) in zip(axes[0], panels):
        # a matrix with no negative entry gets its own range, so its structure near 1 shows
        lo = float(np.min(m))
        cmap, vmin = ("viridis", min(lo, 0.999)) if lo >= 0 else ("RdBu_r", -1.0)
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=1, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("σ bin (median σ)")
        ax.set_ylabel("σ bin (median σ)")
        step = max(1, len(ticks) // 8)
        ax.set_xticks(range(0, len(ticks), step), ticks[::step], rotation=60, fontsize=7)
        ax.set_yticks(range(0, len(ticks), step), ticks[::step], fontsize=7)
        for s in tree:
            ax.axvline(s - 0.5, color="k", ls="--", lw=1, label="tree split")
            ax.axhline(s - 0.5, color="k", ls="--", lw=1)
        for s in chosen or []:
            ax.axvline(s - 0.5, color="g", ls="-", lw=2, label="recommended")
            ax.axhline(s - 0.5, color="g", ls="-", lw=2)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def validation_picture(
    predicted: Sequence[float],
    measured: Sequence[float],
    labels: Sequence[str],
    rho: float | None,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Predicted gain (x) against the measured specialist gap (y), one labelled point per band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.0), dpi=100)
    ax.scatter(predicted, measured, color="C0")
    for x, y, label in zip(predicted, measured, labels):
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("predicted gain (advisor)")
    ax.set_ylabel("measured gap (specialist vs shared)")
    rho_text = "n/a" if rho is None else f"{rho:+.2f}"
    ax.set_title(f"{title} Spearman ρ = {rho_text}".strip(), fontsize=9)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)
