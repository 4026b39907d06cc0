"""Crash-safe file writes: whole files appear atomically, with the umask's permissions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ediff_train.errors import disk_full, is_disk_full


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def save_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """safetensors file written atomically, readable as the umask allows (not owner-only)."""
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temp name next to `path` to write to, renamed over `path` when the block succeeds.

    On any failure the partial temp is removed, so nothing half-written stays (a full disk
    would otherwise be left fuller), and running out of space becomes one DiskFull line that
    names `path`, whose previous version is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.is_file():  # safetensors creates owner-only files: a shared run dir needs umask's
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, e) from None
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace a small text file whole (never a truncated one after a crash or a full disk)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
