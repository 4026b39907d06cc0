"""Text in, every backbone out (`ediff-export`, docs/export.md): a tiny digits TextUNet root and
its children (full, and a LoRA one), trained a few steps in this process, and a TextDiT tree
(random weights, built directly) are exported with the encoders that made their shards, then
loaded, prompted in plain text and sampled in a separate Python that cannot import ediff_train
(the folder's user has torch and diffusers only). Their images equal ediff-sample's for the same
prompts, noise, solver, steps and per-expert guidance. Then the one-line refusals: an unknown
word (pipeline and our sampler alike), a prompt over the encoders' context (one warning line),
encoders that no longer match the shards' manifest (nothing written, exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_CACHE, compose_train, run_env, train_in_process
from omegaconf import OmegaConf

from ediff_train.cli.export import main as export_main
from ediff_train.errors import EdiffError
from ediff_train.export.folder import export_run
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
]
PROMPTS = ["the number 3", "a handwritten seven"]
STEPS = 6
CASES = {  # folder name → (run, experts, guidance as exported and as ediff-sample takes it)
    "root": ("R", ["E0_0"], Guidance(5.0)),
    "tree": ("R", ["E1_0", "E1_1"], Guidance(5.0, {"E1_0": 3.0, "E1_1": 7.0})),
    "dit": ("D", ["E1_0", "E1_1"], Guidance(4.0)),
    "lora": ("L", ["E1_0", "E1_1"], Guidance(3.0)),  # E1_1 a LoRA adapter, exported merged
}

# Runs in a fresh Python with ediff_train made unimportable: what a user of the folder has.
SCRIPT = r"""
import importlib.abc, sys

class NoEdiff(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ediff_train":
            raise ImportError("an exported folder must not need ediff_train")

sys.meta_path.insert(0, NoEdiff())
import torch
from diffusers import DiffusionPipeline

torch.set_num_threads(1)
jobs, out = torch.load(sys.argv[1]), {}
for name, job in jobs.items():
    pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=True)
    parts = ("unet", "transformer", "text_encoder", "text_encoder_2", "tokenizer_2")
    res = {"classes": {k: type(getattr(pipe, k)).__name__ for k in parts}}
    if "prompts" in job:
        call = dict(num_inference_steps=job["steps"], latents=job["noise"], output_type="pt")
        res["images"] = pipe(job["prompts"], negative_prompt="", **call).images
        embeds = pipe.encode_prompt(job["prompts"])
        res["from_embeds"] = pipe(prompt_embeds=embeds, **call).images
    if name == "root":  # the README's call, then a prompt over the encoders' context
        res["pil"] = pipe("the number 3", negative_prompt="", num_inference_steps=32).images[0].size
        pil = pipe(job["prompts"], negative_prompt="", **{**call, "output_type": "pil"}).images
        res["pil_pixels"] = torch.stack([torch.tensor(list(im.getdata())) for im in pil])
        print("<<truncate", file=sys.stderr, flush=True)
        pipe("the number 3 " * 20, num_inference_steps=2, output_type="latent")
        print("truncate>>", file=sys.stderr, flush=True)
    if "bad" in job:
        try:
            pipe(job["bad"], num_inference_steps=2)
        except ValueError as e:
            res["error"] = str(e)
    out[name] = res
