"""The SR stage through the real entry points: train.py trains an SR root and two SR experts
and an SR1024-style crop model; sample.py runs Config-B- and SR1024-shaped cascades from the
16 px base; the bad inputs of a cascade or an SR stage stop with one line before any work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_CACHE, run_env
from PIL import Image

FAST = [
    "logger=none",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "monitor.every=0",
    "data.batch_size=8",
    "checkpoint_every=100",
    "probe.enabled=false",
]
# crisp-ink 32 px digits, untrained encoders (the SR stage's text path is not under test)
SR_DATA = [f"data.root={SHARED_CACHE}/digits32_stroke_a0", "data.builder.align_steps=0"]


def run(tmp: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=tmp,
        env=run_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )


def train(tmp: Path, *args: str) -> None:
    proc = run(tmp, "train.py", *FAST, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("sr")
    train(tmp, "run_dir=base", "steps=2")
    sr = ["preset=digits_sr32", "run_dir=sr", *SR_DATA]
    train(tmp, *sr, "steps=2")
    train(tmp, *sr, "expert=E1_0", "steps=1")
    train(tmp, *sr, "expert=E1_1", "steps=1", "degrade=realesrgan")  # degraded low-res
    # SR1024's recipe: 16 px crops of 32 px images, low-res 8 px (4x), aligned 4 px crops
    train(
        tmp,
        "preset=digits_sr_crops",
        "run_dir=crops",
        *SR_DATA,
        "data.image_size=32",
        "data.lowres_size=8",
        "steps=2",
    )
    return tmp


def cascade_file(tmp: Path, name: str, *stages: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text("stages:\n" + "".join(f"  - {s}\n" for s in stages))
    return path


BASE = "{name: base, run_dir: base, experts: [E0_0], steps: 2, guidance: 2.0}"


def test_config_b_style_cascade_routes_sr_steps_to_sr_experts(runs: Path) -> None:
    spec = cascade_file(
        runs,
        "b",
        BASE,
        "{name: sr, run_dir: sr, experts: [E1_0, E1_1], steps: 6, guidance: 1.0, sigma_aug: 0.05}",
    )
    proc = run(
        runs,
        "sample.py",
        f"cascade={spec}",
        "n=2",
        "out=out_b",
        'prompts=["the number 3","the number 7"]',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = dict(re.findall(r"(E1_[01]): (\d+)", proc.stdout.split("sr (")[1]))
    assert int(calls["E1_0"]) > 0 and int(calls["E1_1"]) > 0, proc.stdout
    assert int(calls["E1_0"]) + int(calls["E1_1"]) == 11  # Heun: 2 per step but the last
    sizes = {
        d.name: Image.open(next((runs / "out_b" / d.name).glob("sample_*.png"))).size
        for d in (runs / "out_b").iterdir()
        if d.is_dir() and d.name[0] != "."
    }
    assert sizes == {"base": (16, 16), "sr": (32, 32)}
    assert len(list((runs / "out_b" / "sr").glob("sample_*.png"))) == 4
    assert (runs / "out_b" / "cascade.png").is_file()


def test_crop_trained_stage_samples_whole_images_four_times_the_crop(runs: Path) -> None:
    from ediff_train.sampling.cascade import Stage, load_stages, run_cascade

    stages = load_stages(
        [
            Stage(str(runs / "base"), ["E0_0"], steps=2, name="base"),
            Stage(str(runs / "crops"), ["E0_0"], steps=2, sigma_aug=0.0, size=64, name="crops"),
        ]
    )
    assert [s.image_size for s in stages] == [16, 64] and stages[1].lowres_size == 16
    out = run_cascade(stages, ["the number 3"])
    assert [tuple(o.shape) for o in out] == [(1, 3, 16, 16), (1, 3, 64, 64)]  # 4x the 16 crop
    assert torch.isfinite(out[1]).all() and 0 <= out[1].min() and out[1].max() <= 1


@pytest.mark.parametrize(
    "stages, message",
    [
        (
            (BASE, "{run_dir: crops, experts: [E0_0], size: 32}"),
            "takes 8 px low-res images but base makes 16 px",
        ),
        (("{run_dir: sr, experts: [E0_0]}",), "first stage must be a base model"),
        ((BASE, "{run_dir: sr, experts: [E0_0], sigma_aug: -0.5}"), "sigma_aug must be"),
        ((BASE, BASE), "every stage after the first must be super-resolution"),
    ],
)
def test_bad_cascades_stop_with_one_line(runs: Path, stages: tuple[str, ...], message: str) -> None:
    spec = cascade_file(runs, "bad", *stages)
    proc = run(runs, "sample.py", f"cascade={spec}", "n=1", "out=out_bad")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list((runs / "out_bad").rglob("*.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "model=sr_tiny",
                "data=shards",
                f"data.root={SHARED_CACHE}/digits16",
                "data.image_size=32",
                "data.lowres_size=16",
            ],
            "hold 16 px images, this stage trains at 32 px",
        ),
        (["preset=digits_sr32", *SR_DATA, "data.lowres_size=12"], "does not divide"),
        (["data.lowres_size=8"], "not a super-resolution model"),
    ],
)
def test_bad_sr_stage_stops_before_training(runs: Path, args: list[str], message: str) -> None:
    proc = run(runs, "train.py", *FAST, "run_dir=bad", "steps=1", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert not list((runs / "bad").glob("*/weights.safetensors"))


def test_evaluate_sr_reports_sr_beside_bicubic(runs: Path) -> None:
    proc = run(
        runs,
        "evaluate.py",
        "run_dir=sr",
        "metric=sr",
        "sr.images=20",
        "batch_size=10",
        "steps=3",
        "sr.sigma_aug=[0.002,0.5]",
        "metrics.classifier_steps=20",
        "out=ev",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads((runs / "ev" / "sr.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert methods == ["bicubic", "SR σ_aug=0.002", "SR σ_aug=0.5"]
    assert report["images"] == 20 and report["low_res"] == 16 and report["high_res"] == 32
    for r in report["rows"]:
        assert 0 < r["psnr_db"] < 100 and r["digits_fid"] >= 0 and 0 <= r["digit_accuracy"] <= 1
    # an untrained stage is no better than bicubic: the metric can tell
    assert report["rows"][1]["psnr_db"] < report["rows"][0]["psnr_db"]
    assert (runs / "ev" / "sr_samples.png").is_file()


def test_sr_psnr_and_bicubic_baseline_against_an_independent_computation(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metric=sr in process, its PSNR inputs and the sampler's outputs recorded: every row's
    PSNR is numpy's 10·log10(1/MSE) per image, averaged, of the images it scored; the bicubic
    row scores F.interpolate(bicubic) of the very low-res the SR stage was given; that low-res
    is PIL's bicubic down-sampling of the truth (as training's loader makes it); the SR rows
    score what the sampler returned. A wrong PSNR scale, baseline or pairing fails here."""
    import numpy as np
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    import ediff_train.evaluation.sr as sr_eval

    scored: list[tuple[torch.Tensor, torch.Tensor]] = []
    generated: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_psnr, real_generate = sr_eval.psnr, sr_eval.generate

    def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        scored.append((a.clone(), b.clone()))
        return real_psnr(a, b)

    def generate(*args: object, **kwargs: object) -> torch.Tensor:
        out = real_generate(*args, **kwargs)
        generated.append((kwargs["lowres"].clone(), out.clone()))
        return out

    monkeypatch.setattr(sr_eval, "psnr", psnr)
    monkeypatch.setattr(sr_eval, "generate", generate)
    with initialize_config_dir(str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"run_dir={runs / 'sr'}",
                "metric=sr",
                "sr.images=12",
                "batch_size=6",
                "steps=2",
                "sr.sigma_aug=[0.002,0.5]",
                "metrics.classifier_steps=20",
                f"out={tmp_path}",
            ],
        )
    report = sr_eval.evaluate_sr(cfg)
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["bicubic", "SR σ_aug=0.002", "SR σ_aug=0.5"]
    assert len(scored) == 3 and len(generated) == 4  # 2 batches × 2 σ_aug levels
    for row, (images, truth) in zip(rows, scored):
        mse = ((images.double().numpy() - truth.double().numpy()) ** 2).reshape(12, -1).mean(1)
        assert row["psnr_db"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), abs=6e-4)
    truth = scored[0][1]
    assert truth.shape == (12, 3, 32, 32)
    low = torch.cat([lo for lo, _ in generated[:2]])
    assert low.shape == (12, 3, 16, 16)
    for lo, _ in generated[2:]:  # the second level sees the same inputs
        assert any(torch.equal(lo, g) for g, _ in generated[:2])
    pil = np.stack(
        [
            np.asarray(
                Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
                    (16, 16), Image.Resampling.BICUBIC
                )
            )
            for t in truth
        ]
    )
    np.testing.assert_allclose(low.permute(0, 2, 3, 1).numpy() * 255, pil, atol=1e-3)
    bicubic = F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(scored[0][0], bicubic, rtol=0, atol=1e-6)
    for k, (images, _) in enumerate(scored[1:]):
        torch.testing.assert_close(images, torch.cat([o for _, o in generated[2 * k : 2 * k + 2]]))


