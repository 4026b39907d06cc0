"""`ediff-advise`'s work for one trained node: its plan is resolved once (`AdvicePlan`), then the
signals are measured on the node's own held-out shards and the advice written.

Outputs in `out`: advice.json (every matrix, probe and candidate), advice.txt (the table),
affinity.png (gradient affinity and optimal-denoiser similarity, tree split dashed, the
recommendation solid), and with `validate` validation.png (predicted against measured gap)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ediff_train.advise.advice import band_command, band_stats, candidates, recommend, table
from ediff_train.advise.affinity import affinity_matrix
from ediff_train.advise.bins import Bins, node_bins
from ediff_train.advise.optimal import denoiser_similarity
from ediff_train.advise.picture import matrix_picture, validation_picture
from ediff_train.advise.probe import headroom, transfer_gap
from ediff_train.errors import EdiffError
from ediff_train.evaluation.common import heldout_batches
from ediff_train.io.files import write_json
from ediff_train.run.layout import WEIGHTS
from ediff_train.run.weights import denoiser_of, load_codec, load_expert, load_train_config, node_of


@dataclass(frozen=True)
class AdvicePlan:
    """Everything one advisor run needs, checked before any measurement."""

    node_dir: Path
    out: Path
    data_root: str | None = None  # other shards than the node's own (same codec and dims)
    bins: int = 16
    max_bands: int = 4
    sigma_range: tuple[float, float] | None = None
    images: int = 256  # held-out samples: gradients, losses, the optimal denoiser's data
    batch_size: int = 64
    inputs: int = 96  # noised inputs per σ for the optimal-denoiser similarity
    probe_steps: int = 200  # headroom probe (0: none)
    probe_lr: float | None = None  # None: the node's own lr
    wide: tuple[str, ...] = ()  # model overrides of the wider net (default: twice the width)
    validate: int = 0  # measure the gap for this many equal bands (0: don't)
    validate_steps: int = 150
    threshold: float = 0.02
    seed: int = 0
    device: str = "cpu"


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when a side is constant."""

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for value in np.unique(a):  # ties share their mean rank
            r[a == value] = r[a == value].mean()
        return r

    if len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def widen(model_cfg: Any, overrides: tuple[str, ...]) -> Any:
    """The wider net's model config: the overrides given, else twice the width."""
    wide = copy.deepcopy(model_cfg)
    if not overrides:
        for key in ("model_channels", "width", "hidden_size"):
            if key in wide:
                overrides = (f"{key}={int(wide[key]) * 2}",)
                break
        else:
            raise EdiffError(
                "cannot tell this backbone's width: give the wider net with --wide "
                "KEY=VALUE (keys of the node's model config)"
            )
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.removeprefix("model.")
        if not sep or key not in wide:
            raise EdiffError(f"--wide {item!r}: expected KEY=VALUE with KEY in the model config")
        OmegaConf.update(wide, key, yaml.safe_load(value) if value else value)
    return wide


def _train_stream(cfg: Any, seed: int) -> Iterator[dict[str, Any]]:
    """The node's training shards as an endless, seeded, in-process stream (no workers)."""
    codec = load_codec(cfg)
    spec = None if codec.is_identity else codec.spec()
    dm = instantiate(
        cfg.data, builder=None, codec=spec, num_workers=0, seed=seed, _convert_="object"
    )
    loader = dm.train_dataloader()
    while True:
        yield from loader


def check_plan(plan: AdvicePlan) -> tuple[Any, Any, Bins]:
    """(train config, node, bins), or one line saying what is wrong, before any work."""
    if not (plan.node_dir / WEIGHTS).is_file():
        raise EdiffError(f"{plan.node_dir} has no {WEIGHTS}: advise a node that finished training")
    cfg = load_train_config(plan.node_dir)
    if plan.data_root:
        cfg.data.root = plan.data_root
    node = node_of(cfg)
    bins = node_bins(node, plan.bins, plan.sigma_range)
    if not 2 <= plan.max_bands <= bins.count:
        raise EdiffError(f"--max-bands {plan.max_bands} needs 2 ≤ bands ≤ --bins ({bins.count})")
    if (
        plan.validate
        and not 2 <= plan.validate <= bins.count
        or plan.validate
        and (bins.count % plan.validate)
    ):
        raise EdiffError(
            f"--validate {plan.validate} must divide --bins {bins.count} into 2 or more bands"
        )
    return cfg, node, bins


def _say(text: str) -> None:
    print(text, flush=True)


