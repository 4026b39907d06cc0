"""Where to split (issue 33): `ediff-advise` against closed forms and known answers.

The optimal denoiser of two points is tanh(x/σ²); the affinity of a band with itself is 1, and
a one-parameter denoiser θ·x, whose loss gradient changes sign where θ crosses the optimum
m2/(m2+σ²), pulls low and high σ exactly apart (cosine −1); the clustering's optimum equals a
brute-force search; Spearman's ρ equals scipy's; the picture shows the matrix and its lines."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_CACHE, train_in_process
from torch import nn

from ediff_train.advise.advice import band_command, candidates, recommend
from ediff_train.advise.affinity import affinity_matrix, bin_gradients, cosine_matrix
from ediff_train.advise.bins import Bins, node_bins
from ediff_train.advise.intervals import best_partition, partition_score
from ediff_train.advise.optimal import denoiser_similarity, optimal_denoiser
from ediff_train.advise.run import spearman
from ediff_train.cli.advise import main as advise_main
from ediff_train.core.edm import LogNormalSigma
from ediff_train.core.experts import parse_node
from ediff_train.errors import EdiffError

LAW = LogNormalSigma()


# ---- closed forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_optimal_denoiser_of_two_points_is_tanh(sigma: float) -> None:
    """y ∈ {−1, +1} equally likely: E[y | x] = tanh(x/σ²)."""
    data = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    got = optimal_denoiser(x, sigma, data)
    assert torch.allclose(got, torch.tanh(x / sigma**2), atol=1e-12)


def test_denoiser_similarity_is_one_for_the_same_sigma_and_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.randn(40, 3, 4, 4, generator=g)
    sim = denoiser_similarity(data, [0.1, 0.5, 0.5, 4.0], inputs=12)
    assert np.allclose(sim, sim.T)
    assert sim[1, 2] == pytest.approx(1.0, abs=1e-12)  # two bins at one σ: one function
    assert np.allclose(np.diag(sim), 1.0)
    assert sim[0, 3] < sim[1, 2]


class Scale(nn.Module):
    """D(x) = θ·x: its loss gradient at θ is negative where θ < m2/(m2 + σ²), positive above."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: object) -> torch.Tensor:
        return self.theta * x

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)


def _batches(digits_root: Path, n: int = 2) -> list[dict]:
    from ediff_train.data.datamodule import ShardDataModule

    dm = ShardDataModule(str(digits_root), batch_size=32, image_size=16, num_workers=0)
    return dm.val_batches(n)


def test_gradient_affinity_has_the_sign_the_optimum_predicts(digits_root: Path) -> None:
    batches = _batches(digits_root)
    m2 = float(torch.cat([b["image"] for b in batches]).pow(2).mean())
    # bins 0–1 at σ ≤ 0.05 (optimum ≈ 1), bins 3–4 at σ ≥ 4 (optimum ≤ m2/16): θ between
    edges = tuple(LAW.cdf(s) for s in (0.02, 0.035, 0.05, 4.0, 6.0, 9.0))
    bins = Bins(edges, LAW)
    theta = 0.5 * (1.0 + m2 / (m2 + 16.0))
    a = affinity_matrix(Scale(theta), batches, bins)
    assert np.allclose(np.diag(a), 1.0, atol=1e-12)
    for i, j in [(0, 1), (3, 4)]:
        assert a[i, j] == pytest.approx(1.0, abs=1e-12)
    for i, j in [(0, 3), (0, 4), (1, 3), (1, 4)]:
        assert a[i, j] == pytest.approx(-1.0, abs=1e-12)
    # and the gradient of bin 0 is the hand-summed one over the batches (negative: θ too small)
    assert float(bin_gradients(Scale(theta), batches, bins)[0, 0]) < 0


