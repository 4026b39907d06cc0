"""The hand-off jump: a child's in-band held-out loss in its first steps, optimiser kept vs reset.

Trains a digits root (default 400 steps, the tuned toy settings), then each child from it in four
ways: `keep` (the default: AdamW's moments and step carried over), `reset` (a fresh AdamW, what
every hand-off did before), `keep+warmup` (kept, with `module.lr_schedule.warmup_handoff=`
`warmup` steps) and `full-law` (kept, but trained on the whole σ law, `sigma_from=root`: the
parent's own course measured in the child's band, i.e. how much the loss there moves anyway at
this lr, the reference the other rows are read against). The figures are the ones training
writes itself: each child's `handoff_probe.json` (held-out loss inside the child's own band, on
raw weights, at the hand-off and after 1, 2, 3, 5, 10, ... steps; metrics/handoff_probe.py).

    python bench/handoff.py                         # root 400, children E1_0 and E1_1, 20 steps
    python bench/handoff.py root_steps=400 child_steps=20 children=E1_1 warmup=10 \
        run_dir=runs/bench_handoff

Prints one table (loss ratio to the hand-off per step) and writes it as JSON beside the runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "sample.per_prompt=0", "checkpoint_every=1000"]


MODES = {
    "keep": ["handoff.optimizer=keep"],
    "reset": ["handoff.optimizer=reset"],
    "keep+warmup": ["handoff.optimizer=keep", "module.lr_schedule.warmup_handoff={warmup}"],
    "full-law": ["handoff.optimizer=keep", "sigma_from=root"],
}


def train(*args: str) -> None:
    cmd = [sys.executable, str(ROOT / "train.py"), *FAST, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def main(argv: list[str]) -> int:
    opts = {
        "root_steps": "400",
        "child_steps": "20",
        "children": "E1_0,E1_1",
        "run_dir": "runs/bench_handoff",
        "seed": "0",
        "warmup": "10",
    }
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts:
            sys.exit(f"unknown argument {arg!r}; takes {', '.join(f'{k}=' for k in opts)}")
        opts[key] = value
    base = Path(opts["run_dir"])
    seed = f"seed={opts['seed']}"
    train(f"run_dir={base}", f"steps={opts['root_steps']}", seed)
    rows = []
    for child in opts["children"].split(","):
        for mode, extra in MODES.items():
            run = base / mode
            train(
                f"run_dir={run}",
                f"parent_dir={base / 'E0_0'}",
                f"expert={child}",
                f"steps={opts['child_steps']}",
                seed,
                *(x.format(warmup=opts["warmup"]) for x in extra),
            )
            probe = json.loads((run / child / "handoff_probe.json").read_text())
            first = probe["in_band_loss"][0]
            rows.append(
                {
                    "child": child,
                    "optimizer": mode,
                    "steps": probe["steps"],
                    "loss": probe["in_band_loss"],
                    "ratio": [x / first for x in probe["in_band_loss"]],
                }
            )
    steps = rows[0]["steps"]
    print(
        f"in-band held-out loss / loss at the hand-off (root {opts['root_steps']} steps; "
        f"raw weights)"
    )
    print("child  hand-off    " + " ".join(f"{s:>6}" for s in steps))
    for r in rows:
        print(f"{r['child']:<6} {r['optimizer']:<11} " + " ".join(f"{x:6.3f}" for x in r["ratio"]))
    (base / "handoff_bench.json").write_text(json.dumps({"options": opts, "rows": rows}, indent=1))
    print(f"wrote {base / 'handoff_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
