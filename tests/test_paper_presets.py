"""The paper-scale flow-matching presets (SD3-like, Wan2.2-style) composed by Hydra against the
published figures, their SLURM dry runs, the per-expert guidance a schedule records (train.py →
config.yaml → sample.py), and the Fig. 7 experiment under `param=flow`."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_env
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from ediff_train.cli import register_nodes
from ediff_train.core.boundaries import conventions
from ediff_train.core.experts import Router, node_from_config
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.errors import EdiffError
from ediff_train.experiments.runner import train_command
from ediff_train.experiments.schedule import load_schedule
from ediff_train.run.weights import node_of
from ediff_train.sampling.settings import SamplerSettings
from ediff_train.training.settings import validate_train_config

HIGH, LOW = "wan22_t2v_high", "wan22_t2v_low"


def compose_train(*overrides: str) -> object:
    register_nodes()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_sd3_preset_is_sd3s_published_figures() -> None:
    """SD3-medium's transformer config, its VAE's 16 channels at 8x, and its training law:
    logit-normal(0, 1) shifted by 3, i.e. ln σ ~ N(ln 3, 1), so the level-1 split is σ = 3."""
    cfg = compose_train("preset=paper_sd3", "data.root=/d")
    m = cfg.model
    assert m._target_ == "ediff_train.nn.mmdit.MMDiT"
    got = (m.num_layers, m.num_attention_heads, m.attention_head_dim, m.patch_size)
    assert got == (24, 24, 64, 2)
    assert (m.joint_attention_dim, m.pooled_projection_dim, m.pos_embed_max_size) == (
        4096,
        2048,
        192,
    )
    assert (m.in_channels, m.out_channels, m.image_size) == (16, 16, 1024 // 8)
    assert cfg.codec._target_ == "ediff_train.nn.codec.VAECodec" and cfg.codec.channels == 16
    assert dict(cfg.encoders.dims) == {
        "t5": 4096,
        "clip_txt": 768,
        "clip_pool": 768,
        "clip_img": 768,
    }
    assert cfg.trainer.accelerator == "gpu" and cfg.strategy.stage == 2
    law = param_from_config(cfg.param).law
    assert law.p_mean == pytest.approx(math.log(3.0)) and law.p_std == 1.0
    e1_0 = node_from_config({"name": "E1_0"}, law=law)
    assert e1_0.sigma_pieces[0][1] == pytest.approx(3.0)
    validate_train_config(cfg)
    # the composed keys are the real MMDiT's arguments: build it (one thin block, same
    # channels, latent size and context/pooled widths) and read them back from diffusers
    small = cfg.model.copy()
    small.update(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    inner = instantiate(small).diffusers_model.config
    assert (inner.in_channels, inner.sample_size, inner.patch_size) == (16, 128, 2)
    assert (inner.joint_attention_dim, inner.pooled_projection_dim) == (4096, 2048)


def test_wan22_schedule_stages_compose_to_the_pair() -> None:
    """Each stage's real train.py arguments (the runner's and the submitter's): the root over
    all σ, the experts split at σ = 7 (boundary_ratio 0.875; t_grid 0.875/2.375 at shift 12),
    Wan2.2's guidance 4.0 (high) and 3.0 (low) recorded, 16-channel latents, flow matching."""
    s = load_schedule("wan22_t2v")
    assert [st.name for st in s.stages] == ["E0_0", HIGH, LOW]
    assert [st.parent for st in s.stages] == [None, "E0_0", "E0_0"]
    nodes, guidance = {}, {}
    for st in s.stages:
        cfg = compose_train(*train_command(s, st, Path("/r"))[2:], "data.root=/d")
        validate_train_config(cfg)
        assert cfg.param.name == "flow" and cfg.model.in_channels == 16 == cfg.codec.channels
        nodes[st.name], guidance[st.name] = node_of(cfg), cfg.expert_guidance
    assert guidance == {"E0_0": None, HIGH: 4.0, LOW: 3.0}
    assert nodes["E0_0"].sigma_pieces == ((0.0, math.inf),)
    (hi_lo, hi_hi), (lo_lo, lo_hi) = nodes[HIGH].sigma_pieces[0], nodes[LOW].sigma_pieces[0]
    assert (hi_lo, hi_hi, lo_lo) == (pytest.approx(7.0), math.inf, 0.0)
    assert lo_hi == pytest.approx(7.0)
    Router([nodes[HIGH], nodes[LOW]])  # they tile the noise axis
    c = conventions(7.0, shift=12.0)
    assert c["boundary_ratio"] == pytest.approx(0.875) and c["timestep"] == pytest.approx(875)
    assert c["t_grid"] == pytest.approx(0.875 / (12 - 11 * 0.875))
    i2v = load_schedule("wan22_i2v")
    assert i2v["wan22_i2v_high"].node.sigma_pieces[0][0] == pytest.approx(9.0)
    assert i2v["wan22_i2v_low"].overrides == ("expert_guidance=3.5",)


