"""Old module paths (before the layered house of 0.2) name their new home.

Two jobs: an `import ediff_train.<old>` that no longer exists fails with one line naming the
new module (a finder at the end of `sys.meta_path`, consulted only when nothing else found
the module), and `_target_` paths stored in a run's config.yaml are rewritten to the new
paths when the run is loaded, so run dirs written before the move keep loading."""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

PREFIX = "ediff_train."

# whole modules that moved: old → new (relative to ediff_train)
MODULES: dict[str, str] = {
    "lock": "io.lock",
    "data.remote": "io.remote",
    "edm": "core.edm",
    "experts": "core.experts",
    "conditioning": "core.conditioning",
    "solvers": "core.solvers",
    "sr": "core.sr",
    "lr_schedule": "core.lr_schedule",
    "ema": "core.ema",
    "perf": "core.perf",
    "encoders": "nn.encoders",
    "paint": "nn.paint",
    "optim_state": "run.optim_state",
    "posthoc_ema": "run.posthoc_ema",
    "offload": "sampling.offload",
    "cascade": "sampling.cascade",
    "pipeline": "sampling.pipeline",
    "module": "training.module",
    "training": "training.loop",
    "strategies": "training.strategies",
    "resume": "training.resume",
    "handoff": "training.handoff",
    "continuation": "training.continuation",
    "posthoc_callback": "training.posthoc",
    "validate": "training.settings",
    "metrics.attention": "evaluation.attention",
    "metrics.ema_sweep": "evaluation.ema_sweep",
    "metrics.paint_eval": "evaluation.paint",
    "metrics.sr_eval": "evaluation.sr",
    "metrics.switch": "evaluation.switch",
    "schedule_run": "experiments.runner",
    "experiment": "experiments.experiment",
    "experiment_report": "experiments.report",
    "data.digits": "data.toys.digits",
    "data.digits_vae": "data.toys.digits_vae",
    "data.layout": "data.toys.layout",
}
# modules split into several: old → where its parts went
SPLIT: dict[str, tuple[str, ...]] = {
    "checkpoints": ("io.files", "run.layout", "run.weights"),
    "sampling": (
        "core.solvers",
        "sampling.ensemble",
        "sampling.generation",
        "sampling.grids",
        "sampling.guidance",
    ),
    "evaluation": ("evaluation.common", "evaluation.images", "evaluation.loss"),
    "schedule": ("experiments.schedule", "experiments.schedule_cli"),
}
# names from split modules (and constants that moved): old → new
NAMES: dict[str, str] = {
    "checkpoints.save_safetensors": "io.files.save_safetensors",
    "checkpoints.atomic_write": "io.files.atomic_write",
    "checkpoints.write_text": "io.files.write_text",
    "checkpoints.write_json": "io.files.write_json",
    "checkpoints.WEIGHTS": "run.layout.WEIGHTS",
    "checkpoints.NODE_JSON": "run.layout.NODE_JSON",
    "checkpoints.CONFIG": "run.layout.CONFIG",
    "checkpoints.node_dir": "run.layout.node_dir",
    "checkpoints.read_node_json": "run.layout.read_node_json",
    "checkpoints.parent_weights": "run.layout.parent_weights",
    "checkpoints.save_weights": "run.weights.save_weights",
    "checkpoints.load_weights": "run.weights.load_weights",
    "checkpoints.load_train_config": "run.weights.load_train_config",
    "checkpoints.load_expert": "run.weights.load_expert",
    "checkpoints.load_encoders": "run.weights.load_encoders",
    "sampling.karras_sigmas": "core.solvers.karras_sigmas",
    "sampling.Guidance": "sampling.guidance.Guidance",
    "sampling.TEXT_MODES": "sampling.guidance.TEXT_MODES",
    "sampling.style_guided": "sampling.guidance.style_guided",
    "sampling.style_embedding": "sampling.guidance.style_embedding",
    "sampling.text_only": "sampling.guidance.text_only",
    "sampling.guided": "sampling.guidance.guided",
    "sampling.Ensemble": "sampling.ensemble.Ensemble",
    "sampling.load_ensemble": "sampling.ensemble.load_ensemble",
    "sampling.save_images": "sampling.grids.save_images",
    "sampling.make_grid": "sampling.grids.make_grid",
    "sampling.labelled_grid": "sampling.grids.labelled_grid",
    "sampling.image_noise": "sampling.generation.image_noise",
    "sampling.generate": "sampling.generation.generate",
    "sampling.embed_prompts": "sampling.generation.embed_prompts",
    "evaluation.run_specs": "evaluation.common.run_specs",
    "evaluation.pick_device": "evaluation.common.pick_device",
    "evaluation.load_spec": "evaluation.common.load_spec",
    "evaluation.caption_set": "evaluation.common.caption_set",
    "evaluation.guidance_list": "evaluation.common.guidance_list",
    "evaluation.log_wandb": "evaluation.common.log_wandb",
    "evaluation.build_scorer": "evaluation.images.build_scorer",
    "evaluation.evaluate_images": "evaluation.images.evaluate_images",
    "evaluation.write_reports": "evaluation.images.write_reports",
    "evaluation.evaluate_loss_by_sigma": "evaluation.loss.evaluate_loss_by_sigma",
    "schedule.main": "experiments.schedule_cli.main",
    "resume.CKPT_DIR": "run.layout.CKPT_DIR",
    "resume.LAST": "run.layout.LAST",
}