def test_metric_cascade_scores_every_stage_against_known_digits(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metric=cascade with the cascade's images replaced by held-out real digits: the base stage
    gets a real image of each caption's digit, the SR stage (32 px) a real image of the next
    digit, so its labels are wrong. Each stage's prompt accuracy must be the fraction
    the base data's classifier gets right on exactly those images (computed here, directly),
    ≥ 0.9 for the true digits and ≤ 0.2 for the shifted ones."""
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    import ediff_train.evaluation.sr as sr_eval
    from ediff_train.data.heldout import read_records, validation_source
    from ediff_train.metrics.digits import load_or_train, prompt_digit, records_tensor
    from ediff_train.run.weights import load_train_config

    data = load_train_config(runs / "base" / "E0_0").data
    val = validation_source(str(data.root), data.get("val_root"))
    real, labels = records_tensor(read_records(val[0]))
    bank = {d: real[labels == d] for d in range(10)}
    shown: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    def run_cascade(stages: object, prompts: list[str], seed: int = 0, **kw: object) -> list:
        digits = [prompt_digit(p) for p in prompts]
        base = torch.stack([bank[d][(seed + i) % len(bank[d])] for i, d in enumerate(digits)])
        nxt = [bank[(d + 1) % 10] for d in digits]
        other = torch.stack([b[(seed + i) % len(b)] for i, b in enumerate(nxt)])
        sr = F.interpolate(other, size=(32, 32), mode="bicubic").clamp(0, 1)
        shown.append((digits, base, sr))
        return [base, sr]

    monkeypatch.setattr(sr_eval, "run_cascade", run_cascade)
    spec = cascade_file(
        tmp_path,
        "ev",
        f"{{name: base, run_dir: {runs / 'base'}, experts: [E0_0], steps: 2}}",
        f"{{name: sr, run_dir: {runs / 'sr'}, experts: [E0_0], steps: 2, sigma_aug: 0.05}}",
    )
    # the default classifier (400 steps, cached in the digits build): 20 steps is chance
    overrides = ["metric=cascade", f"cascade={spec}", "captions.per_caption=2", "batch_size=16"]
    overrides += [f"out={tmp_path / 'ev'}"]
    with initialize_config_dir(str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        report = sr_eval.evaluate_cascade(compose("config", overrides=overrides))
    classifier = load_or_train(data.root, val[0])[0]
    want = torch.tensor([d for digits, _, _ in shown for d in digits])
    assert report["images"] == len(want) == 300  # 15 wordings × 10 digits × 2
    expected = [
        float((classifier(torch.cat([s[k] for s in shown])).argmax(1) == want).float().mean())
        for k in (1, 2)
    ]
    got = [s["prompt_accuracy"] for s in report["stages"]]
    assert got == pytest.approx(expected, abs=6e-5), (got, expected)
    assert expected[0] >= 0.9 and expected[1] <= 0.2, expected
    assert [(s["name"], s["size"]) for s in report["stages"]] == [("base", 16), ("sr", 32)]
    assert json.loads((tmp_path / "ev" / "cascade.json").read_text())["stages"] == report["stages"]


def test_evaluate_cascade_cli_end_to_end(runs: Path) -> None:
    """evaluate.py metric=cascade through the real cascade and the entry point: one accuracy per
    stage, each a whole number of the 10 images right."""
    spec = cascade_file(runs, "evc", BASE, "{name: sr, run_dir: sr, experts: [E0_0], steps: 2}")
    proc = run(
        runs,
        "evaluate.py",
        "metric=cascade",
        f"cascade={spec}",
        "captions.templates=plain",
        "captions.per_caption=1",
        "metrics.classifier_steps=20",
        "out=evc",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((runs / "evc" / "cascade.json").read_text())
    assert report["images"] == 10 and [s["size"] for s in report["stages"]] == [16, 32]
    for s in report["stages"]:
        assert round(s["prompt_accuracy"] * 10, 6) == int(round(s["prompt_accuracy"] * 10))
        assert (
            f"{s['name']} ({s['size']} px): prompt accuracy {s['prompt_accuracy']}" in proc.stdout
        )


def test_sampler_api_and_sample_cli_for_real_use(runs: Path) -> None:
    import json

    from ediff_train.sampling.pipeline import Sampler

    s = Sampler.from_run(runs / "base", ["E0_0"])
    prompts = ["the number 1", "seven", "the digit 4"]
    a = s(prompts, seed=3, steps=3, solver="dpmpp_2m", batch_size=1)
    b = s(prompts, seed=3, steps=3, solver="dpmpp_2m", batch_size=3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # an image ignores its batch
    assert not torch.allclose(a, s(prompts, seed=4, steps=3, solver="dpmpp_2m"))
    (runs / "prompts.txt").write_text("the number 1\n\nseven\n")
    proc = run(
        runs,
        "sample.py",
        "run_dir=base",
        "prompts_file=prompts.txt",
        "n=2",
        "seeds=[0,1]",
        "batch_size=3",
        "steps=2",
        "solver=euler",
        "out=real",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (0, 1):
        folder = runs / "real" / f"seed{seed}"
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["prompts"] == ["the number 1", "seven"] and settings["seed"] == seed
        assert settings["solver"] == "euler" and len(settings["files"]) == 4
        assert all((folder / f).is_file() for f in settings["files"])
        assert (folder / "grid.png").is_file()
    bad = run(runs, "sample.py", "run_dir=base", "prompts_file=missing.txt")
    assert bad.returncode == 2 and "prompts_file" in bad.stderr
