"""An experiment = a schedule + an evaluation, over seeds (`ediff-experiment NAME`).

For each seed k the schedule is trained on this machine into `run_dir/seed<k>`
(experiments/runner.py:
finished stages skipped, an interrupted one resumed, `seed=k` given to every stage), then the
ensembles named in the schedule file's `experiment:` section are evaluated with evaluate.py's own
code (images: prompt accuracy + digits-FID, or FID + CLIP, over a guidance sweep; loss by σ) into
`run_dir/report/seed<k>/`. experiments/report.py turns those per-seed reports into the summary
(JSON, CSV, PNG, markdown) under `run_dir/report/`. No figure in the report is typed by hand.

    ediff-experiment fig7_toy                    # 3 seeds, runs/fig7_toy
    ediff-experiment configs_toy run_dir=runs/fig7_toy seeds=1
    ediff-experiment fig7_toy eval.guidance=[1,2,3,5] trainer=cpu

Keys: `seeds=N`, `run_dir=D`, `report_dir=R` (default run_dir/report; give two experiments
sharing a run_dir their own), `scale=S` (the schedule's steps × S), `report_only=true` (evaluate
and report what is trained, train nothing), `eval.<key>=V` (any evaluate.py setting); anything
else goes to train.py for every stage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ediff_train.core.parameterisation import from_config as param_from_config
from ediff_train.errors import EdiffError, run_reporting
from ediff_train.evaluation.images import evaluate_images
from ediff_train.evaluation.loss import evaluate_loss_by_sigma
from ediff_train.evaluation.shapes import evaluate_shapes
from ediff_train.experiments.report import write_summary
from ediff_train.experiments.runner import done_step, run_schedule
from ediff_train.experiments.schedule import CONF_DIR, Schedule, load_schedule, schedule_path
from ediff_train.run.layout import node_dir
from ediff_train.run.weights import load_train_config


def experiment_spec(name: str) -> dict[str, Any]:
    """The schedule file's `experiment:` section, checked against its stages."""
    raw = yaml.safe_load(schedule_path(name).read_text()) or {}
    spec = raw.get("experiment")
    if not isinstance(spec, dict) or not spec.get("ensembles"):
        raise EdiffError(
            f"schedule {name} has no experiment: section naming ensembles to "
            "evaluate (see conf/schedule/fig7_toy.yaml)"
        )
    ensembles = {str(k): [str(n) for n in v] for k, v in spec["ensembles"].items()}
    stages = {s["name"] if s.get("name") else s["node"] for s in raw.get("stages", [])}
    for label, names in ensembles.items():
        missing = [n for n in names if n not in stages]
        if missing:
            raise EdiffError(
                f"experiment {name}: ensemble {label} names {missing}, not stages "
                f"of the schedule ({', '.join(sorted(stages))})"
            )
    for key in ("claim", "baseline"):
        if spec.get(key) not in ensembles:
            raise EdiffError(
                f"experiment {name}: {key}: must name one of its ensembles "
                f"({', '.join(ensembles)}), got {spec.get(key)!r}"
            )
    if spec.get("control") is not None and spec["control"] not in ensembles:
        raise EdiffError(
            f"experiment {name}: control: must name one of its ensembles "
            f"({', '.join(ensembles)}), got {spec['control']!r}"
        )
    gate = spec.get("gate")
    if gate is not None:
        if not isinstance(gate, dict) or not {"root", "continued", "max_gain"} <= set(gate):
            raise EdiffError(
                f"experiment {name}: gate: needs root:, continued: (ensembles) and "
                "max_gain: (e.g. 0.03 = at most 3 % lower held-out loss)"
            )
        for key in ("root", "continued"):
            if gate[key] not in ensembles:
                raise EdiffError(
                    f"experiment {name}: gate.{key}: must name one of its "
                    f"ensembles ({', '.join(ensembles)}), got {gate[key]!r}"
                )
    return {
        "seeds": int(spec.get("seeds", 3)),
        "claim": str(spec["claim"]),
        "baseline": str(spec["baseline"]),
        "ensembles": ensembles,
        "control": spec.get("control"),
        "gate": gate,
        "images": list(spec.get("images") or ensembles),
        "evaluate": dict(spec.get("evaluate") or {}),
    }


def eval_config(
    spec: dict[str, Any],
    seed_dir: Path,
    out: Path,
    overrides: Sequence[str],
    names: Sequence[str] | None = None,
) -> Any:
    """evaluate.py's config for one seed: its defaults, the experiment's settings, the caller's;
    over the ensembles `names` (default: all, in the file's order)."""

    cfg = OmegaConf.load(CONF_DIR / "evaluate" / "config.yaml")
    cfg.pop("hydra", None)
    ens = [spec["ensembles"][n] for n in (names or list(spec["ensembles"]))]
    cfg = OmegaConf.merge(cfg, spec["evaluate"], OmegaConf.from_dotlist(list(overrides)))
    cfg.run_dir, cfg.out = str(seed_dir), str(out)
    cfg.experts, cfg.compare = ens[0], ens[1:]
    return cfg


