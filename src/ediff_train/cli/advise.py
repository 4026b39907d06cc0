"""`ediff-advise NODE_DIR`: should this node be split, and where? (src/ediff_train/advise/)

    ediff-advise runs/digits/E0_0 --bins 16 --max-bands 4 --probe-steps 200
    ediff-advise runs/digits/E0_0 --validate 4        # also measure the gap it predicts

Prints one block per candidate split (the tree's next levels; the best partitions by gradient
affinity and by optimal-denoiser similarity), the recommendation ("don't split" included) and the
train.py overrides of the recommended children; writes advice.json, advice.txt, affinity.png
(and validation.png) to --out (default NODE_DIR/advice).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ediff_train.errors import EdiffError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ediff-advise",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("node_dir", type=Path, help="a trained node's folder (weights.safetensors)")
    p.add_argument("--out", type=Path, default=None, help="default: NODE_DIR/advice")
    p.add_argument("--data", default=None, help="other shards (same codec and dims)")
    p.add_argument("--bins", type=int, default=16, help="equal-probability σ bins of the band")
    p.add_argument("--max-bands", type=int, default=4, help="largest split considered")
    p.add_argument(
        "--sigma-range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="analyse only this σ range (inside the node's band)",
    )
    p.add_argument("--images", type=int, default=256, help="held-out samples used")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--probe-steps", type=int, default=200, help="headroom probe; 0: none")
    p.add_argument("--probe-lr", type=float, default=None, help="default: the node's lr")
    p.add_argument("--wide", nargs="*", default=[], help="model overrides of the wider net")
    p.add_argument(
        "--validate",
        type=int,
        default=0,
        help="measure the specialist gap for this many equal bands",
    )
    p.add_argument("--validate-steps", type=int, default=150)
    p.add_argument("--threshold", type=float, default=0.02, help="least gain worth a split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse, resolve the plan once, advise; `error: …` and exit 2 on bad input."""
    args = parse(list(sys.argv[1:] if argv is None else argv))
    from ediff_train.advise.run import AdvicePlan, advise

    plan = AdvicePlan(
        node_dir=args.node_dir,
        out=args.out or args.node_dir / "advice",
        data_root=args.data,
        bins=args.bins,
        max_bands=args.max_bands,
        sigma_range=tuple(args.sigma_range) if args.sigma_range else None,
        images=args.images,
        batch_size=args.batch_size,
        probe_steps=args.probe_steps,
        probe_lr=args.probe_lr,
        wide=tuple(args.wide),
        validate=args.validate,
        validate_steps=args.validate_steps,
        threshold=args.threshold,
        seed=args.seed,
        device=args.device,
    )
    try:
        report = advise(plan)
    except EdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((plan.out / "advice.txt").read_text(), end="")
    val = report.get("validation")
    if val:
        rho = val["spearman"]
        print(
            f"validation: Spearman ρ(predicted, measured gap) = "
            f"{'n/a' if rho is None else f'{rho:+.2f}'} over {len(val['bands'])} bands"
        )
    print(f"wrote {plan.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
