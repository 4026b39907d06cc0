"""The text-conditioned DiT backbone: patch round trip, zero-init, masking of padded text,
checkpointing, the refused attention hook, and a flow-matching run through train.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env
from test_nn import DIMS, inputs, make_cond, randomize_zero_init

from ediff_train.core.edm import EDMPrecond
from ediff_train.core.parameterisation import FlowMatching
from ediff_train.errors import EdiffError
from ediff_train.nn.dit import TextDiT


def small_dit(**kw: object) -> TextDiT:
    args = dict(image_size=8, patch_size=2, width=32, depth=2, heads=4, context_dim=16, **DIMS)
    args.update(kw)
    torch.manual_seed(0)
    return TextDiT(**args)


def test_zero_init_output_is_zero_so_d_is_c_skip_x() -> None:
    net = small_dit().eval()
    x, c_noise = inputs()
    assert torch.equal(net(x, c_noise, make_cond()), torch.zeros(2, 3, 8, 8))
    sigma = torch.tensor([0.5, 3.0])
    d = EDMPrecond(net, param=FlowMatching())(x, sigma, make_cond())
    torch.testing.assert_close(d, x / (1 + sigma.view(-1, 1, 1, 1)))  # c_skip = 1/(1+σ)


def test_unpatchify_puts_each_patch_back_where_it_came_from() -> None:
    """With the blocks bypassed, patch_in ∘ patch_out must be a per-patch linear map, so one
    changed input pixel changes only its own 2×2 patch of the output."""
    net = randomize_zero_init(small_dit(depth=0)).eval()
    x, c_noise = inputs()
    base = net(x, c_noise, make_cond())
    x2 = x.clone()
    x2[:, :, 5, 2] += 1.0  # pixel (5, 2) lies in patch (2, 1): rows 4–5, cols 2–3
    diff = (net(x2, c_noise, make_cond()) - base).abs().amax(dim=(0, 1))
    changed = diff > 1e-6
    assert changed[4:6, 2:4].all() and changed.sum() == 4


def test_padded_t5_tokens_do_not_reach_the_output() -> None:
    net = randomize_zero_init(small_dit()).eval()
    x, c_noise = inputs()
    a, b = make_cond(), make_cond()
    b.t5[:, 3:] += 100.0  # tokens past the real length (mask False)
    torch.testing.assert_close(net(x, c_noise, a), net(x, c_noise, b))
    b.t5[:, :3] += 1.0
    assert not torch.allclose(net(x, c_noise, a), net(x, c_noise, b))


def test_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        net = randomize_zero_init(small_dit(grad_checkpointing=ckpt)).train()
        x, c_noise = inputs()
        net(x, c_noise, make_cond()).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_attention_hook_is_refused_in_one_line() -> None:
    x, c_noise = inputs()
    with pytest.raises(EdiffError, match="model=dit does not support them"):
        small_dit()(x, c_noise, make_cond(), cross_attn_bias=lambda h, w: None)


def test_flow_matching_dit_trains_and_samples(tmp_path: Path) -> None:
    env = run_env(tmp_path)
    args = [
        "model=dit_tiny",
        "param=flow",
        "run_dir=R",
        "steps=3",
        "logger=none",
        "data.num_workers=0",
        "sample.per_prompt=1",
        "sample.steps=3",
        "monitor.every=0",
        "data.batch_size=8",
        "probe.batches=1",
        "probe.batch_size=8",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            "run_dir=R",
            "expert=E0_0",
            "n=2",
            "steps=3",
            "progress=false",
            "out=s",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "s").glob("sample_*.png")) == [
        "sample_0000.png",
        "sample_0001.png",
    ]
