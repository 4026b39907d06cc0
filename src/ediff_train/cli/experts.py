"""`ediff-experts`: the tree's intervals (core/experts.py), and with `--cost` what a planned
ensemble costs per image before anything is trained (sampling/cost.py):

    ediff-experts --cost E1_0 E1_1:model.model_channels=16,model.num_res_blocks=1 --guidance 2

Each expert is a node name, optionally followed by `:` and its own train.py overrides (comma
separated; `model=dit_tiny` picks another backbone); `--set` gives overrides shared by every
node and the root (E0_0, the ratio's reference). The model configs are composed as train.py
composes them, so the shapes are the ones training would build.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from ediff_train import CONF_DIR
from ediff_train.core import experts as tree
from ediff_train.core.experts import parse_node
from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.errors import EdiffError


def split_overrides(text: str) -> list[str]:
    """`a=1,b=[1,2]` → ["a=1", "b=[1,2]"]: commas inside brackets stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [o.strip() for o in [*out, cur] if o.strip()]


def parse_expert(spec: str) -> tuple[str, list[str]]:
    """`E1_1:model.model_channels=16` → ("E1_1", ["model.model_channels=16"])."""
    name, _, rest = spec.partition(":")
    return name.strip(), split_overrides(rest)


def compose_train(overrides: list[str]) -> Any:
    """train.py's config for these overrides (Hydra's compose API, the same defaults)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ediff_train.cli import register_nodes

    register_nodes()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdiffError(
            f"cannot compose {' '.join(overrides) or 'the defaults'}: {first}"
        ) from None


def cost_report(specs: list[str], shared: list[str], args: argparse.Namespace) -> Any:
    """The planned ensemble's cost (sampling/cost.py), its configs composed here."""
    from ediff_train.sampling.cost import ensemble_cost

    root_cfg = compose_train(shared)
    law = param_from_config(root_cfg.get("param")).law
    nodes, models = [], []
    for spec in specs:
        name, own = parse_expert(spec)
        cfg = compose_train([*shared, *own])
        nodes.append(replace(parse_node(name), law=law))
        models.append(cfg.model)
    return ensemble_cost(
        nodes,
        models,
        root_cfg.model,
        steps=args.steps,
        solver=args.solver,
        guidance=args.guidance,
        rho=args.rho,
        measure=not args.no_time,
    )


def main(argv: list[str] | None = None) -> int:
    """`ediff-experts [names] [--param …]` as core/experts.py; `--cost` for a planned tree."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cost" not in argv:
        return tree.main(argv)
    p = argparse.ArgumentParser(prog="ediff-experts --cost", description=__doc__)
    p.add_argument("--cost", action="store_true")
    p.add_argument("experts", nargs="*", default=["E1_0", "E1_1"])
    p.add_argument("--set", nargs="*", default=[], help="train.py overrides for every node")
    p.add_argument("--steps", type=int, default=24, help="solver steps (evaluate.py's default)")
    p.add_argument("--solver", default="heun", help="euler, heun, dpmpp_2m, deis_ab, deis_rk3")
    p.add_argument("--guidance", type=float, default=1.0, help="≠ 1: CFG's two rows counted")
    p.add_argument("--rho", type=float, default=7.0, help="the σ grid's exponent (paper: 6)")
    p.add_argument("--no-time", action="store_true", help="FLOPs only, no timed forwards")
    args = p.parse_args(argv)
    try:
        if args.steps < 1:
            raise EdiffError(f"--steps must be ≥ 1, got {args.steps}")
        report = cost_report(list(args.experts), list(args.set), args)
    except EdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
