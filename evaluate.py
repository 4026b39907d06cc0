"""Evaluate nodes or ensembles: `python evaluate.py run_dir=R expert=E0_0 guidance=[1,2,4,8]`.

Under torchrun or srun every rank generates its share of the images; rank 0 scores them."""

import hydra
from omegaconf import DictConfig

from ediff_train.cli import entry_point, reporting_errors
from ediff_train.errors import EdiffError


@hydra.main(config_path="conf/evaluate", config_name="config", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    from ediff_train.evaluation import evaluate_images, evaluate_loss_by_sigma
    from ediff_train.metrics.sr_eval import evaluate_cascade, evaluate_sr

    metric = str(cfg.metric)
    known = ("images", "loss_by_sigma", "all", "sr", "cascade", "attention", "paint", "switch",
             "ema_sweep")
    if metric not in known:
        raise EdiffError(f"metric must be one of {', '.join(known)}, got {metric!r}")
    if metric == "ema_sweep":
        from ediff_train.metrics.ema_sweep import evaluate_ema_sweep

        evaluate_ema_sweep(cfg)
        return
    if metric == "switch":
        from ediff_train.metrics.switch import evaluate_switch

        evaluate_switch(cfg)
        return
    if metric == "paint":
        from ediff_train.metrics.paint_eval import evaluate_paint

        evaluate_paint(cfg)
        return
    if metric == "attention":
        from ediff_train.metrics.attention import evaluate_attention

        evaluate_attention(cfg)
        return
    if metric == "sr":
        evaluate_sr(cfg)
        return
    if metric == "cascade":
        evaluate_cascade(cfg)
        return
    if metric in ("loss_by_sigma", "all"):
        evaluate_loss_by_sigma(cfg)
    if metric in ("images", "all"):
        evaluate_images(cfg)


if __name__ == "__main__":
    entry_point(main, register=False)()
