"""FID and CLIP-score primitives: the Fréchet distance against a direct scipy formula, streamed
statistics against numpy, the stats cache, the Inception loader on a random state dict of the
real architecture, and CLIP score on a tiny open_clip model trained here to tell colours apart."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ediff_train.data.toys.digits import one_thread
from ediff_train.errors import EdiffError
from ediff_train.metrics.fid import (
    FeatureStats,
    cached_stats,
    fid_from_stats,
    frechet_distance,
    stats_key,
)
from ediff_train.nn.encoder_models import clip_pixels


def _features(n: int = 500, d: int = 16, seed: int = 0) -> np.ndarray:
    """Correlated features with a non-trivial covariance (a random linear mix)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) / np.sqrt(d)) + rng.normal(size=d)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


# ------------------------------------------------------------------------------------ FID


def test_frechet_distance_matches_scipy_and_is_zero_on_itself() -> None:
    a, b = _features(seed=0), _features(seed=1)
    fa, fb = FeatureStats().update(a), FeatureStats().update(torch.from_numpy(b).float())
    got = fid_from_stats(fa, fb)
    want = _reference_fid(a, b.astype(np.float32).astype(np.float64))
    assert got > 1.0 and abs(got - want) <= 1e-6 * want
    assert fid_from_stats(fa, fa) < 1e-6 * np.trace(fa.sigma)
    # rank-deficient covariance (fewer samples than dims): still real, finite and ~0 on itself
    few = FeatureStats().update(_features(n=10, seed=2))
    assert 0.0 <= fid_from_stats(few, few) < 1e-6 * np.trace(few.sigma)
    with pytest.raises(EdiffError, match="Fréchet"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(EdiffError, match="different dims"):
        fid_from_stats(FeatureStats().update(_features(d=4)), fa)


def test_fid_grows_with_mean_shift_and_equals_shift_squared() -> None:
    base = _features(seed=3)
    ref = FeatureStats().update(base)
    direction = np.random.default_rng(4).normal(size=16)
    direction /= np.linalg.norm(direction)
    shifts = [0.25, 0.5, 1.0, 2.0, 4.0]
    fids = [fid_from_stats(ref, FeatureStats().update(base + s * direction)) for s in shifts]
    assert all(x < y for x, y in zip(fids, fids[1:]))
    assert fids == pytest.approx([s**2 for s in shifts], rel=1e-6)  # same covariance: ‖Δμ‖²


def test_streamed_stats_equal_numpy_and_merge() -> None:
    x = _features(n=257, seed=5)
    chunks = FeatureStats()
    for part in np.array_split(x, 5):
        chunks.update(torch.from_numpy(part))  # tensors and arrays are both accepted
    assert chunks.count == 257 and chunks.dim == 16
    np.testing.assert_allclose(chunks.mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chunks.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    merged = FeatureStats().update(x[:100]).merge(FeatureStats().update(x[100:]))
    np.testing.assert_allclose(merged.sigma, chunks.sigma, rtol=1e-12, atol=1e-12)
    with pytest.raises(EdiffError, match="at least 2"):
        _ = FeatureStats().update(x[:1]).sigma
    with pytest.raises(EdiffError, match="dim"):
        chunks.update(np.zeros((2, 8)))


def test_stats_save_load_round_trip_and_cache(tmp_path) -> None:
    x = _features(n=64, seed=6)
    stats = FeatureStats(meta={"extractor": "test", "images": 64}).update(x)
    path = stats.save(tmp_path / "ref.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temp file left over
    back = FeatureStats.load(path)
    assert back.count == 64 and back.meta == {"extractor": "test", "images": 64}
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.mu, stats.mu)
    calls = []

    def compute() -> FeatureStats:
        calls.append(1)
        return FeatureStats(meta={"n": len(calls)}).update(x)

    cache = tmp_path / "cache" / "abc.npz"
    first = cached_stats(cache, compute)
    second = cached_stats(cache, compute)
    assert len(calls) == 1 and second.meta == {"n": 1} and fid_from_stats(first, second) < 1e-9
    cache.write_bytes(b"not an npz")  # a corrupt cache is recomputed, not an error
    assert cached_stats(cache, compute).meta == {"n": 2} and len(calls) == 2
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(EdiffError, match="cannot read feature stats"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_stats_key_tracks_extractor_files_and_order(tmp_path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"22")
    key = stats_key("inception", [str(a), str(b)])
    assert len(key) == 16 and key == stats_key("inception", [str(b), str(a)])
    assert key != stats_key("other-extractor", [str(a), str(b)])
    assert stats_key("x", ["shard-0", "n=500"]) != stats_key("x", ["shard-0", "n=600"])
    b.write_bytes(b"333")  # edited reference data → new key
    assert key != stats_key("inception", [str(a), str(b)])


# ------------------------------------------------------------------------------ Inception


def test_missing_inception_weights_name_the_option(tmp_path) -> None:
    from ediff_train.metrics.inception import InceptionFeatures

    with pytest.raises(EdiffError) as e:
        InceptionFeatures(tmp_path / "nope.pth")
    msg = str(e.value)
    assert "\n" not in msg and "metrics.inception_weights=" in msg
    assert msg.endswith(f"(file not found: {tmp_path / 'nope.pth'})")
    with pytest.raises(EdiffError, match=r"metrics\.inception_weights=.*\(not set\)$"):
        InceptionFeatures(None)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not torch")
    with pytest.raises(EdiffError, match="cannot read Inception weights"):
        InceptionFeatures(junk)


def test_inception_loads_a_local_state_dict_and_rounds_to_uint8(tmp_path, monkeypatch) -> None:
    """The real architecture and loading path, with random weights (the real file is not here):
    build torch-fidelity's extractor with its loading stubbed out, save its state dict (fp16,
    48 MB), then load it through InceptionFeatures."""
    tfi = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from ediff_train.metrics.inception import InceptionFeatures

    with monkeypatch.context() as m:
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})  # never downloads
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = tfi.FeatureExtractorInceptionV3("x", ["2048"])
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "inception.pth")
    del net, state

    inc = InceptionFeatures(tmp_path / "inception.pth")
    assert "inception-v3-compat" in inc.name and "299" in inc.name
    grid = torch.randint(0, 256, (2, 3, 24, 20), generator=torch.Generator().manual_seed(0)) / 255
    below = (grid - 0.4 / 255).clamp(0, 1)  # rounds back to the grid; truncation would not
    with one_thread():
        out = inc(torch.cat([grid, below]))
        assert out.shape == (4, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert torch.equal(out[:2], out[2:]) and not torch.equal(out[0], out[1])
        assert torch.equal(out[:1], inc((grid[:1] * 255).round().to(torch.uint8)))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(EdiffError, match="not torch-fidelity's Inception"):
        InceptionFeatures(tmp_path / "other.pth")


# ----------------------------------------------------------------------------- CLIP score

TINY = dict(
    embed_dim=16,
    vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=4, image_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=1),
)
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.9, 0.9, 0.1),
}
CAPTIONS = [f"a {c} square" for c in COLOURS]
STEPS = 150


