"""LoRA experts through peft, end to end: a root, then `expert=E1_1 lora=default` through the real
train.py; the frozen base, peft's files read back by peft, merged-weight known answers for the
ensemble's adapter switching, the one-line refusals and the resume of a LoRA node."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from test_train import train

from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.run.adapters import PEFT_PREFIX, resolve_targets
from ediff_train.run.weights import load_expert, load_weights
from ediff_train.sampling.ensemble import load_ensemble
from ediff_train.sampling.lora import AdapterSwitch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = ["sample.per_prompt=0", "probe.enabled=false"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """R/E0_0 (3 steps) and R/E1_1 as a LoRA adapter over it through train.py: 2 steps as a
    2-process DDP run (gloo), then the same command with steps=3 and one process resumes its
    last checkpoint for the third. The raw adapter after step 2 is kept beside it."""
    tmp = tmp_path_factory.mktemp("lora")
    child = ["run_dir=R", "expert=E1_1", "lora=default", *QUIET]
    train(tmp, "run_dir=R", "steps=3", *QUIET)
    train(tmp, *child, "steps=2", "trainer=ddp_cpu")
    shutil.copy(tmp / "R/E1_1/raw/adapter_model.safetensors", tmp / "R/E1_1_step2.safetensors")
    train(tmp, *child, "steps=3")
    return tmp


def cond_for(ndir: Path, batch: int = 2, seed: int = 0) -> Conditioning:
    """Random embeddings of the widths the node's config was trained with."""
    dims = OmegaConf.load(ndir / "config.yaml").encoders.dims
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        t5=torch.randn(batch, 6, dims.t5, generator=g),
        t5_mask=torch.ones(batch, 6, dtype=torch.bool),
        clip_txt=torch.randn(batch, 77, dims.clip_txt, generator=g),
        clip_pool=torch.randn(batch, dims.clip_pool, generator=g),
        clip_img=torch.randn(batch, dims.clip_img, generator=g),
    )


def merged(
    base: torch.nn.Module, tensors: dict[str, torch.Tensor], scale: float
) -> torch.nn.Module:
    """The base with an adapter merged by hand, W + scale·B·A (no peft involved)."""
    out = copy.deepcopy(base)
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            path = key[len(PEFT_PREFIX) :].split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            layer = out.backbone.get_submodule(path)
            layer.weight += scale * (b @ a).reshape(layer.weight.shape)
    return out


