"""Guidance-distilled experts (issue 34): a student learns its teacher's CFG output
D_u + w·(D_c − D_u) with w as an input, and the sampler asks it once per step.

Expected values are computed here, outside the code under test: the guided target from the
teacher's two branches by hand, the forwards per expert from the σ grid and each node's own
`contains`, a mixed ensemble's images from a denoiser written out in this file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, SHARED_CACHE, compose_train, run_env, train_in_process
from hydra.utils import instantiate

from ediff_train.core import solvers
from ediff_train.core.conditioning import Conditioning
from ediff_train.core.solvers import karras_sigmas
from ediff_train.errors import EdiffError
from ediff_train.nn.guidance_embed import GuidedStudent, attach
from ediff_train.run.weights import load_expert, load_train_config, node_of
from ediff_train.sampling import distilled
from ediff_train.sampling.ensemble import load_ensemble
from ediff_train.sampling.generation import generate
from ediff_train.sampling.guidance import Guidance

FAST = [
    "logger=none",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=8",
    "monitor.every=0",
    "module.lr=3e-3",
    "checkpoint_every=100",
    "probe.enabled=false",
    "module.ema_halflife_images=null",
]
NET = ["model.model_channels=16"]
W = (2.0, 6.0)
STUDENT = ["distill_guidance.enabled=true", f"distill_guidance.w=[{W[0]},{W[1]}]"]


def overrides(*args: str) -> list[str]:
    net = [] if any(a.startswith("model=") for a in args) else NET
    return [*FAST, *net, *args]


def train(*args: str) -> Path:
    return train_in_process(*overrides(*args))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """A Wan-style pair under a root: E0_0 (12 steps), E1_0 and E1_1 (2 steps each)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDIFF_CACHE", str(SHARED_CACHE))
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        mp.setenv(key, "0")
    run = tmp_path_factory.mktemp("gd") / "T"
    train(f"run_dir={run}", "steps=12")
    train(f"run_dir={run}", "expert=E1_1", "steps=2")
    train(f"run_dir={run}", "expert=E1_0", "steps=2")
    yield run
    mp.undo()


@pytest.fixture(scope="module")
def student(teacher: Path) -> Path:
    """E1_1 distilled from the teacher's E1_1 for 30 steps, w ~ U[2, 6]; the student run also
    holds the teacher's E1_0 (copied: a mixed ensemble)."""
    run = teacher.parent / "S"
    train(
        f"run_dir={run}",
        "expert=E1_1",
        "steps=30",
        *STUDENT,
        f"distill_guidance.teacher={teacher}",
        "init.warmup=0",
        "module.lr=3e-4",
    )
    (run / "E1_0").symlink_to(teacher / "E1_0", target_is_directory=True)
    return run


def held_out(cfg: object) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """16 held-out images, σ in the node's band and the noise fixed: y, σ, c."""
    data = instantiate(cfg.data, seed=0)
    batch = data.val_batches(1, 16)[0]
    x, cond = batch["image"], Conditioning.from_batch(batch)
    g = torch.Generator().manual_seed(5)
    sigma = node_of(cfg).sample_sigma(x.shape[0], g).float()
    return x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g), sigma, cond


def guided_by_hand(teacher: torch.nn.Module, y, sigma, cond: Conditioning, w: float):
    with torch.no_grad():
        d_c, d_u = teacher(y, sigma, cond), teacher(y, sigma, cond.null())
    return d_u + w * (d_c - d_u)


