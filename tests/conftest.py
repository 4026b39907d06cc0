"""Shared test setup: no hub lookups, no W&B account, a private cache for built data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def run_env(tmp: Path) -> dict[str, str]:
    """Environment for entry-point subprocesses: offline, no inherited distributed vars."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               EDIFF_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def python() -> str:
    return sys.executable
