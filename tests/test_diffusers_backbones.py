"""The diffusers backbones (nn/mmdit.py, nn/sd_unet.py): packing against a hand-built call of
the inner model, masking, training steps, from_pretrained round trips, the one-line errors,
checkpointing, the FLOP counter against closed forms, and a flow MMDiT through train.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_env
from test_nn import DIMS, inputs, make_cond, randomize_zero_init

from ediff_train.core.conditioning import Conditioning
from ediff_train.core.edm import EDMPrecond, edm_loss
from ediff_train.core.parameterisation import VP, FlowMatching
from ediff_train.errors import EdiffError
from ediff_train.nn.mmdit import MMDiT
from ediff_train.nn.sd_unet import SDUNet

SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=8,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    pos_embed_max_size=4,
)
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=8,
    norm_num_groups=8,
    class_embed_type="projection",
    projection_class_embeddings_input_dim=12,
)


@pytest.fixture(autouse=True)
def _threads(one_torch_thread: None) -> None:
    """One thread for the module's tiny models (see conftest.one_torch_thread)."""


def mmdit(**kw: object) -> MMDiT:
    args = dict(
        image_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8, t5_tokens=6
    )
    args.update(kw)
    torch.manual_seed(0)
    return MMDiT(**DIMS, **args)


def sd_unet(**kw: object) -> SDUNet:
    args = dict(image_size=8, block_out_channels=[16, 32], heads=2, norm_num_groups=8)
    args.update(kw)
    torch.manual_seed(0)
    return SDUNet(**DIMS, **args)


def packed(
    cond: Conditioning, width: int, t5_tokens: int | None, clip_tokens: int = 77
) -> tuple[torch.Tensor, ...]:
    """The documented packing, written out by hand: [CLIP text, T5·mask] zero-padded to `width`
    (T5 padded with zero tokens to `t5_tokens`, the first `clip_tokens` CLIP tokens), the key
    mask, [clip_pool, clip_img]."""
    t5 = cond.t5 * cond.t5_mask[..., None]
    mask = cond.t5_mask
    if t5_tokens is not None:
        extra = t5_tokens - t5.shape[1]
        t5 = torch.cat([t5, torch.zeros(t5.shape[0], extra, t5.shape[2])], dim=1)
        mask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], dim=1)
    txt = F.pad(cond.clip_txt[:, :clip_tokens], (0, width - cond.clip_txt.shape[-1]))
    t5 = F.pad(t5, (0, width - t5.shape[-1]))
    keys = torch.cat([torch.ones(txt.shape[:2], dtype=torch.bool), mask], dim=1)
    return torch.cat([txt, t5], dim=1), keys, torch.cat([cond.clip_pool, cond.clip_img], dim=-1)


def hand_mmdit(
    model: torch.nn.Module, x: torch.Tensor, c_noise: torch.Tensor, clip_tokens: int = 77
) -> torch.Tensor:
    tokens, _, pooled = packed(make_cond(), 8, 6, clip_tokens)
    out = model(
        hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
        timestep=1000.0 * c_noise, return_dict=False,
    )  # fmt: skip
    return out[0]


