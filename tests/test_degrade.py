"""Real-ESRGAN-style low-res degradations (data/degrade.py): each op's shape, range, seeding and
effect, and the whole chain's contract (shape, range, dtype, seeding, per-sample parameters)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from kornia.filters import get_gaussian_kernel2d
from omegaconf import OmegaConf
from PIL import Image

from ediff_train.data.degrade import (
    DegradationChain,
    GaussianNoise,
    OneOf,
    PoissonNoise,
    RandomBlur,
    RandomJPEG,
    RandomResize,
    blur_kernels,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "degrade"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def photo(b: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[b, 3, size, size] in [0, 1]: smooth colour gradients, edges and some texture, so blur,
    JPEG and resizing all have something to act on."""
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(b, 3, 1, 1, generator=g) * 6
    img = 0.5 + 0.3 * torch.sin(6 * xx + 4 * yy + phase) * torch.cos(5 * yy - phase)
    img = img + 0.15 * (xx > 0.5).float() + 0.05 * torch.rand(b, 3, size, size, generator=g)
    return img.clamp(0, 1)


def hf_energy(x: torch.Tensor) -> torch.Tensor:
    """Per-sample variance of the discrete Laplacian (high-frequency energy)."""
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(3, 1, 3, 3)
    return F.conv2d(x, lap, groups=3).var(dim=(1, 2, 3))


