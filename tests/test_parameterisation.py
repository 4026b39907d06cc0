"""Flow matching and VP as EDM preconditionings: coefficients, loss weights and noise laws
against their closed forms, Euler in t against Euler in σ, the boundary conventions against
published values, and a flow-matching tree trained through the real entry point."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env

from ediff_train.core import boundaries, solvers
from ediff_train.core.edm import EDMPrecond, edm_loss
from ediff_train.core.experts import Router, parse_node
from ediff_train.core.parameterisation import EDM, VP, FlowMatching, from_config, vp_sigmas
from ediff_train.errors import EdiffError

G = torch.Generator().manual_seed(0)


class Fixed(torch.nn.Module):
    """A 'network' that returns a given tensor (records what it was fed)."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out, self.seen = out, None

    def forward(self, x, c_noise, cond):  # noqa: ANN001, ANN201
        self.seen = (x, c_noise)
        return self.out


def test_flow_matching_is_the_v_target_in_sigma() -> None:
    x0, eps = torch.randn(6, 3, 4, 4, generator=G), torch.randn(6, 3, 4, 4, generator=G)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.97], dtype=torch.float32)
    b = t.view(-1, 1, 1, 1)
    x_t = (1 - b) * x0 + b * eps  # the flow-matching forward process
    sigma = t / (1 - t)
    v_pred = torch.randn(6, 3, 4, 4, generator=G)
    net = Fixed(v_pred)
    d = EDMPrecond(net, param=FlowMatching())(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, None)
    torch.testing.assert_close(net.seen[0], x_t, rtol=1e-5, atol=1e-5)  # c_in·x_σ = x_t
    torch.testing.assert_close(net.seen[1], t, rtol=1e-6, atol=1e-6)  # c_noise = t
    torch.testing.assert_close(d, x_t - b * v_pred, rtol=1e-5, atol=1e-5)  # x̂₀ = x_t − t·v
    fm = (v_pred - (eps - x0)).pow(2).flatten(1).mean(1)  # the flow-matching loss
    ours = edm_loss(EDMPrecond(Fixed(v_pred), param=FlowMatching()), x0, sigma, None, noise=eps)
    torch.testing.assert_close(ours, fm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_vp_is_ddpm_in_sigma(prediction: str) -> None:
    sig = vp_sigmas()
    alpha_bar = 1.0 / (1.0 + sig**2)
    idx = torch.tensor([0, 10, 250, 500, 999])
    ab = alpha_bar[idx].float().view(-1, 1, 1, 1)
    x0, eps = torch.randn(5, 3, 4, 4, generator=G), torch.randn(5, 3, 4, 4, generator=G)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # DDPM's forward process at index i
    target = eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    net = Fixed(target)  # a perfect network
    sigma = sig[idx].float()
    d = EDMPrecond(net, param=VP(prediction))(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, None)
    torch.testing.assert_close(net.seen[0], x_t, rtol=1e-4, atol=1e-5)  # c_in·x_σ = x_t
    torch.testing.assert_close(net.seen[1], idx.float(), rtol=0, atol=2e-3)  # c_noise = i
    torch.testing.assert_close(d, x0, rtol=1e-4, atol=1e-4)  # so D = x₀
    wrong = target + 0.1
    ref = (wrong - target).pow(2).flatten(1).mean(1)  # the ε- or v-loss
    ours = edm_loss(EDMPrecond(Fixed(wrong), param=VP(prediction)), x0, sigma, None, noise=eps)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-6)


def test_logit_normal_with_shift_is_log_normal_in_sigma() -> None:
    m, s, k = 0.3, 0.8, 3.0
    z = torch.linspace(-4, 4, 41, dtype=torch.float64)
    t = torch.sigmoid(m + s * z)
    t_shift = k * t / (1 + (k - 1) * t)  # SD3's shift
    sigma = t_shift / (1 - t_shift)
    law = FlowMatching(m, s, k).law
    torch.testing.assert_close(law.cdf_t(sigma), torch.special.ndtr(z), rtol=0, atol=1e-12)
    # ~1.4 % of logit-normal(0, 1) samples lie above t = 0.9 (DESIGN §9): 1 − Φ(ln 9)
    from scipy.stats import norm

    assert 1 - FlowMatching().law.cdf(9.0) == pytest.approx(norm.sf(math.log(9.0)), rel=1e-9)
    assert round(100 * norm.sf(math.log(9.0)), 1) == 1.4


def test_tree_splits_at_the_laws_quantiles() -> None:
    law = FlowMatching(shift=3.0).law  # median of ln σ is ln 3
    e11 = replace(parse_node("E1_1"), law=law)
    assert e11.sigma_interval[0] == pytest.approx(3.0, rel=1e-12)
    vp = VP().law
    half = vp.icdf(0.5)  # u = 0.5 is half-way through the index table
    lo, hi = vp_sigmas()[499].log(), vp_sigmas()[500].log()
    assert math.log(half) == pytest.approx(float((lo + hi) / 2), rel=1e-12)


