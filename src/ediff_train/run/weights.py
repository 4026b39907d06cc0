"""A node's weights and the models and encoders rebuilt from its stored config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open

from ediff_train.core.edm import EDMPrecond
from ediff_train.core.experts import node_from_config
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.errors import EdiffError
from ediff_train.io.files import save_safetensors
from ediff_train.legacy import rewrite_targets
from ediff_train.nn.codec import Codec, codec_from_config
from ediff_train.nn.encoders import Encoders, build_encoders
from ediff_train.nn.guidance_embed import student_from_config
from ediff_train.run.layout import CONFIG, WEIGHTS


def save_weights(
    path: str | os.PathLike,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Consolidated model + EMA weights under `model.` / `ema.` prefixes."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return save_safetensors(path, tensors, meta)


def load_weights(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, EMA state dict, metadata) from a weights.safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise EdiffError(f"weights not found: {path} does not exist")
    model: dict[str, torch.Tensor] = {}
    ema: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            for key in f.keys():
                group, _, name = key.partition(".")
                (model if group == "model" else ema)[name] = f.get_tensor(key)
    except OSError as e:
        raise EdiffError(f"cannot read weights file {path}: {e.strerror or e}") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        # a copy cut short or overwritten: say which file and how to get a good one back
        raise EdiffError(
            f"weights file {path} is corrupt or truncated ({e}): retrain node "
            f"{path.parent.name} or copy its weights.safetensors again from where it was trained"
        ) from None
    if not model or not ema:
        raise EdiffError(f"{path} lacks model or EMA weights (keys must start with model./ema.)")
    return model, ema, meta


def load_train_config(ndir: str | os.PathLike) -> Any:
    """The resolved training config a node was trained with (its config.yaml)."""

    path = Path(ndir) / CONFIG
    if not path.is_file():
        raise EdiffError(f"not a trained node: {path} does not exist")
    cfg = OmegaConf.load(path)
    rewrite_targets(cfg)  # a run stored before the 0.2 layout names old module paths
    return cfg


def load_expert(ndir: str | os.PathLike, which: str = "ema") -> tuple[Any, torch.nn.Module]:
    """(Node, EDMPrecond denoiser) of a finished node, rebuilt from its config and weights."""

    if which not in ("ema", "model"):
        raise EdiffError(f"weights must be 'ema' or 'model', got {which!r}")
    from ediff_train.run.adapters import is_lora_node, load_lora_expert

    if is_lora_node(ndir):  # base + peft adapter (run/adapters.py)
        return load_lora_expert(ndir, "ema" if which == "ema" else "raw")
    cfg = load_train_config(ndir)
    model, ema, _ = load_weights(Path(ndir) / WEIGHTS)
    denoiser = denoiser_of(cfg)
    denoiser.load_state_dict(ema if which == "ema" else model)
    return node_of(cfg), denoiser.eval().requires_grad_(False)


def node_of(cfg: Any) -> Any:
    """The node a stored training config trained, its quantiles of the run's noise law."""
    return node_from_config(cfg.expert, law=param_from_config(cfg.get("param")).law)


def denoiser_of(cfg: Any) -> EDMPrecond:
    """The config's network inside its parameterisation's preconditioning (random weights);
    a guidance-distilled student's takes w (nn/guidance_embed.py)."""
    plain = EDMPrecond(instantiate(cfg.model), param=param_from_config(cfg.get("param")))
    return student_from_config(plain, cfg.get("distill_guidance"))


def load_encoders(cfg: Any) -> Any:
    """The encoders that embedded a config's shards: tiny ones saved next to the data, or the
    pretrained ones from the local paths in `encoders:`."""

    enc = cfg.encoders
    if enc.get("kind", "tiny") == "tiny":
        return Encoders.load(enc.get("path") or Path(cfg.data.root) / "encoders")
    return build_encoders(**{k: v for k, v in enc.items() if k != "dims"})


def load_codec(cfg: Any, device: Any = "cpu") -> Codec:
    """The codec a config trains in (nn/codec.py): pixels for a stored run without `codec`;
    a VAE without a path is the data set's own (<data.root>/vae)."""
    codec = codec_from_config(cfg.get("codec"), cfg.data.get("root"))
    return codec.to(device)


def check_codec_fits(cfg: Any, codec: Codec) -> None:
    """The backbone must take the codec's channels at the codec's size (conf/model/ interpolate
    both; an override that breaks them is refused here, before anything trains). Pixels: no
    new check (an SR stage's model may train on crops of another size)."""
    if codec.is_identity:
        return
    if cfg.data.get("lowres_size") or cfg.data.get("crop_size"):
        raise EdiffError(
            "codec=vae trains a base stage: data.lowres_size and crop_size must be null"
        )
    model, size = cfg.model, int(cfg.data.image_size)
    if size % codec.downsample:
        raise EdiffError(
            f"data.image_size {size} is not divisible by the codec's downsample {codec.downsample}"
        )
    want = {"in_channels": codec.channels, "image_size": size // codec.downsample}
    if model.get("out_channels") is not None:
        want["out_channels"] = codec.channels
    for key, value in want.items():
        have = model.get(key)
        if have is not None and int(have) != value:
            raise EdiffError(
                f"model.{key}={have} does not fit codec {type(codec).__name__} "
                f"({codec.channels} channels, {size}px // {codec.downsample} = "
                f"{size // codec.downsample}); need model.{key}={value}"
            )
