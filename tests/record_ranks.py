"""Test-only callback: each rank appends what it is and what it trained on to its own JSON-lines
file, one record per start of the run (a requeued job starts again). Used by the multi-node test
to check that SLURM's ranks reached Lightning and that the nodes read disjoint shards."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class RecordRanks(Callback):
    def __init__(self, path: str) -> None:
        self.dir = Path(path)
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        env = {
            k: os.environ.get(k)
            for k in (
                "SLURMD_NODENAME",
                "SLURM_NODEID",
                "SLURM_PROCID",
                "SLURM_RESTART_COUNT",
                "MASTER_ADDR",
            )
        }
        self.record = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "start_step": trainer.global_step,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "env": env,
            "shards": [],
            "keys": [],
        }

    def on_train_batch_start(
        self, trainer: Trainer, module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.record["shards"] += list(batch["shard"])
        self.record["keys"] += list(batch["key"])
        self.record["end_step"] = trainer.global_step + 1
        self.dir.mkdir(parents=True, exist_ok=True)
        out = self.dir / f"rank{trainer.global_rank}.{os.getpid()}.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record))
        tmp.replace(out)
