"""LoRA experts on disk: peft's adapter files in a node folder, and the base they were trained on.

A LoRA node (docs/lora.md) holds no full weights. Its folder has peft's own files, so peft (and
diffusers' `load_lora_adapter`) read them as they are:

- `adapter_model.safetensors` + `adapter_config.json`: the EMA adapter (what the sampler uses);
- `raw/adapter_model.safetensors` + `raw/adapter_config.json`: the raw adapter (a LoRA child's
  start, beside the EMA one);
- node.json `lora`: the base node, its folder and the SHA-256 of its weights.safetensors.

Every LoRA expert of a tree is an adapter over the same frozen base, the EMA weights of the
nearest full-weight ancestor. An adapter is only ever applied to the exact base it was trained
on: a base whose file hash differs is refused in one line. Keys are peft's, relative to the
backbone (`base_model.model.<module path>.lora_A.weight`); in a live model peft names them with
the adapter's name (`<path>.lora_A.<node>.weight`), and the node's name is the adapter's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ediff_train.errors import EdiffError
from ediff_train.io.files import save_safetensors, write_json
from ediff_train.run.layout import WEIGHTS, read_node_json

ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RAW = "raw"  # <node>/raw/: the raw (not averaged) adapter in the same format
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module paths
LAYERS = (nn.Linear, nn.Conv2d)  # what our targets may name (peft's LoRA supports both)

# `target_modules: auto`: the attention projections of each backbone (by class name)
AUTO_TARGETS: dict[str, list[str]] = {
    "TextUNet": ["qkv", "proj", "q", "kv"],
    "EfficientUNet": ["qkv", "proj", "q", "kv"],
    "TextDiT": ["qkv", "proj", "q", "kv", "proj_x"],
    "MMDiT": ["to_q", "to_k", "to_v", "to_out.0"],  # diffusers' attention (inner model at .model)
    "SDUNet": ["to_q", "to_k", "to_v", "to_out.0"],
}
_HASHES: dict[tuple[str, int, int], str] = {}


def has_handoff(ndir: str | os.PathLike) -> bool:
    """A node's hand-off is there: full weights, or a LoRA adapter."""
    return (Path(ndir) / WEIGHTS).is_file() or (Path(ndir) / ADAPTER).is_file()


def is_lora_node(ndir: str | os.PathLike) -> bool:
    """The folder holds a LoRA expert (peft's adapter config), not full weights."""
    return (Path(ndir) / ADAPTER_CONFIG).is_file()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# ---- targets -------------------------------------------------------------------------------
def _matches(name: str, target: str, regex: bool) -> bool:
    """peft's rule: a list entry names a module path or its suffix; a string is a full regex."""
    if regex:
        return re.fullmatch(target, name) is not None
    return name == target or name.endswith("." + target)


def resolve_targets(backbone: nn.Module, targets: Any) -> list[str] | str:
    """The target_modules to give peft: `auto` is the backbone's attention projections (those
    present); a list must have every entry match a Linear/Conv2d; a string is a regex that must
    match one. Anything else is refused in one line naming it and what the backbone has."""
    layers = [n for n, m in backbone.named_modules() if isinstance(m, LAYERS)]
    kind = type(backbone).__name__
    if targets == "auto":
        auto = AUTO_TARGETS.get(kind) or sorted({t for ts in AUTO_TARGETS.values() for t in ts})
        found = [t for t in auto if any(_matches(n, t, False) for n in layers)]
        if not found:
            raise EdiffError(
                f"lora.target_modules=auto: {kind} has none of {auto}; name its Linear/Conv2d "
                f"modules, e.g. lora.target_modules=[{','.join(_examples(layers))}]"
            )
        return found
    if isinstance(targets, str):
        if not any(_matches(n, targets, True) for n in layers):
            raise EdiffError(
                f"lora.target_modules={targets!r} (a regex) matches no Linear/Conv2d module of "
                f"{kind}; it has e.g. {', '.join(_examples(layers))}"
            )
        return targets
    names = [str(t) for t in targets] if targets is not None else []
    for t in names or [""]:
        if not t or not any(_matches(n, t, False) for n in layers):
            raise EdiffError(
                f"lora.target_modules: {t!r} matches no Linear/Conv2d module of {kind}; valid "
                f"are module names or suffixes such as {', '.join(_examples(layers))} (or auto)"
            )
    return names


def _examples(layers: list[str], n: int = 6) -> list[str]:
    """A few distinct last names of the backbone's layers, for messages."""
    seen: list[str] = []
    for name in layers:
        parts = name.split(".")
        last = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        if last not in seen:
            seen.append(last)
    return seen[:n]


# ---- peft ----------------------------------------------------------------------------------
def lora_config(rank: int, alpha: float, dropout: float, targets: list[str] | str) -> Any:
    """peft's LoraConfig; B starts at zero, so a fresh adapter leaves the base's output as is."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=targets,
        init_lora_weights=True,
        bias="none",
    )


def inject(backbone: nn.Module, config: Any, name: str) -> None:
    """Add adapter `name` to the backbone in place (the base layers stay where they are)."""
    import warnings

    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # a second adapter on the same model is what we want
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, backbone, adapter_name=name)


def tuner_layers(model: nn.Module) -> list[Any]:
    """peft's LoRA layers of a model (what switching adapters touches)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def _adapter_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.(lora_[A-Za-z_]+)\.{re.escape(name)}(?=\.|$)")


