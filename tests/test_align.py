"""The tiny encoders after contrastive training on digits: captions of one digit agree, captions
of different digits do not, and the image tower recognises held-out digits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ediff_train.data.align import clip_text_short
from ediff_train.data.manifest import read_manifest
from ediff_train.encoders import Encoders


def test_short_text_pass_equals_open_clip_full_context() -> None:
    enc = Encoders.tiny(0)
    ids = enc.clip_tokenizer(["the number 3", "a drawing of the number seven, written by hand"])
    with torch.no_grad():
        short = clip_text_short(enc.clip, ids)
        full = enc.clip.encode_text(ids)
    torch.testing.assert_close(short, full, rtol=1e-4, atol=1e-5)


def test_trained_encoders_give_wordings_of_one_digit_one_meaning(digits_root: Path) -> None:
    report = read_manifest(digits_root)["align"]
    assert report["steps"] == 300 and report["zero_shot_accuracy"] >= 0.6  # chance: 0.1
    trained, random = Encoders.load(digits_root / "encoders"), Encoders.tiny(0)
    same = ["the number 3", "a handwritten three"]
    other = ["the number 7", "a handwritten seven"]

    def cos(enc: Encoders, a: str, b: str, key: str) -> float:
        out = enc.encode_text([a, b])
        if key == "t5":
            v = [t.mean(0) for t in out["t5"]]
        else:
            v = list(out[key])
        return float(F.cosine_similarity(v[0], v[1], dim=0))

    for key in ("clip_pool", "t5"):
        for a, b in zip(same, other):
            assert cos(trained, same[0], same[1], key) > cos(trained, a, b, key) + 0.2, key
        # the random encoders do not separate them: "3" vs "7" is one byte apart
        gap_random = cos(random, *same, key) - cos(random, same[0], other[0], key)
        gap_trained = cos(trained, *same, key) - cos(trained, same[0], other[0], key)
        assert gap_trained > gap_random + 0.2, key
