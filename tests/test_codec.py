"""Latent space (docs/latent.md): the VAE codec against diffusers called directly, latents in the
shards with the manifest's record, the codec mismatches refused in one line through the real
train CLI before step 1, and a latent run data prep → train → sample → evaluate end to end."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_env
from PIL import Image

from ediff_train.data.datamodule import ShardDataModule, check_codec
from ediff_train.data.manifest import read_manifest
from ediff_train.data.toys.digits import build_digits, digit_images
from ediff_train.errors import EdiffError
from ediff_train.nn.codec import PIXEL_SPEC, PixelCodec, VAECodec, codec_mismatch

SCALE, SHIFT = 0.7, 0.1
VAE_TARGET = "ediff_train.nn.codec.VAECodec"


def tiny_vae(folder: Path, seed: int = 0) -> Path:
    """A random 2-level AutoencoderKL (factor 2, 4 latent channels), saved to `folder`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
        mid_block_add_attention=False,
    ).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vaes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("vaes")
    return tiny_vae(tmp / "vae"), tiny_vae(tmp / "other", seed=1)


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=run_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_vae_codec_is_diffusers_with_scaling_and_shift(vaes: tuple[Path, Path]) -> None:
    from diffusers import AutoencoderKL

    codec = VAECodec(vaes[0], channels=4, downsample=2)
    vae = AutoencoderKL.from_pretrained(str(vaes[0])).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want_z = (vae.encode(x).latent_dist.mean - SHIFT) * SCALE
        z = codec.encode(x, batch_size=2)  # batches must not change the answer
        want_x = vae.decode(z / SCALE + SHIFT).sample
    assert z.shape == (3, 4, 8, 8)
    torch.testing.assert_close(z, want_z, rtol=0, atol=1e-6)
    torch.testing.assert_close(codec.decode(z), want_x, rtol=0, atol=1e-6)
    spec = codec.spec()
    assert (spec["channels"], spec["factor"], spec["scaling_factor"], spec["shift_factor"]) == (
        4,
        2,
        SCALE,
        SHIFT,
    )
    other = VAECodec(vaes[1]).spec()  # same config, other weights
    assert other["config_hash"] == spec["config_hash"]
    assert other["fingerprint"] != spec["fingerprint"]
    with pytest.raises(EdiffError, match=r"^codec.channels=8 but the VAE .* has 4 \(set"):
        VAECodec(vaes[0], channels=8)
    with pytest.raises(EdiffError, match="codec.path: no AutoencoderKL at"):
        VAECodec(vaes[0] / "missing")


def test_codec_mismatch_names_the_difference(vaes: tuple[Path, Path]) -> None:
    a, b = VAECodec(vaes[0]).spec(), VAECodec(vaes[1]).spec()
    assert codec_mismatch(a, {**a, "path": "/copied/elsewhere"}) is None
    assert codec_mismatch(PIXEL_SPEC, PixelCodec().spec()) is None
    assert "encoded by another VAE" in str(codec_mismatch(a, b))
    assert "hold VAE latents but the config's codec is pixel" in str(codec_mismatch(a, PIXEL_SPEC))
    assert "hold pixel images but the config's codec is vae" in str(codec_mismatch(PIXEL_SPEC, a))
    assert "scaling_factor (0.7 vs 0.5)" in str(codec_mismatch(a, {**a, "scaling_factor": 0.5}))
    with pytest.raises(EdiffError, match="latent shards|do not fit the codec"):
        check_codec({"codec": a}, "R", None, 16)  # latent shards under codec=pixel
    assert check_codec({"codec": a}, "R", a, 16) == (4, 8, 8)