def to_peft(state: dict[str, Tensor], name: str, prefix: str = "") -> dict[str, Tensor]:
    """Adapter `name`'s tensors of a live state dict (keys under `prefix`) in peft's file keys."""
    pat, out = _adapter_re(name), {}
    for k, v in state.items():
        if k.startswith(prefix) and pat.search(k):
            out[PEFT_PREFIX + pat.sub(r".\1", k[len(prefix) :])] = v.detach().cpu().contiguous()
    return out


def from_peft(tensors: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """peft's file keys as the live names of adapter `name` (relative to the backbone)."""
    out = {}
    for k, v in tensors.items():
        k = k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k
        out[re.sub(r"\.(lora_[A-Za-z_]+)(?=\.)", rf".\1.{name}", k, count=1)] = v
    return out


def config_dict(config: Any) -> dict[str, Any]:
    """adapter_config.json as peft writes it (sets as lists)."""
    d = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def save_adapter(folder: Path, config: Any, tensors: dict[str, Tensor], meta: dict) -> None:
    """peft's two files in `folder`, each written atomically (weights first)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / ADAPTER, tensors, {k: json.dumps(v) for k, v in meta.items()})
    write_json(folder / ADAPTER_CONFIG, config_dict(config))


def read_adapter(folder: str | os.PathLike) -> tuple[Any, dict[str, Tensor]]:
    """(LoraConfig, tensors in peft's keys) of an adapter folder; one line if it is missing."""
    from peft import LoraConfig

    folder = Path(folder)
    if not (folder / ADAPTER).is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise EdiffError(f"no LoRA adapter in {folder} ({ADAPTER} + {ADAPTER_CONFIG} expected)")
    config = LoraConfig.from_pretrained(str(folder))
    with safe_open(str(folder / ADAPTER), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return config, tensors


def load_into(backbone: nn.Module, tensors: dict[str, Tensor], name: str, what: str) -> None:
    """Write adapter `name`'s values (peft keys); every one of its tensors must be given."""
    live = from_peft(tensors, name)
    params = {k: p for k, p in backbone.named_parameters() if _adapter_re(name).search(k)}
    if live.keys() != params.keys():
        missing = sorted(params.keys() - live.keys()) or sorted(live.keys() - params.keys())
        raise EdiffError(f"{what}: adapter tensors do not fit the model (e.g. {missing[0]})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(live[k].to(p.dtype))


# ---- the base --------------------------------------------------------------------------------
def lora_record(ndir: str | os.PathLike) -> dict[str, Any]:
    """node.json's `lora` record of a LoRA node."""
    rec = read_node_json(ndir).get("lora")
    if not isinstance(rec, dict) or "base" not in rec:
        raise EdiffError(f"{Path(ndir) / 'node.json'} has no lora record (not a LoRA node)")
    return rec


def base_dir(ndir: str | os.PathLike, record: dict[str, Any], who: str | None = None) -> Path:
    """The folder of the base an adapter was trained over: the node named `base` beside this
    one (a run directory that moved), else where the base was at training time. The first whose
    weights hash to the recorded SHA-256 is it; a base with another hash is refused in one line."""
    cands = [Path(ndir).parent / str(record["base"]), Path(str(record.get("base_dir", "")))]
    found = [c for c in cands if (c / WEIGHTS).is_file()]
    for cand in found:
        if file_sha256(cand / WEIGHTS) == str(record.get("base_sha256")):
            return cand
    if found:
        check_base(record, found[0], who or str(ndir))
    raise EdiffError(
        f"{who or ndir}: its LoRA base {record['base']} is missing ({record.get('base_dir')}/"
        f"{WEIGHTS} not found); the adapter needs the exact weights it was trained over"
    )


def check_base(record: dict[str, Any], bdir: Path, who: str) -> None:
    """An adapter over another base than its own is refused in one line."""
    have = file_sha256(bdir / WEIGHTS)
    want = str(record.get("base_sha256"))
    if have != want:
        raise EdiffError(
            f"{who}: LoRA adapter was trained over {record['base']} with weights sha256 "
            f"{want[:12]}…, but {bdir / WEIGHTS} has {have[:12]}… (another base); use the base "
            "it was trained on or retrain the adapter"
        )


def add_adapter(backbone: nn.Module, ndir: str | os.PathLike, which: str = "ema") -> str:
    """Inject a LoRA node's adapter (named after the node) into a backbone that holds its base;
    returns the adapter's name. The caller checked the base."""
    folder = Path(ndir) if which == "ema" else Path(ndir) / RAW
    config, tensors = read_adapter(folder)
    name = str(read_node_json(ndir)["node"])
    inject(backbone, config, name)
    load_into(backbone, tensors, name, str(folder / ADAPTER))
    return name


def load_lora_expert(ndir: str | os.PathLike, which: str = "ema") -> tuple[Any, nn.Module]:
    """(Node, denoiser) of a LoRA node: its base's EMA weights with its adapter injected and
    active (the base's file hash checked first)."""
    from ediff_train.run.weights import load_expert, load_train_config, node_of

    bdir = base_dir(ndir, lora_record(ndir))
    _, denoiser = load_expert(bdir, "ema")
    add_adapter(denoiser.backbone, ndir, which)
    return node_of(load_train_config(ndir)), denoiser.eval().requires_grad_(False)