OPS = {
    "blur": lambda: RandomBlur(),
    "resize": lambda: RandomResize(((0.3, 1.5),)),
    "gauss": lambda: GaussianNoise(),
    "poisson": lambda: PoissonNoise(),
    "jpeg": lambda: RandomJPEG(),
    "oneof": lambda: OneOf([[GaussianNoise()], [RandomJPEG()]], (0.4, 0.4)),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_range_and_seeding(name: str) -> None:
    op, x = OPS[name](), photo(6, 24)
    a, b, c = op(x, gen(1), 8), op(x, gen(1), 8), op(x, gen(2), 8)
    assert a.dtype == torch.float32 and a.shape[:2] == x.shape[:2]
    if name != "resize":
        assert a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert a.shape != c.shape or not torch.equal(a, c)


def test_kernels_sizes_normalisation_and_families() -> None:
    k = blur_kernels(gen(), 64, sinc_prob=0.0)
    assert k.shape == (64, 21, 21)
    assert torch.allclose(k.sum((1, 2)), torch.ones(64), atol=1e-5) and (k >= 0).all()
    assert torch.allclose(k, k.flip(1, 2), atol=1e-6)  # point-symmetric: correlation = convolution
    assert ((k == 0) | (k >= torch.finfo(torch.float32).tiny)).all()  # no denormals (slow CPU)
    outside = k[:, :7].abs().sum((1, 2)) == 0  # the rows drawn with size <= 7 are zero off-centre
    assert outside.any() and not outside.all()
    iso = blur_kernels(gen(), 4, (21, 21), (2.0, 2.0), (1, 0, 0, 0, 0, 0), sinc_prob=0.0)
    ref = get_gaussian_kernel2d((21, 21), (2.0, 2.0))
    assert torch.allclose(iso, ref.expand(4, 21, 21), atol=1e-6)
    aniso = blur_kernels(
        gen(), 16, sigma=(0.5, 3.0), kernel_probs=(0, 1, 0, 0, 0, 0), sinc_prob=0.0
    )
    assert (aniso - aniso.transpose(1, 2)).abs().amax((1, 2)).max() > 1e-2  # not isotropic
    sinc = blur_kernels(gen(), 8, sinc_prob=1.0)
    assert torch.allclose(sinc.sum((1, 2)), torch.ones(8), atol=1e-5) and (sinc < 0).any()


def test_blur_lowers_high_frequencies_and_fits_small_images() -> None:
    x = photo(8, 32)
    y = RandomBlur(sigma=(1.0, 3.0), sinc_prob=0.0)(x, gen())
    assert (hf_energy(y) < 0.5 * hf_energy(x)).all()
    untouched = RandomBlur(p=0.0)(x, gen())
    assert torch.equal(untouched, x)
    tiny = RandomBlur(kernel_sizes=(21, 21))(photo(2, 4), gen())  # kernel cropped to 7 taps
    assert tiny.shape == (2, 3, 4, 4) and torch.isfinite(tiny).all()


def test_resize_sizes_and_modes() -> None:
    x = photo(6, 32)
    assert RandomResize(((0.5, 0.5),))(x, gen()).shape == (6, 3, 16, 16)
    assert RandomResize(((1.5, 1.5),))(x, gen()).shape == (6, 3, 48, 48)
    assert RandomResize(relative_to="output")(x, gen(), 8).shape == (6, 3, 8, 8)
    assert RandomResize(((0.5, 0.5),), relative_to="output")(x, gen(), 8).shape == (6, 3, 4, 4)
    sizes = {RandomResize(((0.2, 1.0),))(x, gen(s)).shape[-1] for s in range(6)}
    assert len(sizes) > 1
    area = RandomResize(modes=("area",), relative_to="output")(x, gen(), 8)
    bicubic = RandomResize(modes=("bicubic",), relative_to="output")(x, gen(), 8)
    assert torch.allclose(area, F.adaptive_avg_pool2d(x, 8))
    assert not torch.allclose(area, bicubic, atol=1e-3)
    mixed = RandomResize(relative_to="output")(x, gen(), 8)  # each row one of the three modes
    per_row = [
        any(
            torch.allclose(mixed[i], r[i].clamp(0, 1), atol=1e-6)
            for r in (area, bicubic, F.interpolate(x, size=8, mode="bilinear", align_corners=False))
        )
        for i in range(6)
    ]
    assert all(per_row)
    with pytest.raises(ValueError):
        RandomResize(modes=("nearest",))


def test_gaussian_noise_level_and_gray() -> None:
    x = torch.full((4, 3, 64, 64), 0.5)
    y = GaussianNoise(sigma=(20, 20), gray_prob=0.0)(x, gen())
    assert (y - x).std().item() == pytest.approx(20 / 255, rel=0.05)
    assert (y[:, 0] - y[:, 1]).abs().mean() > 0.01  # colour noise: channels differ
    grey = GaussianNoise(sigma=(20, 20), gray_prob=1.0)(x, gen())
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    weak = GaussianNoise(sigma=(2, 2))(x, gen())
    assert (weak - x).std() < 0.2 * (y - x).std()


def test_poisson_noise_scales_with_level() -> None:
    x = torch.full((4, 3, 64, 64), 128 / 255)
    one = PoissonNoise(scale=(1.0, 1.0), gray_prob=0.0)(x, gen()) - x
    two = PoissonNoise(scale=(2.0, 2.0), gray_prob=0.0)(x, gen()) - x
    expected = math.sqrt(128 / 255 / 256)  # Poisson: variance = mean, in 256 levels
    assert one.std().item() == pytest.approx(expected, rel=0.05)
    assert (two.std() / one.std()).item() == pytest.approx(2.0, rel=0.05)
    grey = PoissonNoise(gray_prob=1.0)(x, gen())
    assert torch.equal(grey[:, 0], grey[:, 2])
    dark = torch.full((4, 3, 64, 64), 8 / 255)  # shot noise grows with the signal
    low = PoissonNoise(scale=(1.0, 1.0), gray_prob=0.0)(dark, gen()) - dark
    assert low.std() < 0.5 * one.std()


def pil_jpeg_error(x: torch.Tensor, quality: int) -> float:
    """Mean absolute error of libjpeg (through Pillow) at `quality` on [b, 3, h, w] in [0, 1]."""
    errs = []
    for img in x:
        a = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=quality)
        back = torch.from_numpy(np.array(Image.open(buf))).float() / 255
        errs.append((back - torch.from_numpy(a).float() / 255).abs().mean().item())
    return sum(errs) / len(errs)


