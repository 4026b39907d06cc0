"""The digits toy's own VAE: a small diffusers AutoencoderKL trained once on the training
split when the latent digits set is built (`codec=vae` with `codec.path` null), saved beside the
data in `<root>/vae` and loaded from there like any other VAE (docs/latent.md).

Training: MSE reconstruction plus a small KL term (so the posterior stays a usable latent
space), AdamW, fixed seed and batch order: the same steps give the same VAE. Afterwards
`shift_factor` is set to the latents' mean and `scaling_factor` to 0.5 / their standard deviation,
so the model sees latents with σ_data = 0.5, the spread EDM's preconditioning assumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ediff_train.data.latents import pixels
from ediff_train.errors import EdiffError

KL_WEIGHT = 1e-3
SIGMA_DATA = 0.5


def digits_vae(channels: int = 4, downsample: int = 2, size: int = 16, seed: int = 0) -> Any:
    """A random small AutoencoderKL: one encoder/decoder block per factor of two, plus one."""
    from diffusers import AutoencoderKL

    if downsample < 1 or downsample & (downsample - 1):
        raise EdiffError(f"codec.downsample must be a power of two, got {downsample}")
    levels = int(downsample).bit_length()  # 2 → two blocks: one down-sampling
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(16 * 2**i for i in range(levels)),
        layers_per_block=1,
        latent_channels=int(channels),
        norm_num_groups=8,
        sample_size=int(size),
        mid_block_add_attention=False,
    )


def train_digits_vae(
    images: np.ndarray,
    out: str | Path,
    steps: int = 400,
    channels: int = 4,
    downsample: int = 2,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> dict[str, float]:
    """Fit on uint8 [N,H,W,3] images, save to `out` (save_pretrained); returns the record."""
    x = pixels(images)
    vae = digits_vae(channels, downsample, x.shape[-1], seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    rec = kl = torch.zeros(())
    for step in range(int(steps)):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        for group in opt.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.55 + 0.45 * float(np.cos(np.pi * step / max(1, steps))))
        post = vae.encode(x[idx]).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        rec = torch.nn.functional.mse_loss(recon, x[idx])
        kl = post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        (rec + KL_WEIGHT * kl).backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        recon = torch.cat([vae.decode(z[i : i + 256]).sample for i in range(0, len(z), 256)]).clamp(
            -1, 1
        )
    shift, std = float(z.mean()), float(z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=SIGMA_DATA / std)
    vae.save_pretrained(str(out))
    return {
        "steps": int(steps),
        "final_mse": round(float(rec.detach()), 5),
        "final_kl": round(float(kl.detach()), 5),
        "reconstruction_mse": round(float(torch.nn.functional.mse_loss(recon, x)), 5),
        "shift_factor": shift,
        "scaling_factor": SIGMA_DATA / std,
    }


def codec_params(codec: dict[str, Any] | None, vae_steps: int) -> dict[str, Any] | None:
    """What a latent digits build is cached by (None: pixels): a given VAE's fingerprint, or
    the settings of the VAE the build trains itself (codec.path null)."""
    from ediff_train.nn.codec import VAECodec

    if not codec or not str(codec.get("_target_", "")).endswith("VAECodec"):
        return None
    mode = str(codec.get("mode") or "mean")
    if codec.get("path"):
        vae = VAECodec(**_codec_args(codec))
        return {"fingerprint": vae.spec()["fingerprint"], "mode": mode}
    channels, down = int(codec.get("channels") or 4), int(codec.get("downsample") or 2)
    return {
        "own_vae": {"steps": int(vae_steps), "channels": channels, "downsample": down},
        "mode": mode,
    }


def _codec_args(codec: dict[str, Any]) -> dict[str, Any]:
    keys = ("path", "subfolder", "channels", "downsample", "mode")
    return {k: codec.get(k) for k in keys if codec.get(k) is not None}


def digits_codec(
    out: Path, final: Path, codec: dict[str, Any], params: dict[str, Any], train: np.ndarray
) -> tuple[Any, dict[str, Any] | None]:
    """(the VAECodec of a latent digits build being written to `out`, its training record):
    a given VAE, or one trained here on the training split's images `train` and saved in
    out/vae (recorded as final/vae, where it lives once the build is renamed into place)."""
    from ediff_train.nn.codec import VAE_DIR, VAECodec

    own = params["codec"].get("own_vae")
    if own is None:
        return VAECodec(**_codec_args(codec)), None
    record = train_digits_vae(
        train, out / VAE_DIR, int(own["steps"]), own["channels"], own["downsample"], params["seed"]
    )
    vae = VAECodec(out / VAE_DIR, channels=own["channels"], downsample=own["downsample"])
    vae.mode = params["codec"]["mode"]
    vae.path = str(final / VAE_DIR)
    return vae, record
