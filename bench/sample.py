"""What routing costs: sampler step time of an ensemble vs one model of the same network.

    python bench/sample.py                       # tiny net, 3 experts, CPU
    python bench/sample.py --config base64 --experts 3 --batch 4 --device cuda

Both runs use the same solver, steps, guidance and inputs; the ensemble's experts tile the noise
axis (E9_511, E3_0 and the middle, Config-D's base) and every step asks only the owner of σ, so
the ratio should be ≈ 1 (the router's lookup is the only extra work). `--offload` adds the same
ensemble with offloading (each expert on the device only while it runs, the next one prefetched:
offload.Offloader) and reports its step time and peak memory beside the resident ensemble's.
Prints a table; `--json` writes it. Peak memory is CUDA's max allocated (on CPU: not measured).
`--lora R` adds the same experts as rank-R LoRA adapters over one shared base (sampling/lora.py:
the adapter switched by σ, no weight copied): its step time against the single model, and the
parameter bytes of N experts as full copies vs one base + N adapters.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import model_config, random_cond  # noqa: E402

from ediff_train.core.edm import EDMPrecond  # noqa: E402
from ediff_train.core.experts import parse_node  # noqa: E402
from ediff_train.core.solvers import (
    karras_sigmas,  # noqa: E402
    solve,  # noqa: E402
)
from ediff_train.run.adapters import inject, lora_config, resolve_targets  # noqa: E402
from ediff_train.sampling.ensemble import Ensemble  # noqa: E402
from ediff_train.sampling.guidance import guided  # noqa: E402
from ediff_train.sampling.lora import AdapterExpert, AdapterSwitch  # noqa: E402

NODES = ["E9_511", "E3_0", "not_E9_511_E3_0", "E1_0", "E1_1"]


def time_sampler(
    model: Any, cond: Any, size: int, steps: int, solver: str, repeats: int, device: torch.device
) -> list[float]:
    """Seconds per solver step over `repeats` full sampling runs (after one warm-up run)."""
    den = guided(model, cond, cond.null(), 5.0)
    sig = karras_sigmas(steps)
    out = []
    for r in range(repeats + 1):
        if isinstance(model, Ensemble):
            model.plan(sig)  # what generate() does: tells offloading the expert order
        x = torch.randn(cond.batch_size, 3, size, size, device=device) * 80.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        solve(solver, den, x, sig)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if r:
            out.append((time.perf_counter() - t) / steps)
    return out


def peak_mb(run: Any, device: torch.device) -> float | None:
    """CUDA's peak allocated memory (MB) during `run()`; None on other devices."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def param_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct parameter tensors of `modules` (a shared base counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def lora_ensemble(base: torch.nn.Module, nodes: list[Any], rank: int) -> Ensemble:
    """`base` with one rank-`rank` adapter per node (B random, so the adapters do real work),
    as an ensemble whose experts switch the adapter."""
    targets = resolve_targets(base.backbone, "auto")
    g = torch.Generator().manual_seed(1)
    for node in nodes:
        inject(base.backbone, lora_config(rank, rank, 0.0, targets), node.name)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    base.eval().requires_grad_(False)
    switch = AdapterSwitch(base)
    return Ensemble(nodes, [AdapterExpert(base, n.name, switch) for n in nodes])


