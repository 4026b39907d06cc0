"""The speed switches, checked on CPU (perf.py, module.py): a compiled denoiser trains the eager
step under the eager parameter names and falls back to eager, with one warning line, whenever
compiling fails; channels_last changes only the memory layout; a fused AdamW is clipped as
Lightning would clip a plain one; the deferred NaN/Inf check (the GPU default) never lets bad
weights reach a checkpoint; bench/train_step.py writes compile and batch-sweep rows.

Compiled runs use the `aot_eager` backend: dynamo and AOTAutograd as with inductor, without
inductor's C++ build, which takes ~5 minutes for the tiny net on a 2-core machine (measured).
The compiled run's backend is aot_eager registered under another name with counting graph
compilers, so a test can tell that the compiled graphs, forward and backward, actually ran."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file
from test_training_loop import same, train
from torch import nn
from train_probes import RECORDS

from ediff_train.core.ema import full_fp32_state
from ediff_train.core.experts import parse_node
from ediff_train.core.perf import CompiledDenoiser, adamw, is_fused
from ediff_train.errors import EdiffError
from ediff_train.run.weights import load_expert
from ediff_train.training.module import ExpertModule

BACKEND = "ediff_counted_aot_eager"
GRAPH_CALLS: dict[str, list[int]] = {"forward": [], "backward": []}  # calls per compiled graph


def _counting(kind: str) -> object:
    """An AOTAutograd graph compiler that runs the graph as it is and counts each call."""

    def compiler(gm: torch.fx.GraphModule, inputs: object) -> object:
        GRAPH_CALLS[kind].append(0)
        index = len(GRAPH_CALLS[kind]) - 1

        def run(*args: object) -> object:
            GRAPH_CALLS[kind][index] += 1
            return gm(*args)

        return run

    return compiler


def _register_counting_backend() -> None:
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.registry import list_backends

    if BACKEND not in list_backends(exclude_tags=()):
        backend = aot_autograd(fw_compiler=_counting("forward"), bw_compiler=_counting("backward"))
        torch._dynamo.register_backend(compiler_fn=backend, name=BACKEND)


_register_counting_backend()
KEYS = ("perf_eager", "perf_compiled", "perf_fallback", "perf_nan", "perf_fused")


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> Iterator[None]:
    """One intra-op thread (the same float sums in every run compared here); the records go."""
    yield
    for key in KEYS:
        RECORDS.pop(key, None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Path:
    """The same 2 steps of the root node trained eagerly and compiled."""
    base = tmp_path_factory.mktemp("perf")
    common = ("steps=2", "checkpoint_every=100")
    train(base / "eager", digits_root, "perf_eager", *common)
    for calls in GRAPH_CALLS.values():
        calls.clear()
    train(base / "compiled", digits_root, "perf_compiled", *common, f"module.compile={BACKEND}")
    torch._dynamo.reset()
    return base


def test_compiled_graphs_ran_forward_and_backward_at_every_step(runs: Path) -> None:
    """Dynamo captured the denoiser and AOTAutograd's compiled graphs, not the eager module,
    computed both training steps: one compiled forward and one compiled backward call per step
    (a recompile for the second batch, e.g. another T5 length, is a new graph: the calls are
    summed over graphs; an eager fallback would leave them at zero)."""
    assert GRAPH_CALLS["forward"] and GRAPH_CALLS["backward"], GRAPH_CALLS
    assert sum(GRAPH_CALLS["forward"]) == 2 and sum(GRAPH_CALLS["backward"]) == 2, GRAPH_CALLS


def test_compiled_run_trains_the_eager_step(runs: Path) -> None:
    eager, compiled = RECORDS["perf_eager"], RECORDS["perf_compiled"]
    assert compiled["optimizer_steps"] == [0, 1] and sorted(compiled["losses"]) == [0, 1]
    for step in (0, 1):
        assert compiled["losses"][step] == pytest.approx(eager["losses"][step], rel=1e-5)
    same(compiled["weights"][2], eager["weights"][2], 1e-5)


def test_compiled_run_saves_plain_names_an_eager_network_loads(runs: Path) -> None:
    def ckpt(name: str) -> dict:
        path = runs / name / "E0_0" / "checkpoints" / "last.ckpt"
        return torch.load(path, map_location="cpu", weights_only=True)

    eager, compiled = ckpt("eager"), ckpt("compiled")
    assert list(compiled["state_dict"]) == list(eager["state_dict"])
    assert not [k for k in [*compiled["state_dict"], *compiled["ema"]] if "_orig_mod" in k]
    _, net = load_expert(runs / "compiled" / "E0_0")  # weights.safetensors, strict, uncompiled
    assert not isinstance(net, CompiledDenoiser)
    net.load_state_dict(
        {k.removeprefix("denoiser."): v for k, v in compiled["state_dict"].items()}, strict=True
    )


def test_compile_that_cannot_start_trains_eagerly(
    runs: Path,
    digits_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no working C++ compiler (test)")

    monkeypatch.setattr(torch, "compile", broken)
    train(
        runs / "fallback",
        digits_root,
        "perf_fallback",
        "steps=2",
        "checkpoint_every=100",
        "module.compile=true",
    )
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if line.startswith("warning: torch.compile")]
    assert len(warned) == 1 and "RuntimeError: no working C++ compiler (test)" in warned[0]
    same(RECORDS["perf_fallback"]["weights"][2], RECORDS["perf_eager"]["weights"][2])  # exact


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_compile_failing_at_first_call_falls_back(
    where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backend that cannot lower the forward or the backward graph (the backward one is made to
    fail inside the forward call, where falling back is still possible): eager values, eager
    gradients, one warning line."""
    from torch._dynamo.backends.common import aot_autograd

    def fail(gm: object, inputs: object) -> None:
        raise RuntimeError(f"cannot lower the {where} graph")

    def keep(gm: torch.fx.GraphModule, inputs: object) -> torch.fx.GraphModule:
        return gm

    backend = aot_autograd(
        fw_compiler=fail if where == "forward" else keep,
        bw_compiler=fail if where == "backward" else keep,
    )
    torch._dynamo.reset()
    net, ref = _mlp(), _mlp()
    x = torch.randn(3, 4)
    fn = CompiledDenoiser(net, backend)
    out = fn(x)
    out.sum().backward()
    ref(x).sum().backward()
    assert not fn.compiled and torch.equal(out, ref(x))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(net.parameters(), ref.parameters()))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"cannot lower the {where} graph" in err[0], err
    torch._dynamo.reset()


