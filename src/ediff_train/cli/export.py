"""`ediff-export run_dir=R out=DIR [experts=E1_0,E1_1] [guidance=5|E1_1:7,...] [weights=ema]
[steps=32] [solver=heun]`: a run's experts as a folder diffusers loads (docs/export.md)."""

from __future__ import annotations

import json
import sys

from ediff_train.errors import EdiffError, run_reporting

KEYS = ("run_dir", "out", "experts", "guidance", "weights", "steps", "solver")
USAGE = (
    "usage: ediff-export run_dir=R out=DIR [experts=E1_0,E1_1] [guidance=5|E1_1:7,...] "
    "[weights=ema|model] [steps=N] [solver=euler|heun]"
)


def parse(args: list[str]) -> dict[str, str]:
    """key=value arguments; one line naming what is wrong."""
    kv = dict(a.partition("=")[::2] for a in args)
    bad = [a for a in args if "=" not in a] + sorted(set(kv) - set(KEYS))
    if bad or not {"run_dir", "out"} <= kv.keys():
        raise EdiffError(f"{USAGE} (got {' '.join(args)!r})")
    if kv.get("weights", "ema") not in ("ema", "model"):
        raise EdiffError(f"weights must be ema or model, got {kv['weights']!r}")
    if kv.get("solver", "heun") not in ("euler", "heun"):
        raise EdiffError(
            f"solver must be euler or heun (what the pipeline runs), got {kv['solver']!r}"
        )
    steps = kv.get("steps", "32")
    if not steps.isdigit() or int(steps) < 1:
        raise EdiffError(f"steps must be a whole number ≥ 1, got {steps!r}")
    return kv


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def task() -> int:
        kv = parse(args)
        from ediff_train.export.folder import export_run  # torch/diffusers once argv is valid

        names = [n.strip() for n in kv.get("experts", "").strip("[]").split(",") if n.strip()]
        out = export_run(
            kv["run_dir"],
            kv["out"],
            names or None,
            kv.get("guidance"),
            kv.get("weights", "ema"),
            {"steps": int(kv.get("steps", "32")), "solver": kv.get("solver", "heun")},
        )
        print(
            f"wrote {out}: DiffusionPipeline.from_pretrained({str(out)!r}, "
            "trust_remote_code=True) loads it"
        )
        for e in json.loads((out / "experts.json").read_text())["experts"]:
            lo, hi = e["sigma"]
            t = e["boundaries"]["boundary_ratio"]
            print(
                f"  {e['component']:<14} {e['node']:<10} σ ∈ [{lo:g}, "
                f"{'∞' if hi is None else f'{hi:g}'})  t ∈ [{t[0]:.4g}, {t[1]:.4g}]  "
                f"guidance {e['guidance_scale']:g}"
            )
        return 0

    return run_reporting(task)


def run() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
