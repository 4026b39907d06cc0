"""LoRA out (`ediff-export … lora=true`, export/lora.py, docs/export.md): a LoRA tree over a
diffusers backbone — an MMDiT (model=mmdit_tiny, flow) and an SD U-Net (sd_unet_tiny, VP ε) — is
trained a few steps in this process (E1_0 with alpha ≠ rank, E1_1 adapting more modules), the
root exported alone as the base and the tree with its LoRA files. diffusers loads the files onto
the base's pipeline (`load_lora_experts`: diffusers' `load_lora_adapter`, one named adapter per
expert, switched by σ) and its images equal ediff-sample's for the LoRA experts. Then the
one-line refusals, each leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import SHARED_CACHE, train_in_process

from ediff_train.cli.export import main as export_main
from ediff_train.export.folder import export_run
from ediff_train.run.weights import load_expert
from ediff_train.sampling.generation import image_noise
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
    "steps=2",
]
BACKBONES = {  # a large lr: two steps of each node change the images visibly (VP ε's U-Net
    # less: at σ = 80 its ε error is multiplied by 80, and float32 rounding with it)
    "mmdit": ["model=mmdit_tiny", "model.num_layers=1", "param=flow", "module.lr=0.02"],
    "sd_unet": ["model=sd_unet_tiny", "param=vp_eps", "module.lr=0.002"],
}
TEXT_STREAM = "lora.target_modules=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj]"
CHILDREN = {
    "E1_0": ["lora=default", "lora.alpha=4"],  # alpha/rank folded into B
    "E1_1": ["lora=default", "lora.rank=4"],
}
PROMPTS = ["the number 3", "a handwritten seven"]
GUIDANCE = Guidance(5.0, {"E1_0": 3.0, "E1_1": 6.0})
STEPS = 5


@pytest.fixture(scope="module", params=list(BACKBONES))
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None
) -> Path:
    """R/E0_0 (full weights) and its LoRA children E1_0/E1_1; `base` = E0_0 exported alone,
    `tree` = E1_0 + E1_1 exported merged with their LoRA files."""
    os.environ["EDIFF_CACHE"] = str(SHARED_CACHE)
    tmp = tmp_path_factory.mktemp(f"lora_{request.param}")
    model = BACKBONES[request.param]
    train_in_process(f"run_dir={tmp / 'R'}", *FAST, *model)
    for child, extra in CHILDREN.items():
        if request.param == "mmdit" and child == "E1_1":
            extra = [*extra, TEXT_STREAM]  # the MMDiT's text stream too
        train_in_process(f"run_dir={tmp / 'R'}", *FAST, *model, f"expert={child}", *extra)
    export_run(tmp / "R", tmp / "base", ["E0_0"])
    export_run(tmp / "R", tmp / "tree", guidance="5,E1_0:3,E1_1:6", lora=True)
    return tmp


def sample(pipe: object, solver: str) -> torch.Tensor:
    """The pipeline's images for PROMPTS from ediff-sample's noise of seed 0."""
    noise = torch.stack([image_noise(0, i, (3, 16, 16)) for i in range(len(PROMPTS))])
    return pipe(  # type: ignore[operator]
        PROMPTS,
        negative_prompt="",
        latents=noise,
        num_inference_steps=STEPS,
        solver=solver,
        output_type="pt",
    ).images


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_lora_files_on_the_base_give_our_samplers_images(run: Path, solver: str) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(run / "base", trust_remote_code=True)
    base_images = sample(pipe, solver)
    pipe.load_lora_experts(run / "tree" / "lora")  # diffusers' load_lora_adapter, per expert
    kind = "transformer" if pipe.transformer is not None else "unet"
    assert sorted(pipe.get_list_adapters()[kind]) == ["E1_0", "E1_1"]
    assert [(e["node"], e["adapter"], e["component"]) for e in pipe.config.experts] == [
        ("E1_1", "E1_1", kind),
        ("E1_0", "E1_0", kind),
    ]
    images = sample(pipe, solver)
    ours = Sampler.from_run(run / "R", ["E1_0", "E1_1"])(
        PROMPTS, seed=0, steps=STEPS, guidance=GUIDANCE, solver=solver
    )
    torch.testing.assert_close(images, ours, atol=2e-5, rtol=0)
    assert (images - base_images).abs().mean() > 1e-3  # the adapters do change the images
    merged = DiffusionPipeline.from_pretrained(run / "tree", trust_remote_code=True)
    torch.testing.assert_close(sample(merged, solver), images, atol=2e-5, rtol=0)
    swapped = Sampler.from_run(run / "R", ["E1_0", "E1_1"])(
        PROMPTS, seed=0, steps=STEPS, guidance=Guidance(5.0, {"E1_0": 6.0, "E1_1": 3.0})
    )
    wan = pipe(  # Wan's call: guidance_scale for the high-noise expert, _2 for the low one
        PROMPTS,
        negative_prompt="",
        latents=torch.stack([image_noise(0, i, (3, 16, 16)) for i in range(2)]),
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        guidance_scale_2=6.0,
        output_type="pt",
    ).images
    torch.testing.assert_close(wan, swapped, atol=2e-5, rtol=0)


def test_the_files_are_diffusers_lora_files_of_each_expert(run: Path) -> None:
    """diffusers' own LoRA reader sees PEFT keys under the model's prefix and the LoraConfig
    (alpha folded: lora_alpha = r); the model-level loader on the base model gives each LoRA
    node's F (ours: base + peft adapter, alpha/rank applied at run time)."""
    import diffusers

    rec = json.loads((run / "tree" / "lora" / "lora.json").read_text())
    assert rec["format"] == "ediff-export-lora/1" and rec["base"]["node"] == "E0_0"
    assert [e["node"] for e in rec["experts"]] == ["E1_1", "E1_0"]
    assert [(e["rank"], e["alpha"]) for e in rec["experts"]] == [(4, 8.0), (8, 4.0)]
    assert rec["experts"][0]["sigma"][1] is None  # the open high-noise end
    kind = rec["base"]["component"]
    cls, pipeline = {
        "transformer": ("SD3Transformer2DModel", diffusers.StableDiffusion3Pipeline),
        "unet": ("UNet2DConditionModel", diffusers.StableDiffusionPipeline),
    }[kind]
    assert rec["base"]["class"] == cls
    exp = json.loads((run / "tree" / "experts.json").read_text())
    assert exp["lora"] == "lora/lora.json"
    for e in rec["experts"]:
        where = run / "tree" / "lora" / e["file"]
        assert where.name == "pytorch_lora_weights.safetensors"
        # the reader of the pipelines' load_lora_weights (SD's also returns network alphas)
        read = pipeline.lora_state_dict(str(where.parent), return_lora_metadata=True)
        state, meta = read[0], read[-1]
        assert all(k.startswith(f"{kind}.") and ".lora_" in k for k in state)
        assert meta[f"{kind}.r"] == meta[f"{kind}.lora_alpha"] == e["rank"]
        model = getattr(diffusers, cls).from_pretrained(run / "base" / kind)
        model.load_lora_adapter(
            str(where.parent), weight_name=where.name, prefix=kind, adapter_name=e["node"]
        )
        ours = load_expert(run / "R" / e["node"])[1].backbone.diffusers_model
        inputs = model_inputs(model)
        with torch.no_grad():
            want = ours(**inputs, return_dict=False)[0]
            got = model.eval()(**inputs, return_dict=False)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_pipelines_lora_methods_are_diffusers(run: Path) -> None:
    """`load_lora_weights(folder)` as on any diffusers pipeline (one adapter, every step), and
    diffusers' `unload_lora_weights` gives the base's images back."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(run / "base", trust_remote_code=True)
    base_images = sample(pipe, "euler")
    pipe.load_lora_weights(run / "tree" / "lora" / "E1_0", adapter_name="E1_0")
    kind = "transformer" if pipe.transformer is not None else "unet"
    assert pipe.get_list_adapters() == {kind: ["E1_0"]}
    assert (sample(pipe, "euler") - base_images).abs().mean() > 1e-3
    pipe.unload_lora_weights()
    assert torch.equal(sample(pipe, "euler"), base_images)


def model_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A random call of an SD3 transformer or an SD U-Net of the tiny configs."""
    g = torch.Generator().manual_seed(4)
    cfg = model.config
    sd3 = hasattr(cfg, "pooled_projection_dim")
    width = cfg.joint_attention_dim if sd3 else cfg.cross_attention_dim
    x = torch.randn(2, int(cfg.in_channels), 16, 16, generator=g)
    kw = {
        "hidden_states" if sd3 else "sample": x,
        "timestep": torch.tensor([300.0, 700.0]),
        "encoder_hidden_states": torch.randn(2, 7, int(width), generator=g),
    }
    if sd3:
        kw["pooled_projections"] = torch.randn(2, int(cfg.pooled_projection_dim), generator=g)
    elif cfg.class_embed_type == "projection":
        dim = int(cfg.projection_class_embeddings_input_dim)
        kw["class_labels"] = torch.randn(2, dim, generator=g)
    return kw


