"""The codec between pixels and the space the denoiser works in (docs/latent.md).

`PixelCodec` is the identity: the denoiser sees [-1, 1] pixels (the default, and what every run
made before codecs existed did). `VAECodec` wraps a diffusers `AutoencoderKL` loaded from a local
folder: latent = (mean_or_sample − shift)·scale, decode inverts it, with the VAE's own
`config.scaling_factor` and `shift_factor`. The shards store latents computed once (data_prep);
training never runs the encoder, sampling and evaluation run the decoder. `spec()` is what
manifests and node.json record, so a shard set encoded by one VAE is never trained on under
another (`codec_mismatch`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ediff_train.errors import EdiffError
from ediff_train.nn.encoder_models import weights_fingerprint

PIXEL_SPEC = {"class": "PixelCodec", "channels": 3, "factor": 1}
# spec fields that must agree between the shards' manifest and the training config (not the
# path: a VAE folder copied elsewhere is the same VAE)
_COMPARED = ("class", "fingerprint", "scaling_factor", "shift_factor", "channels", "factor")
VAE_DIR = "vae"  # where a data set keeps its own VAE (the digits toy trains one there)


class PixelCodec:
    """Identity: images are the model's input, as before codecs."""

    is_identity = True

    def __init__(self, channels: int = 3, downsample: int = 1) -> None:
        if int(channels) != 3 or int(downsample) != 1:
            raise EdiffError(
                f"codec=pixel has 3 channels and downsample 1, got channels={channels}, "
                f"downsample={downsample} (use codec=vae for latents)"
            )
        self.channels, self.downsample = 3, 1

    def encode(self, images: Tensor, batch_size: int = 64) -> Tensor:
        return images

    def decode(self, latents: Tensor, batch_size: int = 64) -> Tensor:
        return latents

    def spec(self) -> dict[str, Any]:
        return dict(PIXEL_SPEC)

    def to(self, device: str | torch.device) -> PixelCodec:
        return self


def config_hash(config: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of a diffusers config, without the keys that name where it was
    loaded from or which library version wrote it."""
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


class VAECodec:
    """A diffusers AutoencoderKL from `path` (optionally its `subfolder`, e.g. "vae").

    `channels` and `downsample` are stated in the config (the backbone's in/out channels and
    size are interpolated from them before anything is loaded) and checked against the VAE:
    latent_channels and 2^(len(block_out_channels) − 1). `mode`: encode to the posterior's
    mean (deterministic, the default) or a sample of it (seeded by `seed`)."""

    is_identity = False

    def __init__(
        self,
        path: str | Path | None,
        subfolder: str | None = None,
        channels: int | None = None,
        downsample: int | None = None,
        mode: str = "mean",
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        from diffusers import AutoencoderKL

        if path is None:
            raise EdiffError(
                "codec=vae needs codec.path=FOLDER (a diffusers AutoencoderKL saved with "
                "save_pretrained; codec.subfolder=vae for a pipeline folder)"
            )
        if mode not in ("mean", "sample"):
            raise EdiffError(f"codec.mode must be mean or sample, got {mode!r}")
        folder = Path(path) / (subfolder or "")
        if not (folder / "config.json").is_file():
            raise EdiffError(f"codec.path: no AutoencoderKL at {folder} (config.json missing)")
        try:
            self.vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder or None)
        except (OSError, ValueError, TypeError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdiffError(f"codec.path: no AutoencoderKL loads from {folder} ({why})") from None
        self.vae.eval().requires_grad_(False).to(device)
        self.path, self.subfolder, self.mode, self.seed = str(path), subfolder, mode, int(seed)
        cfg = self.vae.config
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale = float(cfg.scaling_factor)
        self.shift = float(cfg.shift_factor) if cfg.shift_factor is not None else 0.0
        for name, stated, real in (
            ("channels", channels, self.channels),
            ("downsample", downsample, self.downsample),
        ):
            if stated is not None and int(stated) != real:
                raise EdiffError(
                    f"codec.{name}={stated} but the VAE at {folder} has {real} "
                    f"(set codec.{name}={real})"
                )
        self._spec: dict[str, Any] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: str | torch.device) -> VAECodec:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """[N,3,H,W] in [-1, 1] → scaled latents [N,C,H/f,W/f] (float32, on the input's device)."""
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise EdiffError(
                f"image size {tuple(images.shape[-2:])} is not divisible by the VAE's "
                f"downsample factor {self.downsample}"
            )
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device, torch.float32)
            dist = self.vae.encode(x).latent_dist
            z = dist.mean if self.mode == "mean" else dist.sample(generator=g)
            out.append(((z - self.shift) * self.scale).to(images.device))
        return torch.cat(out) if out else images.new_zeros(0, self.channels, 1, 1)

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 64) -> Tensor:
        """Scaled latents → pixels in (about) [-1, 1], on the latents' device."""
        out = []
        for i in range(0, len(latents), batch_size):
            z = latents[i : i + batch_size].to(self.device, torch.float32)
            out.append(self.vae.decode(z / self.scale + self.shift).sample.to(latents.device))
        return torch.cat(out)

    def spec(self) -> dict[str, Any]:
        """What manifests and node.json record (the weights' fingerprint identifies the VAE)."""
        if self._spec is None:
            self._spec = {
                "class": "VAECodec",
                "path": self.path,
                "subfolder": self.subfolder,
                "config_hash": config_hash(dict(self.vae.config)),
                "fingerprint": weights_fingerprint(self.vae),
                "scaling_factor": self.scale,
                "shift_factor": self.shift,
                "channels": self.channels,
                "factor": self.downsample,
                "mode": self.mode,
            }
        return dict(self._spec)


