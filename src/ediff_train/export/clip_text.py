"""open_clip's CLIP text tower and BPE tokenizer, standalone, for an exported folder.

`ediff-export` copies this file as `ediff_clip.py` into `text_encoder_2/` and `tokenizer_2/`
(diffusers' custom-component mechanism: model_index.json names the module and class, and
`from_pretrained(folder, trust_remote_code=True)` imports it from the folder). Why not open_clip
itself: the folder's user has torch, diffusers and transformers, not necessarily open_clip, and
not ediff_train; why not transformers' CLIPTextModel: open_clip pads with token 0 and cleans
text its own way, and every one of the 77 token states is an input of the experts, so the
tokens must be open_clip's exactly. Both classes repeat open_clip's code (the tokenizer is
OpenAI's CLIP tokenizer, MIT licence, as open_clip ships it) for the standard text tower:
causal pre-norm blocks with torch's MultiheadAttention, GELU or QuickGELU, optional layer
scale, final LayerNorm, pooled at the end-of-text token, projected. export/text.py refuses other
towers in one line, and checks this one against open_clip's on a caption before writing.

Text cleaning uses ftfy when it is installed (open_clip always does); without it, html
unescaping and whitespace folding only, which is the same for plain text.
"""

from __future__ import annotations

import gzip
import html
import importlib
import json
import os
import shutil
from collections.abc import Sequence
from functools import lru_cache

import regex
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

VOCAB = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_CONFIG = "tokenizer_config.json"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clean(text: str) -> str:
    """open_clip's `lower` cleaning: ftfy, html unescaped twice, whitespace folded, lower."""
    try:
        text = importlib.import_module("ftfy").fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class OpenCLIPTokenizer:
    """OpenAI CLIP's byte-level BPE as open_clip's SimpleTokenizer runs it: [SOT] tokens [EOT],
    zero-padded to the context, cut to it with EOT last."""

    def __init__(self, vocab_file: str, context_length: int = 77) -> None:
        self.vocab_file, self.context_length = vocab_file, int(context_length)
        with gzip.open(vocab_file) as f:
            merges = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        self.encoder = {v: i for i, v in enumerate(vocab + special)}
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {t: t for t in special}
        self.pat = regex.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot, self.eot = self.encoder[special[0]], self.encoder[special[1]]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **_: object) -> OpenCLIPTokenizer:
        with open(os.path.join(path, TOKENIZER_CONFIG)) as f:
            cfg = json.load(f)
        return cls(os.path.join(path, VOCAB), cfg["context_length"])

    def save_pretrained(self, path: str | os.PathLike, **_: object) -> None:
        os.makedirs(path, exist_ok=True)
        if os.path.abspath(self.vocab_file) != os.path.abspath(os.path.join(path, VOCAB)):
            shutil.copyfile(self.vocab_file, os.path.join(path, VOCAB))
        with open(os.path.join(path, TOKENIZER_CONFIG), "w") as f:
            json.dump({"context_length": self.context_length}, f)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """The BPE ids of one text, without SOT/EOT or truncation."""
        ids: list[int] = []
        enc = bytes_to_unicode()
        for token in regex.findall(self.pat, clean(text)):
            token = "".join(enc[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        """[B, context_length] ids (LongTensor)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: computed in the input's dtype, cast back."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, act: str, scale: bool, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = LayerScale(width) if scale else nn.Identity()
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp))
        self.mlp.add_module("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp, width))
        self.ls_2 = LayerScale(width) if scale else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.ln_1(x)
        mask = mask.to(h.dtype) if mask is not None else None
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, layers: int, **kw: object) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(Block(**kw) for _ in range(layers))  # type: ignore[arg-type]


class OpenCLIPTextModel(ModelMixin, ConfigMixin):
    """The text half of an open_clip CLIP: ids → (token states after ln_final [B, 77, width],
    pooled projection [B, output_dim]), what ediff-train's encoders read from open_clip."""

    @register_to_config
    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_width: int,
        vocab_size: int = 49408,
        context_length: int = 77,
        output_dim: int | None = None,
        projection: str = "matrix",
        projection_bias: bool = False,
        act: str = "gelu",
        layer_scale: bool = False,
        causal: bool = True,
        pool_type: str = "argmax",
        eos_id: int | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(
            layers, width=width, heads=heads, mlp=mlp_width, act=act, scale=layer_scale, eps=eps
        )
        self.ln_final = LayerNorm(width, eps=eps)
        out = output_dim or width
        if projection == "matrix":
            self.text_projection = nn.Parameter(torch.zeros(width, out))
        elif projection == "linear":
            self.text_projection = nn.Linear(width, out, bias=projection_bias)
        else:
            self.text_projection = None
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask if causal else None, persistent=False)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        dtype = self.transformer.resblocks[0].mlp.c_fc.weight.dtype
        x = self.token_embedding(ids).to(dtype) + self.positional_embedding.to(dtype)
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
        tokens = self.ln_final(x)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        kind = self.config.pool_type
        if kind == "argmax":
            pooled = tokens[rows, ids.argmax(dim=-1)]
        elif kind == "eos":
            pooled = tokens[rows, (ids == self.config.eos_id).int().argmax(dim=-1)]
        elif kind == "first":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, -1]
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return tokens, pooled
