"""A root from a pretrained diffusers model: `init_from=<local diffusers folder>` (docs/export.md).

The folder's model_index.json names its backbone (an SD3 transformer or an SD-class U-Net) and
its VAE. `init_from` picks our wrapper for that class (nn/mmdit.py MMDiT, nn/sd_unet.py SDUNet)
with `pretrained=<folder>`, so the architecture and the weights come from the folder, and when
the folder has a VAE it becomes the codec (conf/codec/vae.yaml, `path=<folder>`,
`subfolder=vae`). Only the root E0_0 starts this way: a child starts from its parent. Whether
the model fits the data (channels, sample size, text widths) is the wrapper's one-line check,
made when the model is built, before step 1 and before the node's config is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from ediff_train import CONF_DIR
from ediff_train.errors import EdiffError

# diffusers class → (model_index.json component, our wrapper, the conf/model/ file it starts from)
SUPPORTED = {
    "SD3Transformer2DModel": ("transformer", "ediff_train.nn.mmdit.MMDiT", "mmdit_tiny"),
    "UNet2DConditionModel": ("unet", "ediff_train.nn.sd_unet.SDUNet", "sd_unet_tiny"),
}
NAMES = " or ".join(SUPPORTED)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdiffError(f"init_from: {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdiffError(f"init_from: {path} is not a JSON object")
    return data


def pretrained_backbone(folder: str) -> tuple[str, str | None]:
    """(diffusers class, subfolder) of the backbone of a local diffusers folder: a pipeline
    folder (model_index.json) or a bare model folder (config.json). One line otherwise."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EdiffError(f"init_from={folder!r} does not exist (a local diffusers model folder)")
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        found = {
            k: v[1]
            for k, v in index.items()
            if isinstance(v, list) and len(v) == 2 and v[1] in SUPPORTED
        }
        if not found:
            named = sorted(
                f"{k}: {v[1]}" for k, v in index.items() if isinstance(v, list) and len(v) == 2
            )
            raise EdiffError(
                f"init_from={folder!r} has no {NAMES} (model_index.json names "
                f"{', '.join(named) or 'no models'}); those are the backbones a root starts from"
            )
        key = next((k for k in ("transformer", "unet") if k in found), sorted(found)[0])
        return found[key], key
    if (root / "config.json").is_file():
        cls = _read_json(root / "config.json").get("_class_name")
        if cls in SUPPORTED:
            return str(cls), None
        raise EdiffError(
            f"init_from={folder!r} holds a {cls or 'model without _class_name'}; "
            f"supported backbones: {NAMES}"
        )
    raise EdiffError(
        f"init_from={folder!r} is not a diffusers model folder (no model_index.json or "
        "config.json; save one with save_pretrained)"
    )


def vae_codec(folder: Path) -> dict[str, Any] | None:
    """The codec entry for the folder's `vae/` (an AutoencoderKL), None when it has none."""
    cfg_path = folder / "vae" / "config.json"
    template = CONF_DIR / "codec" / "vae.yaml"
    if not cfg_path.is_file() or not template.is_file():
        return None
    vae = _read_json(cfg_path)
    codec = OmegaConf.to_container(OmegaConf.load(template))
    assert isinstance(codec, dict)
    codec.update(
        path=str(folder),
        subfolder="vae",
        channels=int(vae.get("latent_channels", 4)),
        downsample=2 ** (len(vae.get("block_out_channels", [0])) - 1),
    )
    return codec


def apply_init_from(cfg: Any, node: Any) -> dict[str, Any] | None:
    """Point the model (and the codec) of a root's config at `cfg.init_from`; returns what was
    set (for node.json), None without init_from."""
    folder = cfg.get("init_from")
    if node.parent is not None:
        return inherit_backbone(cfg, node)
    if not folder:
        return None
    root = Path(str(folder)).expanduser().resolve()
    with open_dict(cfg):
        cfg.init_from = str(root)  # children compare theirs against the resolved path
    cls, sub = pretrained_backbone(str(folder))
    _, target, base = SUPPORTED[cls]
    raw = OmegaConf.to_container(cfg.model, resolve=False)
    assert isinstance(raw, dict)
    if raw.get("_target_") != target:  # start from the wrapper's own config file
        kept = {k: raw[k] for k in ("image_size", "in_channels", "out_channels") if k in raw}
        raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{base}.yaml"))
        assert isinstance(raw, dict)
        raw.update(kept)
    raw.update(pretrained=str(root), subfolder=sub)
    codec = vae_codec(root)
    with open_dict(cfg):
        cfg.model = OmegaConf.create(raw)
        current = str((cfg.get("codec") or {}).get("_target_", ""))
        if codec is not None and (not current or current.endswith("PixelCodec")):
            cfg.codec = OmegaConf.create(codec)
        elif codec is not None and current.endswith("VAECodec") and not cfg.codec.get("path"):
            cfg.codec.path, cfg.codec.subfolder = str(root), "vae"
    return {"folder": str(root), "class": cls, "subfolder": sub, "vae": codec is not None}


def inherit_backbone(cfg: Any, node: Any) -> dict[str, Any] | None:
    """A child of a root started from a folder trains the same backbone and codec: its parent's
    stored `model`, `codec` and `init_from` replace this command's (`python train.py
    expert=E1_0` needs no model flags; the record passes down the tree). An `init_from` of the
    child's own, other than the tree's, is refused in one line."""
    from ediff_train.run.layout import CONFIG, node_dir

    own = cfg.get("init_from")
    pdir = (
        Path(str(cfg.parent_dir)) if cfg.get("parent_dir") else node_dir(cfg.run_dir, node.parent)
    )
    parent = OmegaConf.load(pdir / CONFIG) if (pdir / CONFIG).is_file() else None
    tree = parent.get("init_from") if parent is not None else None
    if own and (not tree or Path(str(own)).expanduser().resolve() != Path(str(tree))):
        raise EdiffError(
            f"init_from is for the root E0_0 (a child starts from its parent's weights and "
            f"backbone), got expert={node.name} init_from={own}"
        )
    if not tree:
        return None
    with open_dict(cfg):
        cfg.init_from = str(tree)
        cfg.model = parent.model
        if parent.get("codec") is not None:
            cfg.codec = parent.codec
    return {"folder": str(tree), "inherited_from": str(pdir)}
