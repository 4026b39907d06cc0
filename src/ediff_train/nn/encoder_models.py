"""The text and image encoder networks: T5 and CLIP from local files, or tiny random ones
built from configs (offline tests and the digits toy), and their fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ediff_train.errors import EdiffError

RECIPE_VERSION = "1"  # bump when the way embeddings are extracted changes


TINY_NAMES = {"t5": "tiny-t5", "clip": "tiny-clip"}  # the names their manifests carry


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


TINY_T5 = dict(
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    use_cache=False,
)


TINY_CLIP = dict(
    embed_dim=24,
    vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=4, image_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
)


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in _DTYPES:
        raise EdiffError(f"unknown encoder dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide per-file progress bars when loading the tiny saved encoders (pure noise there)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over names, shapes and values. Floats are hashed as bfloat16 so one checkpoint run
    in fp32 on CPU or bf16 on GPU gives the same fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.bfloat16).contiguous().view(torch.int16)
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def tiny_t5(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A random 2-layer T5 encoder with ByT5's byte tokenizer (which needs no vocabulary file)."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tok = ByT5Tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(vocab_size=len(tok), **TINY_T5))
    return model.eval(), tok


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    """A random open_clip CLIP (16x16 images, real 49,408-token BPE vocabulary)."""
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = CLIP(**TINY_CLIP)
    return model.eval()


def load_t5(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, quiet: bool = False
) -> tuple[torch.nn.Module, Any]:
    """T5 encoder + tokenizer from a local folder (save_pretrained layout); never downloads."""
    import transformers
    from transformers import AutoTokenizer, T5EncoderModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise EdiffError(
            f"no T5 model at {path}: expected a local folder with config.json, "
            "weights and tokenizer files (download them beforehand)"
        )
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with quiet_transformers() if quiet else contextlib.nullcontext():
        try:
            model = T5EncoderModel.from_pretrained(str(path), local_files_only=True, **{key: dtype})
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except OSError as e:
            raise EdiffError(f"cannot load T5 from {path}: {str(e).splitlines()[0]}") from None
    return model.eval(), tok


def load_clip(
    name: str, checkpoint: str | os.PathLike, quick_gelu: bool = False, config: dict | None = None
) -> tuple[torch.nn.Module, Any]:
    """open_clip model + its shipped BPE tokenizer from a local weights file (weights only).

    `name` is an open_clip model name (e.g. ViT-L-14); `config`, when given, builds the model
    from that config instead (the tiny encoders, whose config open_clip does not know)."""
    import open_clip
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise EdiffError(f"CLIP checkpoint {checkpoint} does not exist (a local file is required)")
    if config is not None:
        model = CLIP(**config, quick_gelu=quick_gelu)
        open_clip.load_checkpoint(model, str(checkpoint), weights_only=True)
        tok = SimpleTokenizer(context_length=model.context_length)
        return model.eval(), tok
    if name not in open_clip.list_models():
        raise EdiffError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
    try:
        model = open_clip.create_model(
            name, pretrained=str(checkpoint), force_quick_gelu=quick_gelu, weights_only=True
        )
    except (RuntimeError, KeyError, ValueError) as e:
        raise EdiffError(
            f"cannot load {checkpoint} into open_clip {name}: {str(e).splitlines()[0]}"
        ) from None
    return model.eval(), open_clip.get_tokenizer(name)


def text_norm(clip: torch.nn.Module) -> torch.nn.Module:
    """The final LayerNorm of the text tower, whose output is the 77 pre-pooled token states."""
    norm = getattr(clip, "ln_final", None) or getattr(getattr(clip, "text", None), "ln_final", None)
    if norm is None:
        raise EdiffError(f"{type(clip).__name__} has no text ln_final; its tokens are unavailable")
    return norm


def clip_pixels(clip: torch.nn.Module, x: Tensor) -> Tensor:
    """[B,3,H,W] in [0,1] → CLIP input (shorter side bicubic, centre crop, the cfg's mean/std)."""
    from open_clip.model import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(clip)
    th, tw = map(int, (s, s) if isinstance(s := clip.visual.image_size, int) else s[:2])
    h, w = x.shape[-2:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, (nh, nw), mode="bicubic", antialias=True).clamp(0, 1)
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[..., top : top + th, left : left + tw]
    mean = torch.tensor(cfg.get("mean", OPENAI_MEAN), device=x.device).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(cfg.get("std", OPENAI_STD), device=x.device).view(1, 3, 1, 1)
