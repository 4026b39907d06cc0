"""Export (`ediff-export`, export/folder.py): a flow-matching root started from a tiny random SD3
folder and its children E1_0/E1_1, trained a few steps through train.py's task function
(training/loop.train_node, in this process: a subprocess per node would cost ~20 s each here),
exported by the command's main(), loaded back with diffusers from the folder alone, and sampled:
the pipeline's images equal ediff-train's sampler's for the same noise, solver and steps. Then
the one-line refusals, each leaving nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_CACHE
from test_pretrained import compose_train, sd3_folder

from ediff_train.cli.export import main as export_main
from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.export.components import merged
from ediff_train.export.folder import export_run, parse_guidance
from ediff_train.run.weights import load_expert
from ediff_train.sampling.ensemble import load_ensemble
from ediff_train.sampling.generation import generate, image_noise
from ediff_train.sampling.guidance import Guidance
from ediff_train.sampling.pipeline import Sampler

FAST = [
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=4",
    "logger=none",
    "monitor.every=0",
    "probe.enabled=false",
    "checkpoint_every=100",
    "param=flow",
    "steps=2",
]


def train(run_dir: Path, *args: str) -> None:
    from ediff_train.training.loop import train_node

    train_node(compose_train(f"run_dir={run_dir}", *FAST, *args))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """R/E0_0 from the SD3 folder, R/E1_0 and R/E1_1 from it, 2 steps each."""
    import os

    os.environ["EDIFF_CACHE"] = str(SHARED_CACHE)
    tmp = tmp_path_factory.mktemp("export")
    folder = sd3_folder(tmp / "sd3")
    train(tmp / "R", f"init_from={folder}")
    for child in ("E1_0", "E1_1"):
        train(tmp / "R", f"expert={child}")
    return tmp / "R"


def cond(n: int = 2) -> Conditioning:
    """Tiny-encoder-shaped conditioning with ragged T5 lengths (the mask matters)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(n, 5, dtype=torch.bool)
    mask[:, :3] = True
    mask[0, 3:] = True
    return Conditioning(
        t5=torch.randn(n, 5, 32, generator=g) * mask[..., None],
        t5_mask=mask,
        clip_txt=torch.randn(n, 77, 32, generator=g),
        clip_pool=torch.randn(n, 24, generator=g),
        clip_img=torch.zeros(n, 24),
    )


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_diffusers_pipeline_images_equal_our_samplers(
    run: Path, tmp_path: Path, solver: str
) -> None:
    from diffusers import DiffusionPipeline

    out = tmp_path / "home"
    assert export_main([f"run_dir={run}", f"out={out}", "guidance=E1_0:3,E1_1:6"]) == 0
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "EnsemblePipeline"
    # Wan's convention: transformer (high noise), transformer_2 (low), split at t = σ/(1+σ)
    assert [e["node"] for e in pipe.config.experts] == ["E1_1", "E1_0"]
    assert pipe.transformer is not None and pipe.transformer_2 is not None
    assert pipe.config.boundary_ratio == pytest.approx(0.5)  # flow's law: E1 split at σ = 1

    ens = load_ensemble(run, ["E1_0", "E1_1"])
    c = cond()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    g = Guidance(5.0, {"E1_0": 3.0, "E1_1": 6.0})
    ours = generate(ens, c, 16, steps=5, guidance=g, solver=solver, noise=noise)
    backbone = ens.experts[0].backbone
    tokens, _ = backbone.context(c, torch.float32)
    images = pipe(
        prompt_embeds=tokens,
        pooled_prompt_embeds=backbone.pooled(c, torch.float32),
        latents=noise,
        num_inference_steps=5,
        solver=solver,
        output_type="pt",
    ).images
    torch.testing.assert_close(images, ours, atol=2e-5, rtol=0)
    assert (ours - 0.5).abs().mean() > 0.05  # not a constant image: the experts did something
    # Wan's call: guidance_scale for `transformer` (E1_1), guidance_scale_2 for `transformer_2`
    wan = pipe(
        prompt_embeds=tokens,
        pooled_prompt_embeds=backbone.pooled(c, torch.float32),
        latents=noise,
        num_inference_steps=5,
        solver=solver,
        guidance_scale=6.0,
        guidance_scale_2=3.0,
        output_type="pt",
    ).images
    assert torch.equal(wan, images)
    swapped = generate(
        ens,
        c,
        16,
        steps=5,
        guidance=Guidance(5.0, {"E1_0": 6.0, "E1_1": 3.0}),
        solver=solver,
        noise=noise,
    )
    assert not torch.allclose(swapped, ours, atol=1e-3)  # the scales do reach their experts
    # plain text through the folder's encoders, packed for the MMDiT: ediff-sample's images
    prompts = ["the number 3", "a handwritten seven"]
    sampled = Sampler.from_run(run, ["E1_0", "E1_1"])(prompts, steps=5, guidance=g, solver=solver)
    text = pipe(
        prompts,
        negative_prompt="",
        latents=torch.stack([image_noise(0, i, (3, 16, 16)) for i in range(2)]),
        num_inference_steps=5,
        solver=solver,
        output_type="pt",
    ).images
    torch.testing.assert_close(text, sampled, atol=2e-5, rtol=0)


