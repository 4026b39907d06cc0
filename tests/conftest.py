"""Shared test setup: no hub lookups, no W&B account, a private cache for built data."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ediff_train.cli  # noqa: F401  (registers the settings groups Hydra's compose needs)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Under pytest-xdist every worker, and every process a test starts, gets its share of the cores:
# torch would otherwise start one thread per core in each, and on a 2-core runner two workers
# that each train spin against each other (a 2-rank DDP run went ~4x slower that way).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

# One data cache for the whole session: the digits build (with its encoder training) is made
# once, under its lock, by whichever test needs it first; tests of the cache itself use their own.
# EDIFF_TEST_CACHE=/some/dir keeps it between sessions (a developer's reruns). Under
# pytest-xdist the controller makes the folder and its workers inherit it through the
# environment, so the build is shared by all of them and removed once, by the controller.
if os.environ.get("EDIFF_TEST_CACHE"):
    SHARED_CACHE = Path(os.environ["EDIFF_TEST_CACHE"])
else:
    SHARED_CACHE = Path(tempfile.mkdtemp(prefix="ediff-test-cache-"))
    os.environ["EDIFF_TEST_CACHE"] = str(SHARED_CACHE)
    atexit.register(shutil.rmtree, SHARED_CACHE, True)


def run_env(tmp: Path) -> dict[str, str]:
    """Environment for entry-point subprocesses: offline, no inherited distributed vars, the
    session's shared data cache."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        EDIFF_CACHE=str(SHARED_CACHE),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def digits_root() -> Path:
    """The default digits build (training split, val/, trained tiny encoders), made once."""
    from ediff_train.data.toys.digits import build_digits

    return build_digits(SHARED_CACHE / "digits16")


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny in-process runs: faster than two threads fighting
    a busy CI machine, and the same float sums in every run a test compares."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def compose_train(*overrides: str) -> Any:
    """conf/train.yaml composed in process with these overrides (E0_0's level registered)."""
    from hydra import compose, initialize_config_dir

    from ediff_train.cli import register_nodes

    register_nodes(["E0_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def train_in_process(*overrides: str) -> Path:
    """One node trained in this process (training/loop.train_node), as train.py would."""
    from ediff_train.training.loop import train_node

    return train_node(compose_train(*overrides))
