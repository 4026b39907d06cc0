"""A root from a pretrained diffusers folder (`init_from=`, run/pretrained.py): the backbone's
weights are the folder's, bit for bit; the folder's VAE becomes the codec; the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT

from ediff_train.core.experts import node_from_config
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.errors import EdiffError, user_error
from ediff_train.run.pretrained import apply_init_from

SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,  # the tiny encoders' T5 and CLIP token widths (32): zero-padded
    caption_projection_dim=16,
    pooled_projection_dim=48,  # clip_pool 24 + clip_img 24
    pos_embed_max_size=8,
)


def sd3_folder(root: Path, seed: int = 0, vae: bool = False, **over: Any) -> Path:
    """A tiny random SD3 pipeline folder: transformer/ (+ vae/) and model_index.json."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(seed)
    SD3Transformer2DModel(**{**SD3, **over}).save_pretrained(root / "transformer")
    index: dict[str, Any] = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.42.0",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
    }
    if vae:
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 8),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
        ).save_pretrained(root / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def compose_train(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    from ediff_train.cli import register_nodes

    register_nodes(["E0_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def node_of_cfg(cfg: Any) -> Any:
    return node_from_config(cfg.expert, law=param_from_config(cfg.get("param")).law)


def built_root(folder: Path, *overrides: str) -> Any:
    """The root's module as train.py builds it (training/loop.build_module), from init_from."""
    from ediff_train.training.loop import build_module

    cfg = compose_train(f"init_from={folder}", "param=flow", *overrides)
    node = node_of_cfg(cfg)
    apply_init_from(cfg, node)
    module, _ = build_module(cfg, node, Path(str(cfg.run_dir)) / node.name)
    return cfg, module


def test_root_weights_are_the_folders_bit_for_bit(tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    folder = sd3_folder(tmp_path / "sd3")
    cfg, module = built_root(folder, f"run_dir={tmp_path / 'R'}")
    assert cfg.model._target_ == "ediff_train.nn.mmdit.MMDiT"
    assert cfg.model.pretrained == str(folder.resolve())
    ours = module.denoiser.backbone.diffusers_model.state_dict()
    saved = SD3Transformer2DModel.from_pretrained(folder / "transformer").state_dict()
    assert ours.keys() == saved.keys()
    assert all(torch.equal(ours[k], saved[k]) for k in saved)
    # and the denoiser is the folder's network: F = SD3(x_t, 1000·t) for a flow root
    model = SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 4.0])
    ctx, pooled = torch.randn(2, 93, 32), torch.randn(2, 48)
    t = sigma / (1 + sigma)
    with torch.no_grad():
        v = model(
            hidden_states=x / (1 + sigma.view(-1, 1, 1, 1)),
            timestep=1000 * t,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
        ).sample
        net = module.denoiser.backbone.eval()
        mine = net.model(
            hidden_states=x / (1 + sigma.view(-1, 1, 1, 1)),
            timestep=net.timestep(t, 2),
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
        ).sample
    assert torch.equal(v, mine)


def test_the_folders_vae_becomes_the_codec(tmp_path: Path) -> None:
    folder = sd3_folder(tmp_path / "sd3", vae=True)
    cfg = compose_train(f"init_from={folder}", "param=flow")
    record = apply_init_from(cfg, node_of_cfg(cfg))
    assert record == {
        "folder": str(folder.resolve()),
        "class": "SD3Transformer2DModel",
        "subfolder": "transformer",
        "vae": True,
    }
    assert cfg.codec._target_.endswith("VAECodec")
    assert (cfg.codec.path, cfg.codec.subfolder) == (str(folder.resolve()), "vae")
    assert (cfg.codec.channels, cfg.codec.downsample) == (4, 2)  # latent_channels, 2^(2−1)
    assert (cfg.model.in_channels, cfg.model.image_size) == (4, 8)  # follow the codec


def test_a_bare_model_folder_and_an_sd_unet_are_found(tmp_path: Path) -> None:
    from ediff_train.run.pretrained import pretrained_backbone

    sd3_folder(tmp_path / "p")
    assert pretrained_backbone(str(tmp_path / "p")) == ("SD3Transformer2DModel", "transformer")
    assert pretrained_backbone(str(tmp_path / "p" / "transformer")) == (
        "SD3Transformer2DModel",
        None,
    )
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, None]})
    )
    assert pretrained_backbone(str(tmp_path / "u")) == ("UNet2DConditionModel", "unet")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "is not a diffusers model folder"),
        (
            lambda p: (
                p.mkdir(),
                (p / "model_index.json").write_text(
                    json.dumps({"vae": ["diffusers", "AutoencoderKL"]})
                ),
                p,
            )[2],
            "has no SD3Transformer2DModel or UNet2DConditionModel",
        ),
        (
            lambda p: (
                p.mkdir(),
                (p / "config.json").write_text(
                    json.dumps({"_class_name": "FluxTransformer2DModel"})
                ),
                p,
            )[2],
            "holds a FluxTransformer2DModel; supported backbones",
        ),
    ],
)
def test_not_a_supported_folder_is_one_line(tmp_path: Path, make: Any, message: str) -> None:
    folder = make(tmp_path / "m")
    cfg = compose_train(f"init_from={folder}")
    with pytest.raises(EdiffError, match=message) as err:
        apply_init_from(cfg, node_of_cfg(cfg))
    assert "\n" not in str(err.value)