def hand_unet(model: torch.nn.Module, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    tokens, keys, pooled = packed(make_cond(), 8, None)
    out = model(
        x, c_noise, encoder_hidden_states=tokens, encoder_attention_mask=keys,
        class_labels=pooled, return_dict=False,
    )  # fmt: skip
    return out[0]


def test_zero_init_output_and_shapes() -> None:
    x, c_noise = inputs()
    sigma = torch.tensor([0.5, 3.0])
    for net, param in ((mmdit(), FlowMatching()), (sd_unet(), VP())):
        out = net.eval()(x, c_noise, make_cond())
        assert out.shape == (2, 3, 8, 8) and torch.equal(out, torch.zeros_like(out))
        c_skip = param.coefficients(sigma)[0].view(-1, 1, 1, 1)
        d = EDMPrecond(net, param=param)(x, sigma, make_cond())
        torch.testing.assert_close(d, c_skip * x)


def test_packing_equals_a_hand_built_call_of_the_inner_model() -> None:
    x, c_noise = inputs()
    net = randomize_zero_init(mmdit()).eval()
    assert net.diffusers_model is net.model
    assert isinstance(net.model, diffusers.SD3Transformer2DModel)
    assert torch.equal(net(x, c_noise, make_cond()), hand_mmdit(net.model, x, c_noise))
    net = randomize_zero_init(mmdit(clip_tokens=4)).eval()
    assert torch.equal(net(x, c_noise, make_cond()), hand_mmdit(net.model, x, c_noise, 4))
    assert net.context_slices(5) == {"clip_txt": slice(0, 4), "t5": slice(4, 10)}
    net = randomize_zero_init(sd_unet()).eval()
    assert isinstance(net.diffusers_model, diffusers.UNet2DConditionModel)
    assert torch.equal(net(x, c_noise, make_cond()), hand_unet(net.model, x, c_noise))


def test_mmdit_output_does_not_depend_on_the_batch_padding() -> None:
    """No key mask in joint attention: padding is zeroed and fixed to t5_tokens, so a caption
    padded to 4 or to 5 tokens (its batch-mates' lengths) gives the same output."""
    net = randomize_zero_init(mmdit()).eval()
    x, c_noise = inputs()
    a, b = make_cond(length=5), make_cond(length=5)
    b.t5[:, 3:] += 100.0  # padded positions: zeroed before packing
    short = make_cond(length=5)
    short.t5, short.t5_mask = short.t5[:, :4], short.t5_mask[:, :4]
    ref = net(x, c_noise, a)
    torch.testing.assert_close(net(x, c_noise, b), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(net(x, c_noise, short), ref, rtol=0, atol=1e-6)
    b.t5[:, :3] += 1.0
    assert not torch.allclose(net(x, c_noise, b), ref)


def test_sd_unet_key_mask_hides_padded_t5() -> None:
    net = randomize_zero_init(sd_unet()).eval()
    x, c_noise = inputs()
    a, b = make_cond(), make_cond()
    b.t5[:, 3:] += 100.0
    torch.testing.assert_close(net(x, c_noise, b), net(x, c_noise, a))
    b.t5[:, :3] += 1.0
    assert not torch.allclose(net(x, c_noise, b), net(x, c_noise, a))


@pytest.mark.parametrize("kind", ["mmdit", "sd_unet"])
def test_a_few_adam_steps_reduce_the_loss_on_a_fixed_batch(kind: str) -> None:
    net, param = (mmdit(), FlowMatching()) if kind == "mmdit" else (sd_unet(), VP())
    den = EDMPrecond(net, param=param).train()
    opt = torch.optim.Adam(den.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    x, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    sigma, cond = torch.tensor([0.3, 1.0, 2.0, 5.0]), make_cond(b=4)
    losses = []
    for _ in range(8):
        loss = edm_loss(den, x, sigma, cond, noise=noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_pretrained_round_trip_is_bit_identical(tmp_path: Path) -> None:
    x, c_noise = inputs()
    torch.manual_seed(7)
    sd3 = diffusers.SD3Transformer2DModel(**SD3_CONFIG).eval()
    sd3.save_pretrained(tmp_path / "pipe" / "transformer")  # a pipeline folder
    sd3.save_pretrained(tmp_path / "bare")  # a bare model folder
    want = hand_mmdit(sd3, x, c_noise)
    for folder in ("pipe", "bare"):
        net = MMDiT(**DIMS, image_size=8, t5_tokens=6, pretrained=str(tmp_path / folder))
        assert net.model.config.num_layers == 2  # the folder's architecture, not the defaults
        assert torch.equal(net.eval()(x, c_noise, make_cond()), want)
    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()
    unet.save_pretrained(tmp_path / "sd" / "unet")
    net = SDUNet(**DIMS, image_size=8, pretrained=str(tmp_path / "sd")).eval()
    assert torch.equal(net(x, c_noise, make_cond()), hand_unet(unet, x, c_noise))


def test_bad_pretrained_folders_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(match: str, build: type = MMDiT, **kw: object) -> None:
        with pytest.raises(EdiffError, match=match) as e:
            build(**{**DIMS, "image_size": 8, **kw})
        assert "\n" not in str(e.value)

    (tmp_path / "empty").mkdir()
    refused("has no config.json: not a diffusers model folder", pretrained=str(tmp_path / "empty"))
    refused("does not exist", pretrained=str(tmp_path / "nowhere"))
    diffusers.UNet2DConditionModel(**UNET_CONFIG).save_pretrained(tmp_path / "p" / "transformer")
    refused(
        "holds a UNet2DConditionModel, expected a SD3Transformer2DModel",
        pretrained=str(tmp_path / "p"),
    )
    diffusers.SD3Transformer2DModel(**{**SD3_CONFIG, "in_channels": 4}).save_pretrained(
        tmp_path / "four"
    )
    refused("has in_channels=4, the data needs 3", pretrained=str(tmp_path / "four"))
    diffusers.SD3Transformer2DModel(**SD3_CONFIG).save_pretrained(tmp_path / "three")
    refused("takes images up to 8 px", pretrained=str(tmp_path / "three"), image_size=16)
    refused("joint_attention_dim=4, narrower than the t5 embeddings \\(8\\)", joint_attention_dim=4)
    small = {**UNET_CONFIG, "projection_class_embeddings_input_dim": 8}
    diffusers.UNet2DConditionModel(**small).save_pretrained(tmp_path / "u8")
    refused(
        "projection_class_embeddings_input_dim=8, narrower than clip_pool",
        build=SDUNet,
        pretrained=str(tmp_path / "u8"),
    )
    monkeypatch.setattr(diffusers, "SD3Transformer2DModel", None)
    refused(f"diffusers {diffusers.__version__} has no SD3Transformer2DModel")


def test_checkpointing_gives_the_same_gradients_and_sdpa_is_used() -> None:
    x, c_noise = inputs()
    for build in (mmdit, sd_unet):
        grads = []
        for ckpt in (False, True):
            net = randomize_zero_init(build(grad_checkpointing=ckpt)).train()
            assert net.grad_checkpointing is ckpt and net.model.is_gradient_checkpointing is ckpt
            net(x, c_noise, make_cond()).square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        torch.testing.assert_close(grads[0], grads[1])
        procs = {type(p).__name__ for p in net.model.attn_processors.values()}
        assert procs == {"JointAttnProcessor2_0" if build is mmdit else "AttnProcessor2_0"}


def test_attention_hook_is_refused_in_one_line() -> None:
    x, c_noise = inputs()
    for build, kind in ((mmdit, "mmdit"), (sd_unet, "sd_unet")):
        with pytest.raises(EdiffError, match=f"model={kind} does not support them"):
            build()(x, c_noise, make_cond(), cross_attn_bias=lambda h, w: None)


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "bench" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flop_counter_matches_the_closed_form_of_a_linear_layer() -> None:
    """y = xW: forward 2·N·I·O; backward 2·N·I·O for dW, and 2·N·I·O more for dx when x
    needs a gradient (bias adds are not counted)."""
    bench = _bench()
    n, i, o = 5, 7, 3
    lin = torch.nn.Linear(i, o)
    x = torch.randn(n, i)
    assert bench.fwd_bwd_flops(lambda: lin(x).sum()) == 4 * n * i * o
    x.requires_grad_(True)
    assert bench.fwd_bwd_flops(lambda: lin(x).sum()) == 6 * n * i * o


def test_bench_reports_flops_per_image_for_the_diffusers_configs(tmp_path: Path) -> None:
    bench = _bench()
    out = tmp_path / "bench.json"
    args = ["--configs", "mmdit_tiny", "sd_unet_tiny", "--steps", "1", "--warmup", "0"]
    bench.main([*args, "--batch", "2", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["mmdit_tiny", "sd_unet_tiny"]
    for r in rows:
        assert r["gflop_per_img"] == pytest.approx(r["gflop_per_step"] / 2)
    # the SD3 transformer's flops scale with the batch exactly (no batch-shared matmuls)
    cfg = bench.model_config("mmdit_tiny")
    assert bench.count_flops(cfg, 3, 16) * 2 == bench.count_flops(cfg, 2, 16) * 3


def test_flow_matching_mmdit_trains_through_train_py(tmp_path: Path) -> None:
    env = run_env(tmp_path)
    args = [
        "model=mmdit_tiny",
        "param=flow",
        "run_dir=R",
        "steps=3",
        "logger=none",
        "data.num_workers=0",
        "sample.per_prompt=1",
        "sample.steps=2",
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
    node = json.loads((tmp_path / "R" / "E0_0" / "node.json").read_text())
    assert node["step"] == 3
    cfg = (tmp_path / "R" / "E0_0" / "config.yaml").read_text()
    assert "ediff_train.nn.mmdit.MMDiT" in cfg and "name: flow" in cfg
    assert (tmp_path / "R" / "E0_0" / "samples.png").is_file()
