"""The three embeddings eDiff-I conditions on: T5 token states, CLIP text (tokens + pooled), CLIP
image. Pretrained encoders load from local paths only (no hub lookups); tiny random ones are built
from a seed so the digits data and the tests need no files. Tiny encoders are saved next to their
shards and reloaded through the same local-path code as T5-XXL / CLIP-L, so sampling embeds
prompts with exactly the weights that embedded the training captions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ediff_train.errors import EdiffError
from ediff_train.io.files import save_safetensors
from ediff_train.io.remote import is_remote, local_copy
from ediff_train.nn.encoder_models import (
    RECIPE_VERSION,
    TINY_CLIP,
    TINY_NAMES,
    as_dtype,
    clip_pixels,
    load_clip,
    load_t5,
    quiet_transformers,
    text_norm,
    tiny_clip,
    tiny_t5,
    weights_fingerprint,
)

SAVED_JSON = "encoders.json"
CLIP_WEIGHTS = "clip.safetensors"
DEFAULT_T5_MAX_LENGTH = 113  # eDiff-I's T5 sequence length


# ---------------------------------------------------------------- building and loading the parts


# ------------------------------------------------------------------------------ the wrapper


class Encoders:
    """T5 + CLIP in eval mode under no_grad. Outputs are float32 on the CPU; shards and the
    sampler round them through float16 themselves."""

    def __init__(
        self,
        t5: torch.nn.Module,
        t5_tokenizer: Any,
        clip: torch.nn.Module,
        clip_tokenizer: Any,
        spec: dict[str, Any],
        t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device or "cpu")
        self.dtype = as_dtype(dtype)
        # T5 v1.1 activations overflow in fp16: fp16 applies to CLIP, T5 then runs in bf16.
        self.t5_dtype = torch.bfloat16 if self.dtype == torch.float16 else self.dtype
        self.t5 = t5.to(self.device, self.t5_dtype).eval().requires_grad_(False)
        self.clip = clip.to(self.device, self.dtype).eval().requires_grad_(False)
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.t5_max_length = int(t5_max_length)
        self.spec = spec
        self._ln_final = text_norm(self.clip)
        self._fingerprints: dict[str, str] = {}
        # tiny encoders trained on a closed caption set (the shapes) know only its words
        self.vocabulary: frozenset[str] | None = (
            frozenset(spec["vocabulary"]) if spec.get("vocabulary") else None
        )

    # -- construction
    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Encoders:
        """Deterministic random encoders: same seed, same weights, on any machine."""
        from open_clip.tokenizer import SimpleTokenizer

        t5, tok = tiny_t5(seed)
        spec = {
            "kind": "tiny",
            "seed": int(seed),
            "t5": {"name": TINY_NAMES["t5"]},
            "clip": {"name": TINY_NAMES["clip"], "config": TINY_CLIP},
        }
        return cls(
            t5,
            tok,
            tiny_clip(seed),
            SimpleTokenizer(context_length=77),
            spec,
            t5_max_length,
            device,
            dtype,
        )

    @classmethod
    def pretrained(
        cls,
        t5_path: str | os.PathLike,
        clip_model: str,
        clip_checkpoint: str | os.PathLike,
        t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
        clip_quick_gelu: bool = False,
        t5_name: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Encoders:
        """T5 from a local save_pretrained folder, CLIP from a local open_clip weights file."""
        dt = as_dtype(dtype)
        t5, tok = load_t5(t5_path, torch.bfloat16 if dt == torch.float16 else dt)
        clip, ctok = load_clip(clip_model, clip_checkpoint, clip_quick_gelu)
        spec = {
            "kind": "pretrained",
            "t5": {"name": t5_name or Path(t5_path).name, "path": str(Path(t5_path).resolve())},
            "clip": {
                "name": clip_model,
                "checkpoint": str(Path(clip_checkpoint).resolve()),
                "quick_gelu": bool(clip_quick_gelu),
            },
        }
        return cls(t5, tok, clip, ctok, spec, t5_max_length, device, dtype)

    def save(self, path: str | os.PathLike) -> Path:
        """Tiny encoders: weights (safetensors) + configs, reloadable offline by `load`.
        Pretrained encoders: only the local paths they were loaded from (no multi-GB copy)."""

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {
            "kind": self.spec["kind"],
            "t5_max_length": self.t5_max_length,
            "t5": dict(self.spec["t5"]),
            "clip": dict(self.spec["clip"]),
        }
        if self.spec["kind"] == "tiny":
            info["seed"] = self.spec["seed"]
            with quiet_transformers():
                self.t5.save_pretrained(str(path / "t5"))
            self.t5_tokenizer.save_pretrained(str(path / "t5"))
            weights = {k: v.detach().cpu().contiguous() for k, v in self.clip.state_dict().items()}
            save_safetensors(path / CLIP_WEIGHTS, weights)
            info["t5"]["path"] = "t5"
            info["clip"]["checkpoint"] = CLIP_WEIGHTS
        info["fingerprints"] = {"t5": self.fingerprint("t5"), "clip": self.fingerprint("clip")}
        if self.vocabulary:
            info["vocabulary"] = sorted(self.vocabulary)
        (path / SAVED_JSON).write_text(json.dumps(info, indent=1))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Encoders:
        """Encoders written by `save`; tiny ones load from their folder, never re-seeded. A URL
        (saved next to remote shards) is fetched once into the local cache first."""

        if is_remote(path):
            path = local_copy(os.fspath(path), SAVED_JSON)
        path = Path(path)
        if not (path / SAVED_JSON).is_file():
            raise EdiffError(
                f"no saved encoders at {path} ({SAVED_JSON} missing); build the data "
                "first, or train with encoders.path=<folder> (sample.py and "
                "evaluate.py read it from the node's config.yaml)"
            )
        info = json.loads((path / SAVED_JSON).read_text())
        t5i, clipi = info["t5"], info["clip"]
        if info["kind"] != "tiny":
            return cls.pretrained(
                t5i["path"],
                clipi["name"],
                clipi["checkpoint"],
                info["t5_max_length"],
                clipi.get("quick_gelu", False),
                t5i["name"],
                device,
                dtype,
            )
        t5, tok = load_t5(path / t5i["path"], quiet=True)
        clip, ctok = load_clip(clipi["name"], path / clipi["checkpoint"], config=clipi["config"])
        spec = {
            "kind": "tiny",
            "seed": info["seed"],
            "t5": {"name": t5i["name"]},
            "clip": {"name": clipi["name"], "config": clipi["config"]},
            "vocabulary": info.get("vocabulary"),
        }
        return cls(t5, tok, clip, ctok, spec, info["t5_max_length"], device, dtype)

    def restrict_to(self, words: Sequence[str]) -> None:
        """Record the closed vocabulary these encoders were trained on (saved with them)."""
        self.vocabulary = frozenset(words)
        self.spec["vocabulary"] = sorted(self.vocabulary)

    def check_words(self, captions: Sequence[str]) -> None:
        """One line naming the first caption with a word outside the vocabulary, if any: tiny
        encoders map an unseen word to noise, and the denoiser would follow noise."""
        if not self.vocabulary:
            return
        for c in captions:
            bad = [w for w in re.findall(r"[a-z0-9]+", c.lower()) if w not in self.vocabulary]
            if bad:
                raise EdiffError(
                    f"prompt {c!r} uses {', '.join(repr(w) for w in dict.fromkeys(bad))}: not a "
                    f"word these encoders were trained on; use only: "
                    f"{' '.join(sorted(self.vocabulary))}"
                )

    # -- description
    @property
    def dims(self) -> dict[str, int]:
        proj = getattr(self.clip, "text_projection", None)
        width = int(self._ln_final.normalized_shape[-1])
        if proj is None:
            pool = width
        elif isinstance(proj, torch.nn.Linear):
            pool = proj.out_features
        else:
            pool = int(proj.shape[-1])
        return {
            "t5": int(self.t5.config.d_model),
            "clip_txt": width,
            "clip_pool": int(pool),
            "clip_img": int(self.clip.visual.output_dim),
        }

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.clip.visual.image_size
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def fingerprint(self, which: str) -> str:
        """Weights fingerprint of "t5" or "clip", computed once (hashing T5-XXL takes a while)."""
        if which not in self._fingerprints:
            self._fingerprints[which] = weights_fingerprint(getattr(self, which))
        return self._fingerprints[which]

    def manifest_entry(self) -> dict[str, dict[str, Any]]:
        """The manifest's "encoders" section: what a shard set's embeddings were made with."""
        d = self.dims
        return {
            "t5": {
                "name": self.spec["t5"]["name"],
                "version": RECIPE_VERSION,
                "dim": d["t5"],
                "max_length": self.t5_max_length,
                "dtype": "float16",
                "fingerprint": self.fingerprint("t5"),
            },
            "clip": {
                "name": self.spec["clip"]["name"],
                "version": RECIPE_VERSION,
                "text_dim": d["clip_txt"],
                "pool_dim": d["clip_pool"],
                "image_dim": d["clip_img"],
                "context_length": self.context_length,
                "quick_gelu": bool(self.spec["clip"].get("quick_gelu", False)),
                "dtype": "float16",
                "fingerprint": self.fingerprint("clip"),
            },
        }

    # -- encoding
    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], batch_size: int = 64) -> dict[str, Any]:
        """t5: list of [L_i, Dt5] (real tokens incl. EOS, no padding); clip_txt [B, 77, Dc]
        (token states after ln_final, before pooling); clip_pool [B, Dp] (projected, unnormed)."""
        if isinstance(captions, str):
            raise EdiffError("encode_text takes a list of captions, not one string")
        captions = [str(c) for c in captions]
        self.check_words(captions)
        t5: list[Tensor] = []
        txt = [torch.zeros(0, self.context_length, self.dims["clip_txt"])]
        pool = [torch.zeros(0, self.dims["clip_pool"])]
        for i in range(0, len(captions), batch_size):
            chunk = captions[i : i + batch_size]
            t5 += self._t5_tokens(chunk)
            tokens, pooled = self._clip_text(chunk)
            txt.append(tokens)
            pool.append(pooled)
        return {"t5": t5, "clip_txt": torch.cat(txt), "clip_pool": torch.cat(pool)}

    def _t5_tokens(self, chunk: list[str]) -> list[Tensor]:
        batch = self.t5_tokenizer(
            chunk,
            max_length=self.t5_max_length,
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        mask = batch["attention_mask"].to(self.device)
        hidden = self.t5(
            input_ids=batch["input_ids"].to(self.device), attention_mask=mask
        ).last_hidden_state
        hidden, mask = hidden.float().cpu(), mask.bool().cpu()
        return [h[m].clone() for h, m in zip(hidden, mask)]

    def _clip_text(self, chunk: list[str]) -> tuple[Tensor, Tensor]:
        # open_clip's encode_text returns only the pooled projection; a hook on ln_final reads
        # the token states of the same pass instead of re-implementing the text tower.
        ids = self.clip_tokenizer(chunk).to(self.device)
        seen: dict[str, Tensor] = {}
        handle = self._ln_final.register_forward_hook(lambda _m, _i, out: seen.update(t=out))
        try:
            pooled = self.clip.encode_text(ids)
        finally:
            handle.remove()
        tokens = seen["t"]
        if tokens.ndim != 3:
            raise EdiffError("this CLIP model pools before its final norm; no token states")
        return tokens.float().cpu(), pooled.float().cpu()

    @torch.no_grad()
    def encode_image(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """images [B,3,H,W] in [0,1] → projected CLIP image embeddings [B, Di] (unnormed).
        Resized (shorter side, bicubic) and centre-cropped to CLIP's size, then normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise EdiffError(f"encode_image wants [B,3,H,W] images, got {tuple(images.shape)}")
        out = [torch.zeros(0, self.dims["clip_img"])]
        for i in range(0, images.shape[0], batch_size):
            x = clip_pixels(self.clip, images[i : i + batch_size].to(self.device, torch.float32))
            out.append(self.clip.encode_image(x.to(self.dtype)).float().cpu())
        return torch.cat(out)


