"""Paint-with-words through the network's own cross-attention: the explicit attention path, the
phrase → token mapping, painted mass moving into the mask, w′ = 0 bit-identical, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.edm import EDMPrecond
from ediff_train.errors import EdiffError
from ediff_train.nn.attention import AttentionHook, CrossAttention
from ediff_train.nn.encoders import Encoders
from ediff_train.nn.paint import Painter, Region, regions_from_colour_map, token_positions
from ediff_train.nn.unet import TextUNet
from ediff_train.sampling.generation import embed_prompts, generate


@pytest.fixture(scope="module")
def enc() -> Encoders:
    return Encoders.tiny(0)


def _net(enc: Encoders) -> EDMPrecond:
    torch.manual_seed(0)
    d = enc.dims
    net = TextUNet(
        16,
        16,
        [1, 2],
        1,
        [8],
        d["t5"],
        d["clip_txt"],
        d["clip_pool"],
        d["clip_img"],
        32,
        head_channels=8,
    )
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # wake the zero-initialised output layers
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.abs().sum():
            m.weight.data = torch.randn(m.weight.shape, generator=g) * 0.05
    return EDMPrecond(net).eval()


def test_explicit_attention_path_equals_the_fused_one() -> None:
    torch.manual_seed(0)
    layer = CrossAttention(16, 8, head_channels=8)
    torch.nn.init.normal_(layer.proj.weight, std=0.1)
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, True, True]])
    seen: list[torch.Tensor] = []
    fused = layer(x, ctx, mask)
    # a zero paint matrix forces the explicit softmax path: the same output up to rounding
    zero = AttentionHook(torch.zeros(2, 16, 5), torch.zeros(2), seen.append)
    explicit = layer(x, ctx, mask, zero)
    assert not torch.equal(explicit, fused)  # it really is another computation
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    assert seen[0].shape == (2, 2, 16, 5) and float(seen[0][1, :, :, 2].abs().max()) == 0.0
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(2, 2, 16))
    # a hook that only records keeps the fused output bit for bit and sees the same weights
    recorded = layer(x, ctx, mask, AttentionHook(record=seen.append))
    assert torch.equal(recorded, fused) and torch.equal(seen[1], seen[0])


def test_phrase_tokens_are_found_in_both_encoders(enc: Encoders) -> None:
    t5, clip = token_positions(enc, "a handwritten seven", "seven")
    ids = enc.t5_tokenizer(["a handwritten seven"]).input_ids[0]
    assert bytes(ids[p] - 3 for p in t5) == b"seven"  # ByT5: byte + 3
    assert clip == [3]  # <sot> a handwritten seven <eot>
    with pytest.raises(EdiffError, match="not in the prompt"):
        token_positions(enc, "the number 3", "seven")


def test_painting_moves_the_phrase_attention_into_its_mask(enc: Encoders) -> None:
    prompt = "a handwritten seven"
    cond = embed_prompts(enc, [prompt])
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0
    painter = Painter(enc, [prompt], [Region("seven", left)], w_prime=2.0)
    den = _net(enc)
    x = torch.randn(1, 3, 16, 16)
    t5_pos, clip_pos = token_positions(enc, prompt, "seven")
    cols = t5_pos + [cond.t5.shape[1] + p for p in clip_pos]

    def mass(paint: bool) -> tuple[float, float]:
        probs: list[torch.Tensor] = []
        hook = painter.bias_fn(1.0, cond)

        def fn(h: int, w: int) -> AttentionHook:
            base = hook(h, w)
            return AttentionHook(base.paint if paint else None, base.weight, probs.append)

        with torch.no_grad():
            den(x, torch.tensor(1.0), cond, cross_attn_bias=fn)
        inside = outside = 0.0
        for p in probs:  # [1, heads, HW, N] per cross-attention layer
            hw = p.shape[2]
            side = int(hw**0.5)
            m = torch.zeros(side, side)
            m[:, : side // 2] = 1
            on = p[0][:, :, cols].sum(-1).mean(0)  # mass on the phrase, per image token
            inside += float(on[m.reshape(-1) > 0].mean())
            outside += float(on[m.reshape(-1) == 0].mean())
        return inside / len(probs), outside / len(probs)

    (in0, out0), (in1, out1) = mass(False), mass(True)
    # moved inside; outside only what later layers inherit through convolutions
    assert in1 > in0 + 0.1 and abs(out1 - out0) < 0.01


def test_zero_weight_is_bit_identical_and_bad_input_is_refused(
    enc: Encoders, tmp_path: Path
) -> None:
    prompt = "the number 3"
    cond = embed_prompts(enc, [prompt, prompt])
    den = _net(enc)
    plain = generate(den, cond, 16, steps=3, guidance=3.0)
    off = Painter(enc, [prompt] * 2, [Region("3", torch.ones(5, 7))], w_prime=0.0)
    assert torch.equal(generate(den, cond, 16, steps=3, guidance=3.0, paint=off), plain)
    # w′ = 0 through the hooks (what metric=paint's unpainted run does): a recorder installs an
    # AttentionHook with a structured paint matrix in every cross-attention of every solver call,
    # and the images are still the plain sampler's, bit for bit
    mask = torch.zeros(5, 7)
    mask[1:3, 2:5] = 1.0
    calls: list[float] = []
    hooked = Painter(
        enc,
        [prompt] * 2,
        [Region("3", mask)],
        w_prime=0.0,
        record=lambda sigma, probs, a: calls.append(float(a.sum())),
    )
    assert torch.equal(generate(den, cond, 16, steps=3, guidance=3.0, paint=hooked), plain)
    layers = sum(isinstance(m, CrossAttention) for m in den.modules())
    assert len(calls) == 5 * layers and min(calls) > 0  # Heun, 3 steps: 5 network calls
    # w′ = 0 forced through the explicit path: every cross-attention adds w·A with the same
    # structured A and w = 0·log(1+σ)·max(QKᵀ), in its own float32 softmax. Another computation
    # (so not bit-equal), the same images up to rounding: the bias term really vanishes at w′ = 0
    explicit: list[tuple[int, float]] = []

    class Forced(Painter):
        def bias_fn(self, sigma: float, cond: Conditioning) -> Callable[[int, int], AttentionHook]:
            inner = super().bias_fn(sigma, cond)

            def hook(h: int, w: int) -> AttentionHook:
                made = inner(h, w)
                a = self.matrix(h, w, cond.t5.shape[1], cond.batch_size)
                seen = lambda probs, a=a: explicit.append((probs.ndim, float(a.sum())))  # noqa: E731
                return AttentionHook(paint=a, weight=made.weight, record=seen)

            return hook

    forced = Forced(enc, [prompt] * 2, [Region("3", mask)], w_prime=0.0, record=lambda *a: None)
    through = generate(den, cond, 16, steps=3, guidance=3.0, paint=forced)
    assert len(explicit) == 5 * layers and min(a for _, a in explicit) > 0  # _explicit ran
    assert not torch.equal(through, plain)
    torch.testing.assert_close(through, plain, rtol=0, atol=1e-4)
    on = Painter(enc, [prompt] * 2, [Region("3", torch.ones(5, 7))], w_prime=1.0)
    assert not torch.equal(generate(den, cond, 16, steps=3, guidance=3.0, paint=on), plain)
    with pytest.raises(EdiffError, match="not in the prompt"):
        Painter(enc, [prompt], [Region("seven", torch.ones(4, 4))], 0.3)

    canvas = np.zeros((8, 8, 3), np.uint8)
    canvas[:, :4] = (255, 0, 0)
    canvas[:, 4:] = (0, 0, 255)
    Image.fromarray(canvas).save(tmp_path / "map.png")
    regions = regions_from_colour_map(
        tmp_path / "map.png", {"#ff0000": "the number,0.5", "#0000ff": "3"}
    )
    assert [(r.phrase, r.strength) for r in regions] == [("the number", 0.5), ("3", 1.0)]
    assert regions[0].mask[:, :4].min() == 1 and regions[0].mask[:, 4:].max() == 0
    with pytest.raises(EdiffError, match="does not occur"):
        regions_from_colour_map(tmp_path / "map.png", {"#00ff00": "3"})


def test_conditional_rows_only(enc: Encoders) -> None:
    prompt = "the number 3"
    cond = embed_prompts(enc, [prompt])
    both = cond.cat(cond.null())
    painter = Painter(enc, [prompt], [Region("3", torch.ones(4, 4))], 0.5)
    hook = painter.bias_fn(2.0, both)(4, 4)
    assert hook.paint[0].sum() > 0 and hook.paint[1].sum() == 0


def test_attention_recorder_shares_per_call(enc: Encoders) -> None:
    from ediff_train.core.experts import parse_node
    from ediff_train.evaluation.attention import AttentionRecorder
    from ediff_train.sampling.ensemble import Ensemble

    ens = Ensemble([parse_node("E1_0"), parse_node("E1_1")], [_net(enc), _net(enc)])
    cond = embed_prompts(enc, ["the number 3", "seven"])
    rec = AttentionRecorder(ens, rows=2)
    generate(rec, cond, 16, steps=4, guidance=3.0)
    assert len(rec.records) == 7  # Heun: 2 calls per step but the last
    for r in rec.records:
        total = r["t5"] + r["clip_txt"] + r["clip_img"] + r["null"]
        assert abs(total - 1) < 1e-5 and min(r["t5"], r["null"]) > 0
        assert r["expert"] == ("E1_1" if r["sigma"] > 0.3012 else "E1_0")
    assert [r["sigma"] for r in rec.records] == sorted(
        (r["sigma"] for r in rec.records), reverse=True
    )
