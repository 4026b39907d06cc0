"""Offloaded ensembles: the same images as with every expert resident, each expert's weights on
the device only while it runs or is next, the next one fetched ahead of its first step, and each
expert copied once per sampling run. On CPU the "device" copies are clones in host memory, which
is enough to check the bookkeeping; the CUDA stream path is exercised by bench/sample.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_sampling import _cond

from ediff_train.core.experts import parse_node
from ediff_train.core.solvers import karras_sigmas
from ediff_train.sampling.ensemble import Ensemble
from ediff_train.sampling.generation import generate
from ediff_train.sampling.offload import Offloader

NODES = ["E9_511", "E3_0", "not_E9_511_E3_0"]  # Config-D: high σ, low σ, the middle


class _Net(torch.nn.Module):
    """An expert whose answer depends on its weights, its buffer and its input."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
        self.register_buffer("shift", torch.randn(3, generator=g)[:, None, None] * 0.1)
        self.seen: list[tuple[int, ...]] = []  # data pointers of the weights it ran with

    def forward(self, x, sigma, cond):  # noqa: ANN001, ANN201
        self.seen.append((self.conv.weight.data_ptr(), self.shift.data_ptr()))
        return self.conv(x) * 0.5 + x * 0.5 + self.shift + cond.clip_pool[:, :1, None, None]


def _ensemble() -> Ensemble:
    return Ensemble([parse_node(n) for n in NODES], [_Net(k) for k in range(len(NODES))])


def _sample(ens: Ensemble, steps: int = 12) -> torch.Tensor:
    return generate(ens, _cond(2), image_size=4, steps=steps, guidance=2.0, seed=3)


def test_offloaded_ensemble_gives_the_same_images_with_two_experts_resident() -> None:
    plain, off = _ensemble(), _ensemble().offload("cpu")
    host = [[t.data_ptr() for t in (e.conv.weight, e.shift)] for e in off.experts]
    trace: list[tuple[int, list[int]]] = []
    activate = off.offloader.activate

    def spy(i: int) -> None:
        activate(i)
        trace.append((i, sorted(off.offloader.resident)))

    off.offloader.activate = spy  # record residency after every activation
    a, b = _sample(plain), _sample(off)
    assert torch.equal(a, b)
    assert plain.calls == off.calls and all(c > 0 for c in off.calls)

    # the schedule walks σ down: E9_511 (index 0), then the middle (2), then E3_0 (1)
    order = off.offloader.order
    assert order == [0, 2, 1]
    assert off.offloader.transfers == 3  # every expert copied exactly once
    assert off.offloader.peak_resident == 2
    for i, resident in trace:  # the running expert and the next one, nothing else
        k = order.index(i)
        assert resident == sorted(order[k : k + 2]), (i, resident)

    # each expert ran on device copies, never on its host tensors, and its host copy is back
    for e, ptrs in zip(off.experts, host):
        assert e.seen and all(p[0] != ptrs[0] and p[1] != ptrs[1] for p in e.seen)
    last = order[-1]
    for j, (e, ptrs) in enumerate(zip(off.experts, host)):
        now = [e.conv.weight.data_ptr(), e.shift.data_ptr()]
        assert (now != ptrs) == (j == last), j
    off.offloader.release()
    assert [[e.conv.weight.data_ptr(), e.shift.data_ptr()] for e in off.experts] == host


def test_next_expert_is_fetched_before_its_first_step() -> None:
    ens = _ensemble().offload("cpu")
    ens.plan(karras_sigmas(8))
    off: Offloader = ens.offloader
    assert list(off.resident) == [0]  # the first expert is fetched when the plan is made
    off.activate(0)
    assert sorted(off.resident) == [0, 2]  # ... and its successor while it runs
    off.activate(2)
    assert sorted(off.resident) == [1, 2]
    off.activate(1)
    assert list(off.resident) == [1] and off.transfers == 3
    # a second sampling run starts over from the first expert
    ens.plan(karras_sigmas(8))
    off.activate(0)
    assert sorted(off.resident) == [0, 2] and off.transfers == 5


def test_sample_bench_times_the_offloaded_ensemble(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/sample.py --offload at its smallest: a table row with positive step times for the
    single model, the resident ensemble and the offloaded one, which fetched every expert."""
    spec = importlib.util.spec_from_file_location("_bench_sample", ROOT / "bench" / "sample.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sample.json"
    bench.main(
        [
            "--offload",
            "--batch",
            "1",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    row = json.loads(out.read_text())[0]
    for k in ("single_s_per_step", "ensemble_s_per_step", "offload_s_per_step"):
        assert row[k] > 0, k
    assert row["offload_transfers"] >= 3 and row["peak_mb"] is None  # no CUDA: not measured
    table = capsys.readouterr().out
    assert "offload s/step" in table and f"{row['offload_s_per_step']:.4f}" in table