Codec = PixelCodec | VAECodec


def codec_from_config(cfg: Any, data_root: str | Path | None = None, **kw: Any) -> Codec:
    """The codec of a `codec:` config node (None or absent: pixels, as runs made before codecs).
    A VAE without `path` is the data set's own, `<data_root>/vae`."""
    if cfg is None:
        return PixelCodec()
    c = {k: v for k, v in dict(cfg).items() if k != "_target_"}
    target = str(dict(cfg).get("_target_", ""))
    if target.endswith("PixelCodec"):
        return PixelCodec(int(c.get("channels", 3)), int(c.get("downsample", 1)))
    if not target.endswith("VAECodec"):
        raise EdiffError(f"codec._target_ must be a PixelCodec or VAECodec, got {target!r}")
    if c.get("path") is None and data_root is not None:
        c["path"] = str(Path(str(data_root)) / VAE_DIR)
    keys = ("path", "subfolder", "channels", "downsample", "mode", "seed", "device")
    return VAECodec(**{k: v for k, v in {**c, **kw}.items() if k in keys})


def recorded_codec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The codec a manifest records (none: pixel shards, as every set made before codecs)."""
    return dict(manifest.get("codec") or PIXEL_SPEC)


def codec_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """Why shards encoded with `have` cannot train a config whose codec is `want` (None: fine)."""
    if have.get("class") != want.get("class"):
        kind = {"PixelCodec": "pixel images", "VAECodec": "VAE latents"}
        return (
            f"they hold {kind.get(have.get('class'), have.get('class'))} but the config's codec "
            f"is {'pixel' if want.get('class') == 'PixelCodec' else 'vae'} (set "
            f"codec={'vae' if have.get('class') == 'VAECodec' else 'pixel'}, or encode the "
            "shards with the config's codec)"
        )
    bad = [k for k in _COMPARED if have.get(k) != want.get(k)]
    if not bad:
        return None
    if "fingerprint" in bad:
        return (
            f"they were encoded by another VAE (fingerprint {str(have.get('fingerprint'))[:12]}, "
            f"from {have.get('path')}) than codec.path={want.get('path')} "
            f"(fingerprint {str(want.get('fingerprint'))[:12]})"
        )
    return "their codec differs in " + ", ".join(
        f"{k} ({have.get(k)!r} vs {want.get(k)!r})" for k in bad
    )
