"""The cascade: a base ensemble, then super-resolution ensembles, each stage fed the last's images.

eDiff-I samples 64 px with its base experts, then 256 px and 1024 px with SR experts (Configs
A–D differ in which stages are ensembles). A cascade file (conf/cascade/*.yaml) names, per
stage, a run dir and the experts that tile its noise axis, with that stage's solver steps,
guidance and σ_aug. Every stage is an `Ensemble`, so each SR step goes to the SR expert owning
its σ, exactly as in the base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from ediff_train.core.solvers import SOLVERS
from ediff_train.core.sr import check_sigma_aug
from ediff_train.errors import EdiffError
from ediff_train.run.weights import load_encoders, load_train_config
from ediff_train.sampling.ensemble import Ensemble, load_ensemble
from ediff_train.sampling.generation import embed_prompts, generate
from ediff_train.sampling.grids import labelled_grid, save_images


@dataclass
class Stage:
    """One cascade stage as a file describes it (sizes are read from its trained config)."""

    run_dir: str
    experts: list[str]
    steps: int = 32
    guidance: float = 5.0
    sigma_aug: float | None = None  # SR stages: the fixed augmentation level at sampling
    weights: str = "ema"
    size: int | None = None  # output size; default: the stage's training image size
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    solver: str = "heun"
    order: int = 3
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, spec: Mapping[str, Any], index: int) -> Stage:
        spec = dict(spec)
        experts = spec.pop("experts", None) or ([spec.pop("expert")] if "expert" in spec else [])
        if not experts or "run_dir" not in spec:
            raise EdiffError(f"cascade stage {index} needs run_dir and experts")
        known = set(cls.__dataclass_fields__) - {"experts", "extra"}
        extra = {k: spec.pop(k) for k in list(spec) if k not in known}
        stage = cls(experts=[str(e) for e in experts], extra=extra, **spec)
        stage.name = stage.name or f"stage{index}"
        if isinstance(stage.steps, bool) or not isinstance(stage.steps, int) or stage.steps < 1:
            raise EdiffError(
                f"cascade {stage.name}: steps must be a whole number ≥ 1, got {stage.steps!r}"
            )
        if stage.sigma_aug is not None:
            check_sigma_aug(stage.sigma_aug)
        if stage.solver not in SOLVERS:
            raise EdiffError(
                f"cascade {stage.name}: unknown solver {stage.solver!r} "
                f"(choose one of {', '.join(SOLVERS)})"
            )
        return stage


@dataclass
class LoadedStage:
    stage: Stage
    ensemble: Ensemble
    train_cfg: Any
    image_size: int  # the size this stage writes
    lowres_size: int | None  # None for a base stage

    @property
    def is_sr(self) -> bool:
        return self.lowres_size is not None


def load_stages(
    stages: Sequence[Stage], device: str = "cpu", offload: bool = False
) -> list[LoadedStage]:
    """Load every stage's ensemble and check the chain before any sampling: the first stage is
    a base model, every later one is SR, and each SR stage's low-res size is the size of the
    stage below (its output size a multiple of it, for SR1024-style stages run beyond their
    training crop). `offload`: every stage's experts stay in host memory and visit `device`
    one at a time (offload.Offloader), so a whole cascade's experts need not fit at once."""

    loaded: list[LoadedStage] = []
    for k, st in enumerate(stages):
        cfg = load_train_config(Path(st.run_dir) / st.experts[0])
        if str((cfg.get("codec") or {}).get("_target_", "")).endswith("VAECodec"):
            raise EdiffError(  # its latents would need decoding between stages (docs/latent.md)
                f"cascade {st.name}: {st.run_dir} trains in a VAE's latent space; cascades "
                "take pixel stages (sample it with sample.py run_dir=...)"
            )
        low = cfg.data.get("lowres_size")
        train_size = int(cfg.data.image_size)
        size = int(st.size or train_size)
        if low is not None:  # the factor is the training one; the output may be a larger image
            factor = train_size // int(low)
            low = size // factor
            if size % factor:
                raise EdiffError(
                    f"cascade {st.name}: size {size} is not a multiple of its "
                    f"up-sampling factor {factor}"
                )
        if k == 0 and low is not None:
            raise EdiffError(
                f"cascade {st.name}: the first stage must be a base model, "
                f"{st.run_dir} is super-resolution ({low} -> {size} px)"
            )
        if k > 0:
            below = loaded[-1].image_size
            if low is None:
                raise EdiffError(
                    f"cascade {st.name}: {st.run_dir} is a base model; every "
                    "stage after the first must be super-resolution"
                )
            if low != below:
                raise EdiffError(
                    f"cascade {st.name}: takes {low} px low-res images but "
                    f"{loaded[-1].stage.name} makes {below} px"
                )
        ens = load_ensemble(st.run_dir, st.experts, st.weights)
        ens = ens.offload(device) if offload else ens.to(device)
        loaded.append(LoadedStage(st, ens, cfg, size, low))
    return loaded


