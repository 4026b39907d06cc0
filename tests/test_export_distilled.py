"""Guidance-distilled experts exported (`ediff-export`, docs/export.md, issue 34): a tiny digits
TextUNet tree (root 3 steps, children 2 steps) whose children are then distilled for 3 steps each
(w ~ U[2, 6]), and a TextDiT pair stored directly (one student, one CFG expert, random weights).
Each export is loaded and sampled in a separate Python that cannot import ediff_train, as in
tests/test_export_text.py. Shown: the images equal our Sampler's (both experts distilled, and a
mixed ensemble of one student and one CFG expert, at in- and out-of-range scales); the pipeline
asks a student once per step with n rows and a CFG expert with 2n (counted by hooks on the
models, expected from the σ grid and each node's own `contains`); a scale outside a student's
range warns in the same one line as our sampler, once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_CACHE, compose_train, run_env, train_in_process
from omegaconf import OmegaConf

from ediff_train.core.solvers import karras_sigmas
from ediff_train.export.folder import export_run
from ediff_train.run.weights import load_train_config, node_of
from ediff_train.sampling import distilled
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
    "model.model_channels=16",
]
W = (2.0, 6.0)
STUDENT = ["distill_guidance.enabled=true", f"distill_guidance.w=[{W[0]},{W[1]}]"]
PROMPTS = ["the number 3", "a handwritten seven"]
STEPS = 6
# folder → (run, per-expert scales as the pipeline takes them: list in component order, most
# noise first, i.e. [E1_1, E1_0]); each case is sampled at every scale pair listed
CASES = {
    "distilled": ("S", [[5.0, 3.0], [2.0, 6.0], [12.0, 4.0]]),
    "mixed": ("M", [[4.0, 3.0], [12.0, 3.0]]),
    "dit": ("D", [[4.0, 3.0], [2.0, 3.0]]),
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
    res = {"images": []}
    call = dict(num_inference_steps=job["steps"], latents=job["noise"], output_type="pt")
    print(f"<<{name}", file=sys.stderr, flush=True)
    for scales in job["scales"]:
        res["images"].append(pipe(job["prompts"], guidance_scale=scales, **call).images)
    print(f"{name}>>", file=sys.stderr, flush=True)
    rows = {e["node"]: [] for e in pipe.config.experts}
    for e in pipe.config.experts:
        getattr(pipe, e["component"]).register_forward_pre_hook(
            lambda m, a, k, n=e["node"]: rows[n].append(a[0].shape[0]), with_kwargs=True
        )
    pipe(job["prompts"], guidance_scale=job["scales"][0], **call, solver="euler")
    res["rows"] = rows
    out[name] = res
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "ediff_train")
torch.save(out, sys.argv[2])
"""


