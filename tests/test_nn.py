"""The text U-Net and its attention: shapes, zero-init, masking, bias convention, checkpointing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.edm import EDMPrecond
from ediff_train.errors import EdiffError
from ediff_train.nn.attention import CrossAttention
from ediff_train.nn.unet import TextUNet

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"t5_dim": 8, "clip_txt_dim": 6, "clip_pool_dim": 5, "clip_img_dim": 7}


def small_net(**kw: object) -> TextUNet:
    args = dict(
        image_size=8,
        model_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8, 4],
        head_channels=8,
        context_dim=16,
        **DIMS,
    )
    args.update(kw)
    torch.manual_seed(0)
    return TextUNet(**args)


def randomize_zero_init(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Zero-initialised layers make F ≡ 0; give them weights so inputs can reach the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def make_cond(b: int = 2, length: int = 5, real: int = 3, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :real] = True
    return Conditioning(
        t5=torch.randn(b, length, DIMS["t5_dim"], generator=g),
        t5_mask=mask,
        clip_txt=torch.randn(b, 77, DIMS["clip_txt_dim"], generator=g),
        clip_pool=torch.randn(b, DIMS["clip_pool_dim"], generator=g),
        clip_img=torch.randn(b, DIMS["clip_img_dim"], generator=g),
    )


def inputs(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 3, 8, 8, generator=g), torch.tensor([-1.0, 0.7])[:b]


def test_shape_and_zero_init_output() -> None:
    net = small_net().eval()
    x, c_noise = inputs()
    out = net(x, c_noise, make_cond())
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # D = c_skip·x at initialisation
    den = EDMPrecond(net)
    sigma = torch.tensor([0.5, 2.0])
    c_skip = 0.25 / (sigma**2 + 0.25)
    assert torch.allclose(den(x, sigma, make_cond()), c_skip.view(-1, 1, 1, 1) * x)


def test_t5_padding_is_ignored_and_real_tokens_matter() -> None:
    net = randomize_zero_init(small_net()).eval()
    x, c_noise = inputs()
    cond = make_cond(length=5, real=3)
    base = net(x, c_noise, cond)
    assert base.abs().max() > 1e-3
    padded = make_cond(length=5, real=3)
    padded.t5[:, 3:] = 100.0 * torch.randn_like(padded.t5[:, 3:])
    torch.testing.assert_close(net(x, c_noise, padded), base, atol=1e-5, rtol=1e-5)
    real = make_cond(length=5, real=3)
    real.t5[:, 1] += 1.0
    assert (net(x, c_noise, real) - base).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["t5", "clip_txt", "clip_pool", "clip_img"])
def test_dropping_each_embedding_changes_output(name: str) -> None:
    net = randomize_zero_init(small_net()).eval()
    x, c_noise = inputs()
    cond = make_cond()
    dropped = make_cond()
    setattr(dropped, name, torch.zeros_like(getattr(dropped, name)))
    assert (net(x, c_noise, cond) - net(x, c_noise, dropped)).abs().max() > 1e-4


def test_gradient_reaches_every_projection() -> None:
    net = randomize_zero_init(small_net())
    x, c_noise = inputs()
    net(x, c_noise, make_cond()).square().mean().backward()
    emb = net.cond
    for name, p in [
        ("pool", emb.pool_proj.weight),
        ("img", emb.img_proj.weight),
        ("t5", emb.t5_tok[0].weight),
        ("txt", emb.txt_tok[0].weight),
        ("img_tok", emb.img_tok[0].weight),
        ("null", emb.null),
        ("sigma", net.noise_emb.mlp[0].weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cross_attention_bias_convention_matches_reference() -> None:
    torch.manual_seed(0)
    layer = randomize_zero_init(CrossAttention(16, 12, head_channels=8)).eval()
    x, ctx = torch.randn(2, 16, 3, 3), torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, True, False, True], [True, False, True, True, True]])
    bias = 3.0 * torch.randn(2, 9, 5)
    out = layer(x, ctx, mask, bias)

    tok = layer.norm(x).flatten(2).transpose(1, 2)
    q = layer.q(tok).view(2, 9, 2, 8).transpose(1, 2)
    k, v = (t.view(2, 5, 2, 8).transpose(1, 2) for t in layer.kv(ctx).chunk(2, -1))
    logits = (q @ k.transpose(-1, -2) + bias[:, None]) / math.sqrt(8)  # softmax((QKᵀ+B)/√d)
    logits = logits.masked_fill(~mask[:, None, None], float("-inf"))
    ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 16)
    ref = x + layer.proj(ref).transpose(1, 2).reshape(2, 16, 3, 3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(EdiffError, match="bias has shape"):
        layer(x, ctx, mask, bias[:, :4])


def test_unet_bias_changes_output_and_large_negative_bias_removes_token() -> None:
    net = randomize_zero_init(small_net()).eval()
    x, c_noise = inputs()
    cond = make_cond(length=5, real=3)
    n_ctx = 5 + 77 + 2
    assert net.context_slices(5)["t5"] == slice(0, 5)
    calls: list[tuple[int, int]] = []

    def random_bias(h: int, w: int) -> torch.Tensor:
        calls.append((h, w))
        return torch.randn(2, h * w, n_ctx, generator=torch.Generator().manual_seed(h))

    base = net(x, c_noise, cond)
    assert (net(x, c_noise, cond, cross_attn_bias=random_bias) - base).abs().max() > 1e-4
    assert set(calls) == {(8, 8), (4, 4)}

    token = net.context_slices(5)["t5"].start + 1

    def block(h: int, w: int) -> torch.Tensor:
        b = torch.zeros(2, h * w, n_ctx)
        b[:, :, token] = -1e9
        return b

    changed = make_cond(length=5, real=3)
    changed.t5[:, 1] += 2.0
    assert (net(x, c_noise, changed) - base).abs().max() > 1e-4
    torch.testing.assert_close(
        net(x, c_noise, changed, cross_attn_bias=block),
        net(x, c_noise, cond, cross_attn_bias=block),
        atol=1e-5,
        rtol=1e-5,
    )


def test_context_layout() -> None:
    net = small_net()
    cond = make_cond(length=5)
    tokens, mask = net.cond.context(cond)
    s = net.context_slices(5, 77)
    assert tokens.shape == (2, s["null"].stop, 16) and mask.shape == (2, s["null"].stop)
    assert (s["t5"], s["clip_txt"], s["clip_img"], s["null"]) == (
        slice(0, 5),
        slice(5, 82),
        slice(82, 83),
        slice(83, 84),
    )
    torch.testing.assert_close(tokens[:, s["null"]][:, 0], net.cond.null.expand(2, -1))
    assert torch.equal(mask[:, s["t5"]], cond.t5_mask) and mask[:, s["clip_txt"].start :].all()


def test_grad_checkpointing_gives_same_gradients() -> None:
    plain = randomize_zero_init(small_net())
    ckpt = small_net(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, c_noise = inputs()
    for net in (plain, ckpt):
        net.train()
        net(x, c_noise, make_cond()).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def _saved_bytes(net: torch.nn.Module, cond: Conditioning) -> int:
    """Bytes autograd keeps for backward from one training forward (outside checkpointed
    regions: inside one, checkpoint's own hooks take the tensors and recompute them later)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x, c_noise = inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.train()(x, c_noise, cond)
    return total


def test_grad_checkpointing_flag_changes_what_is_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag must take effect: every heavy layer goes through torch's checkpoint, and the
    forward keeps far fewer activations; off (or in eval) it is never called."""
    import ediff_train.nn.unet as unet_mod
    from ediff_train.nn.blocks import ResBlock
    from ediff_train.nn.efficient_unet import EfficientUNet

    calls: list[str] = []
    real = unet_mod.checkpoint

    def counting(fn, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(type(fn).__name__)
        return real(fn, *args, **kw)

    monkeypatch.setattr(unet_mod, "checkpoint", counting)
    heavy = (ResBlock, unet_mod.SelfAttention, CrossAttention)
    d = DIMS["t5_dim"]
    sr_cond = make_cond()
    sr_cond.lowres, sr_cond.sigma_aug = torch.rand(2, 3, 4, 4), torch.full((2,), 0.1)
    for build, cond in (
        (lambda flag: small_net(grad_checkpointing=flag), make_cond()),
        (
            lambda flag: EfficientUNet(
                8,
                16,
                [1, 2],
                [1, 2],
                [4],
                d,
                DIMS["clip_txt_dim"],
                DIMS["clip_pool_dim"],
                DIMS["clip_img_dim"],
                16,
                head_channels=8,
                grad_checkpointing=flag,
            ),
            sr_cond,
        ),
    ):
        plain, ckpt = build(False), build(True)
        n_heavy = sum(isinstance(m, heavy) for m in ckpt.modules())
        calls.clear()
        stored_plain = _saved_bytes(plain, cond)
        assert calls == []
        stored_ckpt = _saved_bytes(ckpt, cond)
        assert len(calls) == n_heavy > 0, (type(ckpt).__name__, calls)
        assert stored_ckpt < 0.5 * stored_plain, (stored_ckpt, stored_plain)
        calls.clear()
        with torch.no_grad():
            ckpt.eval()(*inputs(), cond)  # sampling: nothing to recompute, no checkpoint
        assert calls == []


def test_bf16_autocast_on_cpu_matches_fp32_roughly() -> None:
    net = randomize_zero_init(small_net()).eval()
    x, c_noise = inputs()
    ref = net(x, c_noise, make_cond())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, c_noise, make_cond())
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05
    whole = net.to(torch.bfloat16)(x, c_noise, make_cond())  # bf16 weights, fp32 inputs
    assert whole.dtype == torch.bfloat16 and (whole.float() - ref).norm() / ref.norm() < 0.1


def test_wrong_embedding_width_is_a_clear_error() -> None:
    cond = make_cond()
    cond.clip_img = torch.randn(2, 9)
    with pytest.raises(EdiffError, match="clip_img"):
        small_net()(*inputs(), cond)
    with pytest.raises(EdiffError, match="head_channels"):
        small_net(head_channels=5)


def test_model_configs_instantiate() -> None:
    dims = {"t5": 32, "clip_txt": 32, "clip_pool": 24, "clip_img": 24}
    root = OmegaConf.create(
        {
            "encoders": {"dims": dims},
            "data": {"image_size": 16},
            "model": OmegaConf.load(ROOT / "conf/model/tiny.yaml"),
        }
    )
    tiny = instantiate(root.model)
    assert isinstance(tiny, TextUNet) and tiny.image_size == 16
    assert tiny.cond.dims == {"t5": 32, "clip_txt": 32, "clip_pool": 24, "clip_img": 24}
    with torch.device("meta"):
        base = instantiate(OmegaConf.load(ROOT / "conf/model/base64.yaml"))
    n = sum(p.numel() for p in base.parameters())
    assert base.grad_checkpointing and base.image_size == 64 and 5e8 < n < 1e9
    assert base.cond.dims == {"t5": 4096, "clip_txt": 768, "clip_pool": 768, "clip_img": 768}


def test_bench_smoke(tmp_path: Path) -> None:
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
        "4",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny" in proc.stdout and "img/s" in proc.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["config"] == "tiny" and row["batch"] == 4 and row["img_per_s"] > 0
    assert row["gflop_per_step"] > 0 and 0.5 < row["params_m"] < 5 and row["mfu"] is None
