"""A full disk while saving (issue #14): one `error:` line naming the file and ENOSPC, exit 2, no
traceback; the previous checkpoint and hand-off stay whole and newest, no temp is left; after
space is freed the same command resumes. Runs on a small tmpfs the test mounts (needs root)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, SHARED_CACHE, run_env

from ediff_train.errors import DiskFull, run_reporting
from ediff_train.io.files import write_json
from ediff_train.run.weights import load_weights, save_weights
from ediff_train.training.resume import AtomicCheckpointIO

# A tiny U-Net so a checkpoint is ~2 MB: the disk and the runs stay small and quick.
FAST = [
    "data.num_workers=0",
    "sample.per_prompt=0",
    "data.batch_size=8",
    "logger=none",
    "monitor.every=0",
    "model.model_channels=8",
    "model.head_channels=8",
    "model.context_dim=16",
    "probe.enabled=false",
]
LINE = re.compile(
    r"error: disk full \(ENOSPC\) while writing (\S+) \(\d+ bytes free there\): "
    r"free space and run the same command again to resume from the last complete "
    r"checkpoint"
)


def mount_tmpfs(where: Path, size_k: int) -> Iterator[Path]:
    """A tmpfs of `size_k` KiB at `where`, unmounted afterwards; skips when it cannot be had."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    if not shutil.which("mount"):
        pytest.skip("no mount command to make a small file system with")
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from mount_tmpfs(tmp_path / "disk", 8192)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free on `disk`."""
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dot_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


WRITERS: dict[str, Any] = {
    "last.ckpt": lambda p, n: AtomicCheckpointIO().save_checkpoint(
        {"global_step": n, "w": torch.randn(n * 1000)}, p
    ),
    "weights.safetensors": lambda p, n: save_weights(
        p, {"w": torch.randn(n * 1000)}, {"w": torch.randn(n * 1000)}, {"step": n}
    ),
    "node.json": lambda p, n: write_json(p, {"step": n, "pad": "x" * n * 4000}),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_writer_on_full_disk_keeps_previous_file(small_disk: Path, name: str) -> None:
    path = small_disk / "node" / name
    WRITERS[name](path, 1)
    before = digest(path)
    ballast = fill(small_disk, 64 * 1024)
    with pytest.raises(DiskFull) as e:
        WRITERS[name](path, 100)  # 400-800 KB: cannot fit in 64 KB
    assert LINE.fullmatch(f"error: {e.value}") and f" {path} (" in str(e.value)
    assert digest(path) == before and dot_files(small_disk) == []
    ballast.unlink()
    WRITERS[name](path, 100)  # room again: the same write now goes through
    assert digest(path) != before and dot_files(small_disk) == []


def test_plain_command_reports_enospc_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def task() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/nowhere/out.tar")

    assert run_reporting(task) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk full (ENOSPC) while writing /nowhere/out.tar (")
    assert len(err.splitlines()) == 1


def train(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, *args],
        cwd=cwd,
        env=run_env(cwd),
        capture_output=True,
        text=True,
        timeout=300,
    )


def train_here(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """The first run in this process (Lightning is imported already: ~10 s less than train.py)."""
    from hydra import compose, initialize_config_dir

    from ediff_train.cli import register_nodes
    from ediff_train.training.loop import train_node

    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything's, restored afterwards
        monkeypatch.setenv(key, "0")
    monkeypatch.setenv("EDIFF_CACHE", str(SHARED_CACHE))
    register_nodes(["E0_0"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        train_node(compose("train", overrides=[*FAST, *args]))


def test_train_on_full_disk_stops_in_one_line_then_resumes(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = f"run_dir={small_disk / 'R'}"
    ndir = small_disk / "R" / "E0_0"
    ckpt, weights, node = (
        ndir / "checkpoints" / "last.ckpt",
        ndir / "weights.safetensors",
        ndir / "node.json",
    )
    train_here(monkeypatch, run_dir, "steps=1", "checkpoint_every=1")
    before = {p: digest(p) for p in (ckpt, weights, node)}

    ballast = fill(small_disk, ckpt.stat().st_size // 2)  # room for small files, not a ckpt
    full = train(tmp_path, run_dir, "steps=3", "checkpoint_every=1")  # step 2's ckpt fails
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    lines = [ln for ln in full.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and LINE.fullmatch(lines[0]), full.stderr[-3000:]
    assert LINE.fullmatch(lines[0]).group(1) == str(ckpt)  # type: ignore[union-attr]
    assert {p: digest(p) for p in before} == before and dot_files(ndir) == []
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 1
    assert load_weights(weights)[2]["step"] == 1

    ballast.unlink()
    again = train(tmp_path, run_dir, "steps=3", "checkpoint_every=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert str(ckpt) in again.stderr  # resumed from the step-1 checkpoint
    assert json.loads(node.read_text())["step"] == 3 and dot_files(ndir) == []
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt", "previous.ckpt"]
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3