def lora_row(a: Any, cfg: Any, nodes: list[Any], nets: list[Any], cond: Any) -> dict[str, Any]:
    """Step time of the LoRA ensemble vs the single model, and parameter bytes both ways."""
    device, size = torch.device(a.device), int(cfg.image_size)
    ens = lora_ensemble(copy.deepcopy(nets[0]), nodes, a.lora).to(device)
    single_t: list[float] = []
    lora_t: list[float] = []
    for _ in range(2):  # interleaved, as above
        single_t += time_sampler(nets[0], cond, size, a.steps, a.solver, a.repeats, device)
        lora_t += time_sampler(ens, cond, size, a.steps, a.solver, a.repeats, device)
    s, e = statistics.median(single_t), statistics.median(lora_t)
    full = param_bytes(nets[0]) * len(nodes)
    shared = param_bytes(*ens.experts)
    return {
        "lora_rank": a.lora,
        "experts": len(nodes),
        "single_s_per_step": s,
        "lora_ensemble_s_per_step": e,
        "lora_ratio": e / s,
        "adapter_switches": ens.experts[0].switch.switches,
        "full_copies_mb": full / 2**20,
        "base_plus_adapters_mb": shared / 2**20,
        "adapters_mb": (shared - param_bytes(nets[0])) / 2**20,
    }


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--experts", type=int, default=3, choices=[2, 3])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--solver", default="heun")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", action="store_true", help="also time an offloaded ensemble")
    p.add_argument("--lora", type=int, default=0, help="also time rank-R LoRA experts (0: off)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = model_config(a.config)
    torch.manual_seed(0)
    nets = [
        EDMPrecond(instantiate(cfg, grad_checkpointing=False)).eval().to(device)
        for _ in range(a.experts)
    ]
    nodes = [parse_node(n) for n in (NODES[:3] if a.experts == 3 else NODES[3:])]
    ens = Ensemble(nodes, nets).to(device)
    cond = random_cond(cfg, a.batch, 16, device)
    size = int(cfg.image_size)
    rows = []
    # interleaved, so drift of a shared machine hits both alike
    single_t: list[float] = []
    ens_t: list[float] = []
    for _ in range(2):
        single_t += time_sampler(nets[0], cond, size, a.steps, a.solver, a.repeats, device)
        ens_t += time_sampler(ens, cond, size, a.steps, a.solver, a.repeats, device)
    s, e = statistics.median(single_t), statistics.median(ens_t)
    rows.append(
        {
            "config": a.config,
            "experts": a.experts,
            "batch": a.batch,
            "steps": a.steps,
            "solver": a.solver,
            "device": str(device),
            "single_s_per_step": s,
            "ensemble_s_per_step": e,
            "ratio": e / s,
            "calls": ens.calls,
            "peak_mb": peak_mb(
                lambda: time_sampler(ens, cond, size, a.steps, a.solver, 1, device), device
            ),
        }
    )
    if a.offload:
        off = Ensemble(nodes, [copy.deepcopy(n).cpu() for n in nets]).offload(device)
        ens.cpu()  # only the offloaded copies on the device now
        nets[0].cpu()
        off_t = time_sampler(off, cond, size, a.steps, a.solver, a.repeats, device)
        o = statistics.median(off_t)
        rows[0].update(
            offload_s_per_step=o,
            offload_ratio=o / s,
            offload_peak_mb=peak_mb(
                lambda: time_sampler(off, cond, size, a.steps, a.solver, 1, device), device
            ),
            offload_transfers=off.offloader.transfers,
        )
    print(
        f"{'config':<8}{'experts':>8}{'batch':>7}{'solver':>10}{'single s/step':>15}"
        f"{'ensemble s/step':>17}{'ratio':>8}{'peak MB':>9}"
        + (f"{'offload s/step':>16}{'ratio':>8}{'peak MB':>9}" if a.offload else "")
    )
    for r in rows:
        line = (
            f"{r['config']:<8}{r['experts']:>8}{r['batch']:>7}{r['solver']:>10}"
            f"{r['single_s_per_step']:>15.4f}{r['ensemble_s_per_step']:>17.4f}"
            f"{r['ratio']:>8.3f}{_mb(r['peak_mb']):>9}"
        )
        if a.offload:
            line += (
                f"{r['offload_s_per_step']:>16.4f}{r['offload_ratio']:>8.3f}"
                f"{_mb(r['offload_peak_mb']):>9}"
            )
        print(line)
    threads = torch.get_num_threads()
    print(
        f"device: {device}{f' ({threads} threads)' if device.type == 'cpu' else ''}; "
        f"expert calls in the ensemble runs: {dict(zip([n.name for n in nodes], ens.calls))}"
    )
    if a.lora:
        nets[0].to(device)
        r = lora_row(a, cfg, nodes, nets, cond)
        rows.append(r)
        print(
            f"LoRA rank {r['lora_rank']}, {r['experts']} experts: "
            f"{r['lora_ensemble_s_per_step']:.4f} s/step vs single {r['single_s_per_step']:.4f} "
            f"(ratio {r['lora_ratio']:.3f}, "
            f"{r['adapter_switches']} adapter switches); parameters: {r['full_copies_mb']:.2f} MB "
            f"as full copies vs {r['base_plus_adapters_mb']:.2f} MB base + adapters "
            f"({r['adapters_mb']:.3f} MB of adapters)"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