def test_normal_state_dict_unchanged_and_step0_is_the_teacher(teacher: Path) -> None:
    """A normal node has no w input; a fresh student holds exactly the extra `guidance_emb.*`
    tensors and equals its teacher's conditional output bit for bit, at any w."""
    _, t = load_expert(teacher / "E1_1")
    assert not any("guidance" in k for k in t.state_dict())
    from ediff_train.training.loop import build_module

    cfg = compose_train(
        *overrides(
            f"run_dir={teacher.parent / 'S0'}",
            "expert=E1_1",
            *STUDENT,
            f"distill_guidance.teacher={teacher}",
        )
    )
    module, _ = build_module(cfg, node_of(cfg), teacher.parent / "S0" / "E1_1")
    s = module.denoiser.eval()
    extra = set(s.state_dict()) - set(t.state_dict())
    assert extra and all(k.startswith("backbone.guidance_emb.") for k in extra)
    assert set(t.state_dict()) <= set(s.state_dict())
    y, sigma, cond = held_out(load_train_config(teacher / "E1_1"))
    with torch.no_grad():
        want = t(y, sigma, cond)
        for w in (0.0, 1.0, 3.5, 6.0, 20.0):
            assert torch.equal(s(y, sigma, cond, guidance=w), want)


def test_student_learns_the_guided_teacher(teacher: Path, student: Path) -> None:
    """On held-out inputs in E1_1's band, the student's error against D_u + w·(D_c − D_u)
    (computed here from the teacher's two branches) after 30 steps is below 0.6× its error at
    step 0 (the teacher's conditional output), summed over w = 2, 4, 6 (raw weights: the EMA of 30
    steps still lags). node.json records the distillation."""
    _, t = load_expert(teacher / "E1_1")
    _, s = load_expert(student / "E1_1", "model")
    assert isinstance(s, GuidedStudent) and s.w_range == W
    y, sigma, cond = held_out(load_train_config(teacher / "E1_1"))
    before, after = [], []
    for w in (2.0, 4.0, 6.0):
        target = guided_by_hand(t, y, sigma, cond, w)
        with torch.no_grad():
            before.append(float((t(y, sigma, cond) - target).pow(2).mean()))
            after.append(float((s(y, sigma, cond, guidance=w) - target).pow(2).mean()))
    print(f"error vs guided teacher: step 0 {before}, after 30 steps {after}")
    # measured: 0.40× in sum; w = 4, 6 each ≈ 0.24×, 0.42×; w = 2, whose target is nearest the
    # conditional start, 1.4× (the student's shared weights moved for the larger scales)
    assert sum(after) < 0.6 * sum(before), (before, after)
    assert after[1] < before[1] and after[2] < before[2], (before, after)
    info = json.loads((student / "E1_1" / "node.json").read_text())
    teacher_step = json.loads((teacher / "E1_1" / "node.json").read_text())["step"]
    assert info["init"]["mode"] == "distill_guidance"
    assert info["init"]["distill"]["teacher"] == str(teacher / "E1_1")
    assert info["init"]["distill"]["w"] == list(W)
    assert info["init"]["schedule"] == {"distill_guidance": [teacher_step, teacher_step + 30]}
    assert info["step"] == teacher_step + 30


def test_mixed_ensemble_calls_the_student_once_per_step(
    teacher: Path, student: Path, capsys: pytest.CaptureFixture
) -> None:
    """experts=[E1_0 (CFG), E1_1 (distilled)], Euler 6 steps, guidance 3 (E1_1: 4): the
    student runs once per step of its band with n rows, E1_0 once with 2n rows (CFG); the
    images equal a denoiser written out here. A scale outside [2, 6] warns once."""
    ens = load_ensemble(student, ["E1_0", "E1_1"])
    e10, e11 = ens.router.nodes
    rows: dict[str, list[int]] = {"E1_0": [], "E1_1": []}
    for name, expert in zip(("E1_0", "E1_1"), ens.experts):
        expert.register_forward_pre_hook(
            lambda m, a, k, n=name: rows[n].append(a[0].shape[0]), with_kwargs=True
        )
    cfg = load_train_config(student / "E1_1")
    cond = Conditioning.from_batch(instantiate(cfg.data, seed=0).val_batches(1, 2)[0])
    steps, g = 6, Guidance(3.0, {"E1_1": 4.0})
    out = generate(ens, cond, 16, steps=steps, guidance=g, solver="euler", seed=1)
    sig = [float(s) for s in karras_sigmas(steps)[:-1]]
    assert rows["E1_1"] == [2] * sum(e11.contains(s) for s in sig)
    assert rows["E1_0"] == [4] * sum(e10.contains(s) for s in sig)
    _, t10 = load_expert(teacher / "E1_0")
    _, s11 = load_expert(student / "E1_1")

    def by_hand(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if e11.contains(float(sigma)):
            return s11(x, sigma, cond, guidance=4.0)
        d_c, d_u = t10(x, sigma, cond), t10(x, sigma, cond.null())
        return d_u + 3.0 * (d_c - d_u)

    g0 = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 16, 16, generator=g0) * karras_sigmas(steps)[0]
    want = (solvers.solve("euler", by_hand, x0, karras_sigmas(steps)).float() * 0.5 + 0.5).clamp(
        0, 1
    )
    assert torch.allclose(out, want, atol=1e-5)
    assert "outside" not in capsys.readouterr().err
    distilled._warned.clear()
    for _ in range(2):
        generate(ens, cond, 16, steps=2, guidance=Guidance(3.0, {"E1_1": 12.0}), solver="euler")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: guidance 12 for E1_1 is outside the range it was distilled for [2, 6]: "
        "its output there is extrapolated"
    ]