def _squares(labels: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Grey noisy background with one coloured square of random size and place."""
    n = len(labels)
    x = 0.45 + 0.1 * torch.rand(n, 3, size, size, generator=gen)
    rgb = torch.tensor(list(COLOURS.values()))[labels]
    for i in range(n):
        s = int(torch.randint(size // 3, size // 2 + 1, (), generator=gen))
        top, left = (int(v) for v in torch.randint(0, size - s + 1, (2,), generator=gen))
        x[i, :, top : top + s, left : left + s] = rgb[i].view(3, 1, 1)
    return x


def _first_of(labels: torch.Tensor) -> torch.Tensor:
    """Text→image targets for the symmetric half of CLIP's loss: for each caption, the first
    image of its colour in the batch."""
    return (labels.view(1, -1) == torch.arange(4).view(-1, 1)).float().argmax(1)


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A tiny open_clip CLIP trained for a few seconds to match colours to their captions."""
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(**TINY).train()
    model.token_embedding.requires_grad_(False)  # skips Adam on 49,408 rows; the rest learns
    ids = SimpleTokenizer(context_length=77)(CAPTIONS)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    with one_thread():
        for _ in range(STEPS):
            labels = torch.randperm(32, generator=gen) % 4  # 8 of each colour
            pixels = clip_pixels(model, _squares(labels, 16, gen))
            img = F.normalize(model.encode_image(pixels), dim=-1)
            txt = F.normalize(model.encode_text(ids), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, _first_of(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


def test_clip_score_ranks_matching_captions_first(clip_checkpoint) -> None:
    from ediff_train.metrics.clip_score import CLIPScorer

    scorer = CLIPScorer("tiny", clip_checkpoint, config=TINY)
    assert scorer.name == "open_clip tiny (tiny_clip.pt)"
    labels = torch.arange(4).repeat(6)
    images = _squares(labels, 32, torch.Generator().manual_seed(99))  # resized to 16 inside
    right = [CAPTIONS[k] for k in labels]
    wrong = [CAPTIONS[(k + 1 + j % 3) % 4] for j, k in enumerate(labels.tolist())]
    with one_thread():
        s_right, s_wrong = scorer.score(images, right, batch_size=5), scorer.score(images, wrong)
        cos, cos_wrong = scorer.cosine(images, right), scorer.cosine(images, wrong)
        sims = scorer.image_embeddings(images) @ scorer.text_embeddings(CAPTIONS).T  # [24, 4]
    assert s_right.shape == (24,) and (s_right >= 0).all() and (s_right <= 100).all()
    assert s_right.mean() > s_wrong.mean() + 30  # ≈ 89 vs 14 when trained as above
    torch.testing.assert_close(100 * cos.clamp(min=0), s_right)
    assert cos_wrong.min() < -0.1 and torch.equal(s_wrong, 100 * cos_wrong.clamp(min=0))
    assert (sims.argmax(1) == labels).float().mean() >= 0.9
    with pytest.raises(EdiffError, match="captions"):
        scorer.score(images, right[:3])


def test_missing_clip_checkpoint_names_the_option(tmp_path) -> None:
    from ediff_train.metrics.clip_score import CLIPScorer

    for ckpt, tail in (
        (tmp_path / "none.pt", f"(file not found: {tmp_path / 'none.pt'})"),
        (None, "(not set)"),
    ):
        with pytest.raises(EdiffError) as e:
            CLIPScorer("ViT-g-14", ckpt)
        msg = str(e.value)
        assert "\n" not in msg and "metrics.clip_checkpoint=" in msg and msg.endswith(tail)
        assert "metrics.clip_model=" in msg


def test_clip_pixels_match_open_clip_preprocess() -> None:
    """Same pixels as open_clip's own eval transform (PIL bicubic) up to uint8 rounding."""
    from open_clip.model import CLIP, get_model_preprocess_cfg
    from open_clip.transform import image_transform
    from PIL import Image

    model = CLIP(**TINY)
    cfg = get_model_preprocess_cfg(model)
    noise = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(3))  # aliasing shows
    u8 = (noise * 255).round().to(torch.uint8)
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy())
    ref = image_transform(16, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"))(pil)
    ours = clip_pixels(model, u8[None].float() / 255)[0]
    assert ours.shape == ref.shape == (3, 16, 16)
    # measured 0.013 (≈ 1/255 of the pixel range); no antialias 1.4, bilinear 0.4, area 0.6
    assert (ours - ref).abs().max() < 0.03
