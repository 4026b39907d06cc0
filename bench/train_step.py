"""Time one EDM training step (forward + backward) of the model configs and print a table.

    python bench/train_step.py --configs tiny base64 --json bench.json
    python bench/train_step.py --configs tiny dit_tiny mmdit_tiny sd_unet_tiny
    python bench/train_step.py --configs sr_tiny sr256 sr1024 --infer 1024
    python bench/train_step.py --device cuda --configs base64 --batch 64,128,256 --compile both \
        --optim --json bench_gpu.json

`--batch` takes a list (a sweep up to what fills the GPU; a batch that runs out of memory gives
an "out of memory" row and the sweep goes on). `--compile on|both` adds rows with the denoiser
under `torch.compile` (perf.CompiledDenoiser, the wrapper training uses): the first step, which
compiles forward and backward, is timed apart as `compile_s` and never enters the step figures;
a failed compile falls back to eager and its row says so (`compiled: false`). A compiled row
also carries `dynamo`: torch._dynamo's counters for that row (frames compiled, graph breaks
and their reasons, graphs made), the proof that it ran compiled code. `--channels-last`
runs weights and batch in NHWC; `--optim` uses the AdamW training builds (fused on CUDA).

SR configs (Efficient U-Net) get a low-res input at 1/LOWRES_FACTOR of their size, noise-
augmented as in training. `--infer N` adds, for each SR config, one sampling-time forward pass
(no grad, batch 1, CFG's two rows) of an N×N image: SR1024's whole-image inference memory.

Per config: parameters, images/s (from the median step time after warmup), peak memory, and
FLOPs per step and per image counted by `torch.utils.flop_counter.FlopCounterMode` on a
meta-device copy (model FLOPs: no activation recompute, attention included). On CUDA,
MFU = FLOPs/step ÷ s/step ÷ the dense bf16 peak in PEAK_BF16_TFLOPS. Peak memory is
`torch.cuda.max_memory_allocated` on CUDA; on CPU it is the growth of the process's
resident-set high-water mark (Linux VmHWM, reset through /proc/self/clear_refs) from just
before the model is built, so it covers weights, gradients, optimizer state (with --optim)
and activations.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ediff_train.cli  # noqa: F401  (registers the resolvers the model configs use)
from ediff_train.core.edm import EDMPrecond, LogNormalSigma, edm_loss
from ediff_train.core.perf import CompiledDenoiser, adamw, to_device
from ediff_train.nn.cost import (
    forward_flops,
    fwd_bwd_flops,  # noqa: F401  (re-exported: tests count with it)
    is_sr,
    random_cond,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
# Encoder dims used when conf/encoders/tiny.yaml is absent (the embedded digits encoders).
TINY_DIMS = {"t5": 32, "clip_txt": 32, "clip_pool": 24, "clip_img": 24}
# T5 tokens per sample: the paper's 113 for the full-size model, a short caption otherwise.
T5_LEN = {"base64": 113, "sr256": 113, "sr1024": 113}
DEFAULT_T5_LEN = 16
# SR configs: training image size where the config takes it from the data, and the up-sampling
# factor (high-res / low-res): the paper's stages are 4x, the digits toy 2x.
SR_IMAGE_SIZE = {"sr_tiny": 32, "sr1024_tiny": 16}
LOWRES_FACTOR = {"sr_tiny": 2}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s. First match
# of the device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
]


def model_config(name: str) -> DictConfig:
    """conf/model/<name>.yaml (or a path) with its ${encoders.*}/${data.*} references resolved."""
    path = Path(name) if name.endswith(".yaml") else CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        sys.exit(f"no model config at {path}")
    dims: dict[str, Any] = dict(TINY_DIMS)
    enc = CONF / "encoders" / "tiny.yaml"
    if enc.is_file():
        try:
            dims.update(OmegaConf.to_container(OmegaConf.load(enc).dims, resolve=True))
        except Exception:  # noqa: BLE001 - a half-written encoder config falls back to defaults
            pass
    image_size = SR_IMAGE_SIZE.get(path.stem, 16)
    data = CONF / "data" / "digits.yaml"
    if data.is_file() and path.stem not in SR_IMAGE_SIZE:
        image_size = int(OmegaConf.load(data).get("image_size", 16))
    root = OmegaConf.create(
        {
            "encoders": {"dims": dims},
            "data": {"image_size": image_size},
            "model": OmegaConf.load(path),
        }
    )
    OmegaConf.resolve(root)
    return root.model


def count_flops(cfg: DictConfig, batch: int, t5_len: int, factor: int = 4) -> int:
    """FLOPs of one forward+backward at this batch, on the meta device (no memory, no time)."""
    return forward_flops(cfg, batch, t5_len, factor=factor, backward=True)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_counters() -> dict[str, Any]:
    """What torch._dynamo counted since the row began (`torch._dynamo.utils.counters`): frames
    it compiled (`frames_ok`) of those it traced, graph breaks with their reasons, graphs made.
    frames_ok > 0 is the proof that a compiled row ran compiled code."""
    c = torch._dynamo.utils.counters
    breaks = dict(c["graph_break"])
    return {
        "frames_ok": int(c["frames"]["ok"]),
        "frames_total": int(c["frames"]["total"]),
        "graph_breaks": int(sum(breaks.values())),
        "graph_break_reasons": {str(k)[:300]: int(v) for k, v in list(breaks.items())[:10]},
        "unique_graphs": int(c["stats"]["unique_graphs"]),
    }


def time_steps(
    cfg: DictConfig,
    args: argparse.Namespace,
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    t5_len: int,
    bf16: bool,
    factor: int = 4,
    compile: bool = False,
) -> dict[str, Any]:
    """Build the model and time `steps` training steps after `warmup`; with `compile`, the
    first (compiling) step is timed apart and precedes the warmup. Returns parameters, seconds
    per step, grad checkpointing, and the compile outcome. The model dies with this frame."""
    torch.manual_seed(0)
    net = instantiate(cfg).to(device)
    if args.no_checkpointing:
        net.grad_checkpointing = False
    den = EDMPrecond(net).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    den.to(memory_format=fmt)
    opt = adamw(list(den.parameters()), 1e-4, (0.9, 0.999), 0.01, True) if args.optim else None
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    cond = random_cond(cfg, batch, t5_len, device, factor=factor)
    law = LogNormalSigma()
    fn = CompiledDenoiser(den, args.backend) if compile else den

    def step() -> None:
        sigma = to_device(law.sample(batch).float(), device)  # as training: no host sync
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = edm_loss(fn, x, sigma, cond).mean()
        loss.backward()
        if opt is not None:
            opt.step()
        den.zero_grad(set_to_none=True)

    compile_s = None
    if compile:
        torch._dynamo.utils.counters.clear()  # this row's frames and graph breaks only
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        compile_s = time.perf_counter() - t
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    compiled = isinstance(fn, CompiledDenoiser) and fn.compiled
    dynamo = dynamo_counters() if compile else None
    if compile:
        torch._dynamo.reset()  # the next row's model compiles afresh, this one's graphs go
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "times": times,
        "grad_checkpointing": net.grad_checkpointing,
        "compiled": compiled,
        "compile_s": compile_s,
        "compile_error": fn.failure if isinstance(fn, CompiledDenoiser) else None,
        "dynamo": dynamo,
    }


def bench_one(
    name: str, args: argparse.Namespace, device: torch.device, batch: int | None, compile: bool
) -> dict[str, Any]:
    cfg = model_config(name)
    factor = LOWRES_FACTOR.get(Path(name).stem, 4)
    cuda = device.type == "cuda"
    heavy = int(cfg.image_size) >= 64
    batch = batch or (64 if not heavy else (32 if cuda else 1))
    steps = args.steps or (20 if cuda else (2 if heavy else 10))
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    t5_len = args.t5_len or T5_LEN.get(Path(name).stem, DEFAULT_T5_LEN)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and cuda)
    head = {
        "config": Path(name).stem,
        "batch": batch,
        "compile": compile,
        "channels_last": bool(args.channels_last),
    }

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        mem_method = "torch.cuda.max_memory_allocated"
        device_name = torch.cuda.get_device_name(device)
    else:
        hwm_ok = _reset_hwm() and _rss_kib("VmHWM") is not None
        rss0 = _rss_kib("VmRSS") if hwm_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mem_method = "VmHWM growth (clear_refs)" if hwm_ok else "ru_maxrss growth (lower bound)"
        device_name = f"cpu ({torch.get_num_threads()} threads)"

    try:
        run = time_steps(cfg, args, device, batch, steps, warmup, t5_len, bf16, factor, compile)
    except torch.OutOfMemoryError:
        run = None  # freed once the traceback is gone, i.e. below
    if run is None:
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
        return {**head, "oom": True, "device": device_name}

    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.empty_cache()
    else:
        now = _rss_kib("VmHWM") if hwm_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = max(0, now - rss0) / 1024

    times = run["times"]
    sec = sorted(times)[len(times) // 2]  # median: robust to a hiccup on a shared machine
    flops = count_flops(cfg, batch, t5_len, factor)
    peak = peak_tflops(device_name) if cuda else None
    achieved = flops / sec / 1e12
    return {
        **head,
        "oom": False,
        "params_m": run["params"] / 1e6,
        "t5_len": t5_len,
        "dtype": "bf16-autocast" if bf16 else "fp32",
        "device": device_name,
        "steps": steps,
        "warmup": warmup,
        "optimizer": bool(args.optim),
        "grad_checkpointing": run["grad_checkpointing"],
        "compiled": run["compiled"],
        "compile_s": run["compile_s"],
        "compile_error": run["compile_error"],
        "dynamo": run["dynamo"],
        "sec_per_step": sec,
        "mean_sec_per_step": sum(times) / len(times),
        "best_sec_per_step": min(times),
        "steps_per_s": 1 / sec,
        "img_per_s": batch / sec,
        "peak_mem_mb": peak_mb,
        "mem_method": mem_method,
        "gflop_per_step": flops / 1e9,
        "gflop_per_img": flops / batch / 1e9,
        "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": (achieved / peak) if (peak and bf16) else None,
    }


@torch.no_grad()
def infer_memory(name: str, size: int, device: torch.device, bf16: bool) -> dict[str, Any]:
    """One sampling-time forward of an SR config at size² (batch 1 → 2 rows with CFG): seconds
    and peak memory (CUDA: max allocated; CPU: VmHWM growth)."""
    cfg = model_config(name)
    factor = LOWRES_FACTOR.get(Path(name).stem, 4)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_hwm()
        rss0 = _rss_kib("VmRSS") or 0
    net = instantiate(cfg).to(device).eval()
    den = EDMPrecond(net)
    t5_len = T5_LEN.get(Path(name).stem, DEFAULT_T5_LEN)
    cond = random_cond(cfg, 2, t5_len, device, size=size, factor=factor)
    x = torch.randn(2, 3, size, size, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        den(x, torch.ones(2, device=device), cond)  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        den(x, torch.ones(2, device=device), cond)
        if cuda:
            torch.cuda.synchronize(device)
    sec = time.perf_counter() - t
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if cuda
        else max(0, (_rss_kib("VmHWM") or 0) - rss0) / 1024
    )
    return {
        "config": Path(name).stem,
        "size": size,
        "rows": 2,
        "sec_per_call": sec,
        "peak_mem_mb": peak,
        "dtype": "bf16-autocast" if bf16 else "fp32",
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'config':<13}{'params(M)':>10}{'batch':>7}{'compile':>9}{'dtype':>15}"
    head += f"{'steps/s':>9}{'img/s':>9}{'peak MB':>10}{'GFLOP/step':>12}{'GFLOP/img':>11}"
    head += f"{'TFLOP/s':>9}{'MFU':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["oom"]:
            lines.append(f"{r['config']:<13}{'':>10}{r['batch']:>7}  out of memory")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        comp = (f"{r['compile_s']:.0f}s" if r["compiled"] else "failed") if r["compile"] else "-"
        lines.append(
            f"{r['config']:<13}{r['params_m']:>10.2f}{r['batch']:>7}{comp:>9}{r['dtype']:>15}"
            f"{r['steps_per_s']:>9.2f}{r['img_per_s']:>9.1f}{r['peak_mem_mb']:>10.0f}"
            f"{r['gflop_per_step']:>12.1f}{r['gflop_per_img']:>11.3f}"
            f"{r['achieved_tflops']:>9.3f}{mfu:>8}"
        )
    notes = {f"{r['device']}; memory: {r['mem_method']}" for r in rows if not r["oom"]}
    lines += [f"device: {n}" for n in sorted(notes)]
    lines += (
        ["compile: seconds of the first (compiling) step, kept out of the step figures"]
        if any(r["compile"] for r in rows)
        else []
    )
    for r in rows:
        if r.get("dynamo"):
            d = r["dynamo"]
            lines.append(
                f"dynamo, {r['config']} batch {r['batch']}: frames compiled {d['frames_ok']}"
                f"/{d['frames_total']}, graph breaks {d['graph_breaks']}, "
                f"graphs {d['unique_graphs']}"
            )
    if any(r.get("peak_bf16_tflops") for r in rows):
        peaks = ", ".join(f"{k} {v}" for k, v in PEAK_BF16_TFLOPS)
        lines.append(f"MFU vs dense bf16 peak TFLOP/s: {peaks}")
    return "\n".join(lines)


def batch_list(text: str) -> list[int]:
    """'64,128,256' → [64, 128, 256] (argparse type for --batch)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of batch sizes: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be ≥ 1: {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs",
        nargs="+",
        default=["tiny", "base64"],
        help="names under conf/model/ or paths to model yaml files",
    )
    p.add_argument(
        "--batch",
        type=batch_list,
        default=None,
        help="one size or a list (64,128,256); default: 64 (small nets); "
        "base64: 32 on CUDA, 1 on CPU",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps; default 20 on CUDA, 10 on CPU (2 for base64)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 CUDA, 1 CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="bf16 = torch.autocast bf16; auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--t5-len", type=int, default=None, help="T5 tokens (default 113 base64, 16)")
    p.add_argument("--optim", action="store_true", help="include an AdamW step in each step")
    p.add_argument("--no-checkpointing", action="store_true", help="disable grad checkpointing")
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="torch.compile the denoiser: rows without, with, or both",
    )
    p.add_argument("--backend", default="inductor", help="torch.compile backend (--compile)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and batch")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument(
        "--infer",
        type=int,
        default=None,
        help="also one no-grad CFG forward of each SR config at this size (e.g. 1024)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for name in args.configs:
        for batch in args.batch or [None]:
            for compile in modes:
                rows.append(bench_one(name, args, device, batch, compile))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(table(rows))
    infer = []
    if args.infer:
        bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
        for name in args.configs:
            if is_sr(model_config(name)):
                r = infer_memory(name, args.infer, device, bf16)
                infer.append(r)
                print(
                    f"inference {r['config']} at {r['size']}² ({r['rows']} rows, {r['dtype']}):"
                    f" {r['sec_per_call']:.2f} s/call, peak {r['peak_mem_mb']:.0f} MB"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {"rows": rows, "inference": infer, "peak_bf16_tflops": dict(PEAK_BF16_TFLOPS)}
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