assert "ediff_train" not in sys.modules
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "ediff_train")
torch.save(out, sys.argv[2])
"""


def dit_run(run_dir: Path) -> None:
    """A TextDiT tree stored directly (config.yaml + random weights, the zero-initialised
    output layers drawn too, so F is not zero): export needs no training to be exact."""
    from ediff_train.run.weights import denoiser_of, save_weights

    for seed, name in enumerate(("E1_0", "E1_1")):
        cfg = compose_train(
            f"run_dir={run_dir}", f"expert={name}", "model=dit_tiny", "model.depth=2"
        )
        torch.manual_seed(seed)
        denoiser = denoiser_of(cfg)
        with torch.no_grad():
            for p in denoiser.parameters():
                if not p.any():
                    p.normal_(0, 0.05)
        ndir = run_dir / name
        ndir.mkdir(parents=True)
        (ndir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        state = denoiser.state_dict()
        save_weights(ndir / "weights.safetensors", state, {k: v.clone() for k, v in state.items()})


def copy_node(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of a finished node whose config.yaml has `changes` (dotted keys) applied."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "hydra"))
    cfg = OmegaConf.load(dst / "config.yaml")
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    (dst / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return dst


def vocabulary() -> list[str]:
    import re

    from ediff_train.data.toys.digits import digit_captions

    caps = [c for d in range(10) for c in digit_captions(d)]
    return sorted({w for c in caps for w in re.findall(r"[a-z0-9]+", c.lower())})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """R: a digits TextUNet root (3 steps) exported as `ediff-export run_dir=R` does by
    default, then its children E1_0/E1_1 (2 steps each) exported with per-expert guidance;
    L: children of R's root, E1_1 a LoRA adapter; D: a TextDiT tree; V: R's root with encoders
    that know the digits' words only."""
    os.environ["EDIFF_CACHE"] = str(SHARED_CACHE)
    tmp = tmp_path_factory.mktemp("text")
    train_in_process(f"run_dir={tmp / 'R'}", *FAST, "steps=3")
    cwd = Path.cwd()
    os.chdir(tmp)
    try:
        assert export_main(["run_dir=R"]) == 0  # out defaults to exports/<run name>
    finally:
        os.chdir(cwd)
    shutil.move(tmp / "exports" / "R", tmp / "root")
    for child in ("E1_0", "E1_1"):
        train_in_process(f"run_dir={tmp / 'R'}", *FAST, f"expert={child}", "steps=2")
    export_run(tmp / "R", tmp / "tree", guidance="5,E1_0:3,E1_1:7")  # the leaves
    lora = [f"parent_dir={tmp / 'R' / 'E0_0'}", *FAST, "steps=2"]
    train_in_process(f"run_dir={tmp / 'L'}", "expert=E1_0", *lora)
    train_in_process(f"run_dir={tmp / 'L'}", "expert=E1_1", "lora=default", *lora)
    export_run(tmp / "L", tmp / "lora", guidance="3")
    dit_run(tmp / "D")
    export_run(tmp / "D", tmp / "dit", guidance="4")
    enc = tmp / "vocab_encoders"
    shutil.copytree(SHARED_CACHE / "digits16" / "encoders", enc)
    info = json.loads((enc / "encoders.json").read_text())
    (enc / "encoders.json").write_text(json.dumps({**info, "vocabulary": vocabulary()}))
    copy_node(tmp / "R" / "E0_0", tmp / "V" / "E0_0", encoders__path=str(enc))
    export_run(tmp / "V", tmp / "vocab")
    return tmp