def test_export_keeps_a_students_w_input(student: Path, tmp_path: Path) -> None:
    """The mixed ensemble exports (tests/test_export_distilled.py samples such folders): the
    student's component holds its w range and embedding, the CFG expert's none."""
    from safetensors.torch import load_file

    from ediff_train.export.folder import export_run

    out = export_run(student, tmp_path / "out", ["E1_0", "E1_1"], guidance="3,E1_1:4", text=False)
    rec = json.loads((out / "experts.json").read_text())
    assert [(e["node"], e["guidance_range"]) for e in rec["experts"]] == [
        ("E1_1", list(W)),
        ("E1_0", None),
    ]
    assert json.loads((out / "unet" / "config.json").read_text())["guidance_range"] == list(W)
    assert json.loads((out / "unet_2" / "config.json").read_text())["guidance_range"] is None
    weights = "diffusion_pytorch_model.safetensors"
    assert any(k.startswith("guidance_emb.") for k in load_file(out / "unet" / weights))
    assert not any(k.startswith("guidance_emb.") for k in load_file(out / "unet_2" / weights))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["expert=E2_3"], "teacher E2_3 is not a finished full-weight node"),
        (["expert=E1_1", "model=dit_tiny"], "full copy of its teacher"),
        (["expert=E1_1", "model=mmdit_tiny"], "needs a TextUNet or TextDiT student"),
        (["expert=E1_1", "lora=default"], "LoRA students are not supported yet"),
        (["expert=E1_1", "distill_guidance.w=[6,2]"], "distill_guidance.w must be two numbers"),
    ],
)
def test_refusals(teacher: Path, tmp_path: Path, args: list[str], message: str) -> None:
    run = tmp_path / "X"
    with pytest.raises(EdiffError, match=message) as e:
        train(f"run_dir={run}", *STUDENT, f"distill_guidance.teacher={teacher}", *args)
    assert "\n" not in str(e.value)
    assert not any(p.is_file() for p in run.rglob("*") if "hydra" not in p.parts)


def test_cli_refusal_is_one_line(teacher: Path, tmp_path: Path) -> None:
    """train.py with no teacher: `error: ...`, non-zero exit, no node folder."""
    run = tmp_path / "C"
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"run_dir={run}", "expert=E1_1", *FAST, *STUDENT],
        capture_output=True,
        text=True,
        env=run_env(tmp_path),
        cwd=tmp_path,
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: distill_guidance.teacher must")
    assert not (run / "E1_1" / "node.json").exists()


def test_attach_refuses_a_backbone_without_w_input() -> None:
    L.seed_everything(0, verbose=False)
    with pytest.raises(EdiffError, match="TextUNet or TextDiT"):
        attach(torch.nn.Linear(2, 2), 8)
