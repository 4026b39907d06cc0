"""Take the experts home: a run's experts as one folder diffusers loads (docs/export.md).

The folder holds each expert's backbone as a model subfolder (`transformer`, `transformer_2`,
… or `unet`, `unet_2`, …, most noise first, as WanPipeline orders its pair): diffusers' own
class for a diffusers backbone, export/models.py (copied in as `ediff_models.py`) for ours
(export/components.py). Beside them the text encoders and tokenizers that made the shards
(export/text.py), a scheduler config, the VAE when the run trained on latents, `experts.json`
(each expert's interval in every convention of core/boundaries.py, its guidance scale and, for
a guidance-distilled student, the w range it was distilled for) and
`pipeline.py` + `ediff_text.py` + `ediff_lora.py`, the routing pipeline, named by
model_index.json so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` finds it.
With `lora=True`, LoRA experts also go out as diffusers LoRA files in `lora/` (export/lora.py).
Everything is checked and written in a temporary folder first and renamed at the end: an error
leaves nothing.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ediff_train.core.boundaries import interval
from ediff_train.core.experts import Router
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.core.parameterisation import spec as param_spec
from ediff_train.errors import EdiffError
from ediff_train.export import ediff_lora, ediff_text
from ediff_train.export import pipeline as pipeline_module
from ediff_train.export.components import MODULE_FILES, Expert, component
from ediff_train.export.lora import LORA_DIR, lora_files, write_lora
from ediff_train.export.text import text_components
from ediff_train.run.adapters import has_handoff
from ediff_train.run.layout import WEIGHTS, node_dir
from ediff_train.run.weights import load_expert, load_train_config, node_of

FORMAT = "ediff-export/1"
EXPERTS_JSON = "experts.json"


def finished_leaves(run_dir: str | os.PathLike) -> list[str]:
    """The finished nodes of a run that no other finished node names as its parent."""
    root = Path(run_dir)
    if not root.is_dir():
        raise EdiffError(f"run_dir {str(run_dir)!r} does not exist")
    nodes = {
        p.name: node_of(load_train_config(p))
        for p in sorted(root.iterdir())
        if p.is_dir() and has_handoff(p)
    }
    if not nodes:
        raise EdiffError(f"run_dir {str(run_dir)!r} holds no finished node ({WEIGHTS})")
    parents = {n.parent for n in nodes.values()}
    return [name for name, n in nodes.items() if n.name not in parents]


def parse_guidance(text: str | float | None, default: float = 5.0) -> tuple[float, dict]:
    """`5`, `E1_0:3,E1_1:7` or `5,E1_1:7` → (scale for all, per-expert scales)."""
    if text is None or text == "":
        return default, {}
    scale, per = default, {}
    for item in str(text).split(","):
        name, sep, value = item.strip().rpartition(":")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise EdiffError(
                f"guidance must be a number or NODE:number items (e.g. 5,E1_1:7), got {text!r}"
            )
        if sep:
            per[name] = number
        else:
            scale = number
    return scale, per


def load_experts(
    run_dir: str | os.PathLike, names: Sequence[str], guidance: tuple[float, dict], which: str
) -> list[Expert]:
    """The named experts, checked to tile σ, share one backbone class, noise law and codec;
    ordered from the most noise to the least."""
    scale, per = guidance
    unknown = sorted(set(per) - set(names))
    if unknown:
        raise EdiffError(f"guidance names {', '.join(unknown)}, not among experts={list(names)}")
    for name in names:
        if not has_handoff(node_dir(run_dir, name)):
            raise EdiffError(
                f"expert {name} is not a finished node of {run_dir}: "
                f"{node_dir(run_dir, name) / WEIGHTS} does not exist"
            )
    cfgs = {name: load_train_config(node_dir(run_dir, name)) for name in names}
    nodes = [node_of(cfgs[n]) for n in names]
    try:
        Router(nodes)
    except EdiffError as e:
        raise EdiffError(f"experts={list(names)} do not tile σ: {e}") from None
    specs = {json.dumps(param_spec(param_from_config(c.get("param")))) for c in cfgs.values()}
    if len(specs) > 1:
        raise EdiffError(f"experts={list(names)} were trained under different parameterisations")
    out = []
    for name, node in zip(names, nodes):
        _, denoiser = load_expert(node_dir(run_dir, name), which)
        # a guidance-distilled student exports with its w input (export/components.py)
        comp = component(name, denoiser.backbone, cfgs[name], getattr(denoiser, "w_range", None))
        out.append(Expert(node, cfgs[name], denoiser.backbone, float(per.get(name, scale)), comp))
    classes = {e.comp.cls for e in out}
    if len(classes) > 1:
        raise EdiffError(f"experts={list(names)} mix backbones {sorted(classes)}")
    codecs = {str((e.cfg.get("codec") or {}).get("_target_", "pixel")) for e in out}
    if len(codecs) > 1:
        raise EdiffError(f"experts={list(names)} mix codecs {sorted(codecs)}")
    if len(out) > pipeline_module.MAX_EXPERTS:
        raise EdiffError(
            f"experts={list(names)}: {len(out)} experts, the pipeline holds at most "
            f"{pipeline_module.MAX_EXPERTS}"
        )
    return sorted(out, key=lambda e: -e.node.sigma_pieces[-1][1])


def _finite(x: Any) -> Any:
    """JSON without infinities: an unbounded end is null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def scheduler_for(param: Any) -> Any:
    """The diffusers scheduler that names the experts' noise law (the pipeline steps in σ)."""
    import diffusers

    if param.name == "flow":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=float(param.shift))
    if param.name == "vp":
        kind = "epsilon" if param.prediction == "eps" else "v_prediction"
        return diffusers.EulerDiscreteScheduler(
            num_train_timesteps=param.steps,
            beta_start=param.beta_start,
            beta_end=param.beta_end,
            beta_schedule="scaled_linear",
            prediction_type=kind,
        )
    return diffusers.EDMEulerScheduler(sigma_data=float(param.sigma_data))