def test_the_command_says_where_the_files_go(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "home"
    assert export_main([f"run_dir={run / 'R'}", f"out={out}", "lora=true"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"  {out / 'lora'}: E1_1, E1_0 as LoRA files over E0_0; load them")
    assert "experts=E0_0 out=B" in last and ".load_lora_experts(" in last
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["E1_0", "E1_1", "lora.json"]


def no_leftovers(where: Path) -> None:
    assert not [p for p in where.iterdir() if p.name.startswith(".home")]
    assert not (where / "home").exists()


def refused(args: list[str], where: Path, capsys: pytest.CaptureFixture) -> str:
    """The command's one error line (exit 2, nothing written)."""
    assert export_main([*args, f"out={where / 'home'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    no_leftovers(where)
    return err.strip()


def test_full_weights_and_a_bad_switch_are_refused(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = refused([f"run_dir={run / 'R'}", "experts=E0_0", "lora=true"], tmp_path, capsys)
    assert err == (
        "error: lora=true: E0_0 has full weights, not a LoRA adapter; only LoRA experts export "
        "as LoRA files: export them merged instead (drop lora=true)"
    )
    err = refused([f"run_dir={run / 'R'}", "lora=maybe"], tmp_path, capsys)
    assert err == "error: lora must be true or false, got 'maybe'"


def test_lora_experts_onto_another_pipeline_are_refused(run: Path) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(run / "tree", trust_remote_code=True)
    with pytest.raises(ValueError) as err:
        pipe.load_lora_experts(run / "tree" / "lora")
    assert re.fullmatch(
        r"the LoRA experts of .*/tree/lora adapt E0_0: load them onto the export of E0_0 alone "
        r"\(ediff-export run_dir=… experts=E0_0\), not onto a pipeline of \['E1_1', 'E1_0'\]",
        str(err.value),
    )


def test_our_own_backbones_are_refused_naming_the_merged_export(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_torch_thread: None
) -> None:
    """A TextUNet (model=tiny) LoRA tree: diffusers has no LoRA loader for TextUNetModel."""
    os.environ["EDIFF_CACHE"] = str(SHARED_CACHE)
    fast = [f"run_dir={tmp_path / 'U'}", *FAST, "steps=1"]
    train_in_process(*fast)
    for child in CHILDREN:
        train_in_process(*fast, f"expert={child}", "lora=default")
    err = refused([f"run_dir={tmp_path / 'U'}", "lora=true"], tmp_path, capsys)
    assert err == (
        "error: lora=true: the experts' backbone is ediff-train's own TextUNetModel, which "
        "diffusers does not load LoRA files into (its SD3Transformer2DModel and "
        "UNet2DConditionModel do); export them merged instead (drop lora=true)"
    )
    assert export_main([f"run_dir={tmp_path / 'U'}", f"out={tmp_path / 'home'}"]) == 0  # merged