def test_each_step_goes_to_the_expert_owning_its_sigma(run: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    out = export_run(run, tmp_path / "home", ["E1_1", "E1_0"], guidance="1")
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    seen: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
    for name in seen:
        getattr(pipe, name).register_forward_hook(
            lambda m, a, kw, o, name=name: seen[name].append(float(kw["timestep"][0])),
            with_kwargs=True,
        )
    c = cond(1)
    tokens, _ = load_expert(run / "E1_0")[1].backbone.context(c, torch.float32)
    pipe(
        prompt_embeds=tokens,
        pooled_prompt_embeds=torch.zeros(1, 48),
        num_inference_steps=6,
        solver="euler",
        output_type="latent",
    )
    rho, lo, hi = 7.0, 0.002, 80.0
    sig = [(hi ** (1 / rho) + i / 5 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(6)]
    t = [1000 * s / (1 + s) for s in sig]  # the flow timestep each call must carry
    assert seen["transformer"] == pytest.approx([x for s, x in zip(sig, t) if s >= 1], rel=1e-5)
    assert seen["transformer_2"] == pytest.approx([x for s, x in zip(sig, t) if s < 1], rel=1e-5)


def test_experts_json_gives_the_boundaries_in_every_convention(run: Path, tmp_path: Path) -> None:
    out = export_run(run, tmp_path / "home", None, guidance="4,E1_1:7")
    rec = json.loads((out / "experts.json").read_text())
    hi, lo = rec["experts"]
    assert (hi["node"], hi["component"], hi["guidance_scale"]) == ("E1_1", "transformer", 7.0)
    assert (lo["node"], lo["component"], lo["guidance_scale"]) == ("E1_0", "transformer_2", 4.0)
    assert hi["sigma"][0] == pytest.approx(1.0) and hi["sigma"][1] is None  # ∞ is null
    assert hi["boundaries"]["boundary_ratio"] == pytest.approx([0.5, 1.0])
    assert hi["boundaries"]["timestep"] == pytest.approx([500.0, 1000.0])
    assert lo["boundaries"]["t"] == pytest.approx([0.0, 0.5])
    assert rec["param"]["name"] == "flow" and rec["timestep_scale"] == 1000.0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "EnsemblePipeline"]
    assert index["transformer"] == index["transformer_2"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert (out / "pipeline.py").is_file() and (out / "transformer_2" / "config.json").is_file()


def test_exported_weights_are_the_experts_ema_weights(run: Path, tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    out = export_run(run, tmp_path / "home", ["E1_0", "E1_1"])
    saved = SD3Transformer2DModel.from_pretrained(out / "transformer_2").state_dict()
    ema = load_expert(run / "E1_0")[1].backbone.diffusers_model.state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    root = SD3Transformer2DModel.from_pretrained(run.parent / "sd3" / "transformer").state_dict()
    assert any(not torch.equal(saved[k], root[k]) for k in root)  # it trained


def no_leftovers(where: Path) -> None:
    assert not [p for p in where.iterdir() if p.name.startswith(".home")]
    assert not (where / "home").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["experts=E1_1"], r"experts=\['E1_1'\] do not tile σ"),
        (["experts=E1_0,E0_0"], "do not tile σ"),
        (["experts=E1_0,E2_3"], "expert E2_3 is not a finished node"),
        (["guidance=E2_0:3"], r"guidance names E2_0, not among experts=\['E1_0', 'E1_1'\]"),
        (["guidance=lots"], "guidance must be a number or NODE:number items"),
        (["solver=dpmpp_2m"], "solver must be euler or heun"),
        (["colour=red"], r"usage: ediff-export run_dir=R \[out=DIR\]"),
        (["text=maybe"], "text must be true or false, got 'maybe'"),
    ],
)
def test_bad_requests_are_one_line_and_leave_nothing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert export_main([f"run_dir={run}", f"out={tmp_path / 'home'}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert __import__("re").search(message, err), err
    no_leftovers(tmp_path)


def test_an_existing_out_is_refused(run: Path, tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    with pytest.raises(EdiffError, match="exists; export writes a new folder"):
        export_run(run, tmp_path / "home")


def test_a_backbone_that_does_not_export_is_refused_naming_those_that_do(tmp_path: Path) -> None:
    """An SR stage's EfficientUNet node (a stored config + weights, built directly) does not
    export (our TextUNet and TextDiT do: tests/test_export_text.py)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ediff_train.core.edm import EDMPrecond
    from ediff_train.run.weights import save_weights

    cfg = compose_train(
        f"run_dir={tmp_path / 'R'}",
        "model=sr_tiny",
        "model.model_channels=8",
        "model.head_channels=8",
        "model.context_dim=16",
    )
    ndir = tmp_path / "R" / "E0_0"
    ndir.mkdir(parents=True)
    (ndir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    state = EDMPrecond(instantiate(cfg.model)).state_dict()
    ema = {k: v.clone() for k, v in state.items()}
    save_weights(ndir / "weights.safetensors", state, ema, {"step": 0})
    with pytest.raises(EdiffError) as err:
        export_run(tmp_path / "R", tmp_path / "home")
    assert str(err.value) == (
        "expert E0_0's backbone ediff_train.nn.efficient_unet.EfficientUNet does not export: "
        "TextUNet, TextDiT, SD3Transformer2DModel and UNet2DConditionModel backbones do "
        "(model=tiny or base64 (TextUNet), dit_tiny (TextDiT), mmdit_tiny (MMDiT), "
        "sd_unet_tiny (SDUNet), or init_from=)"
    )
    no_leftovers(tmp_path)


def test_a_lora_expert_exports_merged() -> None:
    """peft's LoRA layers in a diffusers model: the merged plain model gives the same output."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from test_pretrained import SD3

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD3).eval()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_v"]), model, "E1_1")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    inputs: dict[str, Any] = dict(
        hidden_states=torch.randn(1, 3, 16, 16),
        timestep=torch.tensor([300.0]),
        encoder_hidden_states=torch.randn(1, 7, 32),
        pooled_projections=torch.randn(1, 48),
    )
    with torch.no_grad():
        want = model(**inputs).sample
        plain = merged(model).eval()
        assert not any("lora" in k for k in plain.state_dict())
        torch.testing.assert_close(plain(**inputs).sample, want, atol=1e-5, rtol=1e-5)


def test_parse_guidance() -> None:
    assert parse_guidance("5") == (5.0, {})
    assert parse_guidance("E1_0:3,E1_1:7.5") == (5.0, {"E1_0": 3.0, "E1_1": 7.5})
    assert parse_guidance("2,E1_1:7") == (2.0, {"E1_1": 7.0})
    with pytest.raises(EdiffError):
        parse_guidance(f"E1_0:{math.inf}")


def built_run(run_dir: Path, *overrides: str) -> None:
    """E1_0 and E1_1 stored directly (config.yaml + weights.safetensors, no training: the
    trained case is above), each with its own random weights, zero-init output layers too."""
    from omegaconf import OmegaConf

    from ediff_train.run.weights import denoiser_of, save_weights

    for seed, name in enumerate(("E1_0", "E1_1")):
        cfg = compose_train(f"run_dir={run_dir}", f"expert={name}", *overrides)
        torch.manual_seed(seed)
        denoiser = denoiser_of(cfg)
        with torch.no_grad():
            for n, p in denoiser.named_parameters():
                if "conv_out" in n or "proj_out" in n:
                    p.normal_(0, 0.05)
        ndir = run_dir / name
        ndir.mkdir(parents=True)
        (ndir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        state = denoiser.state_dict()
        save_weights(ndir / "weights.safetensors", state, {k: v.clone() for k, v in state.items()})


def tiny_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["sd_unet_vp", "mmdit_vae"])
def test_a_unet_tree_and_a_latent_tree_export_exactly(tmp_path: Path, case: str) -> None:
    """An SD U-Net under VP (ε; the key mask reaches its cross-attention) and an MMDiT on VAE
    latents (the folder's vae/ decodes): pipeline images = ediff-train's for the same noise."""
    from diffusers import DiffusionPipeline

    from ediff_train.run.weights import load_codec, load_train_config

    if case == "sd_unet_vp":
        built_run(tmp_path / "R", "model=sd_unet_tiny", "param=vp_eps")
    else:
        vae = tiny_vae(tmp_path / "vae")
        built_run(
            tmp_path / "R",
            "model=mmdit_tiny",
            "model.num_layers=1",
            "param=flow",
            "codec=vae",
            f"codec.path={vae}",
            "codec.channels=4",
            "codec.downsample=2",
        )
    # text=False: built without data, so no encoders (the embeddings path)
    out = export_run(tmp_path / "R", tmp_path / "home", guidance="4", text=False)
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert pipe.text_encoder is None and pipe.tokenizer_2 is None
    ens = load_ensemble(tmp_path / "R", ["E1_0", "E1_1"])
    backbone = ens.experts[0].backbone
    c = cond()
    tokens, mask = backbone.context(c, torch.float32)
    codec = load_codec(load_train_config(tmp_path / "R" / "E1_0"))
    size, ch = backbone.image_size, backbone.in_channels
    noise = torch.randn(2, ch, size, size, generator=torch.Generator().manual_seed(1))
    decode = None if codec.is_identity else codec.decode
    ours = generate(ens, c, size, steps=4, guidance=4.0, noise=noise, channels=ch, decode=decode)
    kw: dict[str, Any] = {"pooled_prompt_embeds": backbone.pooled(c, torch.float32)}
    if case == "sd_unet_vp":
        kw["prompt_attention_mask"] = mask
        assert pipe.unet is not None and pipe.unet_2 is not None
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    else:
        assert pipe.vae is not None and ours.shape == (2, 3, 16, 16)
    images = pipe(
        prompt_embeds=tokens, latents=noise, num_inference_steps=4, output_type="pt", **kw
    )
    torch.testing.assert_close(images.images, ours, atol=2e-5, rtol=0)


def test_a_lora_child_exports_merged_and_samples_the_same(run: Path, tmp_path: Path) -> None:
    """E1_1 as a peft adapter over the root (lora=default, run/adapters.py) beside a full E1_0,
    both trained from the fixture's root through parent_dir: exported with the adapter merged,
    the pipeline still gives our sampler's images (which runs base + adapter unmerged)."""
    from diffusers import DiffusionPipeline

    root = f"parent_dir={run / 'E0_0'}"
    train(tmp_path / "L", "expert=E1_0", root)
    train(tmp_path / "L", "expert=E1_1", "lora=default", root)
    assert (tmp_path / "L" / "E1_1" / "adapter_model.safetensors").is_file()
    out = export_run(tmp_path / "L", tmp_path / "home", guidance="3")  # the leaves: E1_0, E1_1
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    ens = load_ensemble(tmp_path / "L", ["E1_0", "E1_1"])
    c = cond()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ours = generate(ens, c, 16, steps=4, guidance=3.0, noise=noise)
    backbone = ens.experts[0].backbone
    images = pipe(
        prompt_embeds=backbone.context(c, torch.float32)[0],
        pooled_prompt_embeds=backbone.pooled(c, torch.float32),
        latents=noise,
        num_inference_steps=4,
        output_type="pt",
    ).images
    torch.testing.assert_close(images, ours, atol=2e-5, rtol=0)


def test_the_command_prints_each_expert_and_hints_at_experts(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert export_main([f"run_dir={run}", f"out={tmp_path / 'home'}", "guidance=2,E1_1:6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "  transformer    E1_1       σ ∈ [1, ∞)  t ∈ [0.5, 1]  guidance 6",
        "  transformer_2  E1_0       σ ∈ [0, 1)  t ∈ [0, 0.5]  guidance 2",
    ]
    built_run(tmp_path / "R", "model=sd_unet_tiny", "param=vp_eps")
    (tmp_path / "R" / "E1_0" / "weights.safetensors").unlink()  # E1_0 unfinished: a gap
    assert export_main([f"run_dir={tmp_path / 'R'}", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: experts=['E1_1'] do not tile σ: experts leave a gap")
    assert err.rstrip().endswith("(the run's finished leaves; name the experts: experts=...)")
    assert not (tmp_path / "out").exists()
