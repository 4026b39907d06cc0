"""Solvers, guidance and the ensemble against denoisers whose answers are known in closed form."""

from __future__ import annotations

import torch

from ediff_train.core.conditioning import Conditioning, drop_embeddings
from ediff_train.core.experts import parse_node
from ediff_train.core.solvers import heun, karras_sigmas
from ediff_train.sampling.ensemble import Ensemble
from ediff_train.sampling.guidance import guided


def test_karras_grid() -> None:
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert s.shape == (11,) and s[-1] == 0
    assert torch.isclose(s[0], torch.tensor(80.0, dtype=s.dtype))
    assert torch.isclose(s[-2], torch.tensor(0.002, dtype=s.dtype))
    assert (s[:-1] > s[1:]).all()


def test_heun_on_gaussian_data_reaches_the_data_law() -> None:
    # Data N(0, sd²): the ideal denoiser is x·sd²/(σ²+sd²); the ODE maps N(0, σmax²+sd²) to it.
    sd = 0.5
    den = lambda x, s: x * sd**2 / (s**2 + sd**2)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, generator=g, dtype=torch.float64) * (80.0**2 + sd**2) ** 0.5
    out = heun(den, x, karras_sigmas(32).double())
    assert abs(out.std().item() - sd) < 0.02


def test_guidance_extrapolates() -> None:
    def model(x, sigma, cond):  # noqa: ANN001, ANN202
        return x * 0 + cond.clip_pool[:, :1, None, None]  # "denoises" to the conditioning value

    cond = _cond(2, value=1.0)
    d = guided(model, cond, cond.null(), scale=3.0)
    out = d(torch.zeros(2, 1, 1, 1), torch.tensor(1.0))
    torch.testing.assert_close(out, torch.full((2, 1, 1, 1), 3.0))  # 0 + 3·(1 − 0)


def _cond(b: int, value: float = 1.0, length: int = 3) -> Conditioning:
    return Conditioning(
        t5=torch.full((b, length, 4), value),
        t5_mask=torch.ones(b, length, dtype=torch.bool),
        clip_txt=torch.full((b, 77, 4), value),
        clip_pool=torch.full((b, 2), value),
        clip_img=torch.full((b, 2), value),
    )


class _Const(torch.nn.Module):
    def __init__(self, v: float) -> None:
        super().__init__()
        self.v = v

    def forward(self, x, sigma, cond):  # noqa: ANN001, ANN201
        return torch.full_like(x, self.v)


def test_ensemble_routes_each_step_to_the_owner() -> None:
    nodes = [parse_node("E9_511"), parse_node("E3_0"), parse_node("not_E9_511_E3_0")]
    ens = Ensemble(nodes, [_Const(1.0), _Const(2.0), _Const(3.0)])
    x, c = torch.zeros(2, 1, 2, 2), _cond(2)
    assert ens(x, torch.tensor(50.0), c).unique().item() == 1.0
    assert ens(x, torch.tensor(0.01), c).unique().item() == 2.0
    assert ens(x, torch.tensor(1.0), c).unique().item() == 3.0
    mixed = ens(x, torch.tensor([50.0, 0.01]), c)
    assert mixed[0].unique().item() == 1.0 and mixed[1].unique().item() == 2.0
    # a full Heun run from σmax = 80 visits all three experts
    ens.calls = [0, 0, 0]
    heun(lambda x, s: ens(x, s, c), torch.zeros(2, 1, 2, 2), karras_sigmas(24))
    assert all(n > 0 for n in ens.calls)


def test_embedding_dropout_rates_and_null() -> None:
    c = _cond(20000)
    g = torch.Generator().manual_seed(0)
    d = drop_embeddings(c, {"t5": 0.25, "clip_txt": 0.2, "clip_img": 0.9}, g)
    t5_kept = (d.t5.flatten(1).abs().sum(1) > 0).float().mean().item()
    txt_kept = (d.clip_txt.flatten(1).abs().sum(1) > 0).float()
    img_kept = (d.clip_img.abs().sum(1) > 0).float().mean().item()
    assert abs(t5_kept - 0.75) < 0.015 and abs(txt_kept.mean().item() - 0.8) < 0.015
    assert abs(img_kept - 0.1) < 0.015
    # the pooled CLIP text goes with the CLIP text tokens, so nothing of a dropped caption leaks
    pool_kept = (d.clip_pool.abs().sum(1) > 0).float()
    assert torch.equal(pool_kept, txt_kept)
    n = c.null()
    assert n.t5.abs().sum() == 0 and n.clip_img.abs().sum() == 0 and n.clip_pool.abs().sum() == 0
