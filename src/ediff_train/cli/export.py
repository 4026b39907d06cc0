"""`ediff-export run_dir=R [out=DIR] [experts=E1_0,E1_1] [guidance=5|E1_1:7,...] [weights=ema]
[steps=32] [solver=heun] [text=true] [lora=false]`: a run's experts, with the text encoders that
made their shards, as a folder diffusers loads (docs/export.md); `lora=true` adds each LoRA
expert as a diffusers LoRA file in <out>/lora/. `out` defaults to exports/<run name>."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ediff_train.errors import EdiffError, run_reporting

KEYS = ("run_dir", "out", "experts", "guidance", "weights", "steps", "solver", "text", "lora")
USAGE = (
    "usage: ediff-export run_dir=R [out=DIR] [experts=E1_0,E1_1] [guidance=5|E1_1:7,...] "
    "[weights=ema|model] [steps=N] [solver=euler|heun] [text=true|false] [lora=false|true]"
)
BOOL = {"true": True, "false": False}


def parse(args: list[str]) -> dict[str, str]:
    """key=value arguments; one line naming what is wrong."""
    kv = dict(a.partition("=")[::2] for a in args)
    bad = [a for a in args if "=" not in a] + sorted(set(kv) - set(KEYS))
    if bad or "run_dir" not in kv:
        raise EdiffError(f"{USAGE} (got {' '.join(args)!r})")
    if kv.get("weights", "ema") not in ("ema", "model"):
        raise EdiffError(f"weights must be ema or model, got {kv['weights']!r}")
    if kv.get("solver", "heun") not in ("euler", "heun"):
        raise EdiffError(
            f"solver must be euler or heun (what the pipeline runs), got {kv['solver']!r}"
        )
    for key, default in (("text", "true"), ("lora", "false")):
        if kv.get(key, default).lower() not in BOOL:
            raise EdiffError(f"{key} must be true or false, got {kv[key]!r}")
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
            kv.get("out") or Path("exports") / Path(kv["run_dir"]).resolve().name,
            names or None,
            kv.get("guidance"),
            kv.get("weights", "ema"),
            {"steps": int(kv.get("steps", "32")), "solver": kv.get("solver", "heun")},
            BOOL[kv.get("text", "true").lower()],
            BOOL[kv.get("lora", "false").lower()],
        )
        print(
            f"wrote {out}: DiffusionPipeline.from_pretrained({str(out)!r}, "
            "trust_remote_code=True) loads it"
        )
        for e in json.loads((out / "experts.json").read_text())["experts"]:
            lo, hi = e["sigma"]
            t = e["boundaries"]["boundary_ratio"]
            w = e.get("guidance_range")  # a guidance-distilled student: one forward per step
            print(
                f"  {e['component']:<14} {e['node']:<10} σ ∈ [{lo:g}, "
                f"{'∞' if hi is None else f'{hi:g}'})  t ∈ [{t[0]:.4g}, {t[1]:.4g}]  "
                f"guidance {e['guidance_scale']:g}"
                + (f" (distilled for w ∈ [{w[0]:g}, {w[1]:g}])" if w else "")
            )
        lora = out / "lora" / "lora.json"
        if lora.is_file():
            rec = json.loads(lora.read_text())
            base = rec["base"]
            nodes = ", ".join(e["node"] for e in rec["experts"])
            print(
                f"  {lora.parent}: {nodes} as LoRA files over {base['node']}; load them onto its "
                f"export (ediff-export run_dir={base['run_dir']} experts={base['node']} out=B): "
                f"DiffusionPipeline.from_pretrained(B, trust_remote_code=True)"
                f".load_lora_experts({str(lora.parent)!r})"
            )
        return 0

    return run_reporting(task)


def run() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
