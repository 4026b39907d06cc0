"""Start-up cost: the wall time of a short digits node, as a user runs it (issue 37, item 6).

Times `python train.py run_dir=<fresh> steps=N` end to end (imports, Hydra, Lightning, the
logger, the held-out monitor, the hand-off probe, N steps, checkpoints, the grid) for each
variant, `repeats` times in turn (A, B, A, B, … so a change in machine load hits both), with the
digits set already cached, and prints the median wall per variant. W&B's environment variables are
removed so that `logger=auto` sees a fresh machine; `wandb` sets WANDB_MODE=offline.

    python bench/startup.py                       # steps=10, 3 repeats, the variants below
    python bench/startup.py steps=20 repeats=5
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "defaults": [],
    "defaults, W&B set up (logger=auto picks W&B)": ["+WANDB_MODE=offline"],
    "logger=csv monitor.every=0 sample.per_prompt=0": [
        "logger=csv",
        "monitor.every=0",
        "sample.per_prompt=0",
    ],
}


def run(args: list[str], steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HF_HUB_OFFLINE"] = "1"
    overrides = []
    for a in args:
        if a.startswith("+WANDB_"):
            key, _, value = a[1:].partition("=")
            env[key] = value
        else:
            overrides.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), f"run_dir={tmp}", f"steps={steps}"]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, *overrides], cwd=tmp, env=env, capture_output=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"train.py failed:\n{proc.stderr.decode()[-2000:]}")
    return wall


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    steps, repeats = int(opts.get("steps", 10)), int(opts.get("repeats", 3))
    run([], 1)  # warm the digits cache and the OS's file cache once
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, args in VARIANTS.items():
            walls[name].append(run(args, steps))
    load = os.getloadavg()[0]
    print(f"{steps}-step digits node, {repeats} runs each, load average {load:.1f}:")
    for name, w in walls.items():
        runs = ", ".join(f"{x:.1f}" for x in w)
        print(f"  {name:<50} median {statistics.median(w):5.1f} s  ({runs})")


if __name__ == "__main__":
    main(sys.argv[1:])