# where the rest of a split module went (names not listed in NAMES)
REST: dict[str, str] = {"schedule": "experiments.schedule"}


def new_path(dotted: str) -> str | None:
    """The current dotted path for an old `ediff_train.…` path, or None if it did not move."""
    if not dotted.startswith(PREFIX):
        return None
    rel = dotted[len(PREFIX) :]
    parts = rel.split(".")
    for k in range(len(parts), 0, -1):
        head, rest = ".".join(parts[:k]), parts[k:]
        if rest and f"{head}.{rest[0]}" in NAMES:
            return PREFIX + ".".join([NAMES[f"{head}.{rest[0]}"], *rest[1:]])
        if head in MODULES:
            return PREFIX + ".".join([MODULES[head], *rest])
        if head in REST and rest:
            return PREFIX + ".".join([REST[head], *rest])
    return None


def moved_message(fullname: str) -> str | None:
    """One line saying where an old module went."""
    rel = fullname[len(PREFIX) :] if fullname.startswith(PREFIX) else None
    if rel in MODULES:
        return f"{fullname} moved to {PREFIX}{MODULES[rel]}"
    if rel in SPLIT:
        new = ", ".join(PREFIX + m for m in SPLIT[rel])
        return f"{fullname} was split into {new}"
    return None


class MovedFinder(importlib.abc.MetaPathFinder):
    """Consulted last: an old module path fails with a one-line ModuleNotFoundError naming
    the new one instead of Python's bare 'No module named'."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        message = moved_message(fullname)
        if message:
            raise ModuleNotFoundError(message, name=fullname)
        return None


def install() -> None:
    """Put the finder at the end of sys.meta_path (once)."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())


def old_name(package: str, name: str) -> ImportError | AttributeError:
    """For a package's `__getattr__`: an old module that is now this package (`sampling`,
    `training`, `evaluation`) exported `name`; say where it lives now."""
    rel = package[len(PREFIX) :]
    new = NAMES.get(f"{rel}.{name}") or (f"{MODULES[rel]}.{name}" if rel in MODULES else None)
    if new:
        return ImportError(f"{package}.{name} moved to {PREFIX}{new}")
    return AttributeError(f"module {package!r} has no attribute {name!r}")


def rewrite_targets(cfg: Any) -> int:
    """Rewrite old `_target_` paths in a loaded config (OmegaConf or plain containers) in
    place; returns how many changed."""
    changed = 0
    if hasattr(cfg, "items") and not isinstance(cfg, str):
        for key, value in list(cfg.items()):
            if key == "_target_" and isinstance(value, str):
                new = new_path(value)
                if new:
                    cfg[key] = new
                    changed += 1
            else:
                changed += rewrite_targets(value)
    elif isinstance(cfg, (list, tuple)) or type(cfg).__name__ == "ListConfig":
        for value in cfg:
            changed += rewrite_targets(value)
    return changed
