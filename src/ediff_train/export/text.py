"""The text encoders and tokenizers that made a run's shards, as components of the folder.

Why copies and not paths: the folder is for someone without ediff_train, the run or its data,
so it must hold everything that turns a prompt into the experts' inputs. T5 is a transformers
model: its encoder and tokenizer are written with `save_pretrained` (tiny or pretrained alike;
only the encoder half, in the dtype it was loaded in). CLIP is an open_clip model, which
diffusers cannot load: its text tower (the image tower is not needed) goes in as
export/clip_text.py's OpenCLIPTextModel and the BPE vocabulary as OpenCLIPTokenizer, checked
against open_clip on a caption before writing.

The encoders must be the ones that embedded the shards: their weights' fingerprints are
compared with the shard set's manifest, and a mismatch is one line, nothing written.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ediff_train.data.manifest import read_manifest
from ediff_train.errors import EdiffError
from ediff_train.run.weights import load_encoders

SKIP = "or export without text encoders: text=false"


def text_components(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """({text_encoder, tokenizer, text_encoder_2, tokenizer_2}, the pipeline's `text` config)
    of a node's encoders, after checking them against its shards' manifest."""
    try:
        enc = load_encoders(cfg)
    except EdiffError as e:
        raise EdiffError(f"cannot load the encoders that made the shards: {e} ({SKIP})") from None
    check_fingerprints(cfg, enc)
    clip, tokenizer = clip_text(enc)
    check_clip(enc, clip, tokenizer)
    parts = {
        "text_encoder": enc.t5,
        "tokenizer": enc.t5_tokenizer,
        "text_encoder_2": clip,
        "tokenizer_2": tokenizer,
    }
    text = {
        "t5_max_length": int(enc.t5_max_length),
        "vocabulary": sorted(enc.vocabulary) if enc.vocabulary else None,
        "clip_img_dim": int(enc.dims["clip_img"]),
        "encoders": {w: enc.spec[w].get("name") for w in ("t5", "clip")},
    }
    return parts, text


def check_fingerprints(cfg: Any, enc: Any) -> None:
    """The encoders' weights are those the shards' manifest names (the experts learnt those
    embeddings); one line naming the encoder that differs."""
    root = str(cfg.data.root)
    try:
        manifest = read_manifest(root)
    except EdiffError as e:
        raise EdiffError(f"cannot check the encoders against their shards: {e} ({SKIP})") from None
    bad = []
    for which in ("t5", "clip"):
        want = (manifest.get("encoders") or {}).get(which, {}).get("fingerprint")
        have = enc.fingerprint(which)
        if want != have:
            bad.append(f"{which} {have[:12]} ≠ {str(want)[:12]}")
    if bad:
        raise EdiffError(
            f"the encoders no longer match the shards at {root} (fingerprints: "
            f"{'; '.join(bad)} in the manifest): the experts learnt the manifest's embeddings, "
            f"export with the encoders that made them ({SKIP})"
        )


def clip_text(enc: Any) -> tuple[nn.Module, Any]:
    """The open_clip model's text tower and tokenizer as export/clip_text.py's classes; one
    line for a tower or tokenizer that file does not repeat."""
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock

    from ediff_train.export.clip_text import OpenCLIPTextModel, OpenCLIPTokenizer

    m, tok = enc.clip, enc.clip_tokenizer
    name = enc.spec["clip"].get("name")
    blocks = getattr(getattr(m, "transformer", None), "resblocks", [])
    first = blocks[0] if len(blocks) else None
    act = getattr(getattr(first, "mlp", None), "gelu", None)
    acts = {QuickGELU: "quick_gelu", nn.GELU: "gelu"}
    norms = [b.ln_1 for b in blocks] + [b.ln_2 for b in blocks] + [getattr(m, "ln_final", None)]
    problem = (
        "not an open_clip CLIP with its own text transformer"
        if not isinstance(m, CLIP) or not all(type(b) is ResidualAttentionBlock for b in blocks)
        else "a text tower that is not batch-first"
        if not m.transformer.batch_first or not blocks
        else f"activation {type(act).__name__}"
        if type(act) not in acts or getattr(act, "approximate", "none") != "none"
        else f"text pooling {m.text_pool_type!r}"
        if m.text_pool_type not in ("argmax", "eos", "first", "last")
        else "layer norms other than open_clip's LayerNorm"
        if any(type(n) is not LayerNorm for n in norms)
        else None
    )
    if problem is None and not (
        type(tok) is SimpleTokenizer and tok.reduction_fn is None and tok.vocab_size == 49408
    ):
        problem = f"tokenizer {type(tok).__name__} (only open_clip's CLIP BPE exports)"
    if problem:
        raise EdiffError(f"CLIP {name!r} does not export: {problem} ({SKIP})")
    proj = m.text_projection
    kind = "none" if proj is None else "linear" if isinstance(proj, nn.Linear) else "matrix"
    width = int(m.ln_final.normalized_shape[0])
    out = None if proj is None else int(proj.out_features if kind == "linear" else proj.shape[1])
    model = OpenCLIPTextModel(
        width=width,
        layers=len(blocks),
        heads=int(first.attn.num_heads),
        mlp_width=int(first.mlp.c_fc.out_features),
        vocab_size=int(m.token_embedding.num_embeddings),
        context_length=int(m.context_length),
        output_dim=out,
        projection=kind,
        projection_bias=kind == "linear" and proj.bias is not None,
        act=acts[type(act)],
        layer_scale=not isinstance(first.ls_1, nn.Identity),
        causal=m.attn_mask is not None,
        pool_type=str(m.text_pool_type),
        eos_id=getattr(m, "text_eos_id", None),
        eps=float(m.ln_final.eps),
    )
    keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_")
    state = {k: v for k, v in m.state_dict().items() if k.startswith(keep)}
    model.load_state_dict(state)
    dtype = m.token_embedding.weight.dtype
    model = model.to(dtype) if dtype != torch.float32 else model
    return model.eval(), OpenCLIPTokenizer(default_bpe(), tok.context_length)


def check_clip(enc: Any, model: nn.Module, tokenizer: Any) -> None:
    """The exported tower and tokenizer give open_clip's token states and pooled vector on a
    caption (from the encoders' vocabulary when they have one)."""
    words = sorted(enc.vocabulary)[:6] if enc.vocabulary else ["the number 3,", "a", "photo!"]
    caption = " ".join(words)
    want = enc.encode_text([caption])
    ids = tokenizer([caption])
    if not torch.equal(ids, enc.clip_tokenizer([caption])):
        raise EdiffError(f"the exported CLIP tokenizer differs from open_clip's on {caption!r}")
    with torch.no_grad():
        tokens, pooled = model(ids.to(next(model.parameters()).device))
    for got, key in ((tokens, "clip_txt"), (pooled, "clip_pool")):
        diff = float((got.float().cpu() - want[key]).abs().max())
        if not diff <= 1e-5:
            raise EdiffError(
                f"the exported CLIP text tower differs from open_clip's by {diff:.3g} "
                f"({key}, caption {caption!r})"
            )
