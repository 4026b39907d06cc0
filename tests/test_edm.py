"""EDM core: preconditioning and λ(σ) against their closed forms, the σ law and its quantiles."""

from __future__ import annotations

import math

import torch
from scipy import stats

from ediff_train.core.edm import (
    EDMPrecond,
    LogNormalSigma,
    edm_loss,
    loss_weight,
    precond_coefficients,
)


def test_precond_coefficients_closed_form() -> None:
    sd = 0.5
    for s in (0.002, 0.1, 0.5, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = precond_coefficients(torch.tensor(s, dtype=torch.float64))
        assert math.isclose(float(c_skip), sd**2 / (s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(float(c_out), s * sd / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(float(c_in), 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(float(c_noise), math.log(s) / 4, rel_tol=1e-12)
        lam = float(loss_weight(torch.tensor(s, dtype=torch.float64)))
        assert math.isclose(lam, (s**2 + sd**2) / (s * sd) ** 2, rel_tol=1e-12)
        # λ·c_out² = 1: the weighting makes the network's effective target unit-weighted.
        assert math.isclose(lam * float(c_out) ** 2, 1.0, rel_tol=1e-9)


class _Probe(torch.nn.Module):
    """F returns a fixed function of its inputs so D can be checked by hand."""

    def forward(self, x, c_noise, cond):  # noqa: ANN001, ANN201
        self.seen = (x.clone(), c_noise.clone())
        return torch.full_like(x, 2.0) + c_noise.view(-1, 1, 1, 1)


def test_precond_wraps_backbone() -> None:
    probe = _Probe()
    d = EDMPrecond(probe)
    x = torch.randn(3, 3, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = d(x, sigma, cond=None)
    c_skip, c_out, c_in, c_noise = precond_coefficients(sigma)
    v = (-1, 1, 1, 1)
    torch.testing.assert_close(probe.seen[0], c_in.view(v) * x)
    torch.testing.assert_close(probe.seen[1], c_noise)
    torch.testing.assert_close(out, c_skip.view(v) * x + c_out.view(v) * (2.0 + c_noise.view(v)))


def test_edm_loss_is_weighted_mse() -> None:
    class Ident(torch.nn.Module):
        def forward(self, x, sigma, cond):  # noqa: ANN001, ANN201
            return x * 0.0

    x = torch.randn(4, 3, 2, 2)
    sigma = torch.tensor([0.2, 0.5, 1.0, 3.0])
    loss = edm_loss(Ident(), x, sigma, None)
    expected = loss_weight(sigma) * x.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)


def test_lognormal_quantiles_roundtrip_and_law() -> None:
    law = LogNormalSigma()
    assert math.isclose(law.icdf(0.5), math.exp(-1.2), rel_tol=1e-12)
    for u in (1e-6, 0.125, 0.5, 0.998046875, 0.9999983):
        assert math.isclose(law.cdf(law.icdf(u)), u, rel_tol=1e-9)
    assert math.isclose(law.icdf(0.998046875), 9.610, rel_tol=1e-3)
    s = law.sample(4000, torch.Generator().manual_seed(0)).numpy()
    assert stats.kstest(s, stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf).pvalue > 1e-3
    # the test has power: a slightly wrong law is rejected
    assert stats.kstest(s, stats.lognorm(s=1.2, scale=math.exp(-1.0)).cdf).pvalue < 1e-3


def test_edm_loss_noises_the_input_it_feeds_the_denoiser() -> None:
    """A denoiser that depends on its input: a loss that forgot σ·n, used the wrong noise, or
    skipped λ(σ) gives a different number than this hand-computed reference."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 12, generator=g, dtype=torch.float32) * 0.3

    class Linear(torch.nn.Module):
        """D(y; σ) = W·y + σ·y: depends on the noisy input and on σ."""

        def forward(self, y, sigma, cond):  # noqa: ANN001, ANN201
            flat = y.flatten(1) @ w.T + sigma.view(-1, 1) * y.flatten(1)
            return flat.view_as(y)

    x = torch.randn(4, 3, 2, 2, generator=g)
    sigma = torch.tensor([0.2, 0.5, 1.0, 3.0])
    noise = torch.randn(x.shape, generator=g)
    loss = edm_loss(Linear(), x, sigma, None, noise=noise)
    expected = torch.empty(4, dtype=torch.float64)
    for i in range(4):
        s = float(sigma[i])
        y = (x[i].flatten() + s * noise[i].flatten()).double()
        d = w.double() @ y + s * y
        lam = (s**2 + 0.25) / (s * 0.5) ** 2
        expected[i] = lam * float(((d - x[i].flatten().double()) ** 2).mean())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # the same noise drawn from the global generator when none is passed
    torch.manual_seed(11)
    drawn = torch.randn_like(x)
    torch.manual_seed(11)
    torch.testing.assert_close(
        edm_loss(Linear(), x, sigma, None), edm_loss(Linear(), x, sigma, None, noise=drawn)
    )
    # and the noise matters (the reference is not blind to it)
    assert not torch.allclose(edm_loss(Linear(), x, sigma, None, noise=torch.zeros_like(x)), loss)