def dit_run(run_dir: Path) -> None:
    """A TextDiT pair stored directly: E1_1 a student (config with distill_guidance, its w
    embedding's zero-initialised last layer drawn too, so w matters), E1_0 a CFG expert."""
    from ediff_train.run.weights import denoiser_of, save_weights

    for seed, name in enumerate(("E1_0", "E1_1")):
        extra = [*STUDENT, "distill_guidance.teacher=unused"] if name == "E1_1" else []
        cfg = compose_train(
            f"run_dir={run_dir}", f"expert={name}", "model=dit_tiny", "model.depth=2", *extra
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """T: the teacher tree; S: both children distilled from T; M: S's E1_1 beside T's E1_0 (a
    mixed ensemble); D: the TextDiT pair. Each exported with the encoders that made its shards."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDIFF_CACHE", str(SHARED_CACHE))
    tmp = tmp_path_factory.mktemp("distilled")
    train_in_process(f"run_dir={tmp / 'T'}", *FAST, "steps=3")
    for child in ("E1_0", "E1_1"):
        train_in_process(f"run_dir={tmp / 'T'}", *FAST, f"expert={child}", "steps=2")
    for child in ("E1_0", "E1_1"):  # lr 1e-2 from step 1: the w embedding moves off zero
        student = [*STUDENT, f"distill_guidance.teacher={tmp / 'T'}", "init.warmup=0"]
        train_in_process(
            f"run_dir={tmp / 'S'}", *FAST, f"expert={child}", "steps=3", *student, "module.lr=1e-2"
        )
    (tmp / "M").mkdir()
    (tmp / "M" / "E1_1").symlink_to(tmp / "S" / "E1_1", target_is_directory=True)
    (tmp / "M" / "E1_0").symlink_to(tmp / "T" / "E1_0", target_is_directory=True)
    dit_run(tmp / "D")
    for name, (run, _) in CASES.items():
        export_run(tmp / run, tmp / name, ["E1_0", "E1_1"], guidance="3,E1_1:4")
    yield tmp
    mp.undo()


@pytest.fixture(scope="module")
def loaded(runs: Path) -> dict[str, Any]:
    """What the folders give in a Python without ediff_train: one subprocess for all."""
    noise = torch.stack([image_noise(0, i, (3, 16, 16)) for i in range(len(PROMPTS))])
    jobs = {
        name: {
            "folder": str(runs / name),
            "prompts": PROMPTS,
            "noise": noise,
            "steps": STEPS,
            "scales": scales,
        }
        for name, (_, scales) in CASES.items()
    }
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


def between(stderr: str, name: str) -> list[str]:
    text = stderr.split(f"<<{name}\n")[1].split(f"{name}>>")[0]
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.mark.parametrize("case", list(CASES))
def test_the_exported_students_give_our_samplers_images(
    runs: Path, loaded: dict[str, Any], case: str, capsys: pytest.CaptureFixture
) -> None:
    """Every scale pair, out-of-range ones included: the pipeline's images equal our Sampler's
    within the export tests' 2e-5, and its warning lines are our sampler's, once each."""
    run, pairs = CASES[case]
    sampler = Sampler.from_run(runs / run, ["E1_0", "E1_1"])
    distilled._warned.clear()
    capsys.readouterr()
    for (w11, w10), images in zip(pairs, loaded[case]["images"]):
        g = Guidance(w10, {"E1_1": w11})
        ours = sampler(PROMPTS, seed=0, steps=STEPS, guidance=g)
        torch.testing.assert_close(images, ours, atol=2e-5, rtol=0)
        assert (ours - 0.5).abs().mean() > 0.05  # not a constant image
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert between(loaded["stderr"], case) == warnings
    out_of_range = sum(pair[0] > W[1] for pair in pairs)  # E1_1 at 12; nothing else is out
    assert len(warnings) == out_of_range
    if out_of_range:
        assert warnings[0] == (
            "warning: guidance 12 for E1_1 is outside the range it was distilled for [2, 6]: "
            "its output there is extrapolated"
        )


def test_the_scale_reaches_a_student(loaded: dict[str, Any]) -> None:
    """A student's w changes its images by far more than the 2e-5 the comparisons allow: both
    experts distilled, w = (5, 3) against (2, 6) (3 training steps moved the w embedding off its
    zero start; measured 6e-4); the DiT student (random w embedding) at 4 against 2, its CFG
    partner at 3 in both."""
    for case, least in (("distilled", 2e-4), ("dit", 1e-2)):
        a, b = loaded[case]["images"][:2]
        assert (a - b).abs().max() > least, case


@pytest.mark.parametrize("case", list(CASES))
def test_a_student_is_called_once_per_step(runs: Path, loaded: dict[str, Any], case: str) -> None:
    """Euler, 6 steps, two prompts: a student runs once per step of its band with 2 rows, a CFG
    expert once with 4 rows (conditional + negative)."""
    run, _ = CASES[case]
    sigmas = [float(s) for s in karras_sigmas(STEPS)[:-1]]
    for name, rows in loaded[case]["rows"].items():
        cfg = load_train_config(runs / run / name)
        steps = sum(node_of(cfg).contains(s) for s in sigmas)
        student = bool(cfg.get("distill_guidance", {}).get("enabled"))
        assert steps > 0 and rows == [2 if student else 4] * steps, (name, rows)


def test_the_folder_records_the_w_input(runs: Path, loaded: dict[str, Any]) -> None:
    """The student's component holds its w range and embedding; experts.json says which
    experts are distilled; the code the folder carries never imports ediff_train."""
    assert loaded["imported"] == []
    for case, slot in (("mixed", "unet"), ("dit", "transformer")):
        cfg = json.loads((runs / case / slot / "config.json").read_text())
        assert cfg["guidance_range"] == list(W) and cfg["guidance_features"] == 32
        other = json.loads((runs / case / f"{slot}_2" / "config.json").read_text())
        assert other["guidance_features"] == 0 and other["guidance_range"] is None
        rec = json.loads((runs / case / "experts.json").read_text())
        assert [(e["node"], e["guidance_range"]) for e in rec["experts"]] == [
            ("E1_1", list(W)),
            ("E1_0", None),
        ]
    from safetensors.torch import load_file

    keys = load_file(runs / "distilled" / "unet_2" / "diffusion_pytorch_model.safetensors")
    assert any(k.startswith("guidance_emb.") for k in keys)
    for path in ("pipeline.py", "unet/ediff_models.py", "transformer/ediff_models.py"):
        folder = runs / ("dit" if path.startswith("transformer") else "mixed")
        lines = (folder / path).read_text().splitlines()
        imports = [ln for ln in lines if ln.lstrip().startswith(("import ", "from "))]
        assert imports and not [ln for ln in imports if "ediff_train" in ln], path


def test_the_command_names_the_students(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from ediff_train.cli.export import main as export_main

    args = [f"run_dir={runs / 'M'}", f"out={tmp_path / 'm'}", "guidance=3,E1_1:4", "text=false"]
    assert export_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("guidance 4 (distilled for w ∈ [2, 6])"), lines
    assert lines[2].endswith("guidance 3"), lines