def test_a_child_cannot_start_from_a_folder(tmp_path: Path) -> None:
    cfg = compose_train(f"init_from={sd3_folder(tmp_path / 'sd3')}", "expert=E1_0")
    with pytest.raises(EdiffError, match="init_from is for the root E0_0.*expert=E1_0 init_from="):
        apply_init_from(cfg, node_of_cfg(cfg))


@pytest.mark.parametrize(
    "over, message",
    [
        ({"in_channels": 4, "out_channels": 4}, "has in_channels=4, the data needs 3"),
        ({"pos_embed_max_size": 4}, "takes images up to 8 px"),
        ({"joint_attention_dim": 16}, "joint_attention_dim=16"),
        ({"pooled_projection_dim": 40}, "pooled_projection_dim=40"),
    ],
)
def test_a_folder_that_does_not_fit_the_data_is_one_line(
    tmp_path: Path, over: dict, message: str
) -> None:
    folder = sd3_folder(tmp_path / "sd3", **over)
    with pytest.raises(Exception) as raised:  # Hydra's instantiate wraps it; the CLI unwraps
        built_root(folder, f"run_dir={tmp_path / 'R'}")
    err = user_error(raised.value)
    assert err is not None and message in str(err) and "\n" not in str(err), raised.value


def test_training_refuses_a_bad_folder_before_writing(tmp_path: Path) -> None:
    """train.py's task (training/loop.train_node, in this process: a subprocess costs ~20 s):
    the error is one line and the node's config is never written."""
    from ediff_train.training.loop import train_node

    folder = sd3_folder(tmp_path / "sd3", in_channels=4, out_channels=4)
    cfg = compose_train(f"init_from={folder}", f"run_dir={tmp_path / 'R'}", "steps=1")
    with pytest.raises(Exception) as raised:
        train_node(cfg)
    err = user_error(raised.value)
    assert err is not None and "\n" not in str(err)
    assert str(err) == f"pretrained {str(folder.resolve())!r} has in_channels=4, the data needs 3"
    assert not (tmp_path / "R" / "E0_0" / "config.yaml").exists()


def test_a_child_inherits_the_folders_backbone_and_a_plain_tree_is_left_alone(
    tmp_path: Path,
) -> None:
    """`expert=E1_0` under a root started from a folder trains the root's model and codec; under
    a root that was not, the command's own model stands."""
    from omegaconf import OmegaConf

    folder = sd3_folder(tmp_path / "sd3", vae=True)
    root = compose_train(f"init_from={folder}", f"run_dir={tmp_path / 'R'}")
    apply_init_from(root, node_of_cfg(root))
    (tmp_path / "R" / "E0_0").mkdir(parents=True)
    (tmp_path / "R" / "E0_0" / "config.yaml").write_text(OmegaConf.to_yaml(root, resolve=True))
    child = compose_train("expert=E1_0", f"run_dir={tmp_path / 'R'}")
    record = apply_init_from(child, node_of_cfg(child))
    assert record == {
        "folder": str(folder.resolve()),
        "inherited_from": str(tmp_path / "R" / "E0_0"),
    }
    assert child.model._target_ == "ediff_train.nn.mmdit.MMDiT"
    assert child.model.pretrained == str(folder.resolve()) and child.codec.subfolder == "vae"
    plain = compose_train(f"run_dir={tmp_path / 'P'}")
    (tmp_path / "P" / "E0_0").mkdir(parents=True)
    (tmp_path / "P" / "E0_0" / "config.yaml").write_text(OmegaConf.to_yaml(plain, resolve=True))
    child = compose_train("expert=E1_0", f"run_dir={tmp_path / 'P'}")
    assert apply_init_from(child, node_of_cfg(child)) is None
    assert child.model._target_ == "ediff_train.nn.unet.TextUNet" and child.init_from is None