def advise(plan: AdvicePlan, log: Any = _say) -> dict[str, Any]:
    """Measure the signals, rank the candidate splits, write the advice; the report dict."""
    cfg, node, bins = check_plan(plan)
    t0 = time.perf_counter()
    heldout = heldout_batches(cfg, plan.images, plan.batch_size)
    _, denoiser = load_expert(plan.node_dir, "model")
    denoiser = denoiser.to(plan.device)
    data = torch.cat([b["image"] for b in heldout]).float()
    log(f"{node.name}: {bins.count} σ bins, {data.shape[0]} held-out samples")
    similarity = denoiser_similarity(data, bins.sigma_mid, plan.inputs, plan.seed)
    log(f"optimal-denoiser similarity: done ({time.perf_counter() - t0:.0f} s)")
    affinity = affinity_matrix(denoiser, heldout, bins, plan.seed, plan.device)
    log(f"gradient affinity: done ({time.perf_counter() - t0:.0f} s)")
    lr = float(plan.probe_lr or cfg.module.lr)
    report: dict[str, Any] = {
        "node": node.name,
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
        "sigma_edges": bins.sigma_edges,
        "sigma_mid": bins.sigma_mid,
        "affinity": affinity.tolist(),
        "similarity": similarity.tolist(),
    }
    room = None
    if plan.probe_steps > 0:
        wide_cfg = widen(cfg.model, plan.wide)
        wide_full = copy.deepcopy(cfg)
        wide_full.model = wide_cfg
        probe = headroom(
            lambda: denoiser_of(cfg),
            lambda: denoiser_of(wide_full),
            lambda: _train_stream(cfg, plan.seed),
            heldout,
            bins,
            plan.probe_steps,
            lr,
            plan.seed,
            plan.device,
        )
        room = probe["headroom"]
        log(
            f"headroom probe ({plan.probe_steps} steps × 2 nets): done "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        report["headroom"] = {
            **probe,
            "steps": plan.probe_steps,
            "lr": lr,
            "wide_model": OmegaConf.to_container(wide_cfg, resolve=True),
        }
    cands = candidates(affinity, similarity, room, plan.max_bands, _level(node))
    best, sentence = recommend(cands, plan.threshold)
    report["candidates"] = [asdict(c) for c in cands]
    report["recommendation"] = sentence
    report["commands"] = [band_command(bins, *b["bins"], node) for b in best.bands] if best else []
    if plan.validate:
        report["validation"] = _validate(
            plan, cfg, denoiser, heldout, bins, affinity, similarity, room, lr
        )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _write(plan, report, bins, cands, best, node)
    return report


def _level(node: Any) -> int | None:
    return int(node.name[1:].split("_")[0]) if node.kind == "tree" else None


def _validate(
    plan: AdvicePlan,
    cfg: Any,
    denoiser: Any,
    heldout: Any,
    bins: Bins,
    affinity: np.ndarray,
    similarity: np.ndarray,
    room: Any,
    lr: float,
) -> dict:
    """The measured specialist gap per equal band, beside the advisor's prediction for it."""
    size = bins.count // plan.validate
    bands = [(k * size, (k + 1) * size) for k in range(plan.validate)]
    gap = transfer_gap(
        denoiser,
        lambda: _train_stream(cfg, plan.seed),
        heldout,
        bins,
        bands,
        plan.validate_steps,
        lr,
        plan.seed,
        plan.device,
    )
    stats = [band_stats(lo, hi, affinity, similarity, room) for lo, hi in bands]
    key = "gain" if room is not None else "conflict"
    predicted = [s[key] for s in stats]
    measured = [row["gap"] for row in gap["bands"]]
    return {
        **gap,
        "predicted_by": key,
        "predicted": predicted,
        "spearman": spearman(predicted, measured),
    }


def _write(plan: AdvicePlan, report: dict, bins: Bins, cands: Any, best: Any, node: Any) -> None:
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "advice.json", report)
    text = table(bins, cands) + "\n\n" + report["recommendation"]
    if report["commands"]:
        text += "\n" + "\n".join(f"  python train.py {c}" for c in report["commands"])
    (out / "advice.txt").write_text(text + "\n")
    tree = [bins.count // 2] if bins.count % 2 == 0 else []
    matrix_picture(
        [
            ("gradient affinity (cos)", np.asarray(report["affinity"])),
            ("optimal-denoiser similarity", np.asarray(report["similarity"])),
        ],
        bins,
        tree,
        best.starts if best else None,
        out / "affinity.png",
        title=f"{node.name}: where to split",
    )
    val = report.get("validation")
    if val:
        edges = bins.sigma_edges
        labels = [
            f"[{edges[lo]:.2g},{edges[hi]:.2g})" for lo, hi in (r["bins"] for r in val["bands"])
        ]
        validation_picture(
            val["predicted"],
            [r["gap"] for r in val["bands"]],
            labels,
            val["spearman"],
            out / "validation.png",
            title=node.name,
        )
