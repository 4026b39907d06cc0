"""Throughput of the Real-ESRGAN degradation chain (data/degrade.py) at the SR256 case; prints a
table.

    python bench/degrade.py --out degrade.json     # 256 -> 64, batch 64, CPU (1 thread) + CUDA

The high-res batch is random 256 px crops of real photographs (scikit-learn's two sample
images) in [-1, 1]; the chain is conf/degrade/realesrgan.yaml (= DegradationChain()). Each row
runs --batches timed batches after --warmup untimed ones, each batch with its own seed. The
chain's cost varies with the sizes it draws (the first resize scales the whole batch by
0.15-1.5, and the first noise and JPEG run at that size), so the throughput is all samples over
all time (what training sees); the median batch is shown beside it.
Per-op shares time each top-level op of the chain separately (on CUDA with a synchronize
around each, so the sum is a little above the plain run). The CPU row runs on one thread
(torch.set_num_threads(1)): the figure to hold against "samples/s per core". The target is
≥ 400 samples/s per core in the loader's workers, or keeping up with SR256 training when
batched on the device (this project's choice: the chain runs inside the training step).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ediff_train.data.degrade import DegradationChain, OneOf

TARGET_PER_CORE = 400


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hires_batch(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """[batch, 3, size, size] in [-1, 1]: random crops of real photographs, resized to size."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [
        torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 127.5 - 1
        for p in load_sample_images().images
    ]
    out = []
    for i in range(batch):
        p = photos[i % len(photos)]
        side = int(rng.integers(size, min(p.shape[1:]) + 1))
        y, x = (int(rng.integers(0, d - side + 1)) for d in p.shape[1:])
        crop = p[None, :, y : y + side, x : x + side]
        out.append(
            torch.nn.functional.interpolate(crop, size=size, mode="bicubic", antialias=True).clamp(
                -1, 1
            )
        )
    return torch.cat(out)


def label(op: Any) -> str:
    if isinstance(op, OneOf):
        return (
            "OneOf(" + " | ".join("+".join(type(o).__name__ for o in b) for b in op.branches) + ")"
        )
    return type(op).__name__


class Timed:
    """Wraps an op and adds its wall time (synchronised on CUDA) to `total`."""

    def __init__(self, op: Callable, sync: Callable[[], None]) -> None:
        self.op, self.sync, self.total = op, sync, 0.0

    def __call__(self, x: torch.Tensor, g: torch.Generator, out_size: int) -> torch.Tensor:
        self.sync()
        t = time.perf_counter()
        y = self.op(x, g, out_size)
        self.sync()
        self.total += time.perf_counter() - t
        return y


def measure(
    device: str, batch: int, size: int, out_size: int, batches: int, warmup: int
) -> dict[str, Any]:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    hires = hires_batch(batch, size).to(dev)
    chain = DegradationChain()
    for i in range(warmup):
        chain(hires, out_size, torch.Generator().manual_seed(10_000 + i))
    sync()
    times = []
    for i in range(batches):
        t = time.perf_counter()
        chain(hires, out_size, torch.Generator().manual_seed(i))
        sync()
        times.append(time.perf_counter() - t)
    timed = [Timed(op, sync) for op in chain.ops]
    split = DegradationChain(ops=timed)
    t = time.perf_counter()
    for i in range(batches):  # the same seeds: the same sizes and parameters as above
        split(hires, out_size, torch.Generator().manual_seed(i))
    sync()
    whole = time.perf_counter() - t
    ops = [{"op": f"{k + 1} {label(w.op)}", "share": w.total / whole} for k, w in enumerate(timed)]
    ops.append({"op": "final clamp/round/rescale", "share": 1 - sum(o["share"] for o in ops)})
    med, total = statistics.median(times), sum(times)
    return {
        "device": device,
        "name": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "batch": batch,
        "size": size,
        "out_size": out_size,
        "batches": batches,
        "s_per_batch_median": med,
        "s_per_batch_all": times,
        "samples_per_s": batch * batches / total,
        "ms_per_sample": 1000 * total / batch / batches,
        "samples_per_s_median_batch": batch / med,
        "ops": ops,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="high-res side")
    p.add_argument("--out-size", type=int, default=64, help="low-res side")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=None, help="timed batches (CPU 10, CUDA 50)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if there")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the CPU row")
    p.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    a = p.parse_args(argv)
    devices = a.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    import kornia

    rows = []
    for device in devices:
        if device == "cpu":
            torch.set_num_threads(a.threads)
        n = a.batches or (50 if device.startswith("cuda") else 10)
        rows.append(measure(device, a.batch, a.size, a.out_size, n, a.warmup))
    machine = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "kornia": kornia.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    print(
        f"degradation chain (conf/degrade/realesrgan.yaml) {a.size} -> {a.out_size}, batch "
        f"{a.batch}; torch {torch.__version__}, kornia {kornia.__version__}"
    )
    print(
        f"{'device':<40} {'threads':>7} {'samples/s':>10} {'ms/sample':>10} "
        f"{'median batch':>13}  all batches (s)"
    )
    for r in rows:
        th = "-" if r["threads"] is None else str(r["threads"])
        spread = ", ".join(f"{t:.3f}" for t in r["s_per_batch_all"])
        print(
            f"{r['device'] + ': ' + r['name']:<40.40} {th:>7} {r['samples_per_s']:>10,.1f} "
            f"{r['ms_per_sample']:>10.2f} {r['samples_per_s_median_batch']:>9,.1f}/s  "
            f"{spread}"
        )
    for r in rows:
        print(f"share of the time per op, {r['device']}:")
        for o in r["ops"]:
            print(f"  {o['op']:<62} {100 * o['share']:5.1f} %")
    print(
        f"target: ≥ {TARGET_PER_CORE} samples/s per core in loader workers, or keep up with "
        "SR256 training on the device"
    )
    if a.out is not None:
        a.out.write_text(
            json.dumps(
                {"machine": machine, "rows": rows, "target_samples_per_core": TARGET_PER_CORE},
                indent=1,
            )
        )
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