def test_jpeg_quality_and_odd_sizes() -> None:
    x = photo(4, 48)
    err = {q: (RandomJPEG(quality=(q, q))(x, gen()) - x).abs().mean().item() for q in (30, 95)}
    assert err[30] > 1.3 * err[95]
    for q in (30, 95):  # the codec degrades about as much as real JPEG at that quality
        assert err[q] == pytest.approx(pil_jpeg_error(x, q), rel=0.15)
    odd = RandomJPEG()(photo(3, 20), gen())  # kornia pads to multiples of 16 and crops back
    assert odd.shape == (3, 3, 20, 20) and odd.min() >= 0 and odd.max() <= 1
    per_sample = RandomJPEG(quality=(30, 95))(x[:1].repeat(4, 1, 1, 1), gen())
    assert not torch.equal(per_sample[0], per_sample[1])  # each row its own quality


def test_one_of_branches_and_rest() -> None:
    x = photo(16, 16)
    first = OneOf([[GaussianNoise()], [RandomJPEG()]], (1.0, 0.0))(x, gen())
    assert (first - x).abs().amax((1, 2, 3)).gt(0).all()
    some = OneOf([[GaussianNoise()]], (0.5,))(x, gen())
    kept = (some == x).flatten(1).all(1)
    assert kept.any() and not kept.all()
    clash = OneOf([[RandomResize(((0.5, 0.5),))], [RandomResize()]], (0.5, 0.5))
    with pytest.raises(ValueError):
        clash(x, gen())
    with pytest.raises(ValueError):
        OneOf([[GaussianNoise()]], (0.6, 0.6))


def test_chain_contract() -> None:
    chain = DegradationChain()
    hires = photo(8, 32) * 2 - 1
    a = chain(hires, 8, gen(3))
    assert a.shape == (8, 3, 8, 8) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.allclose((a + 1) * 127.5, ((a + 1) * 127.5).round(), atol=1e-4)  # 8-bit levels
    assert torch.equal(a, chain(hires, 8, gen(3)))
    assert not torch.equal(a, chain(hires, 8, gen(4)))
    same = chain(hires[:1].repeat(8, 1, 1, 1), 8, gen(3))  # one image, eight draws
    assert len({tuple(r.flatten().tolist()) for r in same}) == 8
    bf16 = chain(hires.bfloat16(), 8, gen(3))
    assert bf16.dtype == torch.float32 and bf16.shape == a.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert chain(hires, 8, gen(3)).dtype == torch.float32
    big = chain(photo(4, 64) * 2 - 1, 16, gen())
    assert big.shape == (4, 3, 16, 16) and big.min() >= -1 and big.max() <= 1


def test_empty_chain_is_plain_bicubic() -> None:
    hires = photo(2, 32) * 2 - 1
    out = DegradationChain(ops=[])(hires, 8, gen())
    ref = F.interpolate((hires + 1) / 2, size=8, mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(out, (ref * 255).round() / 255 * 2 - 1, atol=1e-6)


def describe(op: Any) -> Any:
    """An op's settings as plain nested data (lists of ops, branches and attributes)."""
    if isinstance(op, (list, tuple)):
        return [describe(o) for o in op]
    if hasattr(op, "__dict__"):
        return {"type": type(op).__name__, **{k: describe(v) for k, v in vars(op).items()}}
    if isinstance(op, dict):
        return {k: describe(v) for k, v in op.items()}
    return round(op, 6) if isinstance(op, float) else op


def test_configs() -> None:
    chain = instantiate(OmegaConf.load(CONF / "realesrgan.yaml"))
    assert isinstance(chain, DegradationChain)
    assert describe(chain.ops) == describe(DegradationChain().ops)
    out = chain(photo(4, 32) * 2 - 1, 8, gen())
    assert out.shape == (4, 3, 8, 8)
    assert "_target_" not in (OmegaConf.load(CONF / "none.yaml") or {})