def test_only_the_adapter_trains_and_the_base_stays_bit_identical(lora_run: Path) -> None:
    root, child = lora_run / "R" / "E0_0", lora_run / "R" / "E1_1"
    _, root_ema, _ = load_weights(root / "weights.safetensors")
    ckpt = torch.load(child / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    state = {k.removeprefix("denoiser."): v for k, v in ckpt["state_dict"].items()}
    lora = sorted(k for k in state if ".lora_" in k)
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert lora and base.keys() == root_ema.keys()
    assert all(torch.equal(base[k], root_ema[k]) for k in base)  # the frozen base: the root's EMA
    assert all(state[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # B starts at 0
    opt = ckpt["optimizer_states"][0]
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(lora)  # AdamW: adapters only
    assert {int(s["step"]) for s in opt["state"].values()} == {3}
    info = json.loads((child / "node.json").read_text())
    rec = info["lora"]
    digest = hashlib.sha256((root / "weights.safetensors").read_bytes()).hexdigest()
    assert rec["base"] == "E0_0" and rec["base_sha256"] == digest and info["step"] == 6
    assert info["handoff"]["optimizer"] == "fresh (a LoRA adapter)"
    assert not (child / "weights.safetensors").exists()
    assert rec["adapter_params"] == sum(state[k].numel() for k in lora)


def test_peft_reads_the_files_and_gives_our_outputs(lora_run: Path) -> None:
    from peft import PeftModel

    root, child = lora_run / "R" / "E0_0", lora_run / "R" / "E1_1"
    _, ours = load_expert(child)  # base + the EMA adapter, our loader
    _, base = load_expert(root)
    cfg = json.loads((child / "adapter_config.json").read_text())
    tensors = load_file(child / "adapter_model.safetensors")
    by_hand = merged(base, tensors, cfg["lora_alpha"] / cfg["r"])
    theirs = copy.deepcopy(base)
    theirs.backbone = PeftModel.from_pretrained(theirs.backbone, str(child)).eval()
    x, sigma, cond = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), cond_for(child)
    with torch.no_grad():
        want = by_hand(x, sigma, cond)
        torch.testing.assert_close(ours(x, sigma, cond), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x, sigma, cond), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(x, sigma, cond), want, atol=1e-4)  # the adapter matters
    raw = load_file(child / "raw" / "adapter_model.safetensors")
    assert raw.keys() == tensors.keys() and any(not torch.equal(raw[k], tensors[k]) for k in raw)


def test_ensemble_switches_adapters_by_sigma_without_copies(lora_run: Path) -> None:
    """Two adapters over one base (E1_1's and a random one for E1_0): every σ is answered by
    the base with its owner's adapter merged, and the base's tensors are never copied."""
    root, child = lora_run / "R" / "E0_0", lora_run / "R" / "E1_1"
    run = lora_run / "R2"
    shutil.copytree(lora_run / "R", run)
    other = run / "E1_0"
    shutil.copytree(run / "E1_1", other)
    info = json.loads((other / "node.json").read_text())
    (other / "node.json").write_text(json.dumps({**info, "node": "E1_0"}))
    conf = OmegaConf.load(other / "config.yaml")
    conf.expert = {"name": "E1_0", "kind": "tree", "parent": None}
    OmegaConf.save(conf, other / "config.yaml")
    g = torch.Generator().manual_seed(1)
    tensors = {
        k: torch.randn(v.shape, generator=g) * 0.05
        for k, v in load_file(other / "adapter_model.safetensors").items()
    }
    save_file(tensors, other / "adapter_model.safetensors")
    ens = load_ensemble(run, ["E1_0", "E1_1"])
    _, base = load_expert(root)
    scale = 8.0 / 8
    answers = {
        "E1_0": merged(base, tensors, scale),
        "E1_1": merged(base, load_file(child / "adapter_model.safetensors"), scale),
    }
    shared = {p.data_ptr() for e in ens.experts for n, p in e.named_parameters() if "lora" not in n}
    assert len(shared) == sum(1 for n, _ in base.named_parameters())  # one base, not two
    switch = ens.experts[0].switch
    x, cond = torch.randn(2, 3, 16, 16), cond_for(child)
    with torch.no_grad():
        for sigma, owner in ((0.05, "E1_0"), (5.0, "E1_1"), (0.2, "E1_0")):
            s = torch.full((2,), sigma)
            out = ens(x, s, cond)
            assert switch.active == owner
            torch.testing.assert_close(out, answers[owner](x, s, cond), rtol=1e-5, atol=1e-5)
    assert ens.calls == [2, 1] and switch.switches == 3
    with pytest.raises(EdiffError, match="offload"):
        ens.offload("cpu")


def test_adapter_over_another_base_is_refused(lora_run: Path) -> None:
    run = lora_run / "R3"
    shutil.copytree(lora_run / "R", run)
    path = run / "E0_0" / "weights.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("ema."))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, path)
    info = json.loads((run / "E1_1" / "node.json").read_text())
    info["lora"]["base_dir"] = str(run / "gone")  # the base it was trained over is not here
    (run / "E1_1" / "node.json").write_text(json.dumps(info))
    with pytest.raises(EdiffError, match="another base") as e:
        load_expert(run / "E1_1")
    assert "\n" not in str(e.value)


def test_targets_resolve_and_bad_ones_are_refused(lora_run: Path) -> None:
    _, base = load_expert(lora_run / "R" / "E0_0")
    net = base.backbone
    assert resolve_targets(net, "auto") == ["qkv", "proj", "q", "kv"]
    assert resolve_targets(net, r".*\.kv") == r".*\.kv"
    for bad, what in (["kv", "nope"], "'nope'"), (r"nope\d", "regex"):
        with pytest.raises(EdiffError, match=what) as e:
            resolve_targets(net, bad)
        assert "\n" not in str(e.value)


def test_cli_refuses_a_target_that_matches_nothing(lora_run: Path) -> None:
    args = ["run_dir=R", "steps=3", "expert=E1_0", "lora=default", *QUIET]
    proc = train(lora_run, *args, "lora.target_modules=[qkv,nope]", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: lora.target_modules: 'nope' matches no Linear/Conv2d"), last
    ndir = lora_run / "R" / "E1_0"
    assert not (ndir / "config.yaml").exists() and not (ndir / "checkpoints").exists()


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["lora=default"], "has no parent to adapt"),
        (["expert=E1_0", "lora=default", "lora.rank=0"], "lora.rank must be a whole number ≥ 1"),
        (["expert=E1_0", "lora=default", "continue_from=X"], "continue_from=X"),
        (["expert=E2_3"], "parent E1_1 is a LoRA adapter"),
    ],
)
def test_lora_settings_refused_in_one_line(lora_run: Path, overrides: list[str], says: str) -> None:
    """check_lora, which train_node runs before anything is written."""
    from hydra import compose, initialize_config_dir

    from ediff_train import CONF_DIR
    from ediff_train.cli import register_nodes
    from ediff_train.core.experts import node_from_config
    from ediff_train.training.lora import check_lora

    register_nodes(["E2_3"])
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"run_dir={lora_run / 'R'}", *overrides])
    with pytest.raises(EdiffError, match=says) as e:
        check_lora(cfg, node_from_config(cfg.expert))
    assert "\n" not in str(e.value)