@pytest.fixture(scope="module")
def loaded(runs: Path) -> dict[str, Any]:
    """What the folders give in a Python without ediff_train: one subprocess for all."""
    jobs: dict[str, Any] = {}
    noise = torch.stack([image_noise(0, i, (3, 16, 16)) for i in range(len(PROMPTS))])
    for name in CASES:  # ediff-sample's noise for seed 0
        jobs[name] = {"folder": str(runs / name), "prompts": PROMPTS, "noise": noise}
        jobs[name]["steps"] = STEPS
    jobs["vocab"] = {"folder": str(runs / "vocab"), "bad": "the number banana"}
    torch.save(jobs, runs / "jobs.pt")
    env = {**run_env(runs), "HF_MODULES_CACHE": str(runs / "hf_modules"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(runs / "jobs.pt"), str(runs / "out.pt")],
        cwd=runs,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(runs / "out.pt")
    out["stderr"] = proc.stderr
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_plain_text_gives_our_samplers_images(
    runs: Path, loaded: dict[str, Any], case: str
) -> None:
    run, experts, guidance = CASES[case]
    ours = Sampler.from_run(runs / run, experts)(PROMPTS, seed=0, steps=STEPS, guidance=guidance)
    images = loaded[case]["images"]
    torch.testing.assert_close(images, ours, atol=2e-5, rtol=0)
    assert (ours - 0.5).abs().mean() > 0.05  # not a constant image: the experts did something
    torch.testing.assert_close(loaded[case]["from_embeds"], images, atol=0, rtol=0)


def test_the_folder_holds_every_part_and_needs_no_ediff_train(loaded: dict[str, Any]) -> None:
    assert loaded["imported"] == []
    root, dit = loaded["root"]["classes"], loaded["dit"]["classes"]
    assert root["unet"] == "TextUNetModel" and dit["transformer"] == "TextDiTModel"
    assert (root["text_encoder"], root["text_encoder_2"], root["tokenizer_2"]) == (
        "T5EncoderModel",
        "OpenCLIPTextModel",
        "OpenCLIPTokenizer",
    )
    assert loaded["root"]["pil"] == (16, 16)  # pipe("the number 3", negative_prompt="", 32)
    pixels = (loaded["root"]["images"] * 255).round().to(torch.long)  # PIL: the same, in bytes
    assert torch.equal(loaded["root"]["pil_pixels"], pixels.flatten(2).transpose(1, 2))


def test_the_folder_layout(runs: Path) -> None:
    index = json.loads((runs / "tree" / "model_index.json").read_text())
    assert index["unet"] == index["unet_2"] == ["ediff_models", "TextUNetModel"]
    assert index["text_encoder_2"] == ["ediff_clip", "OpenCLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "ByT5Tokenizer"]
    code = ["pipeline.py", "ediff_text.py", "ediff_lora.py", "unet/ediff_models.py"]
    code += ["text_encoder_2/ediff_clip.py"]
    for path in code + ["unet_2/ediff_models.py", "tokenizer_2/ediff_clip.py"]:
        lines = (runs / "tree" / path).read_text().splitlines()
        imports = [ln for ln in lines if ln.lstrip().startswith(("import ", "from "))]
        assert imports and not [ln for ln in imports if "ediff_train" in ln], path
    rec = json.loads((runs / "tree" / "experts.json").read_text())
    assert [(e["node"], e["guidance_scale"]) for e in rec["experts"]] == [
        ("E1_1", 7.0),
        ("E1_0", 3.0),
    ]
    assert rec["text"]["t5_max_length"] == 113 and rec["text"]["vocabulary"] is None


def test_a_long_prompt_is_truncated_with_one_warning_line(loaded: dict[str, Any]) -> None:
    between = loaded["stderr"].split("<<truncate\n")[1].split("truncate>>")[0]
    lines = [ln for ln in between.splitlines() if ln.strip()]
    assert len(lines) == 1, between
    assert lines[0].startswith("1 prompt(s) longer than the text encoders' context, truncated")
    assert "T5 tokens of 113" in lines[0] and "CLIP tokens of 77" in lines[0]


def test_an_unknown_word_is_one_line_in_the_pipeline_and_our_sampler(
    runs: Path, loaded: dict[str, Any]
) -> None:
    err = loaded["vocab"]["error"]
    assert "\n" not in err
    assert err.startswith(
        "prompt 'the number banana' uses 'banana': not a word these encoders were trained on"
    )
    with pytest.raises(EdiffError) as ours:
        Sampler.from_run(runs / "V", ["E0_0"])(["the number banana"], steps=2)
    assert str(ours.value) == err  # the same check, the same words


def test_encoders_that_no_longer_match_the_shards_are_refused(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The shards' manifest names other T5 weights than the encoders there now: exit 2, one
    line, nothing written."""
    data = SHARED_CACHE / "digits16"
    root = tmp_path / "data"
    root.mkdir()
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["encoders"]["t5"]["fingerprint"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(manifest))
    changes = {"data__root": str(root), "encoders__path": str(data / "encoders")}
    copy_node(runs / "R" / "E0_0", tmp_path / "M" / "E0_0", **changes)
    assert export_main([f"run_dir={tmp_path / 'M'}", f"out={tmp_path / 'home'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the encoders no longer match the shards")
    assert "t5 " in err and "≠ 000000000000" in err and "text=false" in err
    assert not (tmp_path / "home").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".home")]


@pytest.mark.parametrize(
    "text_cfg, quick_gelu",
    [
        ({}, True),
        ({"ls_init_value": 0.5, "proj_bias": True}, False),
        ({"no_causal_mask": True, "pool_type": "first"}, False),
    ],
)
def test_the_exported_clip_text_tower_is_open_clips(text_cfg: dict, quick_gelu: bool) -> None:
    """Text towers open_clip builds other ways (QuickGELU, layer scale, a linear projection
    with bias, no causal mask, other pooling) export and give open_clip's outputs exactly."""
    from open_clip.model import CLIP

    from ediff_train.export.text import check_clip, clip_text
    from ediff_train.nn.encoder_models import TINY_CLIP, text_norm
    from ediff_train.nn.encoders import Encoders

    enc = Encoders.tiny(0)
    cfg = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], **text_cfg}}
    torch.manual_seed(1)
    enc.clip = CLIP(**cfg, quick_gelu=quick_gelu).eval()
    enc._ln_final = text_norm(enc.clip)
    model, tokenizer = clip_text(enc)
    check_clip(enc, model, tokenizer)  # raises on any difference
    ids = tokenizer(["a photo of the number 3", "résumé &amp; café, 42!"])
    assert torch.equal(
        ids, enc.clip_tokenizer(["a photo of the number 3", "résumé &amp; café, 42!"])
    )