def test_euler_in_t_is_euler_in_sigma() -> None:
    s_d = 0.7  # Gaussian data: D(x_σ) = s_d²/(s_d² + σ²)·x_σ exactly

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return s_d**2 / (s_d**2 + sigma**2) * x

    sigmas = solvers.karras_sigmas(12, 0.002, 80.0).double()
    x = sigmas[0] * torch.randn(4, 3, generator=G, dtype=torch.float64)
    ours = solvers.euler(denoise, x.clone(), sigmas)
    # the same steps written in flow-matching time on x_t = x_σ/(1+σ), velocity (x_t − x̂₀)/t
    x_t = x / (1 + sigmas[0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        t, t_next = s / (1 + s), s_next / (1 + s_next)
        v = (x_t - denoise(x_t * (1 + s), s)) / t
        x_t = x_t + (t_next - t) * v
    # exact in exact arithmetic; the solvers step in float32 where σ enters
    torch.testing.assert_close(ours, x_t * (1 + sigmas[-1]), rtol=1e-6, atol=1e-7)


def test_wan22_boundaries_in_every_convention() -> None:
    s = boundaries.sigma_of_t(0.875)  # Wan2.2 T2V boundary_ratio
    assert s == pytest.approx(7.0, rel=1e-12)
    assert boundaries.sigma_of_t(0.900) == pytest.approx(9.0, rel=1e-12)  # I2V
    c = boundaries.conventions(7.0, shift=12.0)
    assert c["t"] == c["boundary_ratio"] == pytest.approx(0.875)
    assert c["timestep"] == pytest.approx(875.0)
    assert c["t_grid"] == pytest.approx(0.875 / (12 - 11 * 0.875))
    assert 12 * c["t_grid"] / (1 + 11 * c["t_grid"]) == pytest.approx(0.875)  # shift maps back
    assert c["log_snr"] == pytest.approx(-2 * math.log(7.0))
    sig = vp_sigmas()
    i = int(torch.searchsorted(sig, torch.tensor(7.0, dtype=torch.float64)))
    assert i - 1 <= c["ddpm_index"] <= i  # between the table entries around σ = 7


def test_bad_parameterisations_are_one_line() -> None:
    with pytest.raises(EdiffError, match=r"^param.shift must be a finite number > 0, got -1.0$"):
        from_config({"name": "flow", "shift": -1})
    with pytest.raises(EdiffError, match=r"^param.name must be one of edm, flow, vp, got 'x'$"):
        from_config({"name": "x"})
    with pytest.raises(EdiffError, match="eps or v"):
        from_config({"name": "vp", "prediction": "x0"})
    assert from_config(None) == EDM()
    flow = replace(parse_node("E1_1"), law=FlowMatching().law)
    with pytest.raises(EdiffError, match="different noise laws"):
        Router([parse_node("E1_0"), flow])


FAST = [
    "logger=none",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "monitor.every=0",
    "data.batch_size=8",
    "probe.batches=1",
    "probe.batch_size=8",
    "run_dir=R",
]


def _train(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, *args],
        cwd=tmp,
        env=run_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_flow_matching_tree_trains_and_refuses_a_mixed_child(tmp_path: Path) -> None:
    assert _train(tmp_path, "param=flow", "param.shift=3", "expert=E0_0", "steps=2").returncode == 0
    proc = _train(tmp_path, "param=flow", "param.shift=3", "expert=E1_1", "steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((tmp_path / "R" / "E1_1" / "node.json").read_text())
    assert info["param"] == {"name": "flow", "p_mean": 0.0, "p_std": 1.0, "shift": 3.0}
    assert info["sigma_interval"][0] == pytest.approx(3.0)  # the shifted law's median
    assert info["boundaries"]["t"][0] == pytest.approx(0.75)
    lo, hi = info["sigma_seen"]
    assert lo >= 3.0  # σ drawn inside the node's band of the shifted law
    bad = _train(tmp_path, "expert=E1_0", "steps=1")  # an EDM child of a flow root
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: param: parent E0_0 was trained as {'name': 'flow', 'p_mean': 0.0, 'p_std': 1.0, "
        "'shift': 3.0}, this node asks for {'name': 'edm', 'sigma_data': 0.5, 'p_mean': -1.2, "
        "'p_std': 1.2}; a child keeps its parent's parameterisation (train a new root with the "
        "other one)"
    ]
    assert not (tmp_path / "R" / "E1_0" / "config.yaml").exists()
    # the finished flow root relaunched as EDM (the default): refused, its config left as it was
    stored = (tmp_path / "R" / "E0_0" / "config.yaml").read_bytes()
    again = _train(tmp_path, "expert=E0_0", "steps=2")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        "error: param: E0_0 in R was trained as {'name': 'flow', 'p_mean': 0.0, 'p_std': 1.0, "
        "'shift': 3.0}, this run asks for {'name': 'edm', 'sigma_data': 0.5, 'p_mean': -1.2, "
        "'p_std': 1.2}; resume it with the same param, or train the other one in another run_dir"
    ]
    assert (tmp_path / "R" / "E0_0" / "config.yaml").read_bytes() == stored


@pytest.mark.parametrize("video, sigma", [("t2v", 7.0), ("i2v", 9.0)])
def test_wan22_expert_pair_tiles_at_its_boundary(video: str, sigma: float) -> None:
    from omegaconf import OmegaConf

    from ediff_train.core.experts import node_from_config

    law = FlowMatching().law
    pair = [
        node_from_config(OmegaConf.load(ROOT / "conf" / "expert" / f"wan22_{video}_{s}.yaml"), law)
        for s in ("low", "high")
    ]
    router = Router(pair)  # the two tile σ, with no gap and no overlap
    assert pair[0].sigma_interval[1] == pytest.approx(sigma) == pair[1].sigma_interval[0]
    t = boundaries.t_of_sigma(sigma)
    assert router(boundaries.sigma_of_t(t - 1e-9)).name == f"wan22_{video}_low"
    assert router(boundaries.sigma_of_t(t + 1e-9)).name == f"wan22_{video}_high"
