"""`ediff-sample` (= `python sample.py`): sample from trained experts,
e.g. `ediff-sample run_dir=R expert=E0_0 prompt="the number 3"`, or a whole cascade (base, then
SR stages): `ediff-sample cascade=digits`."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ediff_train import CONF_DIR
from ediff_train.cli import entry_point, reporting_errors
from ediff_train.errors import EdiffError
from ediff_train.io.files import write_json
from ediff_train.nn.paint import Region, read_mask, regions_from_colour_map
from ediff_train.sampling.cascade import (
    call_report,
    load_stages,
    read_cascade,
    run_cascade,
    write_cascade,
)
from ediff_train.sampling.grids import labelled_grid, save_images
from ediff_train.sampling.pipeline import Sampler
from ediff_train.sampling.settings import SamplerSettings, recorded_guidance

CASCADES = CONF_DIR / "cascade"


def prompt_list(cfg: DictConfig) -> list[str]:
    """prompts_file (one per line) > prompts > prompt."""
    if cfg.get("prompts_file"):
        path = Path(str(cfg.prompts_file))
        if not path.is_file():
            raise EdiffError(f"prompts_file {path} does not exist")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        prompts = [ln for ln in lines if ln]
        if not prompts:
            raise EdiffError(f"prompts_file {path} holds no prompts")
        return prompts
    return [str(p) for p in cfg.prompts] if cfg.get("prompts") else [str(cfg.prompt)]


def images_per_prompt(cfg: DictConfig) -> int:
    """n, refused unless a whole number ≥ 1 (n=0 would write an empty grid and exit 0)."""
    n = cfg.n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EdiffError(f"n (images per prompt) must be a whole number ≥ 1, got {n!r}")
    return n


def paint_regions(cfg: DictConfig) -> list[Region] | None:
    """paint=[{phrase, mask, strength}] masks, or paint_map + paint_legend (colour → phrase)."""
    if cfg.get("paint_map"):
        return regions_from_colour_map(str(cfg.paint_map), dict(cfg.get("paint_legend") or {}))
    spec = cfg.get("paint") or []
    return [
        Region(str(r["phrase"]), read_mask(str(r["mask"])), float(r.get("strength", 1.0)))
        for r in spec
    ] or None


def sample_cascade(cfg: DictConfig) -> None:
    per = images_per_prompt(cfg)
    stages, description = read_cascade(str(cfg.cascade), CASCADES)
    loaded = load_stages(stages, cfg.device, offload=bool(cfg.get("offload", False)))
    prompts = [p for p in prompt_list(cfg) for _ in range(per)]
    outputs = run_cascade(loaded, prompts, seed=int(cfg.seed), device=cfg.device)
    grid = write_cascade(loaded, outputs, prompts, cfg.out)
    sizes = " -> ".join(f"{ls.image_size}px" for ls in loaded)
    print(
        f"{description}: wrote {len(prompts)} images per stage ({sizes}) and {grid} "
        f"(expert calls: {call_report(loaded)})"
    )


@hydra.main(config_path=str(CONF_DIR / "sampling"), config_name="config", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    if cfg.get("cascade"):
        sample_cascade(cfg)
        return
    settings, per = SamplerSettings.from_config(cfg), images_per_prompt(cfg)
    regions = paint_regions(cfg)
    names = list(cfg.experts) if cfg.experts else [str(cfg.expert)]
    prompts = prompt_list(cfg)
    seeds = [int(x) for x in (cfg.get("seeds") or [cfg.seed])]
    sampler = Sampler.from_run(
        cfg.run_dir,
        names,
        str(cfg.weights),
        str(cfg.device),
        offload=bool(cfg.get("offload", False)),
    )
    settings = settings.with_recorded(recorded_guidance(cfg.run_dir, names))
    settings.guidance_obj().check(names)
    out = Path(str(cfg.out))
    for seed in seeds:
        images = sampler(
            [p for p in prompts for _ in range(per)], seed=seed, paint=regions, **settings.call()
        )
        folder = out / f"seed{seed}" if len(seeds) > 1 else out
        grid = labelled_grid(images, prompts, per, upscale=max(1, 64 // images.shape[-1]))
        save_images(images, folder, grid=grid)
        record = {
            "run_dir": str(cfg.run_dir),
            "experts": names,
            "weights": str(cfg.weights),
            "prompts": prompts,
            "per_prompt": per,
            "seed": seed,
            **settings.record(),
            "paint": [{"phrase": r.phrase, "strength": r.strength} for r in regions or []],
            "codec": sampler.codec.spec(),  # a VAE run: which VAE decoded the latents
            "files": [f"sample_{i:04d}.png" for i in range(len(images))],
        }
        write_json(folder / "settings.json", record)
        print(f"wrote {len(images)} images, grid.png and settings.json to {folder}")
    print(f"expert calls: {', '.join(f'{k}: {v}' for k, v in sampler.expert_calls.items())}")


def run() -> None:
    """The console script (`expert` is a plain key here, not the config group)."""
    entry_point(main, register=False)()