@torch.no_grad()
def run_cascade(
    stages: Sequence[LoadedStage], prompts: Sequence[str], seed: int = 0, device: str = "cpu"
) -> list[Tensor]:
    """Images in [0, 1] of every stage, one per prompt (repeat a prompt for several)."""

    cond = embed_prompts(load_encoders(stages[0].train_cfg), list(prompts)).to(device)
    outputs: list[Tensor] = []
    for k, ls in enumerate(stages):
        st = ls.stage
        if k:  # each stage embeds with its own encoders (the same ones in a consistent cascade)
            cond = embed_prompts(load_encoders(ls.train_cfg), list(prompts)).to(device)
        low = outputs[-1] if outputs else None
        kw = {"lowres": low, "sigma_aug": float(st.sigma_aug or 0.0)} if ls.is_sr else {}
        images = generate(
            ls.ensemble,
            cond,
            image_size=ls.image_size,
            steps=st.steps,
            guidance=st.guidance,
            seed=seed + 1000 * k,
            sigma_min=st.sigma_min,
            sigma_max=st.sigma_max,
            rho=st.rho,
            solver=st.solver,
            order=st.order,
            **kw,
        )
        if ls.ensemble.offloader is not None:  # the next stage's experts take the device
            ls.ensemble.offloader.release()
        outputs.append(images)
    return outputs


def upsample(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """[N,3,h,w] in [0, 1] → size² (nearest shows pixels as they are, bicubic is the baseline)."""
    if images.shape[-1] == size:
        return images
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(images.float(), size=(size, size), mode=mode, **kw).clamp(0, 1)


def side_by_side(
    stage_images: Sequence[Tensor], prompts: Sequence[str], names: Sequence[str]
) -> Any:
    """For each prompt, one row per stage with that prompt's images, every stage shown at the
    final size (nearest-neighbour, so what each stage added is visible). A PIL image."""
    size = stage_images[-1].shape[-1]
    groups: list[tuple[str, list[int]]] = []
    for i, p in enumerate(prompts[: stage_images[0].shape[0]]):
        if groups and groups[-1][0] == p:
            groups[-1][1].append(i)
        else:
            groups.append((p, [i]))
    per_row = max(len(rows) for _, rows in groups)
    tiles, labels = [], []
    for prompt, rows in groups:
        for name, images in zip(names, stage_images):
            row = upsample(images[rows], size, "nearest")
            pad = torch.zeros(per_row - len(rows), *row.shape[1:])
            tiles.append(torch.cat([row.cpu(), pad]))
            labels.append(f"{prompt} | {name}")
    return labelled_grid(torch.cat(tiles), labels, per_row=per_row, upscale=max(1, 64 // size))


def comparison_rows(rows: Mapping[str, Tensor], upscale: int | None = None) -> Any:
    """A grid with one labelled row per entry (e.g. low-res | bicubic | SR | high-res)."""
    size = max(t.shape[-1] for t in rows.values())
    tiles = torch.cat([upsample(t, size, "nearest") for t in rows.values()])
    per_row = next(iter(rows.values())).shape[0]
    return labelled_grid(tiles, list(rows), per_row=per_row, upscale=upscale)


def read_cascade(name_or_path: str, conf_dir: str | Path) -> tuple[list[Stage], str]:
    """Stages of a cascade file: a name in `conf_dir` (conf/cascade/NAME.yaml) or a path."""

    path = Path(name_or_path)
    if not path.suffix:
        path = Path(conf_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(conf_dir).glob("*.yaml"))
        raise EdiffError(f"no cascade file {path} (known: {', '.join(known) or 'none'})")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(spec, dict) or not spec.get("stages"):
        raise EdiffError(f"{path}: a cascade file needs a list of `stages`")
    stages = [Stage.from_config(s, k) for k, s in enumerate(spec["stages"])]
    return stages, str(spec.get("description", path.stem))


def write_cascade(
    stages: Sequence[LoadedStage],
    outputs: Sequence[Tensor],
    prompts: Sequence[str],
    out_dir: str | Path,
) -> Path:
    """Every stage's images in out_dir/<stage name>/ and the side-by-side cascade.png."""

    out = Path(out_dir)
    for ls, images in zip(stages, outputs):
        save_images(images, out / ls.stage.name)
    path = out / "cascade.png"
    side_by_side(outputs, prompts, [f"{ls.stage.name} {ls.image_size}px" for ls in stages]).save(
        path
    )
    return path


def call_report(stages: Sequence[LoadedStage]) -> str:
    """'stage: expert calls, ...' per stage (which expert answered how many solver calls)."""
    parts = []
    for ls in stages:
        ens = ls.ensemble
        calls = ", ".join(f"{n.name}: {c}" for n, c in zip(ens.router.nodes, ens.calls))
        parts.append(f"{ls.stage.name} ({calls})")
    return "; ".join(parts)