def build_encoders(
    kind: str = "tiny",
    *,
    path: str | os.PathLike | None = None,
    t5_path: str | os.PathLike | None = None,
    clip_model: str | None = None,
    clip_checkpoint: str | os.PathLike | None = None,
    t5_max_length: int | None = None,
    clip_quick_gelu: bool = False,
    t5_name: str | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    dims: dict[str, int] | None = None,
) -> Encoders:
    """Factory for configs (conf/encoders/*.yaml, Hydra `_target_`-compatible).

    kind="tiny": saved encoders from `path`, or fresh seeded ones when path is null.
    kind="pretrained": T5 from `t5_path` and CLIP `clip_model` from `clip_checkpoint`, both local.
    `dims`, when given, must match the built encoders (the network was sized for them)."""
    if kind == "tiny":
        if path is not None:
            enc = Encoders.load(path, device, dtype)
            if t5_max_length is not None and int(t5_max_length) != enc.t5_max_length:
                raise EdiffError(
                    f"encoders at {path} use t5_max_length {enc.t5_max_length}, not {t5_max_length}"
                )
        else:
            enc = Encoders.tiny(seed, t5_max_length or DEFAULT_T5_MAX_LENGTH, device, dtype)
    elif kind == "pretrained":
        missing = [
            k
            for k, v in (
                ("t5_path", t5_path),
                ("clip_model", clip_model),
                ("clip_checkpoint", clip_checkpoint),
            )
            if not v
        ]
        if missing:
            raise EdiffError(f"pretrained encoders need local paths: set encoders.{missing[0]}")
        enc = Encoders.pretrained(
            t5_path,
            clip_model,
            clip_checkpoint,
            t5_max_length or DEFAULT_T5_MAX_LENGTH,
            clip_quick_gelu,
            t5_name,
            device,
            dtype,
        )
    else:
        raise EdiffError(f"encoders.kind must be 'tiny' or 'pretrained', got {kind!r}")
    if dims is not None:
        want = {k: int(v) for k, v in dict(dims).items()}
        have = {k: enc.dims[k] for k in want}
        if have != want:
            raise EdiffError(f"encoders have dims {enc.dims} but the config says {want}")
    return enc
