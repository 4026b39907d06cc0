"""logger=auto (the default): W&B where this machine is set up for it, else CSV, chosen once and
recorded in config.yaml (issue 37, start-up: a fresh CPU machine does not pay W&B's start)."""

from __future__ import annotations

from pathlib import Path

from conftest import compose_train

from ediff_train.training.auto_settings import resolve_auto, resolve_logger, wandb_configured


def test_wandb_counts_as_set_up_by_env_or_login(tmp_path: Path) -> None:
    assert not wandb_configured({}, home=tmp_path)
    assert wandb_configured({"WANDB_MODE": "offline"}, home=tmp_path)
    assert wandb_configured({"WANDB_API_KEY": "k"}, home=tmp_path)
    (tmp_path / ".netrc").write_text("machine example.org login a password b\n")
    assert not wandb_configured({}, home=tmp_path)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password key\n")
    assert wandb_configured({}, home=tmp_path)
    other = tmp_path / "other"
    (other / ".netrc").mkdir(parents=True)  # unreadable: not set up
    assert not wandb_configured({}, home=other)


def test_auto_becomes_the_chosen_logger_in_the_config() -> None:
    cfg = compose_train("run_dir=/x")
    assert cfg.logger.kind == "auto"
    chosen = resolve_logger(cfg, configured=False)
    assert chosen._target_.endswith("CSVLogger") and cfg.logger.save_dir == "/x/E0_0"
    cfg = compose_train("run_dir=/x")
    assert resolve_logger(cfg, configured=True)._target_.endswith("WandbLogger")
    assert cfg.logger.offline is True and "kind" not in cfg.logger
    explicit = compose_train("logger=csv")
    assert resolve_logger(explicit, configured=True)._target_.endswith("CSVLogger")


def test_grid_size_auto_follows_the_run_length() -> None:
    for steps, per in [(10, 1), (199, 1), (200, 4), (600, 4)]:
        cfg = compose_train(f"steps={steps}")
        assert cfg.sample.per_prompt == "auto"
        resolve_auto(cfg)
        assert cfg.sample.per_prompt == per, steps
    cfg = compose_train("steps=10", "sample.per_prompt=3")
    resolve_auto(cfg)
    assert cfg.sample.per_prompt == 3