def test_channels_last_changes_only_the_layout(tmp_path: Path) -> None:
    """The networks give the same values with NHWC weights and input, and the hand-off of an
    NHWC model is plain contiguous tensors (safetensors refuses anything else)."""
    from test_nn import inputs, make_cond, randomize_zero_init, small_net

    nchw, nhwc = randomize_zero_init(small_net()), randomize_zero_init(small_net())
    nhwc.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in nhwc.parameters())
    x, c_noise = inputs()
    cond = make_cond()
    a = nchw(x, c_noise, cond)
    b = nhwc(x.contiguous(memory_format=torch.channels_last), c_noise, cond)
    a.square().mean().backward()
    b.square().mean().backward()
    assert torch.allclose(a, b, atol=1e-5)
    for (name, p), q in zip(nchw.named_parameters(), nhwc.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    state = full_fp32_state(nhwc, {n: p.shape for n, p in nhwc.named_parameters()})
    assert all(t.is_contiguous() for t in state.values())
    save_file(state, str(tmp_path / "w.safetensors"))


def test_fused_adamw_is_clipped_like_lightning_clips() -> None:
    """Lightning refuses to clip for a fused optimiser (it assumes a GradScaler); the module
    clips it itself (its hook, set when the optimiser is fused), by norm or by value, as
    Lightning does a plain one. On CPU the training
    builder never fuses (CPU runs unchanged); fused AdamW also exists on CPU, so the clipping
    path is tested with it here."""
    net = _mlp()
    params = list(net.parameters())
    assert not is_fused(adamw(params, 1e-3, (0.9, 0.999), 0.01, fusable=True))
    module = ExpertModule(_mlp(), parse_node("E0_0"))
    for algorithm, clip in (
        ("norm", torch.nn.utils.clip_grad_norm_),
        ("value", torch.nn.utils.clip_grad_value_),
    ):
        grads = [torch.randn_like(p) * 10 for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
        assert is_fused(fused)
        module.clip_fused(fused, 0.5, algorithm)
        want = [g.clone() for g in grads]
        ref = [nn.Parameter(torch.zeros_like(g)) for g in want]
        for r, g in zip(ref, want):
            r.grad = g
        clip(ref, 0.5)
        assert all(torch.allclose(p.grad, r.grad) for p, r in zip(params, ref)), algorithm


def test_fused_adamw_trains_under_lightning_clipping(
    tmp_path: Path, digits_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a real Trainer, with fusing forced on CPU: bf16-mixed brings Lightning's
    MixedPrecision plugin, whose own clipping refuses a fused optimiser; the run trains and
    clips through the module's hook instead, at every step."""
    import ediff_train.training.module as module_py
    from ediff_train.core import perf

    def fused_adamw(
        params: list, lr: float, betas: tuple, weight_decay: float, fusable: bool
    ) -> torch.optim.AdamW:
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fusable
        )

    clipped: list[float] = []

    def spy(params: object, value: float, algorithm: object = "norm") -> None:
        clipped.append(value)
        perf.clip_gradients(params, value, algorithm)  # type: ignore[arg-type]

    monkeypatch.setattr(module_py, "adamw", fused_adamw)
    monkeypatch.setattr(module_py, "clip_gradients", spy)
    train(
        tmp_path / "R",
        digits_root,
        "perf_fused",
        "steps=2",
        "checkpoint_every=100",
        "trainer.precision=bf16-mixed",
        "trainer.gradient_clip_val=1.0",
    )
    assert RECORDS["perf_fused"]["optimizer_steps"] == [0, 1] and clipped == [1.0, 1.0]


def test_deferred_nan_check_keeps_checkpoints_clean(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """finite_check_every=5 (how a GPU run checks): a NaN at step 2 is not read at once, so
    steps 2 and 3 update the weights, but the checkpoint due after step 3 is refused: the run
    stops with the step-2 checkpoint intact and finite, and no hand-off."""
    run = tmp_path / "R"
    with pytest.raises(SystemExit) as e:
        train(
            run,
            digits_root,
            "perf_nan",
            "steps=6",
            "checkpoint_every=2",
            "module.finite_check_every=5",
            "+callbacks.probe.nan_at=2",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "loss was not finite at a step in 2–3 of E0_0" in lines[0], err
    assert "Traceback" not in err
    rec = RECORDS["perf_nan"]
    assert rec["optimizer_steps"] == [0, 1, 2, 3]  # deferred: the bad steps did update
    assert not all(torch.isfinite(v).all() for v in rec["at_exception"].values())
    ckpt = torch.load(
        run / "E0_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["global_step"] == 2
    same({k.removeprefix("denoiser."): v for k, v in ckpt["state_dict"].items()}, rec["weights"][2])
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())
    assert not (run / "E0_0" / "weights.safetensors").exists()


def test_deferred_check_raises_once_read() -> None:
    module = ExpertModule(_mlp(), parse_node("E0_0"), finite_check_every=3)
    module._check_finite(torch.tensor(1.0), torch.ones(2, dtype=torch.float64))
    module.raise_if_nonfinite()  # finite so far: nothing
    module._check_finite(torch.tensor(float("inf")), torch.ones(2, dtype=torch.float64))
    with pytest.raises(EdiffError, match="loss was not finite at step 0 of E0_0"):
        module.raise_if_nonfinite()
    module.raise_if_nonfinite()  # read once: cleared


def test_bench_compile_rows_and_batch_sweep(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench/train_step.py"),
        "--configs",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch",
        "2,3",
        "--device",
        "cpu",
        "--compile",
        "both",
        "--backend",
        "eager",
        "--optim",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["compile"]) for r in rows] == [
        (2, False),
        (2, True),
        (3, False),
        (3, True),
    ]
    for r in rows:
        assert not r["oom"] and r["img_per_s"] > 0 and r["gflop_per_step"] > 0
        assert r["mfu"] is None  # no MFU on CPU
        assert r["compiled"] == r["compile"] and (r["compile_s"] is not None) == r["compile"]
    assert rows[1]["gflop_per_step"] == rows[0]["gflop_per_step"]
    assert rows[2]["gflop_per_step"] == pytest.approx(rows[0]["gflop_per_step"] * 1.5)