def evaluate_seed(
    spec: dict[str, Any], seed_dir: Path, out: Path, overrides: Sequence[str]
) -> dict[str, Any]:
    """Images (guidance sweep) and loss by σ for every ensemble of one seed's run dir."""

    cfg = eval_config(spec, seed_dir, out, overrides)
    loss = evaluate_loss_by_sigma(cfg)
    image_cfg = eval_config(spec, seed_dir, out, overrides, spec["images"])
    # the shapes benchmark scores with its exact reader (evaluation/shapes.py), else images
    score = evaluate_shapes if str(image_cfg.get("metric")) == "shapes" else evaluate_images
    images = score(image_cfg)
    if images is None:  # only rank 0 scores; the experiment runs as one process
        raise EdiffError("the experiment runs evaluation in one process (no torchrun)")
    return {"images": images, "loss_by_sigma": loss}


def parse_args(args: Sequence[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "seeds": None,
        "run_dir": None,
        "report_dir": None,
        "scale": 1.0,
        "report_only": False,
        "eval": [],
        "train": [],
    }
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            raise EdiffError(f"expected key=value, got {arg!r} (e.g. seeds=3 run_dir=runs/x)")
        if key == "seeds":
            if not value.isdigit() or int(value) < 1:
                raise EdiffError(f"seeds must be a whole number ≥ 1, got {value!r}")
            opts["seeds"] = int(value)
        elif key == "scale":
            try:
                opts["scale"] = float(value)
            except ValueError:
                raise EdiffError(f"scale must be a number, got {value!r}") from None
        elif key in ("run_dir", "report_dir"):
            opts[key] = value
        elif key == "report_only":
            if value.lower() not in ("true", "false"):
                raise EdiffError(f"report_only must be true or false, got {value!r}")
            opts["report_only"] = value.lower() == "true"
        elif key.startswith("eval."):
            opts["eval"].append(f"{key[5:]}={value}")
        else:
            opts["train"].append(arg)
    return opts


def run_experiment(name: str, args: Sequence[str]) -> Path:
    """Train (unless report_only) and evaluate every seed; write the summary. Returns its folder."""

    opts = parse_args(args)
    spec = experiment_spec(name)
    schedule: Schedule = load_schedule(name)
    if opts["scale"] != 1.0:
        schedule = schedule.scaled(opts["scale"])
    seeds = opts["seeds"] or spec["seeds"]
    run_dir = Path(opts["run_dir"] or f"runs/{schedule.name}").expanduser().resolve()
    report_dir = Path(opts["report_dir"] or run_dir / "report").expanduser().resolve()
    needed = {n for names in spec["ensembles"].values() for n in names}
    for seed in range(seeds) if not opts["report_only"] else ():  # train every seed first
        seed_dir = run_dir / f"seed{seed}"
        print(f"== seed {seed}: training into {seed_dir}")
        outcomes = run_schedule(schedule, seed_dir, [f"seed={seed}", *opts["train"]])
        bad = [o.stage for o in outcomes if o.status in ("failed", "blocked")]
        if bad:
            raise EdiffError(
                f"seed {seed}: stages {', '.join(bad)} did not finish (see "
                f"their train.log under {seed_dir}); rerun to resume"
            )
    per_seed = []
    for seed in range(seeds):
        seed_dir = run_dir / f"seed{seed}"
        print(f"== seed {seed}: evaluating {seed_dir}")
        targets = schedule.targets()
        unfinished = [
            s.name
            for s in schedule.stages
            if s.name in needed and (done_step(seed_dir, s) or -1) < targets[s.name]
        ]
        if unfinished:
            raise EdiffError(
                f"seed {seed}: {', '.join(unfinished)} not trained in {seed_dir} "
                "(run without report_only=true to train them)"
            )
        result = evaluate_seed(spec, seed_dir, report_dir / f"seed{seed}", opts["eval"])
        per_seed.append({"seed": seed, "run_dir": str(seed_dir), **result})
    law = training_law(run_dir / "seed0", schedule)
    write_summary(report_dir, schedule.name, schedule, spec, per_seed, law)
    return report_dir


def training_law(seed_dir: Path, schedule: Schedule) -> Any:
    """The noise law the schedule trained under (its first stage's `param`, e.g. param=flow on
    the command line), which the gate weighs held-out loss by and the report's tree follows."""
    cfg = load_train_config(node_dir(seed_dir, schedule.stages[0].name))
    return param_from_config(cfg.get("param")).law


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ediff-experiment",
        description="Train a schedule over seeds and compare its ensembles (report under "
        "run_dir/report/).",
    )
    p.add_argument("name", help="a schedule with an experiment: section (fig7_toy, configs_toy)")
    p.add_argument(
        "args",
        nargs="*",
        help="seeds=N run_dir=D scale=S report_only=true eval.KEY=V, and train.py overrides",
    )
    a = p.parse_args(argv)

    def task() -> int:
        print(f"report: {run_experiment(a.name, a.args) / 'report.md'}")
        return 0

    return run_reporting(task)


if __name__ == "__main__":
    sys.exit(main())
