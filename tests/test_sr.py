"""Super-resolution pieces in isolation: the Efficient U-Net, noise-conditioning augmentation
(its law in training, that it reaches the network, its fixed level at sampling), and the
low-res input losing its influence as σ_aug grows."""

from __future__ import annotations

import math

import pytest
import torch

from ediff_train.core.conditioning import Conditioning, drop_embeddings
from ediff_train.core.edm import EDMPrecond
from ediff_train.core.experts import parse_node
from ediff_train.core.sr import NoiseAugment, SRConditioner, corrupt, sampling_condition
from ediff_train.errors import EdiffError
from ediff_train.nn.attention import CrossAttention, SelfAttention
from ediff_train.nn.blocks import ResBlock
from ediff_train.nn.efficient_unet import EfficientUNet
from ediff_train.sampling.generation import generate
from ediff_train.training.module import ExpertModule

D = 8  # embedding widths of the toy conditioning


def _net(self_attention: bool = True, size: int = 16) -> EfficientUNet:
    torch.manual_seed(0)
    return EfficientUNet(
        size,
        16,
        [1, 2, 2],
        [1, 2, 3],
        [size // 4],
        D,
        D,
        D,
        D,
        16,
        self_attention=self_attention,
        head_channels=8,
    )


def _cond(b: int, low: int = 8, sigma_aug: float | None = 0.1, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        t5=torch.randn(b, 3, D, generator=g),
        t5_mask=torch.ones(b, 3, dtype=torch.bool),
        clip_txt=torch.randn(b, 77, D, generator=g),
        clip_pool=torch.randn(b, D, generator=g),
        clip_img=torch.zeros(b, D),
        lowres=torch.rand(b, 3, low, low, generator=g) * 2 - 1,
        sigma_aug=None if sigma_aug is None else torch.full((b,), sigma_aug),
    )


def _make_live(net: EfficientUNet) -> EfficientUNet:
    """Zero-initialised output and residual convs make a new net ignore its inputs; give them
    weights so input influence can be measured."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.abs().sum():
            m.weight.data = torch.randn(m.weight.shape, generator=g) * 0.05
    return net


def test_efficient_unet_shapes_blocks_and_full_convolution() -> None:
    net = _net()
    x, cond = torch.randn(2, 3, 16, 16), _cond(2)
    assert net(x, torch.zeros(2), cond).shape == (2, 3, 16, 16)
    # trained at 16, runs on a 4x larger image (its low-res 4x larger too)
    assert net(torch.randn(2, 3, 64, 64), torch.zeros(2), _cond(2, low=32)).shape == (2, 3, 64, 64)
    # more residual blocks at lower resolution; down-sampling first in every deeper level
    counts = [sum(isinstance(m, ResBlock) for m in level) for level in net.down]
    assert counts == [1, 2, 3]
    assert [type(level[0]).__name__ for level in net.down] == [
        "ResBlock",
        "Downsample",
        "Downsample",
    ]
    assert type(net.up[0][-1]).__name__ == "Upsample"  # up-sampling after the convolutions
    kinds = {type(m) for m in net.modules()}
    assert SelfAttention in kinds and CrossAttention in kinds
    sr1024 = _net(self_attention=False)
    kinds = {type(m) for m in sr1024.modules()}
    assert SelfAttention not in kinds and CrossAttention in kinds


def test_efficient_unet_refuses_missing_lowres_and_odd_sizes() -> None:
    net = _net()
    with pytest.raises(EdiffError, match="low-res"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1), _cond(1, sigma_aug=None))
    with pytest.raises(EdiffError, match="multiple of 4"):
        net(torch.randn(1, 3, 18, 18), torch.zeros(1), _cond(1))


def test_lowres_influence_vanishes_as_sigma_aug_grows() -> None:
    den = EDMPrecond(_make_live(_net())).eval()
    x = torch.randn(2, 3, 16, 16)
    a, b = _cond(2, seed=1), _cond(2, seed=2)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def gap(level: float) -> float:
        s = torch.full((2,), level)
        ca = Conditioning(**{**vars(a), "lowres": corrupt(a.lowres, s, noise), "sigma_aug": s})
        cb = Conditioning(
            **{
                **vars(b),
                "lowres": corrupt(b.lowres, s, noise),
                "sigma_aug": s,
                "t5": a.t5,
                "clip_txt": a.clip_txt,
                "clip_pool": a.clip_pool,
            }
        )
        with torch.no_grad():
            return float((den(x, torch.tensor(1.0), ca) - den(x, torch.tensor(1.0), cb)).norm())

    clean, mid, drowned = gap(0.002), gap(0.5), gap(80.0)
    assert clean > 0 and mid < clean and drowned < 0.05 * clean


def test_noise_augment_follows_its_law() -> None:
    aug = NoiseAugment(p_mean=-3.0, p_std=2.0, sigma_min=0.002, sigma_max=2.0)
    s = aug.sample(40_000, torch.Generator().manual_seed(0)).double()
    assert s.min() >= 0.002 and s.max() <= 2.0
    phi = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731
    assert abs(float((s == s.min()).double().mean()) - phi((math.log(0.002) + 3) / 2)) < 0.01
    assert abs(float((s == s.max()).double().mean()) - (1 - phi((math.log(2.0) + 3) / 2))) < 0.01
    assert abs(float(s.log().median()) - (-3.0)) < 0.05
    inner = s[(s > 0.01) & (s < 0.5)].log()  # unclipped part: N(-3, 2²) restricted
    expect = phi((math.log(0.5) + 3) / 2) - phi((math.log(0.01) + 3) / 2)
    assert abs(inner.numel() / s.numel() - expect) < 0.01
    with pytest.raises(EdiffError):
        NoiseAugment(sigma_min=1.0, sigma_max=0.5)


class _Spy(torch.nn.Module):
    """Records what the SR network was given."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, c_noise, cond, **kw):  # noqa: ANN001, ANN201, ANN003
        self.seen.append(cond)
        return self.net(x, c_noise, cond, **kw)


def test_training_step_draws_sigma_aug_and_hands_it_to_the_network() -> None:
    spy = _Spy(_net())
    aug = NoiseAugment(p_mean=-1.0, p_std=1.0, sigma_min=0.002, sigma_max=2.0)
    module = ExpertModule(spy, parse_node("E0_0"), sr=SRConditioner(aug))
    module._gen = torch.Generator().manual_seed(0)
    b = 64
    c = _cond(b)
    lowres = torch.rand(b, 3, 8, 8) * 2 - 1
    batch = {
        **{k: v for k, v in vars(c).items() if k not in ("lowres", "sigma_aug")},
        "image": torch.rand(b, 3, 16, 16) * 2 - 1,
        "lowres": lowres,
    }
    module.training_step(batch, 0)
    seen = spy.seen[-1]
    s = seen.sigma_aug
    assert s.shape == (b,) and s.min() >= 0.002 and s.max() <= 2.0 and s.unique().numel() > b // 2
    # the network got lowres + σ_aug·n with unit-variance n, per sample
    unit = (seen.lowres - lowres) / s.view(-1, 1, 1, 1)
    std = unit.flatten(1).std(1)
    assert ((std - 1).abs() < 0.35).all(), std
    # text dropout still applies to an SR stage, and never to its low-res
    assert seen.lowres.abs().sum(dim=(1, 2, 3)).min() > 0


def test_sampling_fixes_sigma_aug_and_its_noise_for_every_step() -> None:
    spy = _Spy(_net())
    den = EDMPrecond(spy).eval()
    cond = drop_embeddings(_cond(2, sigma_aug=None), {})
    low = torch.rand(2, 3, 8, 8)
    out = generate(den, cond, image_size=16, steps=4, guidance=2.0, lowres=low, sigma_aug=0.3)
    assert out.shape == (2, 3, 16, 16)
    assert len(spy.seen) == 7  # Heun: 2 calls per step but the last
    first = spy.seen[0].lowres
    for c in spy.seen:  # batched CFG: 4 rows, both branches see the low-res
        assert torch.equal(c.sigma_aug, torch.full((4,), 0.3))
        assert torch.equal(c.lowres, first)
    torch.testing.assert_close(first[:2], first[2:])
    residual = (first[:2] - (low * 2 - 1)) / 0.3
    assert abs(float(residual.std()) - 1) < 0.15
    with pytest.raises(EdiffError, match="sigma_aug"):
        sampling_condition(cond, low, -0.1)


def test_degradations_make_the_low_res_from_the_high_res_batch() -> None:
    from ediff_train.data.degrade import DegradationChain

    sr = SRConditioner(NoiseAugment(sigma_min=0.002, sigma_max=0.002), DegradationChain(), factor=2)
    hires = torch.rand(6, 3, 32, 32) * 2 - 1
    cond = _cond(6, sigma_aug=None)
    a = sr.condition(cond, hires, None, torch.Generator().manual_seed(0))
    b = sr.condition(cond, hires, None, torch.Generator().manual_seed(0))
    c = sr.condition(cond, hires, None, torch.Generator().manual_seed(1))
    assert a.lowres.shape == (6, 3, 16, 16)
    clean = torch.nn.functional.interpolate(hires, size=16, mode="bicubic", antialias=True)
    # degraded, not a plain down-sampling; per seed (augmentation noise aside, 0.002)
    assert (a.lowres - clean).abs().mean() > 0.02
    assert (a.lowres - b.lowres).abs().max() < 0.02 and (a.lowres - c.lowres).abs().mean() > 0.02
    with pytest.raises(EdiffError, match="factor"):
        SRConditioner(degrade=DegradationChain())