def test_cosine_matrix_of_known_rows() -> None:
    rows = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]])
    got = cosine_matrix(rows)
    assert got[0, 1] == pytest.approx(2**-0.5) and got[0, 3] == pytest.approx(-1.0)
    assert got[2, 2] == 1.0 and got[2, 0] == 0.0


# ---- interval clustering ------------------------------------------------------------------------
def test_clustering_finds_the_blocks_of_a_hand_made_matrix() -> None:
    a = np.full((6, 6), -0.2)
    for lo, hi in [(0, 3), (3, 5), (5, 6)]:
        a[lo:hi, lo:hi] = 0.9
    np.fill_diagonal(a, 1.0)
    starts, score = best_partition(a, 3)
    assert starts == [3, 5]
    assert score == pytest.approx((1 + 2 * 0.9) + (1 + 0.9) + 1.0)
    assert best_partition(a, 2)[0] == [3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_equals_a_brute_force_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.uniform(-1, 1, (7, 7))
    a = (m + m.T) / 2
    for k in (2, 3, 4):
        brute = max(
            (partition_score(a, list(c)), list(c))
            for c in itertools.combinations(range(1, 7), k - 1)
        )
        starts, score = best_partition(a, k)
        assert score == pytest.approx(brute[0]) and starts == brute[1]


def test_spearman_equals_scipy() -> None:
    from scipy.stats import spearmanr

    x = [0.1, 0.4, 0.4, 0.2, 0.9, -0.3]
    y = [1.0, 3.0, 2.0, 2.0, 5.0, 0.0]
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman([1.0, 1.0], [0.0, 2.0]) is None


# ---- bins, candidates, commands -----------------------------------------------------------------
def test_bins_are_equal_probability_slices_of_the_node() -> None:
    bins = node_bins(parse_node("E1_0"), 4)
    assert bins.edges == pytest.approx((0.0, 0.125, 0.25, 0.375, 0.5))
    assert bins.sigma_edges[-1] == pytest.approx(LAW.icdf(0.5))
    with pytest.raises(EdiffError, match=r"σ range \[2, 5\] is not inside node E1_0's band"):
        node_bins(parse_node("E1_0"), 4, (2.0, 5.0))


def test_band_commands_name_tree_children_where_they_exist() -> None:
    root = parse_node("E0_0")
    bins = node_bins(root, 4)
    assert band_command(bins, 2, 4, root) == "expert=E1_1"
    assert band_command(bins, 1, 2, root) == "expert=E2_1"
    assert band_command(node_bins(parse_node("E1_1"), 4), 0, 2, parse_node("E1_1")) == (
        "expert=E2_2"
    )
    assert band_command(bins, 1, 3, root).startswith("expert=interval expert.u_lo=0.25 ")


def test_candidates_and_the_recommendation_follow_the_prediction() -> None:
    a = np.full((4, 4), 0.9)
    a[:2, 2:] = a[2:, :2] = -0.5  # the halves pull apart
    np.fill_diagonal(a, 1.0)
    cands = candidates(a, None, [0.0, 0.0, 0.2, 0.2], 2, level=0)
    assert [c.name for c in cands] == ["tree E1 / affinity DP k=2"]
    (c,) = cands
    assert [b["across"] for b in c.bands] == [pytest.approx(-0.5)] * 2
    assert c.gain == pytest.approx(0.5 * 0.2)  # half the bins gain 20 % × (1 − max(−0.5, 0))
    best, text = recommend(cands, threshold=0.05)
    assert best is c and text.startswith("split as tree E1")
    assert recommend(cands, threshold=0.2)[0] is None


def test_the_picture_shows_the_matrices_and_the_splits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ediff_train.advise import picture

    shown = {}
    monkeypatch.setattr(picture, "_save", lambda plt, fig, path: shown.setdefault("fig", fig))
    bins = node_bins(parse_node("E0_0"), 4)
    a = np.arange(16.0).reshape(4, 4) / 16
    picture.matrix_picture([("gradient affinity (cos)", a)], bins, [2], [1], tmp_path / "m.png")
    ax = shown["fig"].axes[0]
    assert np.array_equal(ax.images[0].get_array(), a)
    assert ax.get_title() == "gradient affinity (cos)" and ax.get_xlabel() == "σ bin (median σ)"
    v = {
        (ln.get_linestyle(), ln.get_xdata()[0])
        for ln in ax.lines
        if ln.get_xdata()[0] == ln.get_xdata()[1]
    }
    assert v == {("--", 1.5), ("-", 0.5)}
    assert [t.get_text() for t in ax.get_xticklabels()][0] == f"{bins.sigma_mid[0]:.3g}"


# ---- the command on a trained node --------------------------------------------------------------
@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv("EDIFF_CACHE", str(SHARED_CACHE))
    run = tmp_path_factory.mktemp("advise") / "R"
    train_in_process(
        f"run_dir={run}",
        "steps=4",
        "logger=none",
        "data.num_workers=0",
        "sample.per_prompt=0",
        "data.batch_size=16",
        "monitor.every=0",
        "probe.enabled=false",
        "model.model_channels=8",
        "model.head_channels=8",
    )
    yield run / "E0_0"
    mp.undo()


def test_advise_writes_consistent_advice(node: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "adv"
    rc = advise_main(
        [
            str(node),
            "--bins",
            "4",
            "--max-bands",
            "2",
            "--images",
            "32",
            "--batch-size",
            "16",
            "--probe-steps",
            "2",
            "--validate",
            "2",
            "--validate-steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    rep = json.loads((out / "advice.json").read_text())
    assert np.allclose(np.diag(rep["affinity"]), 1.0)
    room = rep["headroom"]
    assert room["headroom"] == pytest.approx(
        [(b - w) / b for b, w in zip(room["base"], room["wide"])]
    )
    assert room["wide_model"]["model_channels"] == 16  # twice the node's 8
    names = [c["name"] for c in rep["candidates"]]
    assert any(n.startswith("tree E1") for n in names)
    val = rep["validation"]
    assert [r["bins"] for r in val["bands"]] == [[0, 2], [2, 4]]
    for r in val["bands"]:
        assert r["gap"] == pytest.approx((r["shared"] - r["specialist"]) / r["shared"])
    assert rep["recommendation"] in text and "Spearman" in text
    assert (out / "affinity.png").is_file() and (out / "validation.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bins", "4", "--max-bands", "5"], "--max-bands 5 needs 2 ≤ bands ≤ --bins (4)"),
        (["--sigma-range", "0", "1"], "σ range [0, 1] is not inside node E0_0's band"),
        (["--bins", "4", "--validate", "3"], "--validate 3 must divide --bins 4"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    node: Path, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    out = tmp_path / "adv"
    assert advise_main([str(node), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_a_node_without_weights_or_other_codec_shards_is_refused(
    node: Path, tmp_path: Path, digits_root: Path, capsys
) -> None:
    empty = tmp_path / "E0_0"
    empty.mkdir()
    shutil.copy(node / "config.yaml", empty / "config.yaml")
    assert advise_main([str(empty), "--out", str(tmp_path / "a")]) == 2
    assert "has no weights.safetensors" in capsys.readouterr().err
    other = tmp_path / "latent"
    shutil.copytree(digits_root, other, ignore=shutil.ignore_patterns("*.tar"))
    for manifest in (other / "manifest.json", other / "val" / "manifest.json"):
        m = json.loads(manifest.read_text())
        m["codec"] = {"class": "VAECodec", "channels": 4, "factor": 4}
        manifest.write_text(json.dumps(m))
    args = [str(node), "--data", str(other), "--out", str(tmp_path / "b"), "--probe-steps", "0"]
    assert advise_main(args) == 2
    err = capsys.readouterr().err
    assert "do not fit the codec: they hold VAE latents" in err and not (tmp_path / "b").exists()
