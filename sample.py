"""Sample from trained experts: `python sample.py run_dir=R expert=E0_0 prompt="the number 3"`."""

import hydra
from omegaconf import DictConfig

from ediff_train.checkpoints import load_encoders, load_train_config
from ediff_train.cli import entry_point, reporting_errors
from ediff_train.sampling import (
    embed_prompts,
    generate,
    labelled_grid,
    load_ensemble,
    save_images,
)


@hydra.main(config_path="conf/sampling", config_name="config", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    names = list(cfg.experts) if cfg.experts else [str(cfg.expert)]
    ensemble = load_ensemble(cfg.run_dir, names, cfg.weights).to(cfg.device)
    train_cfg = load_train_config(f"{cfg.run_dir}/{names[0]}")
    prompts = [str(p) for p in cfg.prompts] if cfg.get("prompts") else [str(cfg.prompt)]
    per = int(cfg.n)
    cond = embed_prompts(load_encoders(train_cfg), [p for p in prompts for _ in range(per)])
    images = generate(
        ensemble,
        cond.to(cfg.device),
        image_size=int(train_cfg.data.image_size),
        steps=int(cfg.steps),
        guidance=float(cfg.guidance),
        seed=int(cfg.seed),
        sigma_min=float(cfg.sigma_min),
        sigma_max=float(cfg.sigma_max),
        rho=float(cfg.rho),
    )
    labelled = labelled_grid(images, prompts, per, upscale=max(1, 64 // images.shape[-1]))
    grid = save_images(images, cfg.out, grid=labelled)
    calls = ", ".join(f"{n.name}: {c}" for n, c in zip(ensemble.router.nodes, ensemble.calls))
    print(f"wrote {len(images)} images and {grid} (expert calls: {calls})")


if __name__ == "__main__":
    entry_point(main, register=False)()