def dry_run(tmp: Path, *args: str) -> list[str]:
    """The submitter's dry run through its command line: its numbered job lines."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "slurm" / "submit.py"), "dry_run=true", "run_dir=R", *args],
        cwd=tmp,
        env=run_env(tmp),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(dry run: nothing submitted)" in proc.stdout and not (tmp / "R").exists()
    return proc.stdout.splitlines()


def jobs(lines: list[str]) -> dict[str, tuple[str, str]]:
    """{stage: (its title line, its srun line)} in the printed order."""
    out = {}
    for i, ln in enumerate(lines):
        if ln[:4].strip().rstrip(".").isdigit():
            out[ln.split()[1]] = (ln, lines[i + 1].strip())
    return out


def test_submitter_dry_runs_chain_both_presets(tmp_path: Path) -> None:
    wan = jobs(dry_run(tmp_path, "schedule=wan22_t2v"))
    assert list(wan) == ["E0_0", HIGH, LOW]
    assert "no dependency" in wan["E0_0"][0]
    for name, scale in ((HIGH, "4.0"), (LOW, "3.0")):
        title, srun = wan[name]
        assert "after E0_0 (afterok)" in title and "+100,000 → step 600,000" in title
        assert srun.startswith("srun ") and f"expert={name} " in srun
        assert srun.endswith(f"preset=paper_wan22 expert_guidance={scale}")
    sd3 = jobs(dry_run(tmp_path, "schedule=fig7", 'train.args=["preset=paper_sd3","data.root=/d"]'))
    assert len(sd3) == 8 and list(sd3)[0] == "E0_0"
    assert all(srun.endswith("preset=paper_sd3 data.root=/d") for _, srun in sd3.values())
    assert "after E1_1 (afterok)" in sd3["E2_3"][0] and "after E0_0" in sd3["E0_0_cont"][0]


def test_recorded_guidance_defaults_and_command_line_wins() -> None:
    rec = {HIGH: 4.0, LOW: 3.0}
    s = SamplerSettings(guidance=9.0)
    assert s.with_recorded(rec).guidance_obj().per_expert == rec
    named = SamplerSettings(guidance_per_expert={LOW: 1.5})
    assert named.with_recorded(rec).per_expert == {HIGH: 4.0, LOW: 1.5}
    off = SamplerSettings(recorded_guidance=False)
    assert off.with_recorded(rec).per_expert == {}
    assert "recorded_guidance" not in s.call() and s.with_recorded(rec).record()[
        "guidance_per_expert"
    ] == {HIGH: 4.0, LOW: 3.0}
    cfg = compose_train("expert_guidance=loud")
    with pytest.raises(EdiffError, match=r"^expert_guidance must be null or a finite number"):
        validate_train_config(cfg)


def test_gate_weighs_loss_by_the_runs_law() -> None:
    """The gate's one-number loss under flow's law N(0, 1) in ln σ (not EDM's), and under VP's
    index law by the probability of each grid cell."""
    from ediff_train.core.parameterisation import VP, FlowMatching
    from ediff_train.experiments.tables import law_weighted

    sig, loss = [math.exp(0.0), math.exp(1.0)], [1.0, 2.0]  # flow weights 1 and e^-1/2
    w = math.exp(-0.5)
    assert law_weighted(sig, loss, FlowMatching().law) == pytest.approx((1 + 2 * w) / (1 + w))
    assert law_weighted(sig, loss) != pytest.approx((1 + 2 * w) / (1 + w))  # EDM's default
    vp = VP().law
    cut = vp.cdf(math.exp(0.5))  # the cells meet at the grid's geometric mean
    want = (cut * 1.0 + (1 - cut) * 2.0) / 1.0
    assert 0 < cut < 1 and law_weighted(sig, loss, vp) == pytest.approx(want)


FAST = [
    "logger=csv",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=16",
    "monitor.every=0",
    "probe.batches=1",
    "probe.batch_size=16",
    "module.lr=1e-3",
]
FLOW_FIG7 = {  # Fig. 7's shape at its smallest: root, its continuation (the gate), one split
    "name": "fig7_flow_tiny",
    "overrides": FAST,
    "stages": [
        {"node": "E0_0", "steps": 2, "source": "test"},
        {"name": "E0_0_cont", "node": "E0_0", "parent": "E0_0", "continue": True, "steps": 1}
        | {"source": "test"},
        {"node": "E1_0", "steps": 1, "source": "test", "overrides": ["expert_guidance=4.0"]},
        {"node": "E1_1", "steps": 1, "source": "test", "overrides": ["expert_guidance=2.0"]},
    ],
    "experiment": {
        "seeds": 1,
        "claim": "experts",
        "baseline": "baseline",
        "gate": {"root": "root", "continued": "baseline", "max_gain": 0.03},
        "ensembles": {"experts": ["E1_0", "E1_1"], "baseline": ["E0_0_cont"], "root": ["E0_0"]},
        "images": ["experts", "baseline"],
        "evaluate": {
            "guidance": [3],
            "steps": 2,
            "captions": {"per_caption": 1, "templates": "plain"},
            "loss_by_sigma": {"images": 16, "sigmas": 5, "batch_size": 16},
        },
    },
}


def run(tmp: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=run_env(tmp),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def law_loss(sigmas: list[float], loss: list[float], mean: float, std: float) -> float:
    w = [math.exp(-0.5 * ((math.log(x) - mean) / std) ** 2) for x in sigmas]
    return sum(a * b for a, b in zip(w, loss)) / sum(w)


@pytest.mark.slow
def test_fig7_experiment_under_flow_and_recorded_guidance(tmp_path: Path) -> None:
    """`ediff-experiment NAME param=flow`, unchanged otherwise: every stage trains under flow
    matching (the split at the flow law's median σ = 1, not EDM's 0.3012), the gate weighs
    held-out loss by the flow law, the report prints flow's bands; then sample.py takes the
    experts' recorded expert_guidance as their scales: the images are an in-process sampler's
    with those scales, not with the global one."""
    from ediff_train.sampling.guidance import Guidance
    from ediff_train.sampling.pipeline import Sampler

    (tmp_path / "t.yaml").write_text(json.dumps(FLOW_FIG7))
    exp = ["-m", "ediff_train.experiments.experiment", str(tmp_path / "t.yaml")]
    run(tmp_path, *exp, f"run_dir={tmp_path / 'R'}", "param=flow")
    seed, rep = tmp_path / "R" / "seed0", tmp_path / "R" / "report"
    names = [st.get("name") or st["node"] for st in FLOW_FIG7["stages"]]
    info = {n: json.loads((seed / n / "node.json").read_text()) for n in names}
    flow = {"name": "flow", "p_mean": 0.0, "p_std": 1.0, "shift": 1.0}
    assert all(i["param"] == flow for i in info.values())
    assert info["E1_0"]["boundaries"]["sigma"] == [0.0, pytest.approx(1.0)]
    assert info["E1_1"]["boundaries"]["sigma"][0] == pytest.approx(1.0)
    assert info["E1_0"]["sigma_seen"][1] < 1.0 < info["E1_1"]["sigma_seen"][0]
    # the gate: held-out loss under ln σ ~ N(0, 1), recomputed from the per-seed curves
    summary = json.loads((rep / "summary.json").read_text())
    curves = json.loads((rep / "seed0" / "loss_by_sigma.json").read_text())["runs"]
    sig = summary["loss_by_sigma"]["sigmas"]
    root = curves[list(FLOW_FIG7["experiment"]["ensembles"]).index("root")]["loss"]
    gate = summary["gate"]
    assert gate["root_loss"]["mean"] == pytest.approx(law_loss(sig, root, 0.0, 1.0))
    assert gate["root_loss"]["mean"] != pytest.approx(law_loss(sig, root, -1.2, 1.2))
    assert summary["verdict"] and gate["passed"] in (True, False)
    md = (rep / "report.md").read_text()
    assert re.search(r"E1_0\s+\[0, 1\)\s", md) and re.search(r"E1_1\s+\[1, ∞\)\s", md), md
    # recorded guidance → sample.py
    out = tmp_path / "guided"
    args = [f"run_dir={seed}", "experts=[E1_0,E1_1]", "prompt=the number 3", "n=2"]
    run(tmp_path, str(ROOT / "sample.py"), *args, "steps=4", "guidance=9", f"out={out}")
    settings = json.loads((out / "settings.json").read_text())
    assert settings["guidance_per_expert"] == {"E1_0": 4.0, "E1_1": 2.0}
    assert settings["guidance"] == 9.0 and settings["recorded_guidance"] is True
    got = torch.stack([torch.from_numpy(np.array(Image.open(out / f))) for f in settings["files"]])
    got = got.permute(0, 3, 1, 2).float()
    sampler = Sampler.from_run(seed, ["E1_0", "E1_1"])

    def pixels(per: dict[str, float]) -> torch.Tensor:
        images = sampler(["the number 3"] * 2, seed=0, steps=4, guidance=Guidance(9.0, per))
        return (images.clamp(0, 1) * 255).round()

    assert float((got - pixels({"E1_0": 4.0, "E1_1": 2.0})).abs().max()) <= 1.0
    for other in ({}, {"E1_0": 2.0, "E1_1": 4.0}):
        assert float((got - pixels(other)).abs().max()) > 2.0, other