def test_resumed_lora_node_carries_on(lora_run: Path) -> None:
    """E1_1's third step came from its step-2 checkpoint: the adapter's AdamW carried on (its
    step is 3; a fresh one would be at 1), the adapter moved on from step 2's, the tree's step
    counts on from the parent's, and the base is still the root's EMA, bit for bit."""
    child = lora_run / "R" / "E1_1"
    ckpt = torch.load(child / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3
    assert {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {3}
    before = load_file(lora_run / "R" / "E1_1_step2.safetensors")
    after = load_file(child / "raw" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(
        not torch.equal(before[k], after[k]) for k in before
    )
    assert json.loads((child / "node.json").read_text())["steps_this_run"] == 3
    rank1 = json.loads((child / "data" / "rank1.json").read_text())  # the DDP leg's 2nd rank
    assert sum(rank1.values()) == 2 * 16  # its two batches of 16


def test_in_process_pieces() -> None:
    """AdapterSwitch changes peft's active adapter only when asked for another one."""
    from peft import LoraConfig, inject_adapter_in_model

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    for name in ("a", "b"):
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), net, adapter_name=name)
    switch = AdapterSwitch(net)
    switch.use("a")
    switch.use("a")
    switch.use("b")
    assert switch.switches == 2 and all(m.active_adapters == ["b"] for m in switch.layers)


def test_lora_child_of_a_lora_parent_starts_from_its_adapter(lora_run: Path) -> None:
    """E2_3 under the LoRA E1_1: the same base (the root's EMA, hash-checked), its adapter and
    the adapter's EMA starting as E1_1's raw and EMA adapters; only the adapter trains."""
    from hydra import compose, initialize_config_dir

    from ediff_train import CONF_DIR
    from ediff_train.cli import register_nodes
    from ediff_train.core.experts import node_from_config
    from ediff_train.run.adapters import to_peft
    from ediff_train.training.loop import build_module

    register_nodes(["E2_3"])
    run = lora_run / "R"
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose(
            "train", overrides=[f"run_dir={run}", "expert=E2_3", "lora=default", "logger=csv"]
        )
    cfg.data.root = OmegaConf.load(run / "E1_1" / "config.yaml").data.root
    module, resume = build_module(cfg, node_from_config(cfg.expert), run / "E2_3")
    assert resume is None and module.step_offset == 6 and module.lora.base["base"] == "E0_0"
    raw = to_peft(module.denoiser.state_dict(), "E2_3", "backbone.")
    ema = to_peft(module.ema_state.module.state_dict(), "E2_3", "backbone.")
    for got, file in ((raw, "raw/adapter_model.safetensors"), (ema, "adapter_model.safetensors")):
        want = load_file(run / "E1_1" / file)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    _, root_ema, _ = load_weights(run / "E0_0" / "weights.safetensors")
    trainable = [n for n, p in module.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    for k, v in module.denoiser.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, root_ema[k.replace(".base_layer.", ".")]), k


def test_bench_counts_one_base_plus_adapters() -> None:
    """bench/sample.py's LoRA memory figure: N experts over one base are the base's bytes plus
    rank·(in + out) fp32 values per targeted Linear per expert (counted here from the layers)."""
    import copy as _copy
    import importlib.util

    from hydra.utils import instantiate

    from ediff_train.core.edm import EDMPrecond
    from ediff_train.core.experts import parse_node

    spec = importlib.util.spec_from_file_location("_bench_sample", ROOT / "bench" / "sample.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = EDMPrecond(instantiate(bench.model_config("tiny"), grad_checkpointing=False))
    plain = _copy.deepcopy(base)
    nodes = [parse_node(n) for n in ("E1_0", "E1_1")]
    ens = bench.lora_ensemble(base, nodes, 4)
    lin = [
        m
        for n, m in plain.backbone.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("qkv", "proj", "q", "kv")
    ]
    adapter = sum(4 * (m.in_features + m.out_features) * 4 for m in lin) * len(nodes)
    assert bench.param_bytes(*ens.experts) == bench.param_bytes(plain) + adapter
    assert bench.param_bytes(plain) == sum(p.numel() * 4 for p in plain.parameters())


@pytest.mark.parametrize("model", ["dit_tiny", "mmdit_tiny", "sd_unet_tiny"])
def test_auto_targets_on_every_backbone_give_the_merged_answer(model: str) -> None:
    """`target_modules: auto` on the DiT and on the diffusers backbones (inner model at .model):
    a fresh adapter leaves the output as is, a random one gives the base with W + B·A merged."""
    import importlib.util

    from hydra.utils import instantiate

    from ediff_train.core.edm import EDMPrecond
    from ediff_train.run.adapters import inject, lora_config, to_peft

    if not (ROOT / "conf" / "model" / f"{model}.yaml").is_file():
        pytest.skip(f"no conf/model/{model}.yaml")
    spec = importlib.util.spec_from_file_location("_bench_step", ROOT / "bench" / "train_step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    cfg = step.model_config(model)
    torch.manual_seed(0)
    base = EDMPrecond(instantiate(cfg, grad_checkpointing=False)).eval()
    with torch.no_grad():  # off adaLN-Zero's zero init, where attention has no effect yet
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    plain = copy.deepcopy(base)
    inject(base.backbone, lora_config(4, 4, 0.0, resolve_targets(base.backbone, "auto")), "k")
    size = int(cfg.image_size)
    x, s = torch.randn(2, int(cfg.in_channels), size, size), torch.tensor([0.5, 2.0])
    cond = step.random_cond(cfg, 2, 8, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(base(x, s, cond), plain(x, s, cond))  # B = 0
        for name, p in base.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.1)
        adapter = to_peft(base.state_dict(), "k", "backbone.")
        want = merged(plain, adapter, 1.0)(x, s, cond)
        torch.testing.assert_close(base(x, s, cond), want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(plain(x, s, cond), want, atol=1e-3)
