"""The hand-off: a child continues its parent's AdamW (moments and step) under DDP and ZeRO-2,
its EMA continues the parent's with a half-life in images, and a continuation is the same run.

Every expected figure is recomputed outside the run: the AdamW step in float64 from the recorded
weights and gradient (tests/handoff_probes.py), the EMA from the recorded weights, the
uninterrupted run trained separately."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env

from ediff_train.core.lr_schedule import LRSchedule
from ediff_train.run.optim_state import MOMENTS, OPTIMIZER, read_state
from ediff_train.run.weights import load_expert, load_weights

LR, BETAS, WD, EPS = 3e-3, (0.9, 0.999), 0.01, 1e-8
FAST = [
    "logger=none",
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=8",
    "monitor.every=0",
    f"module.lr={LR}",
    "checkpoint_every=100",
    "probe.batches=1",
    "probe.batch_size=8",
]


def train(tmp: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = run_env(tmp)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def record(tmp: Path, name: str) -> list[str]:
    return [
        "+callbacks.rec._target_=handoff_probes.RecordSteps",
        f"+callbacks.rec.path={tmp}/{name}.pt",
    ]


def adamw_step(
    w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float = LR
) -> torch.Tensor:
    """One AdamW update in float64 (decoupled weight decay, bias correction at step + 1)."""
    w, g, m, v = (t.double() for t in (w, g, m, v))
    t = step + 1
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    v = BETAS[1] * v + (1 - BETAS[1]) * g * g
    w = w * (1 - lr * WD)
    denom = (v.sqrt() / math.sqrt(1 - BETAS[1] ** t)) + EPS
    return w - (lr / (1 - BETAS[0] ** t)) * m / denom


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def predicted(rec: dict, moments: dict[str, torch.Tensor] | None, step: int) -> dict:
    out = {}
    for name, w in rec["before"].items():
        m = moments[f"exp_avg/{name}"] if moments else torch.zeros_like(w)
        v = moments[f"exp_avg_sq/{name}"] if moments else torch.zeros_like(w)
        out[name] = adamw_step(w, rec["grad"][name], m, v, step if moments else 0)
    return out


STRATEGIES = {
    "ddp": ["trainer=ddp_cpu", "strategy=ddp"],
    "zero2": [
        "trainer=ddp_cpu",
        "strategy=deepspeed_stage_2",
        "strategy._target_=cpu_deepspeed.CPUDeepSpeed",
        "trainer.precision=32-true",
        "trainer.gradient_clip_val=null",
    ],
}
H, R, BATCH = 400.0, 0.5, 8  # EMA half-life (images) and ramp-up ratio of the shared parent
EMA_ARGS = [f"module.ema_halflife_images={H}", f"module.ema_rampup_ratio={R}"]


def checkpoint_moments(ndir: Path) -> dict[str, torch.Tensor]:
    """AdamW's moments from Lightning's own last.ckpt (a plain torch optimiser state, indexed by
    parameter order), by name: independent of optim_state.py."""
    ckpt = torch.load(ndir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["optimizer_states"][0]["state"]
    names = [n for n, _ in load_expert(ndir)[1].named_parameters()]  # the optimiser's order
    assert len(names) == len(state)
    return {f"{k}/{n}": state[i][k] for i, n in enumerate(names) for k in MOMENTS}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_child_first_update_is_the_uninterrupted_parents(tmp_path: Path, strategy: str) -> None:
    """2 ranks. Parent 3 steps, then a child E1_1 for 1 step. The stored state S3 is the live
    one (DDP: Lightning's own checkpoint; ZeRO-2, whose checkpoint is sharded: S3 predicts the
    4th update of the same run uninterrupted), and the child's first update is AdamW with S3
    on the child's own gradient: the update the uninterrupted parent would take on that batch."""
    if strategy == "zero2":
        pytest.importorskip("deepspeed")
    extra = STRATEGIES[strategy]
    train(tmp_path, "run_dir=P", "steps=3", *extra)
    moments, step = read_state(tmp_path / "P" / "E0_0" / OPTIMIZER)
    assert step == 3
    parent, _, _ = load_weights(tmp_path / "P" / "E0_0" / "weights.safetensors")
    if strategy == "ddp":
        stored = checkpoint_moments(tmp_path / "P" / "E0_0")
        assert all(torch.equal(stored[k], moments[k]) for k in stored)
    else:
        train(tmp_path, "run_dir=U", "steps=4", *extra, *record(tmp_path, "uninterrupted"))
        u = torch.load(tmp_path / "uninterrupted.pt", weights_only=True)
        assert worst(u[3]["after"], parent) == 0.0  # the same run up to the hand-off
        assert worst(predicted(u[4], moments, step), u[4]["after"]) < 1e-6

    train(tmp_path, "run_dir=P", "expert=E1_1", "steps=1", *extra, *record(tmp_path, "child"))
    c = torch.load(tmp_path / "child.pt", weights_only=True)
    assert worst(c[1]["before"], parent) == 0.0
    kept = worst(predicted(c[1], moments, step), c[1]["after"])
    fresh = worst(predicted(c[1], None, 0), c[1]["after"])
    assert kept < 1e-6 < 1e-4 < fresh, (kept, fresh)  # a fresh AdamW moves ~lr per weight
    info = json.loads((tmp_path / "P" / "E1_1" / "node.json").read_text())
    assert info["handoff"]["optimizer"] == "kept"
    if strategy == "zero2":  # another world size: one process continues the 2-rank state
        train(
            tmp_path,
            "run_dir=one",
            f"parent_dir={tmp_path}/P/E0_0",
            "expert=E1_0",
            "steps=1",
            *record(tmp_path, "one"),
        )
        one = torch.load(tmp_path / "one.pt", weights_only=True)[1]
        assert worst(predicted(one, moments, step), one["after"]) < 1e-6


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step root on one process (EMA half-life 400 images, ramp-up 0.5)."""
    tmp = tmp_path_factory.mktemp("handoff")
    train(tmp, "run_dir=R", "steps=3", "handoff_at=[2]", *EMA_ARGS, *record(tmp, "parent"))
    return tmp


def test_child_branches_from_the_parents_state_at_a_named_step(parent: Path) -> None:
    """handoff_at=[2] left the parent's weights, EMA and AdamW state after step 2; a child
    with branch_step=2 starts there (step count 2, those weights, that optimiser state)."""
    steps = torch.load(parent / "parent.pt", weights_only=True)
    at = parent / "R" / "E0_0" / "at" / "000000002"
    weights, _, meta = load_weights(at / "weights.safetensors")
    assert meta["step"] == 2 and worst(weights, steps[2]["after"]) == 0.0
    moments, step = read_state(at / OPTIMIZER)
    assert step == 2
    train(
        parent,
        "run_dir=R",
        "expert=E1_1",
        "branch_step=2",
        "steps=1",
        *EMA_ARGS,
        *record(parent, "branch"),
    )
    rec = torch.load(parent / "branch.pt", weights_only=True)[1]
    assert worst(rec["before"], steps[2]["after"]) == 0.0
    assert worst(predicted(rec, moments, step), rec["after"]) < 1e-6
    assert json.loads((parent / "R" / "E1_1" / "node.json").read_text())["step"] == 3
    proc = train(parent, "run_dir=R", "expert=E1_0", "branch_step=1", "steps=1", ok=False)
    assert proc.returncode != 0 and "parent E0_0 wrote no hand-off at step 1" in proc.stderr
    assert not (parent / "R" / "E1_0" / "weights.safetensors").exists()


def test_stored_moments_are_the_optimisers_and_reset_starts_fresh(parent: Path) -> None:
    ndir = parent / "R" / "E0_0"
    moments, step = read_state(ndir / OPTIMIZER)
    assert step == 3
    stored = checkpoint_moments(ndir)
    assert stored.keys() == moments.keys()
    assert all(torch.equal(stored[k], moments[k]) for k in stored)
    train(
        parent,
        "run_dir=reset",
        f"parent_dir={ndir}",
        "expert=E1_0",
        "steps=1",
        "handoff.optimizer=reset",
        *EMA_ARGS,
        *record(parent, "reset"),
    )
    c = torch.load(parent / "reset.pt", weights_only=True)
    assert worst(predicted(c[1], None, 0), c[1]["after"]) < 1e-6
    info = json.loads((parent / "reset" / "E1_0" / "node.json").read_text())
    assert info["handoff"]["optimizer"].startswith("reset")


def test_continuation_is_the_uninterrupted_run(parent: Path) -> None:
    """E0_0 to 3 then continued +3 (its own folder) = E0_0 trained to 6 at once: weights, EMA."""
    cont = [
        "expert=interval",
        "expert.name=E0_0_cont",
        "expert.u_lo=0.0",
        "expert.u_hi=1.0",
        "expert.parent=E0_0",
        f"continue_from={parent}/R/E0_0",
        "steps=3",
        *EMA_ARGS,
    ]
    train(parent, "run_dir=R", *cont)
    train(parent, "run_dir=B", "steps=6", *EMA_ARGS)
    got, got_ema, meta = load_weights(parent / "R" / "E0_0_cont" / "weights.safetensors")
    once, once_ema, _ = load_weights(parent / "B" / "E0_0" / "weights.safetensors")
    assert meta["step"] == 6
    assert worst(got, once) < 1e-6 and worst(got_ema, once_ema) < 1e-6
    root, _, _ = load_weights(parent / "R" / "E0_0" / "weights.safetensors")
    assert worst(root, once) > 1e-4  # three more steps did move the weights
    # a changed hyperparameter is refused in one line, before anything is written
    bad = [a.replace("E0_0_cont", "E0_0_c2") for a in cont]
    proc = train(parent, "run_dir=R", *bad, "module.lr=1e-3", ok=False)
    assert proc.returncode != 0
    assert "module.lr was 0.003 there, is 0.001 here" in proc.stderr
    assert not (parent / "R" / "E0_0_c2" / "weights.safetensors").exists()


def test_child_ema_continues_the_parents_in_images(parent: Path) -> None:
    """The child's EMA starts at the parent's and decays by 0.5^(batch / min(H, images·r))
    with images counted over the tree (the parent's included)."""
    _, parent_ema, meta = load_weights(parent / "R" / "E0_0" / "weights.safetensors")
    assert meta["images"] == 3 * BATCH
    train(
        parent,
        "run_dir=ema",
        f"parent_dir={parent}/R/E0_0",
        "expert=E1_1",
        "steps=4",
        *EMA_ARGS,
        *record(parent, "ema"),
    )
    steps = torch.load(parent / "ema.pt", weights_only=True)
    ema = {k: parent_ema[k].double() for k in steps[4]["after"]}
    for n in range(1, 5):
        beta = 0.5 ** (BATCH / min(H, (3 + n) * BATCH * R))
        for k, w in steps[n]["after"].items():
            ema[k] = beta * ema[k] + (1 - beta) * w.double()
    _, child_ema, meta = load_weights(parent / "ema" / "E1_1" / "weights.safetensors")
    assert meta["images"] == 7 * BATCH
    assert worst(ema, {k: child_ema[k] for k in ema}) < 1e-6
    assert worst(ema, steps[4]["after"]) > 1e-4  # the EMA is not the raw weights


def test_warmup_after_handoff_scales_the_first_update(parent: Path) -> None:
    """module.lr_schedule.warmup_handoff=4: the child's first step runs at lr/4 (kept state)."""
    ndir = parent / "R" / "E0_0"
    moments, step = read_state(ndir / OPTIMIZER)
    train(
        parent,
        "run_dir=warm",
        f"parent_dir={ndir}",
        "expert=E1_0",
        "steps=1",
        "module.lr_schedule.warmup_handoff=4",
        *EMA_ARGS,
        *record(parent, "w"),
    )
    rec = torch.load(parent / "w.pt", weights_only=True)[1]
    quarter = {
        n: adamw_step(
            w, rec["grad"][n], moments[f"exp_avg/{n}"], moments[f"exp_avg_sq/{n}"], step, lr=LR / 4
        )
        for n, w in rec["before"].items()
    }
    assert worst(quarter, rec["after"]) < 1e-6
    info = json.loads((parent / "warm" / "E1_0" / "node.json").read_text())
    assert info["lr_schedule"]["lr_at_step"][0] == [0, LR / 4]


def test_optimizer_state_of_another_shape_is_refused(parent: Path) -> None:
    """A stored state whose tensors do not fit the model is one line naming the tensor."""
    from ediff_train.errors import EdiffError
    from ediff_train.run.optim_state import check_fits

    ndir = parent / "R" / "E0_0"
    _, model = load_expert(ndir)
    moments, _ = read_state(ndir / OPTIMIZER)
    name = next(iter(moments))
    check_fits(model, moments, ndir / OPTIMIZER)  # its own state fits
    bad = {**moments, name: torch.zeros(3, 5)}
    with pytest.raises(EdiffError, match=rf"{name} is \[3, 5\], the model's is"):
        check_fits(model, bad, ndir / OPTIMIZER)
    with pytest.raises(EdiffError, match="missing"):
        check_fits(model, {k: v for k, v in moments.items() if k != name}, ndir / OPTIMIZER)


def test_lr_schedule_known_values() -> None:
    s = LRSchedule(decay="cosine", warmup=4, total=11, min_factor=0.1)
    assert s.factor(0) == 0.25
    assert s.factor(3) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.3)))
    assert s.factor(10) == pytest.approx(0.1)
    inv = LRSchedule(decay="inv_sqrt", ref=100, offset=300, total=200)
    assert inv.factor(0) == pytest.approx(1 / math.sqrt(3)) and inv.factor(100) == 0.5
    assert LRSchedule(warmup=0).factor(0) == 1.0


def test_adamw_state_handed_on_through_the_file_continues_adam_exactly(tmp_path: Path) -> None:
    """gather_state → optimizer.safetensors → read_state → load_state into a fresh AdamW: the
    next update equals the one the original optimiser makes, bit for bit. Both the moments and
    Adam's step must travel (a step restarted at 0 changes the bias correction). In process,
    one second: the subprocess tests above check the same through train.py, minutes each."""
    import copy

    from torch import nn

    from ediff_train.run.optim_state import gather_state, load_state, save_state

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    x = torch.randn(16, 4)

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        step(net, opt)
    path = save_state(tmp_path / OPTIMIZER, gather_state(net, opt), world_size=1)
    twin = copy.deepcopy(net)
    fresh = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.01)
    moments, at = read_state(path)
    assert at == 3 and load_state(twin, fresh, moments, at)
    step(net, opt)
    step(twin, fresh)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