def _members(tar: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = t.extractfile(m).read()  # type: ignore[union-attr]
    return out


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory: pytest.TempPathFactory, vaes: tuple[Path, Path]) -> Path:
    """40 digits embedded by the real data_prep CLI with codec=vae."""
    tmp = tmp_path_factory.mktemp("embed")
    images, labels = digit_images(16)
    (tmp / "in" / "img").mkdir(parents=True)
    lines = []
    for i in range(40):
        Image.fromarray(images[i]).save(tmp / "in" / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": f"the number {labels[i]}"}))
    (tmp / "in" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    proc = _run(
        tmp,
        str(ROOT / "data_prep" / "embed.py"),
        "input=in",
        "output=out",
        "stage.size=16",
        "stage.min_side=8",
        "stage.format=png",
        "unit_size=20",
        "workers=0",
        "progress=false",
        "codec=vae",
        f"codec.path={vaes[0]}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def test_data_prep_writes_latents_and_the_vae_spec(
    latent_shards: Path, vaes: tuple[Path, Path]
) -> None:
    codec = VAECodec(vaes[0])
    manifest = read_manifest(latent_shards)
    assert manifest["codec"] == codec.spec()
    assert manifest["num_samples"] == 40 and len(manifest["shards"]) == 2
    sample = next(iter(_members(latent_shards / "000000.tar").values()))
    latent = np.load(io.BytesIO(sample["latent.npy"]))
    png = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    pixels = torch.from_numpy(png.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert latent.dtype == np.float16 and latent.shape == (4, 8, 8)
    np.testing.assert_allclose(latent, codec.encode(pixels)[0].numpy(), atol=2e-3, rtol=2e-3)
    # the loader yields the stored latents as the model input, pixels not decoded
    dm = ShardDataModule(str(latent_shards), 8, 16, num_workers=0, codec=codec.spec())
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))
    assert first["image"].shape == (8, 4, 8, 8) and first["image"].dtype == torch.float32
    stored = {}
    for tar in sorted(manifest["shards"]):
        for key, m in _members(latent_shards / tar).items():
            stored[key] = np.load(io.BytesIO(m["latent.npy"])).astype(np.float32)
    for key, z in zip(first["key"], first["image"]):
        np.testing.assert_array_equal(z.numpy(), stored[key])
    with pytest.raises(EdiffError, match="hold VAE latents but the config's codec is pixel"):
        ShardDataModule(str(latent_shards), 8, 16, num_workers=0).setup("fit")


@pytest.mark.slow
def test_codec_mismatches_stop_train_before_step_one(
    latent_shards: Path, vaes: tuple[Path, Path], tmp_path: Path
) -> None:
    base = [
        str(ROOT / "train.py"),
        "data=shards",
        f"data.root={latent_shards}",
        "data.image_size=16",
        "data.num_workers=0",
        "logger=none",
        "steps=1",
        "run_dir=R",
        "codec=vae",
    ]
    other = _run(tmp_path, *base, f"codec.path={vaes[1]}")
    channels = _run(tmp_path, *base, f"codec.path={vaes[0]}", "model.in_channels=3")
    for proc, want in (
        (other, "do not fit the codec: they were encoded by another VAE"),
        (channels, "model.in_channels=3 does not fit codec VAECodec (4 channels"),
    ):
        assert proc.returncode != 0
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") and want in lines[-1], proc.stderr[-2000:]
        assert sum(ln.startswith("error: ") for ln in lines) == 1
    # nothing of the run was written: a refused command removes even Hydra's own record and the
    # node folder it made (training/guard.py)
    assert not (tmp_path / "R" / "E0_0").exists()


OWN = {"_target_": VAE_TARGET, "path": None, "channels": 4, "downsample": 2}
DIGITS = {"align_steps": 0, "val_size": 64, "codec": OWN, "vae_steps": 2}


@pytest.fixture(scope="module")
def own_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The latent digits set with its own VAE (codec.path null), as train.py builds it."""
    return build_digits(tmp_path_factory.mktemp("digits") / "D", **DIGITS)  # type: ignore[arg-type]


def test_digits_builds_its_own_vae_beside_the_data(own_digits: Path) -> None:
    """codec=vae without a path: a small VAE trained on the training split, saved in root/vae,
    recorded in the manifest, normalised to σ_data = 0.5 and used for every sample's latent."""
    from ediff_train.data.toys.digits import split_indices

    root = own_digits
    vae = VAECodec(root / "vae", channels=4, downsample=2)
    m, val = read_manifest(root), read_manifest(root / "val")
    assert m["codec"] == val["codec"] == {**vae.spec(), "path": str(root / "vae")}
    assert m["vae"]["steps"] == 2 and m["params"]["codec"]["own_vae"]["steps"] == 2
    assert build_digits(root, **DIGITS) == root  # cached: found, not rebuilt  # type: ignore[arg-type]
    # shift = the training latents' mean, scale = 0.5 / their std: a known answer
    images, _ = digit_images(16)
    train, _ = split_indices(len(images), 0, 64)
    x = torch.from_numpy(images[train]).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(x, batch_size=512)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 0.5) < 1e-4
    sample = next(iter(_members(root / sorted(m["shards"])[0]).values()))
    png = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    pixels = torch.from_numpy(png.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    np.testing.assert_allclose(
        np.load(io.BytesIO(sample["latent.npy"])),
        vae.encode(pixels)[0].numpy(),
        atol=2e-3,
        rtol=2e-3,
    )


@pytest.mark.slow
def test_latent_digits_train_sample_evaluate(own_digits: Path, tmp_path: Path) -> None:
    """The latent digits set → train.py codec=vae → sample.py → evaluate.py (metric=all): the
    sampler's PNGs are the diffusers VAE's decoding of the latents the expert sampled, the
    evaluation scores decoded 16 px images and measures loss-by-σ in latent space."""
    from diffusers import AutoencoderKL

    from ediff_train.run.weights import load_encoders, load_expert, load_train_config
    from ediff_train.sampling.generation import embed_prompts, generate, image_noise

    train = _run(
        tmp_path,
        str(ROOT / "train.py"),
        f"data.root={own_digits}",
        "data.builder.align_steps=0",
        "data.builder.val_size=64",
        "data.builder.vae_steps=2",
        "data.num_workers=0",
        "data.batch_size=16",
        "codec=vae",
        "steps=2",
        f"run_dir={tmp_path / 'R'}",
        "logger=none",
        "sample.per_prompt=0",
        "probe.enabled=false",
        "monitor.every=0",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    ndir = tmp_path / "R" / "E0_0"
    assert (
        json.loads((ndir / "node.json").read_text())["codec"] == read_manifest(own_digits)["codec"]
    )
    sample = _run(
        tmp_path, str(ROOT / "sample.py"), "run_dir=R", "n=2", "steps=3", "out=S", "seed=5"
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    # an independent decode: the expert's latents for image 0, through diffusers directly
    cfg = load_train_config(ndir)
    _, denoiser = load_expert(ndir)
    cond = embed_prompts(load_encoders(cfg), ["the number 3"])
    latents: list[torch.Tensor] = []
    generate(
        denoiser,
        cond,
        8,
        steps=3,
        guidance=json.loads((tmp_path / "S" / "settings.json").read_text())["guidance"],
        channels=4,
        noise=image_noise(5, 0, (4, 8, 8))[None],
        decode=lambda z: latents.append(z) or z,  # keep the sampled latent
    )
    vae = AutoencoderKL.from_pretrained(str(own_digits / "vae")).eval()
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    with torch.no_grad():
        want = (vae.decode(latents[0] / scale + shift).sample * 0.5 + 0.5).clamp(0, 1)
    png = np.asarray(Image.open(tmp_path / "S" / "sample_0000.png").convert("RGB"))
    got = torch.from_numpy(png.copy()).permute(2, 0, 1).float() / 255
    assert got.shape == (3, 16, 16)
    assert (got - want[0]).abs().max() <= 1 / 255 + 1e-6
    ev = _run(
        tmp_path,
        str(ROOT / "evaluate.py"),
        "run_dir=R",
        "metric=all",
        "captions.per_caption=1",
        "captions.templates=plain",
        "steps=2",
        "guidance=[2]",
        "metrics.classifier_steps=10",
        "loss_by_sigma.sigmas=3",
        "loss_by_sigma.images=16",
        "loss_by_sigma.batch_size=16",
        "device=cpu",
        "out=E",
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert report["runs"][0]["rows"][0]["images"] == 10
    made = sorted((tmp_path / "E" / "E0_0" / "guidance_2").rglob("*.png"))
    assert len(made) == 10 and Image.open(made[0]).size == (16, 16)
    assert json.loads((tmp_path / "E" / "loss_by_sigma.json").read_text())["runs"][0]["loss"]


def test_a_child_keeps_its_parents_codec(vaes: tuple[Path, Path], tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from ediff_train.training.latent import check_parent_codec

    spec = VAECodec(vaes[0]).spec()
    (tmp_path / "E0_0").mkdir()
    (tmp_path / "E0_0" / "node.json").write_text(json.dumps({"node": "E0_0"}))  # pre-codec: pixels
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "parent_dir": None})
    check_parent_codec(cfg, "E0_0", None)
    with pytest.raises(EdiffError, match="parent E0_0 was trained with another codec .*pixel"):
        check_parent_codec(cfg, "E0_0", spec)
    (tmp_path / "E0_0" / "node.json").write_text(json.dumps({"codec": spec}))
    check_parent_codec(cfg, "E0_0", {**spec, "path": "/a/copy"})
    with pytest.raises(EdiffError, match="encoded by another VAE"):
        check_parent_codec(cfg, "E0_0", VAECodec(vaes[1]).spec())
