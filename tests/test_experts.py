"""The expert tree: intervals, exact truncated σ sampling, parents, the router, the CLI."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from ediff_train.core.edm import LogNormalSigma
from ediff_train.core.experts import (
    ROOT,
    Node,
    Router,
    interval_node,
    node_from_config,
    parse_node,
    tree_node,
)
from ediff_train.errors import EdiffError

LAW = LogNormalSigma()


def truncated_cdf(node: Node):  # noqa: ANN201
    """Analytic CDF of the σ law restricted to the node's (possibly two-piece) u-set."""

    def cdf(sigma: np.ndarray) -> np.ndarray:
        u = stats.norm.cdf((np.log(sigma) - LAW.p_mean) / LAW.p_std)
        below = sum(np.clip(u - lo, 0.0, hi - lo) for lo, hi in node.pieces)
        return below / node.mass

    return cdf


NODES = [
    parse_node("E9_511"),
    parse_node("E3_0"),
    parse_node("not_E9_511"),
    parse_node("not_E9_511_E3_0"),
    parse_node("not_E2_1"),  # a true two-piece complement: [0, .25) ∪ [.5, 1)
    interval_node(sigma_lo=0.5, sigma_hi=2.0),
    parse_node("E1_1"),
]


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.name)
def test_sigma_inside_node_and_follows_truncated_law(node: Node) -> None:
    sigma = node.sample_sigma(5000, torch.Generator().manual_seed(1)).numpy()
    assert np.isfinite(sigma).all() and (sigma > 0).all()
    u = stats.norm.cdf((np.log(sigma) - LAW.p_mean) / LAW.p_std)
    inside = np.zeros_like(u, dtype=bool)
    for lo, hi in node.pieces:
        inside |= (u >= lo - 1e-12) & (u < hi + 1e-12)
    assert inside.all()
    assert stats.kstest(sigma, truncated_cdf(node)).pvalue > 1e-3
    # power check: the untruncated law is rejected wherever the node is clearly smaller
    if node.mass < 0.9:
        assert stats.kstest(sigma, lambda s: stats.norm.cdf((np.log(s) + 1.2) / 1.2)).pvalue < 1e-3


def test_two_piece_complement_splits_mass_by_length() -> None:
    node = parse_node("not_E2_1")
    assert node.pieces == ((0.0, 0.25), (0.5, 1.0))
    u = LAW.cdf_t(node.sample_sigma(20000, torch.Generator().manual_seed(2))).numpy()
    assert abs((u < 0.25).mean() - 1 / 3) < 0.015


def test_root_follows_lognormal() -> None:
    sigma = parse_node(ROOT).sample_sigma(5000, torch.Generator().manual_seed(3)).numpy()
    assert stats.kstest(sigma, stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf).pvalue > 1e-3


def test_known_boundaries() -> None:
    assert math.isclose(parse_node("E1_1").sigma_interval[0], 0.3012, abs_tol=1e-4)
    assert math.isclose(parse_node("E3_0").sigma_interval[1], 0.0757, abs_tol=1e-4)
    assert math.isclose(parse_node("E9_511").sigma_interval[0], 9.610, abs_tol=1e-3)
    assert parse_node("E9_511").contains(80.0)
    assert not parse_node("E9_511").contains(9.0)


def test_parents() -> None:
    assert parse_node("E9_511").parent == "E8_255"
    assert parse_node("E3_0").parent == "E2_0"
    assert parse_node("E1_1").parent == ROOT
    assert parse_node(ROOT).parent is None
    assert parse_node("not_E9_511_E3_0").parent == ROOT
    assert parse_node("not_E9_511", parent="E1_1").parent == "E1_1"
    assert interval_node(sigma_lo=1.0).parent == ROOT


@pytest.mark.parametrize(
    "name, message",
    [
        ("E9_600", "0–511"),
        ("E11_0", "levels are 0–10"),
        ("E2", "unknown node"),
        ("not_E0_0", "empty"),
        ("not_E1", "cannot read"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(EdiffError, match=message):
        parse_node(name)


def test_custom_interval_from_config() -> None:
    node = node_from_config(
        {"name": "interval", "kind": "interval", "sigma_lo": 0.5, "sigma_hi": 2.0}
    )
    lo, hi = node.sigma_interval
    assert math.isclose(lo, 0.5, rel_tol=1e-9) and math.isclose(hi, 2.0, rel_tol=1e-9)
    q = node_from_config({"name": "interval", "kind": "interval", "u_lo": 0.25, "u_hi": 0.5})
    assert q.pieces == ((0.25, 0.5),)
    with pytest.raises(EdiffError, match="invalid interval"):
        interval_node(sigma_lo=2.0, sigma_hi=0.5)


def test_router_tiles_and_routes() -> None:
    nodes = [parse_node("E9_511"), parse_node("E3_0"), parse_node("not_E9_511_E3_0")]
    r = Router(nodes)
    assert r(80.0).name == "E9_511"
    assert r(0.002).name == "E3_0"
    assert r(1.0).name == "not_E9_511_E3_0"
    sig = torch.tensor([0.01, 0.0757, 0.08, 5.0, 9.7])
    assert [nodes[i].name for i in r.index(sig)] == [
        "E3_0",
        "E3_0",
        "not_E9_511_E3_0",
        "not_E9_511_E3_0",
        "E9_511",
    ]
    # level-4 tree: 16 leaves tile, and each σ goes to the leaf that contains it
    leaves = [tree_node(4, i) for i in range(16)]
    r4 = Router(leaves)
    s = parse_node(ROOT).sample_sigma(500, torch.Generator().manual_seed(0))
    for sv, i in zip(s.tolist(), r4.index(s).tolist()):
        assert leaves[i].contains(sv)


def test_router_refuses_overlap_and_gap() -> None:
    with pytest.raises(EdiffError, match="overlap"):
        Router([parse_node(ROOT), parse_node("E1_1")])
    with pytest.raises(EdiffError, match="gap"):
        Router([parse_node("E1_0"), parse_node("E2_3")])
    with pytest.raises(EdiffError, match="gap"):
        Router([parse_node("E1_0")])


def test_cli_prints_intervals_and_parents() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ediff_train.core.experts", "E9_511", "E3_0", "not_E9_511_E3_0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 3
    assert "9.61" in out[0] and "E8_255" in out[0]
    assert "0.07574" in out[1] and "E2_0" in out[1]
    assert "0.125" in out[2] and "E0_0" in out[2]
    bad = subprocess.run(
        [sys.executable, "-m", "ediff_train.core.experts", "E9_600"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "0–511" in bad.stderr


def test_a_sigma_on_a_boundary_belongs_to_the_node_above() -> None:
    """Nodes own half-open quantile intervals [lo, hi): a σ whose u is exactly a boundary is
    the upper node's. σ = exp(P_mean) has u = 0.5 exactly (E1_0 | E1_1), and the level-2
    boundaries u = 1/4, 1/2, 3/4 round-trip exactly through the law, so ties really occur."""
    pair = Router([parse_node("E1_0"), parse_node("E1_1")])
    at = math.exp(pair.law.p_mean)
    assert float(pair.law.cdf_t(torch.tensor(at, dtype=torch.float64))) == 0.5
    assert pair(at).name == "E1_1" and pair(at * (1 - 1e-9)).name == "E1_0"
    four = Router([parse_node(f"E2_{i}") for i in (3, 1, 0, 2)])  # any order
    for k in (1, 2, 3):
        sigma = four.law.icdf(k / 4)
        assert float(four.law.cdf_t(torch.tensor(sigma, dtype=torch.float64))) == k / 4
        assert four(sigma).name == f"E2_{k}"
