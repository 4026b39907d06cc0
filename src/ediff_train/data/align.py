"""Give the tiny encoders meaning: contrastive training on the digits' image–caption pairs.

Pretrained T5/CLIP map "3" and "three" to nearby vectors; random tiny encoders do not (the
difference between "the number 3" and "the number 7" is one byte in a sea of shared tokens), so
a denoiser conditioned on them barely follows its prompt. Before the digits shards are embedded,
both text towers are trained to agree with the image tower, as CLIP itself is trained:

- CLIP: open_clip's symmetric InfoNCE loss between image and caption embeddings.
- T5: the same loss between a masked mean of its token states (through a linear head that is
  thrown away afterwards) and the CLIP image embeddings, so its token states carry the digit.

Batches are groups of ten pairs with ten different digits: with 150 distinct captions, a random
batch holds many same-digit pairs that InfoNCE would wrongly push apart (web-scale data, which
CLIP is built for, has almost no such duplicates). Everything is seeded, so a build is
reproducible; the figures it reports (zero-shot accuracy on held-out images) land in the
manifest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ediff_train.nn.encoder_models import clip_pixels
from ediff_train.nn.encoders import Encoders


def _info_nce(a: Tensor, b: Tensor, scale: Tensor, groups: int) -> Tensor:
    """Symmetric InfoNCE inside each group of rows ([G*K, D] embeddings, row i ↔ row i)."""
    a = F.normalize(a, dim=-1).view(groups, -1, a.shape[-1])
    b = F.normalize(b, dim=-1).view(groups, -1, b.shape[-1])
    logits = scale * a @ b.transpose(1, 2)  # [G, K, K]
    target = torch.arange(logits.shape[1]).expand(groups, -1)
    return 0.5 * (
        F.cross_entropy(logits.flatten(0, 1), target.flatten())
        + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target.flatten())
    )


def clip_text_short(clip: nn.Module, ids: Tensor) -> Tensor:
    """open_clip's `encode_text` on ids cut after their longest real token. The text tower is
    causal and pools at the end-of-text token, so the pooled output is the full-context one
    (tests check this) at a fraction of the cost of all 77 positions."""
    n = int((ids != 0).sum(1).max())
    x = clip.token_embedding(ids[:, :n]) + clip.positional_embedding[:n]
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0]), ids[:, :n].argmax(dim=-1)]
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class _T5Head(nn.Module):
    """Masked mean of T5 token states → CLIP's embedding width (training only)."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, out)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.proj((hidden * m).sum(1) / m.sum(1).clamp(min=1))


