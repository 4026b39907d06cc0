"""Prompts in plain text for the exported pipeline (export/pipeline.py's TextMixin).

Copied as `ediff_text.py` beside `pipeline.py` into every folder `ediff-export` writes; the
pipeline imports it relatively (`from .ediff_text import ...`), which diffusers' remote-code
loader resolves by copying this file from the folder too, so the name here and in the folder
is the same. Like the pipeline it needs torch and diffusers only.

The text path repeats ediff-train's (nn/encoders.py `Encoders.encode_text`, sampling/
generation.py `embed_prompts`, nn/diffusers_backbone.py's packing): the same tokenizers and
truncation, every embedding rounded through float16 as the shards store it, so a prompt reaches
the experts as it reaches them in ediff-sample.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.utils import logging
from torch import Tensor

logger = logging.get_logger("diffusers.ediff_export")  # one line on stderr, no traceback


STREAMS = ("t5", "t5_mask", "clip_txt", "clip_pool", "clip_img")


def null_streams(s: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every embedding dropped, the T5 mask kept: the unconditional input ediff-train trains."""
    return {k: v if k == "t5_mask" else torch.zeros_like(v) for k, v in s.items()}


def cat_streams(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Two batches of streams as one, T5 zero-padded (mask False) to the longer length."""
    n = max(a["t5"].shape[1], b["t5"].shape[1])

    def pad(s: dict[str, Tensor]) -> dict[str, Tensor]:
        extra = n - s["t5"].shape[1]
        t5 = torch.nn.functional.pad(s["t5"], (0, 0, 0, extra))
        mask = torch.nn.functional.pad(s["t5_mask"], (0, extra), value=False)
        return {**s, "t5": t5, "t5_mask": mask}

    a, b = pad(a), pad(b)
    return {k: torch.cat([a[k], b[k].to(a[k].device)]) for k in STREAMS}


def pack(s: dict[str, Tensor], packing: dict[str, Any]) -> tuple[Tensor, Tensor, Any]:
    """Streams → a diffusers backbone's (tokens [CLIP text, T5], key mask, pooled vector), as
    ediff-train's DiffusersBackbone packs them (zero-padded widths, `t5_tokens` fixed)."""
    mask = s["t5_mask"].to(torch.bool)
    t5 = s["t5"] * mask[..., None].to(s["t5"].dtype)
    n = packing.get("t5_tokens")
    if n is not None:
        t5, mask = t5[:, :n], mask[:, :n]
        if t5.shape[1] < n:
            t5 = torch.nn.functional.pad(t5, (0, 0, 0, n - t5.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, n - mask.shape[1]), value=False)
    txt = s["clip_txt"][:, : packing.get("clip_tokens")]
    width = int(packing["context_dim"])
    txt = torch.nn.functional.pad(txt, (0, width - txt.shape[-1]))
    t5 = torch.nn.functional.pad(t5, (0, width - t5.shape[-1]))
    real = torch.ones(txt.shape[:2], dtype=torch.bool, device=mask.device)
    pooled = None
    if packing.get("pooled_dim"):
        vec = torch.cat([s["clip_pool"], s["clip_img"]], dim=-1)
        pooled = torch.nn.functional.pad(vec, (0, int(packing["pooled_dim"]) - vec.shape[-1]))
    return torch.cat([txt, t5], dim=1), torch.cat([real, mask], dim=1), pooled


class TextMixin:
    """encode_prompt and its checks, for a pipeline with `text_encoder`/`tokenizer` (T5),
    `text_encoder_2`/`tokenizer_2` (CLIP) and `config.text` (t5_max_length, vocabulary,
    clip_img_dim)."""

    config: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    _execution_device: Any

    def check_words(self, prompts: list[str]) -> None:
        """One line naming the first prompt with a word outside the encoders' closed vocabulary
        (tiny encoders map an unseen word to noise, and the experts would follow noise)."""
        vocab = set((self.config.text or {}).get("vocabulary") or [])
        for p in prompts if vocab else []:
            bad = [w for w in re.findall(r"[a-z0-9]+", p.lower()) if w not in vocab]
            if bad:
                raise ValueError(
                    f"prompt {p!r} uses {', '.join(repr(w) for w in dict.fromkeys(bad))}: not a "
                    f"word these encoders were trained on; use only: {' '.join(sorted(vocab))}"
                )

    def warn_truncated(self, prompts: list[str]) -> None:
        """One warning line when prompts are longer than the encoders' contexts (T5's
        t5_max_length tokens, CLIP's 77): they are cut there, as ediff-train cuts them."""
        limit, ctx = int(self.config.text["t5_max_length"]), self.tokenizer_2.context_length
        long = []
        for p in prompts:
            n_t5 = len(self.tokenizer(p, truncation=False, verbose=False)["input_ids"])
            n_clip = len(self.tokenizer_2.encode(p)) + 2
            if n_t5 > limit or n_clip > ctx:
                long.append((p, n_t5, n_clip))
        if long:
            p, n_t5, n_clip = long[0]
            logger.warning(
                f"{len(long)} prompt(s) longer than the text encoders' context, truncated "
                f"(first: {p[:40]!r}{'…' if len(p) > 40 else ''}: {n_t5} T5 tokens of {limit}, "
                f"{n_clip} CLIP tokens of {ctx})"
            )

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str]) -> dict[str, Tensor]:
        """Prompts → the streams the shards store: t5 [B,L,D] zero-padded with t5_mask [B,L],
        clip_txt [B,77,D], clip_pool [B,D], clip_img [B,D] (zeros: no image prompt), each
        rounded through float16 as ediff-train's sampler rounds them."""
        prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise ValueError(
                "this folder has no text encoders (exported with text=false): pass "
                "prompt_embeds instead of a prompt"
            )
        self.check_words(prompts)
        self.warn_truncated(prompts)
        device = self._execution_device
        tok = self.tokenizer(
            prompts,
            max_length=int(self.config.text["t5_max_length"]),
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        mask = tok["attention_mask"].to(device)
        hidden = self.text_encoder(input_ids=tok["input_ids"].to(device), attention_mask=mask)
        hidden, mask = hidden.last_hidden_state.float().cpu(), mask.bool().cpu()
        t5 = torch.zeros(len(prompts), int(mask.sum(1).max()), hidden.shape[-1])
        t5_mask = torch.zeros(t5.shape[:2], dtype=torch.bool)
        for i, (h, m) in enumerate(zip(hidden, mask)):
            t5[i, : int(m.sum())] = h[m].half().float()
            t5_mask[i, : int(m.sum())] = True
        tokens, pooled = self.text_encoder_2(self.tokenizer_2(prompts).to(device))
        return {
            "t5": t5,
            "t5_mask": t5_mask,
            "clip_txt": tokens.float().cpu().half().float(),
            "clip_pool": pooled.float().cpu().half().float(),
            "clip_img": torch.zeros(len(prompts), int(self.config.text["clip_img_dim"])),
        }

    def negative_streams(self, negative: Any, streams: dict[str, Tensor]) -> dict[str, Tensor]:
        """The negative branch: an empty (or no) negative prompt is every embedding dropped
        (ediff-sample's unconditional input); a text one is encoded, row by row."""
        n = streams["t5"].shape[0]
        texts = [negative] * n if isinstance(negative, str) or negative is None else negative
        if len(texts) != n:
            raise ValueError(f"negative_prompt needs {n} entries, got {len(texts)}")
        null = null_streams(streams)
        rows = [i for i, t in enumerate(texts) if t]
        if not rows:
            return null
        enc = self.encode_prompt([texts[i] for i in rows])
        pad = cat_streams(null, enc)  # one T5 length for both
        out = {k: v[:n].clone() for k, v in pad.items()}
        for j, i in enumerate(rows):
            for k in STREAMS:
                out[k][i] = pad[k][n + j]
        return out