def vae_of(cfg: Any) -> Any:
    """The run's VAE (codec=vae) as a diffusers AutoencoderKL, else None."""
    codec = cfg.get("codec") or {}
    if not str(codec.get("_target_", "")).endswith("VAECodec"):
        return None
    import diffusers

    path = codec.get("path") or Path(str(cfg.data.root)) / "vae"
    sub = codec.get("subfolder")
    kw = {"subfolder": str(sub)} if sub else {}
    return diffusers.AutoencoderKL.from_pretrained(str(path), local_files_only=True, **kw)


def expert_records(experts: list[Expert], kind: str, shift: float) -> list[dict[str, Any]]:
    """experts.json's entries: node, component, σ interval, every convention, guidance."""
    names = pipeline_module.SLOTS[kind]
    rows = []
    for i, (slot, e) in enumerate(zip(names, experts)):
        pieces = e.node.sigma_pieces
        if len(pieces) != 1:
            raise EdiffError(
                f"expert {e.node.name} owns {len(pieces)} separate σ bands; the pipeline routes "
                "one band per expert (export the named nodes instead of a complement)"
            )
        lo, hi = pieces[0]
        # the ends of the tiling are open, as the Router's are: a σ beyond the law's range
        # (σ_max = 80 above a VP schedule's top, say) belongs to the end expert
        hi = math.inf if i == 0 else hi
        lo = 0.0 if i == len(experts) - 1 else lo
        rows.append(
            {
                "node": e.node.name,
                "component": slot,
                "sigma": [lo, hi],
                "guidance_scale": e.guidance,
                "guidance_range": None if e.comp.w_range is None else list(e.comp.w_range),
                "boundaries": interval(lo, hi, shift),
            }
        )
    return rows


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    names: Sequence[str] | None = None,
    guidance: str | float | None = None,
    which: str = "ema",
    sample: dict[str, Any] | None = None,
    text: bool = True,
    lora: bool = False,
) -> Path:
    """Write the experts of `run_dir` (default: its finished leaves) to the new folder `out`,
    with the text encoders that made their shards unless `text` is False (embeddings only), and
    with `lora`, each (LoRA) expert's adapter as a diffusers LoRA file in `out`/lora/."""
    out = Path(out)
    if out.exists():
        raise EdiffError(f"out={str(out)!r} exists; export writes a new folder")
    given = bool(names)
    names = list(names) if names else finished_leaves(run_dir)
    try:
        experts = load_experts(run_dir, names, parse_guidance(guidance), which)
    except EdiffError as e:
        if given or "do not tile" not in str(e):
            raise
        raise EdiffError(
            f"{e} (the run's finished leaves; name the experts: experts=...)"
        ) from None
    cfg = experts[0].cfg
    base, adapters = lora_files(run_dir, experts, which) if lora else ({}, [])
    encoders, text_cfg = text_components(cfg) if text else ({}, None)
    param = param_from_config(cfg.get("param"))
    shift = float(getattr(param, "shift", 1.0))
    rows = expert_records(experts, experts[0].comp.kind, shift)
    backbone = experts[0].backbone
    settings = {
        "steps": 32,
        "solver": "heun",
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "rho": 7.0,
        **(sample or {}),
        "image_size": int(backbone.image_size),
        "channels": int(backbone.in_channels),
    }
    ratio = rows[0]["boundaries"]["boundary_ratio"][0] if len(rows) == 2 else None
    tokenizer_2 = encoders.pop("tokenizer_2", None)  # a plain class: saved below, not by diffusers
    pipe = pipeline_module.EnsemblePipeline(
        scheduler=scheduler_for(param),
        vae=vae_of(cfg),
        **encoders,
        **{r["component"]: e.comp.model for r, e in zip(rows, experts)},
        experts=_finite(
            [{k: r[k] for k in ("node", "component", "sigma", "guidance_scale")} for r in rows]
        ),
        param=param_spec(param),
        timestep_scale=float(getattr(backbone, "timestep_scale", 1.0)),
        boundary_ratio=ratio,
        sample=settings,
        text=text_cfg,
        packing=experts[0].comp.packing,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = ["pipeline", "EnsemblePipeline"]
        if tokenizer_2 is not None:
            tokenizer_2.save_pretrained(tmp / "tokenizer_2")
            index["tokenizer_2"] = ["ediff_train.export.clip_text", type(tokenizer_2).__name__]
        copy_code(tmp, index)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        record = {
            "format": FORMAT,
            "run_dir": str(run_dir),
            "weights": which,
            "backbone": experts[0].comp.cls,
            "param": param_spec(param),
            "timestep_scale": pipe.config.timestep_scale,
            "boundary_ratio": ratio,
            "experts": rows,
            "sample": settings,
            "text": text_cfg,
            "directions": "every convention runs up with noise except log_snr",
        }
        if adapters:
            write_lora(tmp / LORA_DIR, base, adapters, _finite(rows))
            record["lora"] = f"{LORA_DIR}/{ediff_lora.LORA_JSON}"
        (tmp / EXPERTS_JSON).write_text(json.dumps(_finite(record), indent=2) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_code(folder: Path, index: dict[str, Any]) -> None:
    """The pipeline's code beside model_index.json, and each custom component's module in its
    folder under the name model_index.json gives it (diffusers' custom-component layout)."""
    shutil.copyfile(pipeline_module.__file__, folder / "pipeline.py")
    shutil.copyfile(ediff_text.__file__, folder / "ediff_text.py")
    shutil.copyfile(ediff_lora.__file__, folder / "ediff_lora.py")
    for name, entry in index.items():
        if isinstance(entry, list) and entry and str(entry[0]) in MODULE_FILES:
            module = importlib.import_module(entry[0])
            assert module.__file__ is not None
            shutil.copyfile(module.__file__, folder / name / f"{MODULE_FILES[entry[0]]}.py")
            index[name] = [MODULE_FILES[entry[0]], entry[1]]