def align_encoders(
    enc: Encoders,
    images: Tensor,
    labels: Tensor,
    captions: Sequence[Sequence[str]],
    steps: int = 300,
    groups: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    holdout: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """Train `enc`'s CLIP and T5 in place on (image, caption-of-its-label) pairs.

    images [N,3,H,W] in [0,1]; labels [N] in 0..C-1; captions[c] are the wordings for class c.
    `holdout` (images, labels) measures zero-shot accuracy afterwards. Returns a report.
    The head's init and the dropout masks draw from torch's global generator: it is forked and
    seeded here, so a build does not depend on what the process ran before (under pytest, which
    tests a worker ran first) and leaves the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _align(enc, images, labels, captions, steps, groups, lr, seed, holdout)


def _align(
    enc: Encoders,
    images: Tensor,
    labels: Tensor,
    captions: Sequence[Sequence[str]],
    steps: int,
    groups: int,
    lr: float,
    seed: int,
    holdout: tuple[Tensor, Tensor] | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    classes = len(captions)
    flat = [c for cs in captions for c in cs]
    owner = torch.tensor([k for k, cs in enumerate(captions) for _ in cs])
    by_class = [torch.nonzero(labels == k).squeeze(1) for k in range(classes)]
    if any(len(ix) == 0 for ix in by_class):
        raise ValueError("every class needs at least one image")
    clip, t5 = enc.clip.float().train().requires_grad_(True), enc.t5.float().train()
    t5.requires_grad_(True)
    head = _T5Head(enc.dims["t5"], enc.dims["clip_img"])
    ids = enc.clip_tokenizer(flat)
    t5_batch = enc.t5_tokenizer(flat, padding="longest", return_tensors="pt")
    pixels = torch.cat(
        [clip_pixels(enc.clip, images[i : i + 256]) for i in range(0, len(images), 256)]
    )
    params = [*clip.parameters(), *t5.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:  # short warm-up, then cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        # G groups of one image per class, each with a random wording of its class
        pick = torch.stack(
            [ix[torch.randint(len(ix), (groups,), generator=gen)] for ix in by_class], 1
        ).flatten()
        cls = labels[pick]
        cap = torch.stack(
            [
                torch.nonzero(owner == int(c)).squeeze(1)[
                    torch.randint(int((owner == int(c)).sum()), (1,), generator=gen)
                ]
                for c in cls
            ]
        )
        cap = cap.squeeze(1)
        used, inverse = torch.unique(cap, return_inverse=True)
        img = clip.encode_image(pixels[pick])
        txt = clip_text_short(clip, ids[used])[inverse]
        hidden = t5(
            input_ids=t5_batch["input_ids"][used], attention_mask=t5_batch["attention_mask"][used]
        ).last_hidden_state
        t5e = head(hidden, t5_batch["attention_mask"][used])[inverse]
        scale = clip.logit_scale.exp().clamp(max=100)
        loss = _info_nce(img, txt, scale, groups) + _info_nce(img, t5e, scale, groups)
        _step(opt, loss, losses)
    report = _done(clip, t5, losses, start, steps=steps, groups=groups, lr=lr, seed=seed)
    if holdout is not None:
        report["zero_shot_accuracy"] = zero_shot_accuracy(enc, *holdout, captions)
    return report


def _step(opt: torch.optim.Optimizer, loss: Tensor, losses: list[float]) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))


def _done(
    clip: nn.Module, t5: nn.Module, losses: list[float], start: float, **settings: Any
) -> dict[str, Any]:
    """Both towers back to frozen eval mode; the report (the last 20 steps' mean loss)."""
    clip.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)
    return {
        **settings,
        "final_loss": round(sum(losses[-20:]) / max(len(losses[-20:]), 1), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }


@torch.no_grad()
def zero_shot_accuracy(
    enc: Encoders, images: Tensor, labels: Tensor, captions: Sequence[Sequence[str]]
) -> float:
    """CLIP's zero-shot test: each image is given the class whose mean caption embedding is
    closest (as CLIP's prompt ensembling does)."""
    pooled = enc.encode_text([c for cs in captions for c in cs])["clip_pool"]
    sizes = [len(cs) for cs in captions]
    means = torch.stack([F.normalize(p, dim=-1).mean(0) for p in pooled.split(sizes)])
    img = F.normalize(enc.encode_image(images), dim=-1)
    guess = (img @ F.normalize(means, dim=-1).T).argmax(1)
    return round(float((guess == labels).float().mean()), 4)


def _soft_nce(a: Tensor, b: Tensor, scale: Tensor, same: Tensor) -> Tensor:
    """Symmetric InfoNCE over all rows with every equal-caption pair a positive (`same` [B,B]
    bool): with compositional captions a batch holds repeats, which plain InfoNCE would push
    apart."""
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean()
    )


def align_pairs(
    enc: Encoders,
    images: Tensor,
    captions: Sequence[str],
    steps: int = 600,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    holdout: tuple[Tensor, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """`align_encoders` for captions that are not classes: each image with its own caption.

    images [N,3,H,W] in [0,1], captions[i] describes images[i]. Batches are random pairs;
    identical captions in a batch count as positives of each other. `holdout` (images,
    captions) measures caption retrieval afterwards: the share of held-out images whose own
    caption is the closest of a batch of 32. Seeded like `align_encoders`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _align_pairs(enc, images, list(captions), steps, batch, lr, seed, holdout)


def _align_pairs(
    enc: Encoders,
    images: Tensor,
    captions: list[str],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    holdout: tuple[Tensor, Sequence[str]] | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    clip, t5 = enc.clip.float().train().requires_grad_(True), enc.t5.float().train()
    t5.requires_grad_(True)
    head = _T5Head(enc.dims["t5"], enc.dims["clip_img"])
    params = [*clip.parameters(), *t5.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:  # short warm-up, then cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(len(captions), (batch,), generator=gen)
        caps = [captions[int(i)] for i in pick]
        same = torch.tensor([[a == b for b in caps] for a in caps])
        ids = enc.clip_tokenizer(caps)
        tok = enc.t5_tokenizer(caps, padding="longest", return_tensors="pt")
        img = clip.encode_image(clip_pixels(enc.clip, images[pick]))
        txt = clip_text_short(clip, ids)
        hidden = t5(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        t5e = head(hidden.last_hidden_state, tok["attention_mask"])
        scale = clip.logit_scale.exp().clamp(max=100)
        loss = _soft_nce(img, txt, scale, same) + _soft_nce(img, t5e, scale, same)
        _step(opt, loss, losses)
    report = _done(clip, t5, losses, start, steps=steps, batch=batch, lr=lr, seed=seed)
    if holdout is not None:
        report["caption_retrieval_of_32"] = retrieval_accuracy(enc, *holdout)
    return report


@torch.no_grad()
def retrieval_accuracy(enc: Encoders, images: Tensor, captions: Sequence[str]) -> float:
    """Share of images whose own caption's pooled CLIP text is the nearest among its batch of
    32 (ties with an identical caption count as right)."""
    right = total = 0
    for i in range(0, len(captions) - 31, 32):
        caps = list(captions[i : i + 32])
        txt = F.normalize(enc.encode_text(caps)["clip_pool"], dim=-1)
        img = F.normalize(enc.encode_image(images[i : i + 32]), dim=-1)
        guess = (img @ txt.T).argmax(1).tolist()
        right += sum(caps[g] == caps[k] for k, g in enumerate(guess))
        total += len(caps)
    return round(right / max(total, 1), 4)
