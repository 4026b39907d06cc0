"""A latent run's codec, settled before the node's folder exists (docs/latent.md).

The VAE is loaded, the backbone checked against its channels and latent size, a data set that
builds itself (the digits toy) is built with it, and the shards' manifest is compared with its
spec: another VAE, pixel shards under codec=vae or latent shards under codec=pixel are one line
here, before step 1 and before anything of the run is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ediff_train.data.datamodule import check_codec
from ediff_train.data.manifest import MANIFEST, read_manifest
from ediff_train.errors import EdiffError
from ediff_train.io.remote import is_remote
from ediff_train.nn.codec import PIXEL_SPEC, codec_mismatch
from ediff_train.run.layout import NODE_JSON, node_dir, read_node_json
from ediff_train.run.weights import check_codec_fits, load_codec


def is_vae(cfg: DictConfig) -> bool:
    codec = cfg.get("codec")
    return codec is not None and str(codec.get("_target_", "")).endswith("VAECodec")


def prepare_codec(cfg: DictConfig) -> dict[str, Any] | None:
    """The codec's spec for the data module (None: pixels). A data set with a builder is built
    first (cached; the digits toy trains its own VAE when codec.path is null)."""
    root = str(cfg.data.get("root"))
    local = not is_remote(root)
    if is_vae(cfg):
        builder = cfg.data.get("builder")
        if builder:
            codec_cfg = OmegaConf.to_container(cfg.codec, resolve=True)
            instantiate(builder)(codec=codec_cfg)
        codec = load_codec(cfg)
        check_codec_fits(cfg, codec)
        spec = codec.spec()
    else:
        spec = None
    if local and (Path(root) / MANIFEST).is_file():  # else the data module says what is missing
        manifest = read_manifest(root)
        check_codec(manifest, root, spec, int(cfg.data.image_size))
    return spec


def check_parent_codec(cfg: DictConfig, parent: str | None, spec: dict[str, Any] | None) -> None:
    """A child denoises in its parent's space: same codec (same VAE), else one line here."""
    if parent is None:
        return
    pdir = Path(str(cfg.parent_dir)) if cfg.get("parent_dir") else node_dir(cfg.run_dir, parent)
    if not (pdir / NODE_JSON).is_file():
        return  # parent_weights() names a missing parent
    theirs = read_node_json(pdir).get("codec") or PIXEL_SPEC
    why = codec_mismatch(dict(theirs), dict(spec or PIXEL_SPEC))
    if why:
        raise EdiffError(
            f"codec: parent {parent} was trained with another codec ({why}); a child keeps "
            "its parent's codec"
        )
