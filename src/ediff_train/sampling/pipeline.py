"""The sampling API a notebook uses: load a run's experts once, then sample many times.

    from ediff_train.sampling.pipeline import Sampler
    s = Sampler.from_run("runs/digits", ["E1_0", "E1_1"])
    images = s(["the number 3", "a handwritten seven"], seed=0, solver="dpmpp_2m", steps=16)

Every image's starting noise is seeded by (seed, its index in the call), so an image does not
change with the batch size it was generated in, and a prompt list can be split across calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ediff_train.errors import EdiffError
from ediff_train.nn.codec import Codec, PixelCodec
from ediff_train.nn.paint import Painter
from ediff_train.run.weights import load_codec, load_encoders, load_train_config
from ediff_train.sampling.ensemble import Ensemble, load_ensemble
from ediff_train.sampling.generation import embed_prompts, generate, image_noise
from ediff_train.sampling.guidance import Guidance, style_embedding


class Sampler:
    """A base-stage ensemble with its encoders, image size and codec, called like a function.
    A VAE codec's run samples latents of image_size // downsample and decodes them."""

    def __init__(
        self,
        ensemble: Ensemble,
        encoders: Any,
        image_size: int,
        device: str | torch.device = "cpu",
        offload: bool = False,
        codec: Codec | None = None,
    ) -> None:
        self.ensemble = ensemble.offload(device) if offload else ensemble.to(device)
        self.encoders, self.image_size, self.device = encoders, int(image_size), device
        self.codec = (codec or PixelCodec()).to(device)

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        experts: Sequence[str],
        weights: str = "ema",
        device: str | torch.device = "cpu",
        offload: bool = False,
    ) -> Sampler:

        cfg = load_train_config(Path(run_dir) / experts[0])
        if cfg.data.get("lowres_size"):
            raise EdiffError(
                f"{run_dir}/{experts[0]} is a super-resolution stage: sample it "
                "in a cascade (ediff_train.sampling.cascade)"
            )
        return cls(
            load_ensemble(run_dir, experts, weights),
            load_encoders(cfg),
            int(cfg.data.image_size),
            device,
            offload,
            load_codec(cfg),
        )

    @property
    def expert_calls(self) -> dict[str, int]:
        return {n.name: c for n, c in zip(self.ensemble.router.nodes, self.ensemble.calls)}

    def __call__(
        self,
        prompts: Sequence[str],
        seed: int = 0,
        steps: int = 32,
        guidance: float | Guidance = 5.0,
        solver: str = "heun",
        batch_size: int = 64,
        progress: bool = False,
        first_index: int = 0,
        **kw: Any,
    ) -> Tensor:
        """Images [N,3,H,W] in [0, 1], one per prompt (repeat a prompt for several). Extra
        keywords go to sampling.generate (sigma_min, sigma_max, rho, order, text, style,
        style_guidance); `style_image=PATH` is turned into `style` here; `paint` (a list of
        paint.Region) with `paint_weight` (w′, default 0.3) paints phrases onto regions;
        `paint_record` is paint.Painter's `record`."""
        check_words = getattr(self.encoders, "check_words", None)
        if check_words is not None:  # every prompt, before any image is made
            check_words(list(prompts))
        if kw.get("style_image"):
            kw["style"] = style_embedding(self.encoders, kw.pop("style_image"))
        kw.pop("style_image", None)
        regions, w_prime = kw.pop("paint", None), float(kw.pop("paint_weight", 0.3))
        record = kw.pop("paint_record", None)
        if batch_size < 1:
            raise EdiffError(f"batch_size must be ≥ 1, got {batch_size}")
        if not prompts:
            raise EdiffError("no prompts to sample")
        side = self.image_size // self.codec.downsample
        shape = (self.codec.channels, side, side)
        starts = range(0, len(prompts), batch_size)
        if progress:
            starts = tqdm(starts, desc="sampling", unit="batch")
        out = []
        for i in starts:
            chunk = list(prompts[i : i + batch_size])
            cond = embed_prompts(self.encoders, chunk).to(self.device)
            noise = torch.stack(
                [image_noise(seed, first_index + i + k, shape) for k in range(len(chunk))]
            )
            painter = Painter(self.encoders, chunk, regions, w_prime, record) if regions else None
            out.append(
                generate(
                    self.ensemble,
                    cond,
                    side,
                    steps=steps,
                    guidance=guidance,
                    seed=seed,
                    channels=self.codec.channels,
                    noise=noise,
                    solver=solver,
                    paint=painter,
                    decode=None if self.codec.is_identity else self.codec.decode,
                    **kw,
                ).cpu()
            )
        return torch.cat(out)
