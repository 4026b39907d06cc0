"""Encoders: tiny ones are deterministic and round-trip through save/load; T5 states are unpadded;
CLIP token states come from the same pass as the pooled embedding; and the local-path loading
used for T5-XXL / CLIP-L works on small models saved the way users' checkpoints are."""

from __future__ import annotations

import json

import pytest
import torch

from ediff_train.errors import EdiffError
from ediff_train.nn.encoder_models import TINY_CLIP, tiny_clip, tiny_t5
from ediff_train.nn.encoders import Encoders, build_encoders

CAPTIONS = ["7", "a photo of the digit seven, drawn carefully by hand on paper", "the number 3"]
TINY_DIMS = {"t5": 32, "clip_txt": 32, "clip_pool": 24, "clip_img": 24}


@pytest.fixture(scope="module")
def enc() -> Encoders:
    return Encoders.tiny(seed=0)


def _images(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _same(a: dict, b: dict) -> bool:
    return (
        len(a["t5"]) == len(b["t5"])
        and all(torch.equal(x, y) for x, y in zip(a["t5"], b["t5"]))
        and torch.equal(a["clip_txt"], b["clip_txt"])
        and torch.equal(a["clip_pool"], b["clip_pool"])
    )


def test_tiny_encoders_are_deterministic_and_leave_global_rng_alone(enc: Encoders) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = Encoders.tiny(seed=0)
    assert torch.equal(torch.rand(3), expected)  # building did not consume the global RNG
    assert _same(enc.encode_text(CAPTIONS), other.encode_text(CAPTIONS))
    assert torch.equal(enc.encode_image(_images()), other.encode_image(_images()))
    assert enc.manifest_entry() == other.manifest_entry()
    seed1 = Encoders.tiny(seed=1)
    assert seed1.fingerprint("t5") != enc.fingerprint("t5")
    assert seed1.fingerprint("clip") != enc.fingerprint("clip")


def test_dims_and_shapes(enc: Encoders) -> None:
    assert enc.dims == TINY_DIMS
    out = enc.encode_text(CAPTIONS)
    assert out["clip_txt"].shape == (3, 77, 32) and out["clip_pool"].shape == (3, 24)
    assert all(t.dtype == torch.float32 and t.shape[1] == 32 for t in out["t5"])
    assert enc.encode_image(_images()).shape == (3, 24)
    assert enc.encode_text([])["clip_txt"].shape == (0, 77, 32)
    with pytest.raises(EdiffError):
        enc.encode_text("one string")
    with pytest.raises(EdiffError):
        enc.encode_image(torch.rand(2, 1, 16, 16))


def test_t5_keeps_exactly_the_real_tokens(enc: Encoders) -> None:
    out = enc.encode_text(CAPTIONS)
    # ByT5: one token per UTF-8 byte, plus EOS; nothing for padding.
    assert [t.shape[0] for t in out["t5"]] == [len(c.encode()) + 1 for c in CAPTIONS]
    # The short caption padded inside a batch equals the caption encoded alone: the mask is used.
    alone = enc.encode_text(["7"])["t5"][0]
    torch.testing.assert_close(out["t5"][0], alone, rtol=1e-5, atol=1e-5)
    long = enc.encode_text(["x" * 300])["t5"][0]
    assert long.shape[0] == enc.t5_max_length == 113


def test_different_captions_differ(enc: Encoders) -> None:
    out = enc.encode_text(["the number 3", "the number 8"])
    assert not torch.allclose(out["t5"][0], out["t5"][1], atol=1e-3)
    assert not torch.allclose(out["clip_pool"][0], out["clip_pool"][1], atol=1e-3)
    assert not torch.allclose(out["clip_txt"][0], out["clip_txt"][1], atol=1e-3)
    img = enc.encode_image(_images(2))
    assert not torch.allclose(img[0], img[1], atol=1e-3)


def test_clip_tokens_are_the_pre_pooled_states(enc: Encoders) -> None:
    out = enc.encode_text(CAPTIONS)
    ids = enc.clip_tokenizer(CAPTIONS)
    with torch.no_grad():
        pooled = enc.clip.encode_text(ids)
    torch.testing.assert_close(out["clip_pool"], pooled)
    # Pooling = the EOT token's state (highest id) times the text projection.
    eot = out["clip_txt"][torch.arange(3), ids.argmax(-1)]
    torch.testing.assert_close(eot @ enc.clip.text_projection, pooled, rtol=1e-4, atol=1e-5)


def test_encode_image_resizes_and_matches_manual_preprocessing(enc: Encoders) -> None:
    x = _images(2, 16)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        manual = enc.clip.encode_image((x - mean) / std)
    torch.testing.assert_close(enc.encode_image(x), manual)
    assert enc.encode_image(_images(2, 40)).shape == (2, 24)  # resized and centre-cropped


def test_save_load_round_trip(enc: Encoders, tmp_path) -> None:
    enc.save(tmp_path / "enc")
    info = json.loads((tmp_path / "enc" / "encoders.json").read_text())
    assert info["kind"] == "tiny" and (tmp_path / "enc" / "clip.safetensors").is_file()
    back = Encoders.load(tmp_path / "enc")
    assert _same(enc.encode_text(CAPTIONS), back.encode_text(CAPTIONS))
    assert torch.equal(enc.encode_image(_images()), back.encode_image(_images()))
    assert back.manifest_entry() == enc.manifest_entry()
    via_factory = build_encoders("tiny", path=tmp_path / "enc", dims=TINY_DIMS)
    assert via_factory.fingerprint("t5") == enc.fingerprint("t5")
    with pytest.raises(EdiffError, match="dims"):
        build_encoders("tiny", path=tmp_path / "enc", dims={**TINY_DIMS, "t5": 4096})
    with pytest.raises(EdiffError, match="no saved encoders"):
        Encoders.load(tmp_path / "missing")


def test_pretrained_path_loads_local_t5_folder_and_open_clip_checkpoint(enc, tmp_path) -> None:
    """The code path of T5-XXL + CLIP-L, fed a tiny T5 saved with save_pretrained and a tiny
    open_clip state dict (torch .pt, loaded weights-only) under a registered model config."""
    import open_clip

    t5, tok = tiny_t5(seed=0)
    t5.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    torch.save(tiny_clip(seed=0).state_dict(), tmp_path / "clip.pt")
    cfgs = tmp_path / "cfgs"
    cfgs.mkdir()
    (cfgs / "ediff-test-tiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfgs)

    pre = build_encoders(
        "pretrained",
        t5_path=tmp_path / "t5",
        clip_model="ediff-test-tiny",
        clip_checkpoint=tmp_path / "clip.pt",
        t5_max_length=113,
        dims=TINY_DIMS,
    )
    assert _same(pre.encode_text(CAPTIONS), enc.encode_text(CAPTIONS))
    assert torch.equal(pre.encode_image(_images()), enc.encode_image(_images()))
    entry = pre.manifest_entry()
    assert entry["t5"]["name"] == "t5" and entry["clip"]["name"] == "ediff-test-tiny"
    assert entry["t5"]["fingerprint"] == enc.fingerprint("t5")
    # Saving pretrained encoders records their paths; loading goes back through them.
    pre.save(tmp_path / "saved")
    assert not (tmp_path / "saved" / "clip.safetensors").exists()
    assert _same(Encoders.load(tmp_path / "saved").encode_text(CAPTIONS), enc.encode_text(CAPTIONS))


def test_pretrained_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(EdiffError, match="t5_path"):
        build_encoders("pretrained", clip_model="ViT-L-14", clip_checkpoint="x.pt")
    with pytest.raises(EdiffError, match="no T5 model"):
        build_encoders(
            "pretrained", t5_path=tmp_path, clip_model="ViT-L-14", clip_checkpoint=tmp_path / "x.pt"
        )
    t5, tok = tiny_t5()
    t5.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    with pytest.raises(EdiffError, match="does not exist"):
        build_encoders(
            "pretrained",
            t5_path=tmp_path / "t5",
            clip_model="ViT-L-14",
            clip_checkpoint=tmp_path / "missing.pt",
        )
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(EdiffError, match="unknown open_clip model"):
        build_encoders(
            "pretrained",
            t5_path=tmp_path / "t5",
            clip_model="ViT-Q-99",
            clip_checkpoint=tmp_path / "w.pt",
        )
    with pytest.raises(EdiffError, match="kind"):
        build_encoders("huge")


def test_bf16_runs_and_keeps_the_fingerprint(enc: Encoders) -> None:
    """Half precision is how T5-XXL runs on GPUs; outputs stay float32 and the fingerprint
    names the checkpoint, not the compute dtype."""
    half = Encoders.tiny(seed=0, dtype="bf16")
    a, b = enc.encode_text(CAPTIONS), half.encode_text(CAPTIONS)
    assert b["clip_pool"].dtype == torch.float32 and b["t5"][1].dtype == torch.float32
    torch.testing.assert_close(b["clip_pool"], a["clip_pool"], atol=0.1, rtol=0.05)
    torch.testing.assert_close(b["t5"][1], a["t5"][1], atol=0.15, rtol=0.05)
    assert half.manifest_entry() == enc.manifest_entry()
