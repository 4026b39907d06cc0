"""`ediff-embed` (= `python data_prep/embed.py`): embed images + captions into a shard set,
`ediff-embed input=DIR output=OUT`
(OUT: a folder, or an object-store URL such as s3://bucket/set).

Thin Hydra app over ediff_train.data.prep (see there for units, restart and merging). The
`encoders` group is conf/encoders/*.yaml, the trainer's own files, registered here so both
programs read one definition of each encoder set.
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ediff_train import CONF_DIR, REPO
from ediff_train.cli import reporting_errors


def register_encoder_configs() -> None:
    """The trainer's `encoders` and `codec` groups (conf/), so both read one definition."""
    cs = ConfigStore.instance()
    for group in ("encoders", "codec"):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            cs.store(group=group, name=path.stem, node=OmegaConf.load(path))


@hydra.main(config_path=str(REPO / "data_prep" / "conf"), config_name="embed", version_base="1.3")
@reporting_errors
def main(cfg: DictConfig) -> None:
    import torch  # heavy imports only once the command line is valid

    from ediff_train.data.images import ImageSpec
    from ediff_train.data.prep import EmbedJob, PrepConfig, resolve_task
    from ediff_train.data.sources import list_input
    from ediff_train.data.store import open_store
    from ediff_train.errors import EdiffError
    from ediff_train.nn.codec import codec_from_config
    from ediff_train.nn.encoders import build_encoders

    missing = [k for k in ("input", "output") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise EdiffError(
            f"set {' and '.join(f'{k}=...' for k in missing)} (input: a folder "
            "with captions.jsonl or .tar files; output: the shard folder to write)"
        )
    task_id, num_tasks = resolve_task(cfg.task_id, cfg.num_tasks)
    enc_cfg = OmegaConf.to_container(cfg.encoders, resolve=True)
    if enc_cfg.get("device") is None:  # embedding wants the GPU whenever there is one
        enc_cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if enc_cfg.get("dtype") is None:
        enc_cfg["dtype"] = "bf16" if enc_cfg["device"].startswith("cuda") else "fp32"
    stage = cfg.stage
    prep = PrepConfig(
        input=cfg.input,
        output=cfg.output,
        image=ImageSpec(int(stage.size), int(stage.min_side), str(stage.format)),
        unit_size=int(cfg.unit_size),
        batch_size=int(cfg.batch_size),
        sort_window=int(cfg.sort_window),
        workers=int(cfg.workers),
        clip_min_similarity=cfg.clip_min_similarity,
    )
    listing = list_input(prep.input, prep.unit_size)  # bad input fails before encoders load
    open_store(prep.output).check()  # so does an output URL without backend, bucket or access
    codec_cfg = cfg.get("codec")
    codec = codec_from_config(codec_cfg, device=enc_cfg["device"]) if codec_cfg else None
    encoders = build_encoders(**enc_cfg)
    print(
        f"encoders: {encoders.spec['t5']['name']} + {encoders.spec['clip']['name']} on "
        f"{encoders.device} ({enc_cfg['dtype']}); stage {stage.size}px; task "
        f"{task_id}/{num_tasks}",
        flush=True,
    )
    if codec is not None and not codec.is_identity:
        print(f"codec: VAE {codec.path} ({codec.channels} channels, /{codec.downsample})")
    job = EmbedJob(prep, encoders, listing, codec=codec)
    report = job.run(
        task_id,
        num_tasks,
        max_units=cfg.max_units,
        progress=bool(cfg.progress),
        finalize=bool(cfg.finalize),
        cpu_threads=cfg.cpu_threads,
    )
    print(report.summary(), flush=True)


def run() -> None:
    """The console script."""
    register_encoder_configs()
    main()
