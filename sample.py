"""Sample from trained experts: `python sample.py run_dir=R expert=E0_0 prompt="the number 3"`,
or a whole cascade (base, then SR stages): `python sample.py cascade=digits`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ediff_train.cascade import call_report, load_stages, read_cascade, run_cascade, write_cascade
from ediff_train.checkpoints import load_encoders, load_train_config
from ediff_train.cli import entry_point, reporting_errors
from ediff_train.errors import EdiffError
from ediff_train.sampling import (
    TEXT_MODES,
    Guidance,
    embed_prompts,
    generate,
    labelled_grid,
    load_ensemble,
    save_images,
)
from ediff_train.solvers import SOLVERS

CASCADES = Path(__file__).resolve().parent / "conf" / "cascade"


def prompt_list(cfg: DictConfig) -> list[str]:
    return [str(p) for p in cfg.prompts] if cfg.get("prompts") else [str(cfg.prompt)]


def sampler_settings(cfg: DictConfig) -> Guidance:
    """Check the solver and guidance settings before anything is loaded; the Guidance."""
    if str(cfg.solver) not in SOLVERS:
        raise EdiffError(f"unknown solver {cfg.solver!r}: choose one of {', '.join(SOLVERS)}")
    if int(cfg.steps) < 1:
        raise EdiffError(f"steps must be ≥ 1, got {cfg.steps}")
    if str(cfg.text) not in TEXT_MODES:
        raise EdiffError(f"text must be one of {', '.join(TEXT_MODES)}, got {cfg.text!r}")
    interval = cfg.get("guidance_interval")
    per = {str(k): float(v) for k, v in (cfg.get("guidance_per_expert") or {}).items()}
    g = Guidance(float(cfg.guidance), per,
                 (float(interval[0]), float(interval[1])) if interval else None)
    g.check(list(per))  # the interval's form; expert names are checked once loaded
    return g


def sample_cascade(cfg: DictConfig) -> None:
    stages, description = read_cascade(str(cfg.cascade), CASCADES)
    loaded = load_stages(stages, cfg.device)
    prompts = [p for p in prompt_list(cfg) for _ in range(int(cfg.n))]
    outputs = run_cascade(loaded, prompts, seed=int(cfg.seed), device=cfg.device)
    grid = write_cascade(loaded, outputs, prompts, cfg.out)
    sizes = " -> ".join(f"{ls.image_size}px" for ls in loaded)
    print(f"{description}: wrote {len(prompts)} images per stage ({sizes}) and {grid} "
          f"(expert calls: {call_report(loaded)})")


@hydra.main(config_path="conf/sampling", config_name="config", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    if cfg.get("cascade"):
        sample_cascade(cfg)
        return
    guidance = sampler_settings(cfg)
    names = list(cfg.experts) if cfg.experts else [str(cfg.expert)]
    ensemble = load_ensemble(cfg.run_dir, names, cfg.weights).to(cfg.device)
    guidance.check(names)
    train_cfg = load_train_config(f"{cfg.run_dir}/{names[0]}")
    if train_cfg.data.get("lowres_size"):
        raise EdiffError(f"{cfg.run_dir}/{names[0]} is a super-resolution stage: sample "
                         "it in a cascade (cascade=NAME, conf/cascade/)")
    prompts = prompt_list(cfg)
    per = int(cfg.n)
    cond = embed_prompts(load_encoders(train_cfg), [p for p in prompts for _ in range(per)])
    images = generate(
        ensemble,
        cond.to(cfg.device),
        image_size=int(train_cfg.data.image_size),
        steps=int(cfg.steps),
        guidance=guidance,
        seed=int(cfg.seed),
        sigma_min=float(cfg.sigma_min),
        sigma_max=float(cfg.sigma_max),
        rho=float(cfg.rho),
        solver=str(cfg.solver),
        order=int(cfg.order),
        text=str(cfg.text),
    )
    labelled = labelled_grid(images, prompts, per, upscale=max(1, 64 // images.shape[-1]))
    grid = save_images(images, cfg.out, grid=labelled)
    calls = ", ".join(f"{n.name}: {c}" for n, c in zip(ensemble.router.nodes, ensemble.calls))
    print(f"wrote {len(images)} images and {grid} (expert calls: {calls})")


if __name__ == "__main__":
    entry_point(main, register=False)()
