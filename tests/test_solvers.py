"""Solvers against the exact ODE solution of Gaussian data, independent re-implementations of
Heun and DPM-Solver++(2M), and guidance per expert / in a σ interval / per text encoder."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.experts import parse_node
from ediff_train.core.solvers import SOLVERS, karras_sigmas, solve
from ediff_train.errors import EdiffError
from ediff_train.sampling.ensemble import Ensemble
from ediff_train.sampling.guidance import Guidance, guided, text_only

SD = 0.5  # data N(0, SD²): D(x, σ) = x·SD²/(σ²+SD²) exactly


def gaussian_denoiser(calls: list[int] | None = None):  # noqa: ANN201
    def den(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        s = sigma.double()
        return x * SD**2 / (s**2 + SD**2)

    return den


def exact(x_t: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
    return x_t * math.sqrt(s_to**2 + SD**2) / math.sqrt(s_from**2 + SD**2)


X0 = torch.linspace(-3, 3, 101, dtype=torch.float64)


def error(name: str, steps: int) -> float:
    s = karras_sigmas(steps, 0.05, 20.0, 7.0)[:-1]  # stop at σ_min: measures the ODE itself
    x_t = X0 * float(s[0])
    out = solve(name, gaussian_denoiser(), x_t.clone(), s)
    return float((out - exact(x_t, float(s[0]), float(s[-1]))).abs().max())


@pytest.mark.parametrize(
    "name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("deis_ab", 3), ("deis_rk3", 3)]
)
def test_each_solver_converges_at_its_order(name: str, order: int) -> None:
    errs = [error(name, n) for n in (20, 40, 80)]
    slope = math.log2(errs[0] / errs[2]) / 2  # log-log fit over a 4x refinement
    assert order - 0.3 < slope < order + 0.6, (name, errs, slope)


def test_step_to_zero_is_first_order_and_calls_are_counted() -> None:
    sig = karras_sigmas(12, 0.002, 80.0, 7.0)  # ends in 0
    want_calls = {"euler": 12, "heun": 23, "dpmpp_2m": 12, "deis_ab": 12, "deis_rk3": 34}
    den = gaussian_denoiser()
    for name in SOLVERS:
        calls: list[int] = []
        out = solve(name, gaussian_denoiser(calls), X0 * 80.0, sig)
        assert len(calls) == want_calls[name] and torch.isfinite(out).all(), name
        # the last step, σ → 0, is x = D(x, σ): exact for any multistep history
        last = torch.tensor([0.3, 0.0], dtype=torch.float64)
        torch.testing.assert_close(
            solve(name, den, X0.clone(), last), den(X0, last[:1].float()), rtol=1e-6, atol=1e-6
        )


def reference_heun(den, x, sigmas):  # noqa: ANN001, ANN201 - written from EDM's Algorithm 1
    out = x.clone()
    for i in range(len(sigmas) - 1):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        d_cur = (out - den(out, torch.tensor(t_cur))) / t_cur
        x_euler = out + (t_next - t_cur) * d_cur
        if t_next != 0:
            d_prime = (x_euler - den(x_euler, torch.tensor(t_next))) / t_next
            out = out + (t_next - t_cur) * (d_cur / 2 + d_prime / 2)
        else:
            out = x_euler
    return out


def reference_dpmpp_2m(den, x, sigmas):  # noqa: ANN001, ANN201 - in t = −ln σ, as the paper
    out, old = x.clone(), None
    t = [-math.log(float(s)) if s > 0 else math.inf for s in sigmas]
    for i in range(len(sigmas) - 1):
        denoised = den(out, torch.tensor(float(sigmas[i])))
        if math.isinf(t[i + 1]):
            out = denoised
            continue
        h = t[i + 1] - t[i]
        if old is None:
            d = denoised
        else:
            r = (t[i] - t[i - 1]) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        out = (float(sigmas[i + 1]) / float(sigmas[i])) * out - math.expm1(-h) * d
        old = denoised
    return out


@pytest.mark.parametrize("name, ref", [("heun", reference_heun), ("dpmpp_2m", reference_dpmpp_2m)])
def test_heun_and_dpmpp_match_reference_formulas(name: str, ref) -> None:  # noqa: ANN001
    den = gaussian_denoiser()

    def den32(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return den(x, s.float())  # both see σ rounded to float32, as models do

    sig = karras_sigmas(18, 0.002, 80.0, 7.0)
    x_t = X0 * 80.0
    torch.testing.assert_close(
        solve(name, den32, x_t.clone(), sig), ref(den32, x_t, sig), rtol=1e-12, atol=1e-12
    )


def _cond(b: int) -> Conditioning:
    return Conditioning(
        t5=torch.ones(b, 3, 4),
        t5_mask=torch.ones(b, 3, dtype=torch.bool),
        clip_txt=torch.ones(b, 77, 4),
        clip_pool=torch.ones(b, 2),
        clip_img=torch.zeros(b, 2),
    )


class _Expert(torch.nn.Module):
    """Answers its constant, plus 1 where the caption is present: D_c − D_u = 1."""

    def __init__(self, value: float, rows: list[int]) -> None:
        super().__init__()
        self.value, self.rows = value, rows

    def forward(self, x, sigma, cond):  # noqa: ANN001, ANN201
        self.rows.append(x.shape[0])
        return torch.full_like(x, self.value) + cond.clip_pool[:, :1, None, None]


def test_guidance_per_expert_and_interval_apply_per_band() -> None:
    rows: list[int] = []
    ens = Ensemble(
        [parse_node("E1_0"), parse_node("E1_1")], [_Expert(10.0, rows), _Expert(20.0, rows)]
    )
    cond = _cond(2)
    g = Guidance(5.0, {"E1_1": 3.0, "E1_0": 1.0})
    den = guided(ens, cond, cond.null(), g)
    x = torch.zeros(2, 1, 1, 1)
    assert float(den(x, torch.tensor(5.0))[0]) == 20.0 + 3.0  # E1_1's band: scale 3
    assert rows[-1] == 4  # both branches in one call
    assert float(den(x, torch.tensor(0.05))[0]) == 10.0 + 1.0  # E1_0: scale 1, cond only
    assert rows[-1] == 2
    inter = guided(ens, cond, cond.null(), Guidance(4.0, interval=(0.19, 1.61)))
    assert float(inter(x, torch.tensor(1.0))[0]) == 20.0 + 4.0  # inside (0.19, 1.61]
    assert float(inter(x, torch.tensor(5.0))[0]) == 21.0 and rows[-1] == 2  # outside
    with pytest.raises(EdiffError, match="E9_511"):
        Guidance(2.0, {"E9_511": 3.0}).check(["E1_0", "E1_1"])
    with pytest.raises(EdiffError, match="interval"):
        Guidance(2.0, interval=(2.0, 1.0)).check([])
    with pytest.raises(EdiffError, match="unknown solver"):
        solve("rk4", gaussian_denoiser(), X0.clone(), karras_sigmas(3))


def test_text_modes_drop_the_other_encoder_and_null_drops_all() -> None:
    c = _cond(2)
    t5 = text_only(c, "t5")
    assert t5.t5.abs().sum() > 0 and t5.clip_txt.abs().sum() == 0 and t5.clip_pool.abs().sum() == 0
    clip = text_only(c, "clip")
    assert clip.t5.abs().sum() == 0 and clip.clip_txt.abs().sum() > 0
    null = c.null()
    assert all(getattr(null, k).abs().sum() == 0 for k in ("t5", "clip_txt", "clip_pool"))
    with pytest.raises(EdiffError, match="text must be"):
        text_only(c, "bert")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["solver=rk4"],
            "solver must be one of euler, heun, dpmpp_2m, deis_ab, deis_rk3, got 'rk4'",
        ),
        (["steps=0"], "steps must be ≥ 1"),
        (["guidance_interval=[2,1]"], "guidance interval"),
        (["style_image=missing.png"], "style_image missing.png does not exist"),
    ],
)
def test_sample_cli_refuses_bad_settings_first(
    tmp_path: Path, args: list[str], message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "run_dir=nowhere", *args],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


class _ImageAware(torch.nn.Module):
    """1 where the caption is present, +10 where a style image is: the branches are visible."""

    def forward(self, x, sigma, cond):  # noqa: ANN001, ANN201
        return (
            torch.zeros_like(x)
            + cond.clip_pool[:, :1, None, None]
            + 10 * cond.clip_img[:, :1, None, None]
        )


def test_style_guidance_weighs_the_image_on_its_own(tmp_path: Path) -> None:
    from ediff_train.sampling.guidance import style_embedding, style_guided

    c = _cond(2)
    styled = Conditioning(**{**vars(c), "clip_img": torch.ones(2, 2)})
    x = torch.zeros(2, 1, 1, 1)
    for s, s_style in ((3.0, 0.0), (3.0, 1.0), (2.0, 4.0)):
        out = style_guided(_ImageAware(), styled, c.null(), s, s_style)(x, torch.tensor(1.0))
        assert float(out[0]) == s * 1 + s_style * 10  # D_u = 0, D_t = 1, D_ts = 11
    with pytest.raises(EdiffError, match="does not exist"):
        style_embedding(None, tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(EdiffError, match="not a readable image"):
        style_embedding(None, tmp_path / "notes.png")


def test_prompt_switch_uses_a_then_b() -> None:
    from ediff_train.sampling.switching import switch_sigma, switched

    sig = karras_sigmas(10)
    assert switch_sigma(sig, 0.0) == float("inf") and switch_sigma(sig, 1.0) == 0.0
    s = switch_sigma(sig, 0.4)
    assert s == float(sig[4])
    seen = []
    den = switched(
        lambda x, t: seen.append("A") or x * 0, lambda x, t: seen.append("B") or x * 0, s
    )
    solve("euler", den, torch.zeros(1, 1), sig)
    assert seen == ["A"] * 4 + ["B"] * 6
