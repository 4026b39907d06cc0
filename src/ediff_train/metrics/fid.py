"""Fréchet distance between feature sets, from streamed statistics.

Only (count, Σx, Σxxᵀ) are kept, in float64, so features of any number of images can be
accumulated batch by batch, merged across workers and cached on disk; reference statistics of a
fixed data set are then computed once per extractor (see `cached_stats` and `stats_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ediff_train.errors import EdiffError

STATS_VERSION = 1  # bump if the .npz layout changes; older files are then recomputed


def _as_array(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


class FeatureStats:
    """Running count, sum and sum of outer products of [N, D] features (float64)."""

    def __init__(self, dim: int | None = None, meta: dict[str, Any] | None = None) -> None:
        self.meta: dict[str, Any] = dict(meta or {})
        self._n = 0
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None
        if dim is not None:
            self._init(int(dim))

    def _init(self, dim: int) -> None:
        self._sum = np.zeros(dim, dtype=np.float64)
        self._outer = np.zeros((dim, dim), dtype=np.float64)

    @property
    def dim(self) -> int | None:
        return None if self._sum is None else int(self._sum.shape[0])

    @property
    def count(self) -> int:
        return self._n

    def update(self, features: Tensor | np.ndarray) -> FeatureStats:
        """Add a batch [N, D] of features."""
        f = _as_array(features)
        if f.ndim != 2:
            raise EdiffError(f"features must be [N, D], got shape {tuple(f.shape)}")
        if self._sum is None:
            self._init(f.shape[1])
        if f.shape[1] != self.dim:
            raise EdiffError(f"features have dim {f.shape[1]}, these stats have dim {self.dim}")
        if not np.isfinite(f).all():
            raise EdiffError("features contain NaN or inf (check the images fed to the extractor)")
        self._n += f.shape[0]
        self._sum += f.sum(axis=0)
        self._outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's features (e.g. from another worker) into this one."""
        if other._sum is None:
            return self
        if self._sum is None:
            self._init(other.dim or 0)
        if other.dim != self.dim:
            raise EdiffError(f"cannot merge feature stats of dim {other.dim} into dim {self.dim}")
        self._n += other._n
        self._sum += other._sum
        self._outer += other._outer
        return self

    @property
    def mu(self) -> np.ndarray:
        if self._n < 1 or self._sum is None:
            raise EdiffError("no features accumulated; the mean is undefined")
        return self._sum / self._n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (N−1 denominator, as np.cov and pytorch-fid use)."""
        if self._n < 2:
            raise EdiffError(f"a covariance needs at least 2 features, have {self._n}")
        mu = self.mu
        cov = (self._outer - self._n * np.outer(mu, mu)) / (self._n - 1)
        return (cov + cov.T) / 2

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (atomically, so a killed job never leaves a half-written cache)."""
        if self._sum is None:
            raise EdiffError("refusing to save empty feature stats")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    version=np.int64(STATS_VERSION),
                    count=np.int64(self._n),
                    sum=self._sum,
                    outer=self._outer,
                    meta=np.array(json.dumps(self.meta)),
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise EdiffError(f"no feature stats at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != STATS_VERSION:
                    raise EdiffError(
                        f"{path} has stats version {int(z['version'])}, expected {STATS_VERSION}"
                    )
                n, s, outer = int(z["count"]), z["sum"], z["outer"]
                meta = json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise EdiffError(f"cannot read feature stats {path}: {e}".splitlines()[0]) from None
        if s.ndim != 1 or outer.shape != (s.shape[0], s.shape[0]) or n < 0:
            raise EdiffError(f"feature stats {path} are malformed")
        stats = cls(meta=meta)
        stats._n, stats._sum, stats._outer = n, s.astype(np.float64), outer.astype(np.float64)
        return stats


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½.

    The cross term uses symmetric eigendecompositions (Σ1^½ Σ2 Σ1^½ is symmetric PSD and has the
    same eigenvalues as Σ1Σ2), which stays real and stable for rank-deficient covariances where a
    general sqrtm returns complex parts; eigenvalues a rounding error below 0 are clipped to 0."""
    mu1, mu2, s1, s2 = (_as_array(a) for a in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise EdiffError(
            f"Fréchet distance needs mu [D] and sigma [D,D] of one D; got "
            f"{mu1.shape}, {s1.shape} vs {mu2.shape}, {s2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise EdiffError("Fréchet distance got NaN or inf statistics")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * cross, 0.0))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two accumulated feature sets."""
    if a.dim != b.dim:
        raise EdiffError(
            f"feature stats have different dims ({a.dim} vs {b.dim}); were they made "
            "with the same extractor?"
        )
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def stats_key(extractor_name: str, items: Iterable[str | os.PathLike]) -> str:
    """Short sha256 naming a reference-stats cache: the extractor plus each item, where an item
    that is an existing file contributes its path, size and mtime (so edited data is re-read)."""
    parts = []
    for item in items:
        p = Path(item)
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
        else:
            parts.append(str(item))
    h = hashlib.sha256(extractor_name.encode())
    for part in sorted(parts):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def cached_stats(
    cache_path: str | os.PathLike, compute: Callable[[], FeatureStats]
) -> FeatureStats:
    """Stats saved at cache_path if readable, else `compute()` saved there and returned."""
    path = Path(cache_path)
    if path.is_file():
        try:
            return FeatureStats.load(path)
        except EdiffError:
            pass  # stale or corrupt cache: recompute and overwrite
    stats = compute()
    if not isinstance(stats, FeatureStats):
        raise TypeError(f"compute() must return FeatureStats, got {type(stats).__name__}")
    stats.save(path)
    return stats
