"""The sampler's settings, one object: its fields carry type, default and valid range (the
defaults conf/sampling/config.yaml composes, via the ConfigStore), `from_config` checks a
composed config before anything is loaded, `call` gives the Sampler's keywords and `record`
what settings.json stores — so sample.py spells each setting once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ediff_train.core.settings import boolean, check, count, one_of, optional, plain, real, setting
from ediff_train.core.solvers import SOLVERS
from ediff_train.errors import EdiffError
from ediff_train.run.weights import load_train_config
from ediff_train.sampling.guidance import TEXT_MODES, Guidance

STEPS_VALID = "≥ 1 (a whole number of solver steps)"


def _interval(value: Any) -> bool:
    items = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else None
    return items is not None and len(items) == 2 and all(real()(v) for v in items)


@dataclass
class SamplerSettings:
    """How each image is sampled (not which run, prompts or seeds: those are sample.py's)."""

    steps: int = setting(32, STEPS_VALID, count(1))  # solver steps (Heun: 2 calls each)
    # the paper's "DEIS 3-Kutta, order 6, 25 steps" ≈ solver=deis_rk3 rho=6 steps=25
    solver: str = setting("heun", f"one of {', '.join(SOLVERS)}", one_of(*SOLVERS))
    order: int = setting(3, "a whole number in [1, 4]", count(1, 4))  # deis_ab's order
    rho: float = setting(7.0, "a finite number > 0", real(lambda x: x > 0))
    sigma_min: float = setting(0.002, "a finite number > 0", real(lambda x: x > 0))
    sigma_max: float = setting(80.0, "a finite number > 0", real(lambda x: x > 0))
    guidance: float = setting(5.0, "a finite number", real())  # classifier-free; 1 = none
    # per-expert scales by node, e.g. {E1_1: 7.0, E1_0: 3.0}; others: guidance. null, not {}:
    # Hydra merges a dict given on the command line into an existing one and refuses new keys
    guidance_per_expert: Any = setting(
        None, "null or {node: scale}", lambda v: v is None or hasattr(v, "items")
    )
    # each expert's expert_guidance from its training config (train.py) as its default scale;
    # a scale in guidance_per_expert wins; false: ignore them
    recorded_guidance: bool = setting(True, "true or false", boolean)
    # [lo, hi]: guide only for σ in (lo, hi], the conditional alone elsewhere
    guidance_interval: Any = setting(None, "null or [lo, hi]", optional(_interval))
    # both, t5 (T5 only) or clip (CLIP text only); unconditional = all dropped
    text: str = setting("both", f"one of {', '.join(TEXT_MODES)}", one_of(*TEXT_MODES))
    # a reference image: its CLIP image embedding conditions every sample
    style_image: Any = setting(None)
    # its own guidance weight (0 = ignore the image; > 1 = push towards it)
    style_guidance: float = setting(1.0, "a finite number", real())
    # paint-with-words: w′ in w = w′·log(1+σ)·max(QKᵀ) (eDiff-I §4.3); 0 = off, bit for bit
    paint_weight: float = setting(0.3, "a finite number ≥ 0", real(lambda x: x >= 0))
    batch_size: int = setting(64, "a whole number ≥ 1", count(1))  # images per sampler call
    progress: bool = setting(True, "true or false", boolean)  # a progress bar over batches

    @classmethod
    def from_config(cls, cfg: Any) -> SamplerSettings:
        """The settings of a composed sample.py config, checked (one line for the first bad
        value), before any model is loaded."""
        check(cfg, cls, "")
        values = {f.name: plain(cfg.get(f.name, f.default)) for f in dataclasses.fields(cls)}
        style = values["style_image"]
        if style and not Path(str(style)).is_file():
            raise EdiffError(f"style_image {style} does not exist")
        settings = cls(**values)
        settings.guidance_obj().check(list(settings.per_expert))  # expert names: once loaded
        return settings

    @property
    def per_expert(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in (self.guidance_per_expert or {}).items()}

    def with_recorded(self, recorded: dict[str, float]) -> SamplerSettings:
        """These settings with the experts' recorded scales (`recorded_guidance`) under the ones
        named in guidance_per_expert, so a schedule's per-expert guidance is the default."""
        if not self.recorded_guidance or not recorded:
            return self
        return dataclasses.replace(self, guidance_per_expert={**recorded, **self.per_expert})

    def guidance_obj(self) -> Guidance:
        interval = self.guidance_interval
        return Guidance(
            float(self.guidance),
            self.per_expert,
            (float(interval[0]), float(interval[1])) if interval else None,
        )

    def call(self) -> dict[str, Any]:
        """The Sampler's keywords (paint regions are added by the caller)."""
        kw = dataclasses.asdict(self)
        for key in ("guidance_per_expert", "guidance_interval", "recorded_guidance"):
            kw.pop(key)
        kw["guidance"] = self.guidance_obj()
        return kw

    def record(self) -> dict[str, Any]:
        """What settings.json stores: every field, the per-expert scales and interval as used."""
        out = dataclasses.asdict(self)
        out.pop("progress")
        out["guidance_per_expert"] = self.per_expert
        g = self.guidance_obj()
        out["guidance_interval"] = g.interval
        return out


def recorded_guidance(run_dir: str | Path, names: list[str]) -> dict[str, float]:
    """{expert: scale} for the experts whose training config records `expert_guidance`
    (a schedule sets it per stage, e.g. conf/schedule/wan22_t2v.yaml)."""
    out = {}
    for name in names:
        value = load_train_config(Path(run_dir) / name).get("expert_guidance")
        if value is not None:
            out[name] = float(value)
    return out
